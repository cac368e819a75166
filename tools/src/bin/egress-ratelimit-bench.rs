//! egress-ratelimit-bench: what the rate-limit step costs per decision, measured in the kernel.
//!
//! ```sh
//! cargo build --release -p egress-agent -p egress-tests -p egress-tools
//! sudo target/release/egress-ratelimit-bench [--attempts N] [--rounds R] [--json]
//! ```
//!
//! For each scenario it loads the programs with one policy through the agent's library,
//! attaches them to a fresh cgroup, and runs the probe (as nobody, in a network namespace
//! with only loopback, so allowed connects end in ENETUNREACH and nothing leaves) for N
//! attempts. With BPF run-time statistics on (`BPF_ENABLE_STATS`, held only while the bench
//! runs; no sysctl is written), the kernel's own run time and run count of the hook give the
//! cost per decision. The rate-limit step's cost is a scenario's cost minus the baseline's
//! (same allowlist, no limits) in the same round; printed is the median over R rounds (the
//! scenarios rotate their order each round) with the range. Wall time per attempt (socket +
//! connect/sendto + close) is printed for scale.
//!
//! Scenarios (all allowed unless said):
//! - `baseline`: no rate limits (the allowlist only).
//! - `destination`: a per-destination budget too large to run out: one compare-and-exchange.
//! - `destination+global`: both budgets: two.
//! - `denied-destination`: the budget is used up: every attempt denied by the rate limit,
//!   measured against `denied-baseline` (denied by the allowlist: the same event and counter
//!   work, without the rate-limit step).
//! - `udp-baseline` / `udp-flow`: unconnected UDP sends to one destination, without limits /
//!   with a budget; all but the first continue a live flow (one LRU lookup).
//!
//! Must run as root. Other agents may run meanwhile: the bench reads only its own programs
//! (those using its bucket map).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{ProgramInfo, loaded_programs};
use egress_agent::compile::Resolved;
use egress_agent::enforcer::Enforcer;
use egress_agent::policy;
use egress_tests::cgroup::TestCgroupParent;
use egress_tests::copy_probe_for_nobody;
use egress_tests::netns::Netns;
use egress_tests::testbed::run_probe_in_cgroup;

struct Scenario {
    name: &'static str,
    /// The scenario this one's rate-limit step is measured against.
    baseline: &'static str,
    program: &'static str,
    limits: &'static str,
    op: &'static str,
}

const RULES: &str = "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - {host: 198.18.0.1, ports: [9], protocols: [tcp, udp]}\n";
const HUGE: &str = "{max_connections: 4000000000, time_window: 1}";

fn scenarios() -> Vec<Scenario> {
    let tcp = "connect tcp4 198.18.0.1 9";
    let udp = "sendto udp4 198.18.0.1 9 x";
    let scenario = |name, baseline, program, limits, op| Scenario {
        name,
        baseline,
        program,
        limits,
        op,
    };
    vec![
        scenario("baseline", "baseline", "egress_connect4", "", tcp),
        scenario(
            "destination",
            "baseline",
            "egress_connect4",
            "  rate_limits:\n    per_destination: HUGE\n",
            tcp,
        ),
        scenario(
            "destination+global",
            "baseline",
            "egress_connect4",
            "  rate_limits:\n    per_destination: HUGE\n    global: {max_new_connections: 4000000000, time_window: 1}\n",
            tcp,
        ),
        // A denial by the allowlist (port not allowed): the same event and counter work as a
        // rate-limit denial, without the rate-limit step.
        scenario(
            "denied-baseline",
            "denied-baseline",
            "egress_connect4",
            "",
            "connect tcp4 198.18.0.1 10",
        ),
        scenario(
            "denied-destination",
            "denied-baseline",
            "egress_connect4",
            "  rate_limits:\n    per_destination: {max_connections: 1, time_window: 3600}\n",
            tcp,
        ),
        scenario("udp-baseline", "udp-baseline", "egress_sendmsg4", "", udp),
        scenario(
            "udp-flow",
            "udp-baseline",
            "egress_sendmsg4",
            "  rate_limits:\n    per_destination: HUGE\n",
            udp,
        ),
    ]
}

struct Measured {
    kernel_ns: f64,
    wall_ns: f64,
}

/// The program `name` that uses the map `map_id`: ours, whatever else is loaded.
fn ours(name: &str, map_id: u32) -> Result<ProgramInfo> {
    for info in loaded_programs() {
        let info = info.context("listing loaded programs")?;
        if info.name_as_str() == Some(name)
            && info
                .map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.contains(&map_id))
        {
            return Ok(info);
        }
    }
    bail!("no loaded {name} uses map {map_id}")
}

fn measure(
    s: &Scenario,
    attempts: u64,
    slot: u32,
    probe: &Path,
    cgroup: &Path,
    ns: &Netns,
) -> Result<Measured> {
    let yaml = format!("{RULES}{}", s.limits.replace("HUGE", HUGE));
    let policy = policy::parse_str(&yaml, Path::new("bench.yaml"))?;
    let mut enforcer = Enforcer::start(policy, Resolved::new(), slot)?;
    enforcer.attach(cgroup)?;
    let map_id = enforcer
        .rate_limits()
        .bucket_map_id()
        .context("the bucket map has no id")?;
    let prog = ours(s.program, map_id)?;
    let op = format!("hammer 1 {attempts} {}", s.op);
    let start = Instant::now();
    let out = run_probe_in_cgroup(ns, cgroup, probe, &[&op], Duration::from_secs(600))?;
    let wall = start.elapsed();
    let r = out
        .result(&op)
        .with_context(|| format!("the probe did not run `{op}`: {}", out.describe()))?;
    ensure!(
        r.attempts == Some(attempts),
        "attempts {:?}: {}",
        r.attempts,
        out.describe()
    );
    let after = ours(s.program, map_id)?;
    let runs = after.run_count().saturating_sub(prog.run_count());
    let time = after.run_time().saturating_sub(prog.run_time());
    ensure!(
        runs >= attempts,
        "{} ran {runs} times for {attempts} attempts",
        s.program
    );
    drop(enforcer);
    Ok(Measured {
        kernel_ns: time.as_nanos() as f64 / runs as f64,
        wall_ns: wall.as_nanos() as f64 / attempts as f64,
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress-ratelimit-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn run() -> Result<()> {
    let mut attempts: u64 = 50_000;
    let mut rounds: usize = 5;
    let mut json = false;
    let usage =
        "usage: egress-ratelimit-bench [--attempts N (1..=100000)] [--rounds R (1..=50)] [--json]";
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut number = |max: u64| -> Result<u64> {
            args.next()
                .and_then(|n| n.parse().ok())
                .filter(|n| (1..=max).contains(n))
                .context(usage)
        };
        match a.as_str() {
            "--attempts" => attempts = number(100_000)?,
            "--rounds" => rounds = usize::try_from(number(50)?)?,
            "--json" => json = true,
            _ => bail!(usage),
        }
    }
    ensure!(nix::unistd::geteuid().is_root(), "must run as root");
    let here: PathBuf = std::env::current_exe()?
        .parent()
        .context("no exe dir")?
        .into();
    let probe = copy_probe_for_nobody(&here.join("egress-probe"))?;
    let parent = TestCgroupParent::new()?;
    let ns = Netns::new("bench")?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("BPF_ENABLE_STATS (kernel >= 5.8)")?;
    let all = scenarios();
    // results[round][scenario]; each round starts at another scenario, so that no scenario
    // always runs first (or right after another).
    let mut results: Vec<Vec<Option<Measured>>> = Vec::new();
    for round in 0..rounds {
        let mut this: Vec<Option<Measured>> = (0..all.len()).map(|_| None).collect();
        for k in 0..all.len() {
            let i = (round + k) % all.len();
            let s = &all[i];
            let slot = u32::try_from(i).unwrap_or(0);
            let cgroup = parent.child(&format!("bench-{round}-{i}"))?;
            let m = measure(s, attempts, slot, probe.path(), &cgroup, &ns)
                .with_context(|| format!("scenario {} round {round}", s.name))?;
            this[i] = Some(m);
        }
        results.push(this);
    }
    let baseline_of = |name: &str| all.iter().position(|s| s.name == name);
    let mut out = std::io::stdout().lock();
    for (i, s) in all.iter().enumerate() {
        let ms: Vec<&Measured> = results.iter().filter_map(|r| r[i].as_ref()).collect();
        let kernel = median(ms.iter().map(|m| m.kernel_ns).collect());
        let wall = median(ms.iter().map(|m| m.wall_ns).collect());
        let steps: Vec<f64> = results
            .iter()
            .filter_map(|r| {
                let b = r[baseline_of(s.baseline)?].as_ref()?;
                Some(r[i].as_ref()?.kernel_ns - b.kernel_ns)
            })
            .collect();
        let (lo, hi) = steps
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| {
                (l.min(*x), h.max(*x))
            });
        let step = median(steps);
        if json {
            writeln!(
                out,
                "{{\"scenario\":\"{}\",\"program\":\"{}\",\"rounds\":{rounds},\"attempts\":{attempts},\"kernel_ns_per_decision\":{kernel:.1},\"rate_limit_step_ns\":{step:.1},\"rate_limit_step_ns_min\":{lo:.1},\"rate_limit_step_ns_max\":{hi:.1},\"wall_ns_per_attempt\":{wall:.0}}}",
                s.name, s.program
            )?;
        } else {
            writeln!(
                out,
                "{:<20} {:<16} {:>7.1} ns/decision  rate-limit step {:>+7.1} ns [{:+.0} .. {:+.0}]  (wall {:>6.0} ns/attempt)",
                s.name, s.program, kernel, step, lo, hi, wall
            )?;
        }
    }
    Ok(())
}
