//! egress-bench: egress against no filter, iptables, nftables and a userspace CONNECT proxy,
//! measured side by side in one run (`cargo xtask bench`, root).
//!
//! It builds its own world (network namespaces joined by veth pairs, a cgroup parent; see
//! `world`), puts the same allowlists of 10, 10,000 and 100,000 entries into each filter
//! (`allowlist`), and then times one TCP connect and one UDP sendto, IPv4 and IPv6, under
//! every scenario. Scenarios are interleaved: each round runs every (scenario, operation)
//! cell once in a shuffled order and keeps the cell's fastest batch, and each reported figure
//! is the median over rounds, so slow drifts of the machine hit every scenario alike. After the rounds it reads the
//! kernel's own run time of egress's programs, runs the real agent (`egress-agent exec`)
//! under a flood of denied connects for the events and memory figures, times DNS queries
//! through the agent's DNS proxy against the same queries sent directly (`dns`), and writes the
//! report (Markdown and JSON) to the output directory and, with `--docs`, into the marked
//! section of docs/benchmarks.md.
//!
//! Benchmarks are not tests: nothing here asserts anything about time. The run fails only
//! when a scenario cannot be measured (an operation failed, a tool is missing).
//!
//! Everything it creates (namespaces, cgroups, programs, threads, temp files) is owned by
//! guards and removed on the way out, also on failure or interruption (exit 130).

#![expect(
    clippy::print_stdout,
    reason = "the report on stdout is the benchmark's purpose"
)]

mod agent_runs;
mod allowlist;
mod dns;
mod inbound;
mod kernel;
mod phases;
mod proxy;
mod report;
mod setup;
mod world;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, Result, bail, ensure};
use egress_tools::interrupt;
use rand::SeedableRng as _;

use crate::allowlist::Allowlist;
use crate::phases::{agent_phase, dns_phase, kernel_phase, measure_rounds};
use crate::report::{Group, Machine, Results, ScenarioInfo};
use crate::setup::set_up;
use crate::world::{World, dest};

const SIZES: [usize; 3] = [10, 10_000, 100_000];
const SEED: u64 = 0x6567_7265_7373;
/// The rate-limit scenario's slot (each scenario's programs and maps are its own anyway).
const RATE_LIMIT_SLOT: u32 = 9;
/// Budgets no benchmark run can use up: the rate-limit step runs, nothing is throttled.
const RATE_LIMITS: &str = "  rate_limits:
    per_destination: {max_connections: 4000000000, time_window: 1}
    global: {max_new_connections: 4000000000, time_window: 1}
";
const USAGE: &str =
    "usage: egress-bench [--quick] [--only dns|inbound] [--verbose] [--docs FILE] [--out DIR] [--command TEXT]
  --quick      fewer rounds, shorter batches, a smaller flood
  --only dns   only the DNS proxy scenario; writes dns.md and dns.json, never --docs
  --only inbound  only the inbound check's per-packet cost; writes inbound.md and
               inbound.json, never --docs
  --verbose    print every cell's batches as they are measured
  --docs FILE  replace the results section of FILE (docs/benchmarks.md)
  --out DIR    where latest.md and latest.json go (default target/bench)
  --command T  the command to name in the report
Run as root, or through `cargo xtask bench`.";
/// At most this many operations per batch; batches end on time first.
const MAX_OPS: u64 = 1_000_000;

/// How much to measure.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Settings {
    pub rounds: usize,
    pub batches: u64,
    pub tcp_batch_ms: u64,
    pub udp_batch_ms: u64,
    /// Rounds of the kernel run-time phase (each runs every egress scenario's operations).
    pub kernel_rounds: usize,
    pub flood: u64,
    pub dns: dns::DnsSettings,
}

const FULL: Settings = Settings {
    rounds: 12,
    batches: 8,
    tcp_batch_ms: 8,
    udp_batch_ms: 3,
    kernel_rounds: 6,
    flood: 1_000_000,
    dns: dns::FULL,
};
const QUICK: Settings = Settings {
    rounds: 4,
    batches: 5,
    tcp_batch_ms: 5,
    udp_batch_ms: 2,
    kernel_rounds: 3,
    flood: 200_000,
    dns: dns::QUICK,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Op {
    Tcp4,
    Udp4,
    Tcp6,
    Udp6,
}

pub const OPS: [Op; 4] = [Op::Tcp4, Op::Udp4, Op::Tcp6, Op::Udp6];

impl Op {
    pub fn v6(self) -> bool {
        matches!(self, Op::Tcp6 | Op::Udp6)
    }

    pub fn tcp(self) -> bool {
        matches!(self, Op::Tcp4 | Op::Tcp6)
    }
}

/// Where and how one scenario's workload runs.
struct Scenario {
    info: ScenarioInfo,
    client: String,
    cgroup: PathBuf,
}

impl Scenario {
    fn step(&self, op: Op, s: &Settings) -> Option<String> {
        let dest = dest(op.v6());
        let b = s.batches;
        match (self.info.group, op.tcp()) {
            (Group::Proxy, true) => Some(format!(
                "proxy {} {dest} {b} {MAX_OPS} {}",
                proxy::proxy_addr(op.v6()),
                s.tcp_batch_ms
            )),
            (Group::Proxy, false) => None,
            (_, true) => Some(format!("tcp {dest} {b} {MAX_OPS} {}", s.tcp_batch_ms)),
            (_, false) => Some(format!("udp {dest} {b} {MAX_OPS} {}", s.udp_batch_ms)),
        }
    }
}

struct Args {
    settings: Settings,
    verbose: bool,
    quick: bool,
    only_dns: bool,
    only_inbound: bool,
    docs: Option<PathBuf>,
    out: PathBuf,
    command: String,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        settings: FULL,
        verbose: false,
        quick: false,
        only_dns: false,
        only_inbound: false,
        docs: None,
        out: egress_tests::agent::workspace_root().join("target/bench"),
        command: "target/release/egress-bench".to_owned(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => {
                args.settings = QUICK;
                args.quick = true;
            }
            "--verbose" => args.verbose = true,
            "--only" => match it.next().as_deref() {
                Some("dns") => args.only_dns = true,
                Some("inbound") => args.only_inbound = true,
                other => bail!("--only takes `dns` or `inbound`, not {other:?}\n{USAGE}"),
            },
            "-h" | "--help" => {
                // Nothing has been created yet: exiting here leaves nothing behind.
                eprintln!("{USAGE}");
                std::process::exit(0);
            }
            "--docs" => args.docs = Some(it.next().context("--docs needs a path")?.into()),
            "--out" => args.out = it.next().context("--out needs a directory")?.into(),
            "--command" => args.command = it.next().context("--command needs a string")?,
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    // Checked between measurements: dying mid-way would leave namespaces and cgroups behind.
    if let Err(e) = interrupt::catch() {
        eprintln!("egress-bench: {e:#}");
        return ExitCode::FAILURE;
    }
    let outcome = parse_args().and_then(|args| bench(&args));
    // Every guard has been dropped by now.
    if interrupt::interrupted() {
        eprintln!("egress-bench: interrupted; everything the benchmark created has been removed");
        return ExitCode::from(interrupt::EXIT_INTERRUPTED);
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn progress(msg: &str) {
    eprintln!("egress-bench: {msg}");
}

fn bench(args: &Args) -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the benchmark needs root: it creates network namespaces, veth links and cgroups, \
         loads eBPF programs and installs iptables/nftables rules inside its namespaces; run \
         `cargo xtask bench` as root"
    );
    let s = args.settings;
    let started = Instant::now();
    let priority = raise_priority();
    let here = std::env::current_exe()?
        .parent()
        .context("the benchmark binary has no directory")?
        .to_path_buf();
    let agent = egress_tests::agent::agent_bin()?;
    let mut machine = Machine::describe(&args.command);
    machine.priority = priority;

    progress("building the world: namespaces, veth pairs, listeners");
    let mut world = World::new(&here.join("egress-bench-load"))?;
    let dns_client = here.join("egress-dns-client");
    if args.only_dns {
        world.add_client("base")?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
        machine.loadavg_start = report::loadavg();
        let dns = dns::run(&world, &dns_client, &agent, s.dns, &mut rng)?;
        machine.loadavg_end = report::loadavg();
        let outcome = dns::DnsOutcome::Measured(Box::new(dns));
        let markdown = report::dns_only_markdown(&machine, args.quick, &outcome, started.elapsed());
        println!("{markdown}");
        return write_outputs(&args.out, "dns", &markdown, &outcome);
    }
    if args.only_inbound {
        let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
        machine.loadavg_start = report::loadavg();
        let cost = inbound::run(&mut world, &s, &mut rng)?;
        machine.loadavg_end = report::loadavg();
        let markdown = cost.markdown();
        println!("{markdown}");
        return write_outputs(&args.out, "inbound", &markdown, &cost);
    }
    let lists: Vec<Allowlist> = SIZES
        .iter()
        .map(|&n| Allowlist::generate(n, SEED))
        .collect();
    // Declared after `world`, so dropped (detached, stopped) before it.
    let setup = set_up(&mut world, &lists)?;

    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    machine.loadavg_start = report::loadavg();
    let rounds = measure_rounds(&world, &setup.scenarios, &s, args.verbose, &mut rng)?;
    machine.loadavg_end = report::loadavg();
    let kernel_stats = kernel_phase(&world, &setup.scenarios, &s, &mut rng)?;
    let agent_runs = agent_phase(&world, &agent, &lists, &s)?;
    let dns = dns_phase(&world, &dns_client, &agent, &s, &mut rng)?;
    let inbound = inbound::run(&mut world, &s, &mut rng)?;

    let results = Results::compute(
        machine,
        s,
        args.quick,
        setup.scenarios.iter().map(|sc| sc.info.clone()).collect(),
        &rounds,
        kernel_stats,
        setup.loads,
        agent_runs,
        setup.notes,
        dns,
        started.elapsed(),
    );
    let markdown = format!("{}\n{}", results.markdown(), inbound.markdown());
    println!("{markdown}");
    write_outputs(&args.out, "latest", &markdown, &results)?;
    write_outputs(&args.out, "inbound", &inbound.markdown(), &inbound)?;
    if let Some(docs) = &args.docs {
        report::update_docs(docs, &markdown)?;
        progress(&format!(
            "updated the results section of {}",
            docs.display()
        ));
    }
    Ok(())
}

/// Writes `<stem>.md` and `<stem>.json` into `out`.
fn write_outputs(
    out: &Path,
    stem: &str,
    markdown: &str,
    json: &impl serde::Serialize,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let md_path = out.join(format!("{stem}.md"));
    std::fs::write(&md_path, markdown)?;
    let json_path = out.join(format!("{stem}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(json)?)?;
    progress(&format!(
        "results written to {} and {}",
        md_path.display(),
        json_path.display()
    ));
    Ok(())
}

/// Gives this process, and so the workload and the agent it starts, the highest CPU
/// priority, so that other work on the machine disturbs the measurement less; returns what
/// was done, for the report.
///
/// With autogroup scheduling (`kernel.sched_autogroup_enabled`), nice values only count
/// within a session: the benchmark first starts a session of its own (so that nothing but
/// its own processes changes), then sets that session's group to nice -20 as well. Leaving
/// the caller's session also leaves its terminal, so the benchmark asks to be sent SIGTERM
/// when its parent (xtask) dies, and still cleans up on Ctrl-C.
fn raise_priority() -> String {
    // SAFETY: plain system calls on this process.
    let nice = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -20) } == 0;
    let mut what = if nice {
        "nice -20".to_owned()
    } else {
        "default priority (setpriority refused)".to_owned()
    };
    let autogroup = std::path::Path::new("/proc/self/autogroup");
    // SAFETY: as above; prctl's argument is a signal number.
    if autogroup.exists()
        && unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } == 0
        && unsafe { libc::setsid() } >= 0
    {
        if std::fs::write(autogroup, "-20").is_ok() {
            what.push_str(", in a session of its own whose autogroup is at nice -20");
        } else {
            what.push_str(", in a session of its own (its autogroup's nice could not be set)");
        }
    }
    what
}
