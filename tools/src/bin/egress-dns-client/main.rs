//! egress-dns-client: a small DNS stub client for the benchmark and the demo. It runs as an
//! unprivileged workload (uid nobody), with or without the agent around it, and reports each
//! step as one JSON line on stdout.
//!
//! ```text
//! egress-dns-client [--timeout-ms MS] [--pin-cpu N] STEP...
//!
//! query udp|udp-sendto|tcp SERVER NAME A|AAAA
//!     one query (with an EDNS OPT record); reports the rcode, the answer's addresses, an
//!     Extended DNS Error if any, the address the answer came from and the round trip.
//!     udp: a connected socket (connect + send + recv, as glibc does); udp-sendto: one
//!     unconnected socket, sendto + recvfrom; tcp: connect, two-byte length + query.
//! seq SERVER NAME WARMUP N
//!     WARMUP unrecorded then N recorded A queries, one after the other, on one connected
//!     UDP socket; each waits for its answer; reports count, failures and the round-trip
//!     median / p90 / p99 in microseconds, and the queries per second.
//! par SERVER NAME THREADS N
//!     THREADS threads started together, each with its own connected UDP socket doing N
//!     sequential A queries; reports the queries per second over the whole step.
//! sleep MS
//!     waits (at most a minute), e.g. so that a driver can read the agent's metrics.
//! ```
//!
//! SERVER is an IP address (port 53) or a socket address. A query counts as answered when the
//! answer carries its ID, is a response, has rcode NOERROR and at least one answer record;
//! anything else (a timeout, another rcode, an error from a system call) is a failure, counted
//! by kind. Every loop is bounded: by its count, by STEP_DEADLINE, and by at most
//! MAX_CONSECUTIVE_FAILURES failures in a row. `--pin-cpu N` pins the thread that runs `seq`
//! to CPU N for that step (the driver's choice, to keep scheduling noise out of the
//! latencies); `par` threads are never pinned. Exit status: 0, or 64 for malformed arguments.

mod message;
mod net;
mod steps;
#[cfg(test)]
mod tests;

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;

use crate::message::{TYPE_A, TYPE_AAAA};
use crate::steps::{par_step, query_step, seq_step};

const EX_USAGE: u8 = 64;
const DNS_PORT: u16 = 53;
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1000);
const MAX_TIMEOUT_MS: u64 = 10_000;
/// A measuring step stops after this long whatever its count says.
const STEP_DEADLINE: Duration = Duration::from_secs(120);
const MAX_QUERIES: u64 = 1_000_000;
const MAX_THREADS: u64 = 64;
const MAX_SLEEP_MS: u64 = 60_000;
/// A step gives up after this many failed queries in a row: the path is broken, and
/// timing it further would only take long.
const MAX_CONSECUTIVE_FAILURES: u64 = 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (opts, steps) = match parse_args(&args) {
        Ok(v) => v,
        Err(why) => {
            eprintln!("egress-dns-client: {why}\nsee the module documentation for the steps");
            return ExitCode::from(EX_USAGE);
        }
    };
    for step in &steps {
        let report = match step {
            Step::Query {
                text,
                transport,
                server,
                name,
                qtype,
            } => query_step(text, *transport, *server, name, *qtype, opts.timeout),
            Step::Seq {
                text,
                server,
                name,
                warmup,
                n,
            } => seq_step(text, *server, name, *warmup, *n, &opts),
            Step::Par {
                text,
                server,
                name,
                threads,
                n,
            } => par_step(text, *server, name, *threads, *n, opts.timeout),
            Step::Sleep { text, ms } => {
                std::thread::sleep(Duration::from_millis(*ms));
                json!({"step": text, "ok": true})
            }
        };
        let mut out = std::io::stdout().lock();
        // A closed stdout only loses the report; the driver notices the missing line.
        let _ = writeln!(out, "{report}");
        let _ = out.flush();
    }
    ExitCode::SUCCESS
}

struct Opts {
    timeout: Duration,
    pin_cpu: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Udp,
    UdpSendto,
    Tcp,
}

enum Step {
    Query {
        text: String,
        transport: Transport,
        server: SocketAddr,
        name: String,
        qtype: u16,
    },
    Seq {
        text: String,
        server: SocketAddr,
        name: String,
        warmup: u64,
        n: u64,
    },
    Par {
        text: String,
        server: SocketAddr,
        name: String,
        threads: u64,
        n: u64,
    },
    Sleep {
        text: String,
        ms: u64,
    },
}

fn parse_args(args: &[String]) -> Result<(Opts, Vec<Step>), String> {
    let mut opts = Opts {
        timeout: DEFAULT_TIMEOUT,
        pin_cpu: None,
    };
    let mut it = args.iter();
    let mut steps = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--timeout-ms" => {
                let ms: u64 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|ms| (1..=MAX_TIMEOUT_MS).contains(ms))
                    .ok_or(format!("--timeout-ms needs 1..={MAX_TIMEOUT_MS}"))?;
                opts.timeout = Duration::from_millis(ms);
            }
            "--pin-cpu" => {
                opts.pin_cpu = Some(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .filter(|&c: &usize| c < libc::CPU_SETSIZE as usize)
                        .ok_or("--pin-cpu needs a CPU number")?,
                );
            }
            step => steps.push(parse_step(step)?),
        }
    }
    if steps.is_empty() {
        return Err("no step given".to_owned());
    }
    Ok((opts, steps))
}

fn parse_step(text: &str) -> Result<Step, String> {
    let f: Vec<&str> = text.split_whitespace().collect();
    let bad = |why: &str| format!("{text:?}: {why}");
    let exact = |n: usize| {
        if f.len() == n {
            Ok(())
        } else {
            Err(bad(&format!("expected {n} fields")))
        }
    };
    let num = |i: usize, min: u64, max: u64| -> Result<u64, String> {
        f.get(i)
            .and_then(|s| s.parse().ok())
            .filter(|v| (min..=max).contains(v))
            .ok_or_else(|| bad(&format!("field {i} must be {min}..={max}")))
    };
    let server = |i: usize| -> Result<SocketAddr, String> {
        let s = f.get(i).copied().unwrap_or_default();
        s.parse::<SocketAddr>()
            .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, DNS_PORT)))
            .map_err(|_| bad("SERVER must be an IP address or a socket address"))
    };
    let name = |i: usize| -> Result<String, String> {
        let n = f.get(i).copied().unwrap_or_default().trim_end_matches('.');
        if n.is_empty() || n.len() > 253 || n.split('.').any(|l| l.is_empty() || l.len() > 63) {
            return Err(bad("NAME must be a DNS name"));
        }
        Ok(n.to_owned())
    };
    match f.first().copied() {
        Some("query") => {
            exact(5)?;
            let transport = match f[1] {
                "udp" => Transport::Udp,
                "udp-sendto" => Transport::UdpSendto,
                "tcp" => Transport::Tcp,
                _ => return Err(bad("transport must be udp, udp-sendto or tcp")),
            };
            let qtype = match f[4] {
                "A" => TYPE_A,
                "AAAA" => TYPE_AAAA,
                _ => return Err(bad("type must be A or AAAA")),
            };
            Ok(Step::Query {
                text: text.to_owned(),
                transport,
                server: server(2)?,
                name: name(3)?,
                qtype,
            })
        }
        Some("seq") => {
            exact(5)?;
            Ok(Step::Seq {
                text: text.to_owned(),
                server: server(1)?,
                name: name(2)?,
                warmup: num(3, 0, MAX_QUERIES)?,
                n: num(4, 1, MAX_QUERIES)?,
            })
        }
        Some("par") => {
            exact(5)?;
            Ok(Step::Par {
                text: text.to_owned(),
                server: server(1)?,
                name: name(2)?,
                threads: num(3, 1, MAX_THREADS)?,
                n: num(4, 1, MAX_QUERIES)?,
            })
        }
        Some("sleep") => {
            exact(2)?;
            Ok(Step::Sleep {
                text: text.to_owned(),
                ms: num(1, 0, MAX_SLEEP_MS)?,
            })
        }
        _ => Err(bad("unknown step (query, seq, par or sleep)")),
    }
}
