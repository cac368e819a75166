//! The DNS proxy's cost: the same client, the same queries, the same DNS server, with and
//! without egress's proxy in the path, interleaved in one run.
//!
//! dnsmasq in the remote namespace answers one name (an A record) on `198.18.0.2:53`. The
//! client, `egress-dns-client` as uid nobody in the `base` client namespace, sends sequential
//! A queries for it on a connected UDP socket to `198.18.0.2:53` and waits for each answer,
//! then runs several threads of the same for a queries-per-second figure:
//!
//! - *direct*: the client alone, in a cgroup with no programs: its queries go to dnsmasq;
//! - *through the proxy*: the client under `egress-agent exec` (run in the same client
//!   namespace, so its upstream queries leave from there, never from the root namespace) with
//!   a policy that allows the name and names `198.18.0.2` as its only resolver; the kernel
//!   redirects the client's port-53 packets to the agent's proxy, which checks the name,
//!   forwards the query to dnsmasq, writes the answer's address into the workload's allow
//!   map and only then answers. The per-workload query budget is raised out of the way.
//!
//! dnsmasq answers both paths from its configuration (`--address`), so the difference is the
//! proxy's work: two more loopback hops, parsing, the policy check, the map write. Each round
//! runs both paths once, in a shuffled order; "added" is the median over rounds of (proxy −
//! direct) within each round.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::process::{RunOutput, run_captured};
use egress_tests::{NOBODY_GID, NOBODY_UID};
use rand::seq::SliceRandom as _;
use serde::Serialize;
use serde_json::Value;

use crate::report::{median, quantile};
use crate::world::{DEST4, World, stage};
use egress_tools::interrupt;

use crate::progress;

/// The name the benchmark resolves (answered by dnsmasq with [`DEST4`]).
pub const NAME: &str = "dns-bench.example.test";
/// The per-workload query budget, raised so that the benchmark measures the proxy, not its
/// rate limiter.
const QUERY_RATE: &str = "1000000";
const QUERY_BURST: &str = "1000000";
/// Deadline for one client run (both steps), with or without the agent.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the client waits for one answer.
const ANSWER_TIMEOUT_MS: u64 = 1000;
/// The aim issue #3 sets for the proxy's added latency per query (median).
pub const AIM_ADDED_US: f64 = 50.0;

/// How much of the DNS scenario to run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DnsSettings {
    pub rounds: usize,
    /// Unrecorded queries before the recorded ones, per run.
    pub warmup: u64,
    /// Recorded sequential queries per run.
    pub queries: u64,
    pub par_threads: u64,
    /// Queries per thread in the parallel step.
    pub par_queries: u64,
}

pub const FULL: DnsSettings = DnsSettings {
    rounds: 10,
    warmup: 200,
    queries: 2000,
    par_threads: 4,
    par_queries: 1000,
};
pub const QUICK: DnsSettings = DnsSettings {
    rounds: 3,
    warmup: 100,
    queries: 1000,
    par_threads: 4,
    par_queries: 500,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum DnsPath {
    Direct,
    Proxy,
}

impl DnsPath {
    fn key(self) -> &'static str {
        match self {
            DnsPath::Direct => "direct",
            DnsPath::Proxy => "proxy",
        }
    }
}

/// One run of one path: its sequential and parallel steps.
#[derive(Clone, Debug, Serialize)]
pub struct DnsRun {
    pub round: usize,
    pub path: DnsPath,
    pub answered: u64,
    pub failures: u64,
    pub median_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// Sequential queries per second (one query in flight).
    pub seq_qps: f64,
    pub par_answered: u64,
    pub par_failures: u64,
    /// Queries per second with `par_threads` threads.
    pub par_qps: f64,
    pub par_median_us: f64,
}

/// One path over the rounds: medians of the per-round figures.
#[derive(Clone, Debug, Serialize)]
pub struct PathStats {
    pub median_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub seq_qps: f64,
    pub par_qps: f64,
    pub par_median_us: f64,
    pub queries: u64,
    pub failures: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DnsResults {
    pub settings: DnsSettings,
    pub name: String,
    pub server: SocketAddr,
    pub runs: Vec<DnsRun>,
    pub direct: PathStats,
    pub proxy: PathStats,
    /// Median over rounds of (proxy median − direct median), and its quartiles.
    pub added_us: f64,
    pub added_p25_us: f64,
    pub added_p75_us: f64,
    /// Median over rounds of (proxy p99 − direct p99).
    pub added_p99_us: f64,
    /// Median over rounds of proxy / direct parallel throughput.
    pub par_qps_ratio: f64,
}

/// The outcome of the DNS scenario: the figures, or why they could not be measured.
#[derive(Clone, Debug, Serialize)]
pub enum DnsOutcome {
    Measured(Box<DnsResults>),
    NotMeasured(String),
}

/// Runs the scenario; the world's `base` client namespace and cgroup parent are used.
pub fn run(
    world: &World,
    client_bin: &Path,
    agent: &Path,
    s: DnsSettings,
    rng: &mut rand::rngs::StdRng,
) -> Result<DnsResults> {
    let client = world.client("base")?;
    let server = SocketAddr::new(IpAddr::V4(DEST4), 53);
    progress(&format!(
        "DNS: dnsmasq on {server} answering {NAME}; {} rounds of {} sequential queries and {} x {} in parallel, direct and through the proxy",
        s.rounds, s.queries, s.par_threads, s.par_queries
    ));
    let dnsmasq = Dnsmasq::start(
        &world.remote,
        IpAddr::V4(DEST4),
        &[(NAME, IpAddr::V4(DEST4))],
    )
    .context("starting dnsmasq in the remote namespace")?;
    let staged = stage(client_bin)?;
    let direct_cg = world.cgroups.child("dns-direct")?;
    let policy_dir = tempfile::Builder::new()
        .prefix("egress-bench-dns-")
        .tempdir()?;
    let policy = policy_dir.path().join("dns.yaml");
    std::fs::write(&policy, policy_yaml(server))?;

    let steps = [
        format!("seq {server} {NAME} {} {}", s.warmup, s.queries),
        format!("par {server} {NAME} {} {}", s.par_threads, s.par_queries),
    ];
    let run_path = |path: DnsPath, round: usize| -> Result<DnsRun> {
        let out = match path {
            DnsPath::Direct => {
                let mut cmd = Command::new(staged.path());
                cmd.args(client_args(&steps)).current_dir("/");
                join_cgroup(&mut cmd, &direct_cg)?;
                client.ns.run_in_as(&mut cmd, NOBODY_UID, NOBODY_GID);
                run_captured(&mut cmd, RUN_TIMEOUT, || {
                    let _ = world.cgroups.kill_all();
                })?
            }
            DnsPath::Proxy => {
                let mut cmd = Command::new(agent);
                cmd.args([
                    "--log-format",
                    "json",
                    "--log-level",
                    "warn",
                    "exec",
                    "--policy",
                ])
                .arg(&policy)
                .args(["--user", "nobody", "--cgroup-parent"])
                .arg(world.cgroups.path())
                .args([
                    "--dns-query-rate",
                    QUERY_RATE,
                    "--dns-query-burst",
                    QUERY_BURST,
                    "--",
                ])
                .arg(staged.path())
                .args(client_args(&steps))
                .current_dir("/");
                client.ns.run_in(&mut cmd);
                run_captured(&mut cmd, RUN_TIMEOUT, || {
                    let _ = world.cgroups.kill_all();
                })?
            }
        };
        parse_run(&out, path, round)
    };

    // A first run of each path, unrecorded: proves both work before the rounds start.
    for path in [DnsPath::Direct, DnsPath::Proxy] {
        interrupt::check()?;
        run_path(path, 0).with_context(|| format!("DNS warm-up run, {}", path.key()))?;
    }
    let mut runs = Vec::new();
    for round in 0..s.rounds {
        let mut order = [DnsPath::Direct, DnsPath::Proxy];
        order.shuffle(rng);
        for path in order {
            interrupt::check()?;
            let r = run_path(path, round)
                .with_context(|| format!("DNS round {round}, {}", path.key()))?;
            progress(&format!(
                "DNS round {}/{} {}: median {:.1} µs, p99 {:.1} µs, {:.0} queries/s sequential, {:.0} queries/s with {} threads",
                round + 1,
                s.rounds,
                path.key(),
                r.median_us,
                r.p99_us,
                r.seq_qps,
                r.par_qps,
                s.par_threads
            ));
            runs.push(r);
        }
    }
    // dnsmasq's log names every query it answered: both paths reached it.
    let answered_upstream = dnsmasq
        .queries()
        .iter()
        .filter(|q| q.contains(NAME))
        .count();
    ensure!(
        answered_upstream > 0,
        "dnsmasq logged no query for {NAME}: {}",
        dnsmasq.log()
    );
    Ok(summarize(s, server, runs))
}

/// The client's arguments: the answer timeout and the steps. Nothing is pinned: a query
/// wakes three processes in turn (client, agent, dnsmasq), and pinning the client alone made
/// the direct path bimodal on a 2-CPU machine (a cross-CPU wake-up or not), so each process
/// goes where the scheduler puts it, as it would in production.
fn client_args(steps: &[String]) -> Vec<String> {
    let mut args = vec!["--timeout-ms".to_owned(), ANSWER_TIMEOUT_MS.to_string()];
    args.extend(steps.iter().cloned());
    args
}

fn policy_yaml(server: SocketAddr) -> String {
    format!(
        "egress_policy:
  name: bench-dns
  default_action: DENY
  allowed_destinations:
    - {{host: {NAME}, ports: [8000], protocols: [tcp, udp], purpose: \"benchmark name\"}}
  dns_policy:
    allowed_resolvers: [{}]
    block_doh: true
    block_dot: true
",
        server.ip()
    )
}

/// Makes the child join `cgroup` before exec.
fn join_cgroup(cmd: &mut Command, cgroup: &Path) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::process::CommandExt as _;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
    // SAFETY: the closure only calls write(2) on a descriptor opened before fork.
    unsafe {
        cmd.pre_exec(move || {
            let mut f = &procs;
            f.write_all(b"0")
        });
    }
    Ok(())
}

fn f64_of(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn parse_run(out: &RunOutput, path: DnsPath, round: usize) -> Result<DnsRun> {
    let describe = || {
        let tail: Vec<&str> = out.stderr.lines().rev().take(20).collect();
        format!(
            "{} ({}{}); stdout: {}; stderr (last lines): {}",
            out.command,
            out.status,
            if out.timed_out { ", timed out" } else { "" },
            out.stdout.trim(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    };
    ensure!(
        out.status.success() && !out.timed_out,
        "the client run failed: {}",
        describe()
    );
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let step = |verb: &str| {
        lines
            .iter()
            .find(|l| l["step"].as_str().is_some_and(|s| s.starts_with(verb)))
    };
    let (Some(seq), Some(par)) = (step("seq "), step("par ")) else {
        bail!("the client did not report both steps: {}", describe());
    };
    if let Some(e) = par["error"].as_str() {
        bail!("parallel step: {e}");
    }
    let count = |v: &Value, key: &str| v[key].as_u64().unwrap_or(0);
    // A benchmark of failing queries would time the wrong thing.
    for (what, v) in [("sequential", seq), ("parallel", par)] {
        ensure!(
            count(v, "failures") == 0 && count(v, "answered") == count(v, "count"),
            "{what} step: {} of {} answered, failures {} ({}); {}",
            count(v, "answered"),
            count(v, "count"),
            count(v, "failures"),
            v["failure_kinds"],
            describe()
        );
    }
    Ok(DnsRun {
        round,
        path,
        answered: count(seq, "answered"),
        failures: count(seq, "failures"),
        median_us: f64_of(seq, "median_us"),
        p90_us: f64_of(seq, "p90_us"),
        p99_us: f64_of(seq, "p99_us"),
        seq_qps: f64_of(seq, "qps"),
        par_answered: count(par, "answered"),
        par_failures: count(par, "failures"),
        par_qps: f64_of(par, "qps"),
        par_median_us: f64_of(par, "median_us"),
    })
}

fn summarize(s: DnsSettings, server: SocketAddr, runs: Vec<DnsRun>) -> DnsResults {
    let stats = |p: DnsPath| {
        let r: Vec<&DnsRun> = runs.iter().filter(|r| r.path == p).collect();
        let m = |f: fn(&DnsRun) -> f64| median(&r.iter().map(|x| f(x)).collect::<Vec<_>>());
        PathStats {
            median_us: m(|x| x.median_us),
            p90_us: m(|x| x.p90_us),
            p99_us: m(|x| x.p99_us),
            seq_qps: m(|x| x.seq_qps),
            par_qps: m(|x| x.par_qps),
            par_median_us: m(|x| x.par_median_us),
            queries: r.iter().map(|x| x.answered + x.par_answered).sum(),
            failures: r.iter().map(|x| x.failures + x.par_failures).sum(),
        }
    };
    // Within each round: proxy against the same round's direct run.
    let by_round: BTreeMap<(usize, DnsPath), &DnsRun> =
        runs.iter().map(|r| ((r.round, r.path), r)).collect();
    let mut added = Vec::new();
    let mut added_p99 = Vec::new();
    let mut ratio = Vec::new();
    for round in 0..s.rounds {
        if let (Some(d), Some(p)) = (
            by_round.get(&(round, DnsPath::Direct)),
            by_round.get(&(round, DnsPath::Proxy)),
        ) {
            added.push(p.median_us - d.median_us);
            added_p99.push(p.p99_us - d.p99_us);
            ratio.push(p.par_qps / d.par_qps);
        }
    }
    DnsResults {
        settings: s,
        name: NAME.to_owned(),
        server,
        direct: stats(DnsPath::Direct),
        proxy: stats(DnsPath::Proxy),
        added_us: median(&added),
        added_p25_us: quantile(&added, 0.25),
        added_p75_us: quantile(&added, 0.75),
        added_p99_us: median(&added_p99),
        par_qps_ratio: median(&ratio),
        runs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(round: usize, path: DnsPath, median_us: f64, par_qps: f64) -> DnsRun {
        DnsRun {
            round,
            path,
            answered: 10,
            failures: 0,
            median_us,
            p90_us: median_us + 1.0,
            p99_us: median_us + 2.0,
            seq_qps: 1e6 / median_us,
            par_answered: 20,
            par_failures: 0,
            par_qps,
            par_median_us: median_us,
        }
    }

    #[test]
    fn added_latency_is_compared_within_each_round() {
        let s = DnsSettings { rounds: 3, ..QUICK };
        let server = SocketAddr::from(([198, 18, 0, 2], 53));
        let r = summarize(
            s,
            server,
            vec![
                run(0, DnsPath::Direct, 20.0, 40_000.0),
                run(0, DnsPath::Proxy, 50.0, 20_000.0),
                // A slow round for both paths: its difference still counts as 30.
                run(1, DnsPath::Proxy, 90.0, 10_000.0),
                run(1, DnsPath::Direct, 60.0, 20_000.0),
                run(2, DnsPath::Direct, 22.0, 40_000.0),
                run(2, DnsPath::Proxy, 62.0, 20_000.0),
            ],
        );
        assert_eq!(r.added_us, 30.0);
        assert_eq!(r.direct.median_us, 22.0);
        assert_eq!(r.proxy.median_us, 62.0);
        assert_eq!(r.par_qps_ratio, 0.5);
        assert_eq!(r.proxy.queries, 90);
        assert!(policy_yaml(server).contains("allowed_resolvers: [198.18.0.2]"));
    }
}
