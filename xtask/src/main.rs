//! `cargo xtask <command>`: the one entry point for building and testing egress, used by
//! developers and by CI (`.ci/run` is `cargo xtask test`).

mod host;
mod plan;

use std::{
    path::Path,
    process::{Command, ExitCode},
};

use anyhow::bail;
use clap::{Parser, Subcommand};

use crate::plan::Step;

/// Exit code for a command line that could not be parsed (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test, demo and benchmark egress. Each command runs scripts/bootstrap.sh first.",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain (nightly rust-src, LLVM, bpf-linker) if missing.
    Bootstrap,
    /// Build the release agent: target/release/egress-agent.
    Build,
    /// Everything CI checks: fmt, clippy, unit tests, then the privileged integration tests.
    ///
    /// The integration tests need root. Outside CI a non-root run skips them with a loud
    /// notice; with CI=true a non-root run fails before building anything.
    Test,
    /// Run the MCP-NET-02 demo in local network namespaces (needs root).
    Demo,
    /// Benchmark egress against no filter, iptables, nftables and a CONNECT proxy, and its DNS
    /// proxy against direct DNS queries (needs root).
    ///
    /// Sets up and tears down its own network namespaces and cgroups; changes nothing outside
    /// them. Prints the table, writes target/bench/latest.{md,json} and, unless --quick, the
    /// results section of docs/benchmarks.md.
    Bench {
        /// A shorter run (fewer rounds, shorter batches, a smaller flood) that leaves
        /// docs/benchmarks.md alone.
        #[arg(long)]
        quick: bool,
        /// Run only one scenario: `dns` (the DNS proxy against direct queries) or `inbound`
        /// (the inbound check's cost per received packet). Writes target/bench/<name>.{md,json}
        /// and leaves docs/benchmarks.md alone.
        #[arg(long, value_parser = ["dns", "inbound"])]
        only: Option<String>,
    },
    /// Clippy on the eBPF crate (nightly, bpfel-unknown-none, build-std=core).
    ClippyEbpf,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version go to stdout and succeed; everything else is a usage error.
            let code = if err.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd) -> anyhow::Result<()> {
    let root = host::repo_root()?;
    let agent_bin = host::target_dir(&root).join("release/egress-agent");
    match command {
        Cmd::Bootstrap => plan::execute("bootstrap", vec![bootstrap(&root)]),
        Cmd::Build => {
            plan::execute("build", vec![bootstrap(&root), build_agent(&root)])?;
            eprintln!("xtask: agent at {}", agent_bin.display());
            Ok(())
        }
        Cmd::Test => test(&root, &agent_bin),
        Cmd::Demo => demo(&root, &agent_bin),
        Cmd::Bench { quick, only } => bench(&root, &agent_bin, quick, only.as_deref()),
        Cmd::ClippyEbpf => plan::execute(
            "clippy-ebpf",
            vec![
                bootstrap(&root),
                Step::run("clippy-ebpf", clippy_ebpf(&root)),
            ],
        ),
    }
}

/// Clippy over the kernel programs (nightly, BPF target): the workspace clippy leaves them out.
fn clippy_ebpf(root: &Path) -> Command {
    let mut clippy = Command::new("cargo");
    clippy.current_dir(root).args([
        "+nightly",
        "clippy",
        "--package",
        "egress-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]);
    clippy
}

fn test(root: &Path, agent_bin: &Path) -> anyhow::Result<()> {
    let privileged = if host::is_root()? {
        let mut tests = cargo(
            root,
            &[
                "test",
                "--package",
                "egress-tests",
                "--release",
                "--",
                "--test-threads=2",
            ],
        );
        tests.env("EGRESS_AGENT_BIN", agent_bin);
        Step::run("privileged-tests", tests)
    } else if host::in_ci() {
        // Fail before a long build: the run could not end in a pass.
        bail!(
            "the privileged integration tests need root (network namespaces, cgroups, eBPF \
             programs) and CI=true forbids skipping them; run `cargo xtask test` as root"
        );
    } else {
        Step::skip(
            "privileged-tests",
            "not root, so the privileged integration tests (egress-tests) did NOT run; \
             run `cargo xtask test` as root to include them (with CI=true this is a failure)",
        )
    };

    plan::execute(
        "test",
        vec![
            bootstrap(root),
            Step::run("fmt", cargo(root, &["fmt", "--all", "--", "--check"])),
            Step::run(
                "clippy",
                cargo(
                    root,
                    &[
                        "clippy",
                        "--workspace",
                        "--exclude",
                        "egress-ebpf",
                        "--all-targets",
                        "--",
                        "-D",
                        "warnings",
                    ],
                ),
            ),
            Step::run("clippy-ebpf", clippy_ebpf(root)),
            Step::run(
                "unit-tests",
                cargo(
                    root,
                    &[
                        "test",
                        "--workspace",
                        "--exclude",
                        "egress-ebpf",
                        "--exclude",
                        "egress-tests",
                    ],
                ),
            ),
            build_agent(root),
            privileged,
        ],
    )
}

fn demo(root: &Path, agent_bin: &Path) -> anyhow::Result<()> {
    if !host::is_root()? {
        bail!(
            "the demo needs root: it creates network namespaces, veth links and a cgroup and \
             loads the eBPF programs; run `cargo xtask demo` as root"
        );
    }
    let mut demo = cargo(
        root,
        &[
            "run",
            "--release",
            "--package",
            "egress-tools",
            "--bin",
            "egress-demo",
        ],
    );
    demo.env("EGRESS_AGENT_BIN", agent_bin);
    plan::execute(
        "demo",
        vec![
            bootstrap(root),
            build_agent(root),
            // `cargo run --bin egress-demo` builds only the demo; it runs the probe (a test
            // workload) and the DNS client too, which cargo puts next to it.
            Step::run(
                "build-demo",
                cargo(
                    root,
                    &[
                        "build",
                        "--release",
                        "--package",
                        "egress-tests",
                        "--package",
                        "egress-tools",
                        "--bins",
                    ],
                ),
            ),
            Step::run("demo", demo),
        ],
    )
}

fn bench(root: &Path, agent_bin: &Path, quick: bool, only: Option<&str>) -> anyhow::Result<()> {
    if !host::is_root()? {
        bail!(
            "the benchmark needs root: it creates network namespaces, veth links and cgroups, \
             loads the eBPF programs and installs iptables/nftables rules inside its own \
             namespaces; run `cargo xtask bench` as root"
        );
    }
    let target = host::target_dir(root);
    let shown = if quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    // A partial run never rewrites the documented results.
    let partial = quick || only.is_some();
    let mut bench = Command::new(target.join("release/egress-bench"));
    bench
        .current_dir(root)
        .env("EGRESS_AGENT_BIN", agent_bin)
        .arg("--command")
        .arg(shown)
        .arg("--out")
        .arg(target.join("bench"));
    if quick {
        bench.arg("--quick");
    }
    if let Some(only) = only {
        bench.arg("--only").arg(only);
    }
    if !partial {
        bench.arg("--docs").arg(root.join("docs/benchmarks.md"));
    }
    plan::execute(
        "bench",
        vec![
            bootstrap(root),
            build_agent(root),
            Step::run(
                "build-bench",
                cargo(
                    root,
                    &[
                        "build",
                        "--release",
                        "--package",
                        "egress-tools",
                        "--bin",
                        "egress-bench",
                        "--bin",
                        "egress-bench-load",
                        "--bin",
                        "egress-dns-client",
                    ],
                ),
            ),
            Step::run("bench", bench),
        ],
    )
}

fn bootstrap(root: &Path) -> Step {
    let mut command = Command::new("bash");
    command
        .current_dir(root)
        .arg(root.join("scripts/bootstrap.sh"));
    Step::run("bootstrap", command)
}

fn build_agent(root: &Path) -> Step {
    Step::run(
        "build-agent",
        cargo(root, &["build", "--release", "--package", "egress-agent"]),
    )
}

fn cargo(root: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("cargo");
    command.current_dir(root).args(args);
    command
}
