//! Thin binary: parse the command line, set up logging, run the command, map errors to exit
//! codes (0 ok, 64 usage, 78 bad policy, 1 runtime failure).

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use egress_agent::cmd::{check, detach, exec, explain, learn, run, status};
use egress_agent::observe::{logging, report};
use egress_agent::{cli, exit};

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    if let Err(e) = logging::init(cli.log_format, &cli.log_level) {
        let _ = writeln!(std::io::stderr(), "egress-agent: {e}");
        return ExitCode::from(exit::USAGE);
    }
    // One thread: the workload's parent-death signal is tied to the thread that forked it.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "egress-agent: starting the runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            cli::Command::Exec(args) => exec::run(args)
                .await
                .unwrap_or_else(|e| fail(&e, e.exit_code())),
            cli::Command::Learn(args) => learn::run(args)
                .await
                .unwrap_or_else(|e| fail(&e, e.exit_code())),
            cli::Command::Run(args) => run::run(args)
                .await
                .unwrap_or_else(|e| fail(&e, e.exit_code())),
            cli::Command::Detach(args) => match detach::run(&args) {
                Ok(text) => {
                    let _ = std::io::stdout().write_all(text.as_bytes());
                    exit::OK
                }
                Err(e) => fail(&e, e.exit_code()),
            },
            cli::Command::Status(args) => print_or_fail(status::status(args.json)),
            cli::Command::ExplainLast(args) => print_or_fail(status::explain_last(
                args.cgroup.as_deref(),
                args.limit,
                args.json,
            )),
            // A malformed --explain is a usage error, reported before any output.
            cli::Command::Check(args) if let Err(e) = explain::parse_all(&args.explain) => {
                let _ = writeln!(std::io::stderr(), "{e}");
                e.exit_code()
            }
            cli::Command::Check(args) => {
                match check::check(&args.file, &args.names, &args.maps.limits()) {
                    Ok(checked) => {
                        let _ = std::io::stdout().write_all(checked.text.as_bytes());
                        for w in &checked.warnings {
                            let _ = writeln!(std::io::stderr(), "{w}");
                        }
                        explain_or_fail(&args.file, &args.explain, &args.maps.limits())
                    }
                    Err(e) => {
                        let _ = writeln!(std::io::stderr(), "{}", report::chain(&e));
                        e.exit_code()
                    }
                }
            }
        }
    });
    ExitCode::from(code)
}

fn print_or_fail(r: Result<String, status::StatusError>) -> u8 {
    match r {
        Ok(text) => {
            let _ = std::io::stdout().write_all(text.as_bytes());
            exit::OK
        }
        Err(e) => fail(&e, e.exit_code()),
    }
}

/// `check --explain`: printed after the check's own text.
fn explain_or_fail(
    file: &std::path::Path,
    queries: &[String],
    limits: &egress_policy::capacity::MapLimits,
) -> u8 {
    if queries.is_empty() {
        return exit::OK;
    }
    match explain::explain_file(file, queries, limits) {
        Ok(text) => {
            let _ = std::io::stdout().write_all(text.as_bytes());
            exit::OK
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{e}");
            e.exit_code()
        }
    }
}

fn fail(e: &dyn std::error::Error, code: u8) -> u8 {
    let chain = report::chain(e);
    tracing::error!(error = %chain, exit_code = code, "egress-agent failed");
    code
}
