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
mod proxy;
mod report;
mod world;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context as _, Result, bail, ensure};
use egress_agent::compile::{Resolved, SetIds, compile};
use egress_agent::enforcer::Enforcer;
use egress_agent::policy;
use rand::SeedableRng as _;
use rand::seq::SliceRandom as _;

use crate::allowlist::Allowlist;
use crate::report::{Group, LoadTimes, Machine, Results, ScenarioInfo};
use crate::world::{World, dest, run_tool_in};

const EXIT_INTERRUPTED: u8 = 130;
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

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM/SIGHUP only set a flag, checked between measurements: dying mid-way would
/// leave namespaces and cgroups behind. Handlers reset on exec.
fn catch_interrupts() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.with_context(|| format!("handling {signal}"))?;
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = catch_interrupts() {
        eprintln!("egress-bench: {e:#}");
        return ExitCode::FAILURE;
    }
    let outcome = parse_args().and_then(|args| bench(&args));
    // Every guard has been dropped by now.
    if INTERRUPTED.load(Ordering::SeqCst) {
        eprintln!("egress-bench: interrupted; everything the benchmark created has been removed");
        return ExitCode::from(EXIT_INTERRUPTED);
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

fn size_key(size: usize) -> String {
    match size {
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
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

/// The DNS proxy against direct queries. A proxy path that cannot be measured (an agent
/// without DNS control refuses the policy) is reported in the table, like the rate-limit
/// scenario, rather than failing the whole run; an interruption still stops it.
fn dns_phase(
    world: &World,
    client: &Path,
    agent: &Path,
    s: &Settings,
    rng: &mut rand::rngs::StdRng,
) -> Result<dns::DnsOutcome> {
    match dns::run(world, client, agent, s.dns, rng) {
        Ok(r) => Ok(dns::DnsOutcome::Measured(Box::new(r))),
        Err(e) => {
            check_interrupted()?;
            progress(&format!("DNS: not measured: {e:#}"));
            Ok(dns::DnsOutcome::NotMeasured(format!("{e:#}")))
        }
    }
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

/// Everything the scenarios need, alive until the measurements are done.
struct Setup {
    scenarios: Vec<Scenario>,
    loads: Vec<LoadTimes>,
    notes: Vec<String>,
    // Guards: the programs stay attached and the proxy serves while these live.
    _enforcers: Vec<Enforcer>,
    _proxy: proxy::Proxy,
}

/// Loads each filter with each allowlist, in its own cgroup or namespace.
fn set_up(world: &mut World, lists: &[Allowlist]) -> Result<Setup> {
    world.add_client("base")?;
    let base_cg = world.cgroups.child("base")?;
    let mut scenarios = vec![Scenario {
        info: ScenarioInfo::new("baseline", "no filter", Group::Baseline, None),
        client: "base".into(),
        cgroup: base_cg.clone(),
    }];
    let mut loads: Vec<LoadTimes> = Vec::new();
    let mut notes = Vec::new();

    // egress: the agent's own library path (parse, compile, load and verify the programs,
    // write the maps), timed, then attached to a cgroup of its own.
    let mut enforcers = Vec::new();
    for (i, list) in lists.iter().enumerate() {
        check_interrupted()?;
        progress(&format!("egress: loading {} entries", list.size));
        let key = format!("egress-{}", size_key(list.size));
        let cgroup = world.cgroups.child(&key)?;
        let (enforcer, load) = load_egress(list, "", u32::try_from(i)?, &cgroup)?;
        enforcers.push(enforcer);
        loads.push(load);
        scenarios.push(Scenario {
            info: ScenarioInfo::new(
                &key,
                &format!("egress, {} entries", report::thousands(list.size as f64)),
                Group::Egress,
                Some(list.size),
            ),
            client: "base".into(),
            cgroup,
        });
    }
    let key = "egress-10-rl";
    let cgroup = world.cgroups.child(key)?;
    match load_egress(&lists[0], RATE_LIMITS, RATE_LIMIT_SLOT, &cgroup) {
        Ok((enforcer, _)) => {
            enforcers.push(enforcer);
            scenarios.push(Scenario {
                info: ScenarioInfo::new(
                    key,
                    "egress, 10 entries + rate limits",
                    Group::Egress,
                    Some(lists[0].size),
                ),
                client: "base".into(),
                cgroup,
            });
        }
        Err(e) => notes.push(format!(
            "egress + rate-limit step: not measured: a policy with `rate_limits` did not load ({e:#})"
        )),
    }

    // iptables and nftables: one client namespace per size, rules inside it only.
    for (li, list) in lists.iter().enumerate() {
        check_interrupted()?;
        let k = size_key(list.size);
        let n = report::thousands(list.size as f64);
        progress(&format!(
            "iptables and nftables: loading {} entries",
            list.size
        ));
        let ipt = format!("ipt-{k}");
        world.add_client(&ipt)?;
        let ns = &world.client(&ipt)?.ns;
        let t4 = run_tool_in(ns, "iptables-restore", &[], &list.iptables_restore(false))?;
        let t6 = run_tool_in(ns, "ip6tables-restore", &[], &list.iptables_restore(true))?;
        loads[li].iptables_secs = Some((t4 + t6).as_secs_f64());
        scenarios.push(Scenario {
            info: ScenarioInfo::new(
                &format!("iptables-{k}"),
                &format!(
                    "iptables, {n} entries ({} + {} rules)",
                    report::thousands(list.count_v4() as f64),
                    report::thousands(list.count_v6() as f64)
                ),
                Group::Iptables,
                Some(list.size),
            ),
            client: ipt,
            cgroup: base_cg.clone(),
        });
        let nft = format!("nft-{k}");
        world.add_client(&nft)?;
        let ns = &world.client(&nft)?.ns;
        let t = run_tool_in(ns, "nft", &["-f", "-"], &list.nft_script())?;
        loads[li].nft_secs = Some(t.as_secs_f64());
        scenarios.push(Scenario {
            info: ScenarioInfo::new(
                &format!("nft-{k}"),
                &format!("nftables sets, {n} entries"),
                Group::Nftables,
                Some(list.size),
            ),
            client: nft,
            cgroup: base_cg.clone(),
        });
    }

    // The proxy, with the 10,000-entry list's addresses as its allowlist.
    world.add_client("proxy")?;
    let proxy = proxy::Proxy::start(&world.client("proxy")?.ns, lists[1].exact_addresses())?;
    scenarios.push(Scenario {
        info: ScenarioInfo::new(
            "proxy",
            "userspace CONNECT proxy (TCP only)",
            Group::Proxy,
            None,
        ),
        client: "proxy".into(),
        cgroup: base_cg,
    });
    Ok(Setup {
        scenarios,
        loads,
        notes,
        _enforcers: enforcers,
        _proxy: proxy,
    })
}

/// Per-round values: (scenario index, operation) -> the fastest batch of each round.
type Rounds = BTreeMap<(usize, Op), Vec<f64>>;

/// A warm-up round, then the interleaved rounds.
fn measure_rounds(
    world: &World,
    scenarios: &[Scenario],
    s: &Settings,
    verbose: bool,
    rng: &mut rand::rngs::StdRng,
) -> Result<Rounds> {
    let cells: Vec<(usize, Op)> = (0..scenarios.len())
        .flat_map(|si| OPS.iter().map(move |&op| (si, op)))
        .filter(|&(si, op)| scenarios[si].step(op, s).is_some())
        .collect();
    // Every cell once, unrecorded: warms caches and proves every scenario works before the
    // long part starts.
    progress(&format!(
        "{} scenarios, {} cells; warm-up round",
        scenarios.len(),
        cells.len()
    ));
    for &(si, op) in &cells {
        check_interrupted()?;
        run_cell(world, &scenarios[si], op, s)
            .with_context(|| format!("warm-up of {} {op:?}", scenarios[si].info.key))?;
    }
    let mut rounds = Rounds::new();
    for round in 0..s.rounds {
        let t = Instant::now();
        let mut order = cells.clone();
        order.shuffle(rng);
        for &(si, op) in &order {
            check_interrupted()?;
            let t = Instant::now();
            let batches = run_cell(world, &scenarios[si], op, s)
                .with_context(|| format!("round {round}: {} {op:?}", scenarios[si].info.key))?;
            if verbose {
                progress(&format!(
                    "{} {op:?}: {:.0?} ns/op ({:.2} s)",
                    scenarios[si].info.key,
                    batches,
                    t.elapsed().as_secs_f64()
                ));
            }
            // A round's value is its fastest batch: interference from the rest of the
            // machine only ever adds time.
            let fastest = batches.iter().copied().fold(f64::INFINITY, f64::min);
            rounds.entry((si, op)).or_default().push(fastest);
        }
        progress(&format!(
            "round {}/{} done in {:.1} s",
            round + 1,
            s.rounds,
            t.elapsed().as_secs_f64()
        ));
    }
    Ok(rounds)
}

/// The kernel's account of each egress program, per scenario: rounds over the egress
/// scenarios with BPF run-time statistics on (only for this phase: they cost two clock reads
/// per run), the median per program.
fn kernel_phase(
    world: &World,
    scenarios: &[Scenario],
    s: &Settings,
    rng: &mut rand::rngs::StdRng,
) -> Result<BTreeMap<String, kernel::PerRun>> {
    progress("kernel run time of egress's programs");
    let egress: Vec<&Scenario> = scenarios
        .iter()
        .filter(|sc| sc.info.group == Group::Egress)
        .collect();
    let mut attached = Vec::new();
    for sc in &egress {
        let a = kernel::Attached::query(&sc.cgroup)?;
        ensure!(
            !a.is_empty(),
            "no program attached to {}",
            sc.cgroup.display()
        );
        attached.push(a);
    }
    let mut samples: Vec<kernel::Samples> = vec![kernel::Samples::default(); egress.len()];
    let _stats = kernel::enable_stats()?;
    for _ in 0..s.kernel_rounds {
        let mut order: Vec<usize> = (0..egress.len()).collect();
        order.shuffle(rng);
        for i in order {
            check_interrupted()?;
            let before = attached[i].snapshot()?;
            for op in OPS {
                run_cell(world, egress[i], op, s)?;
            }
            let after = attached[i].snapshot()?;
            samples[i].add(&kernel::per_run(&before, &after));
        }
    }
    Ok(egress
        .iter()
        .zip(samples)
        .map(|(sc, samples)| (sc.info.key.clone(), samples.medians()))
        .collect())
}

/// The real agent under the 10- and the 100,000-entry policy: start-up, events, memory.
fn agent_phase(
    world: &World,
    agent: &Path,
    lists: &[Allowlist],
    s: &Settings,
) -> Result<Vec<agent_runs::AgentRun>> {
    let policies = tempfile::Builder::new()
        .prefix("egress-bench-policy-")
        .tempdir()?;
    let mut runs = Vec::new();
    for (list, threads) in [(&lists[0], 1), (&lists[2], 1), (&lists[2], 2)] {
        check_interrupted()?;
        progress(&format!(
            "egress-agent exec: {} entries, flood of {} denied connects from {threads} thread(s)",
            list.size, s.flood
        ));
        let path = policies.path().join(format!("bench-{}.yaml", list.size));
        std::fs::write(&path, list.egress_yaml(&format!("bench-{}", list.size), ""))?;
        runs.push(agent_runs::run(
            world,
            world.client("base")?,
            agent,
            &path,
            list.size,
            s.flood,
            threads,
        )?);
    }
    Ok(runs)
}

/// Loads one policy through the agent's library and attaches it to `cgroup`, timing each
/// stage.
fn load_egress(
    list: &Allowlist,
    extra: &str,
    slot: u32,
    cgroup: &Path,
) -> Result<(Enforcer, LoadTimes)> {
    let yaml = list.egress_yaml(&format!("bench-{}", list.size), extra);
    let t = Instant::now();
    let policy = policy::parse_str(&yaml, Path::new("bench.yaml"))?;
    let parse = t.elapsed();
    let unsupported = policy::unsupported_features(&policy, egress_agent::dns::doh_list());
    ensure!(
        unsupported.is_empty(),
        "the policy is refused: {}",
        unsupported
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );
    let t = Instant::now();
    let compiled = compile(
        &policy,
        1,
        &Resolved::new(),
        egress_agent::dns::doh_list(),
        &mut SetIds::default(),
    );
    let compile_time = t.elapsed();
    let t = Instant::now();
    let mut enforcer = Enforcer::start(policy, Resolved::new(), slot)?;
    let start = t.elapsed();
    enforcer.attach(cgroup)?;
    let load = LoadTimes {
        size: list.size,
        kernel_entries: compiled.entries(),
        port_entries: compiled.ports.len(),
        parse_secs: parse.as_secs_f64(),
        compile_secs: compile_time.as_secs_f64(),
        start_secs: start.as_secs_f64(),
        iptables_secs: None,
        nft_secs: None,
    };
    Ok((enforcer, load))
}

/// One cell: the workload's batches of one operation under one scenario, in ns/op.
fn run_cell(world: &World, sc: &Scenario, op: Op, s: &Settings) -> Result<Vec<f64>> {
    let step = sc.step(op, s).context("no such cell")?;
    let lines = world.run_workload(world.client(&sc.client)?, &sc.cgroup, &[step])?;
    let batches: Vec<f64> = lines[0]["ns_per_op"]
        .as_array()
        .context("no ns_per_op in the workload's report")?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    ensure!(!batches.is_empty(), "the workload measured nothing");
    Ok(batches)
}
