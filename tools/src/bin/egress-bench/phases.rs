//! The measuring phases after set-up: the interleaved rounds, the kernel's own run time,
//! the real agent under a flood, and the DNS proxy.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result, ensure};
use egress_tools::interrupt;
use rand::seq::SliceRandom as _;

use crate::allowlist::Allowlist;
use crate::report::Group;
use crate::world::World;
use crate::{OPS, Op, Scenario, Settings, agent_runs, dns, kernel, progress};

/// The DNS proxy against direct queries. A proxy path that cannot be measured (an agent
/// without DNS control refuses the policy) is reported in the table, like the rate-limit
/// scenario, rather than failing the whole run; an interruption still stops it.
pub fn dns_phase(
    world: &World,
    client: &Path,
    agent: &Path,
    s: &Settings,
    rng: &mut rand::rngs::StdRng,
) -> Result<dns::DnsOutcome> {
    match dns::run(world, client, agent, s.dns, rng) {
        Ok(r) => Ok(dns::DnsOutcome::Measured(Box::new(r))),
        Err(e) => {
            interrupt::check()?;
            progress(&format!("DNS: not measured: {e:#}"));
            Ok(dns::DnsOutcome::NotMeasured(format!("{e:#}")))
        }
    }
}

/// Per-round values: (scenario index, operation) -> the fastest batch of each round.
type Rounds = BTreeMap<(usize, Op), Vec<f64>>;

/// A warm-up round, then the interleaved rounds.
pub fn measure_rounds(
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
        interrupt::check()?;
        run_cell(world, &scenarios[si], op, s)
            .with_context(|| format!("warm-up of {} {op:?}", scenarios[si].info.key))?;
    }
    let mut rounds = Rounds::new();
    for round in 0..s.rounds {
        let t = Instant::now();
        let mut order = cells.clone();
        order.shuffle(rng);
        for &(si, op) in &order {
            interrupt::check()?;
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
pub fn kernel_phase(
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
            interrupt::check()?;
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
pub fn agent_phase(
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
        interrupt::check()?;
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

/// One cell: the workload's batches of one operation under one scenario, in ns/op.
fn run_cell(world: &World, sc: &Scenario, op: Op, s: &Settings) -> Result<Vec<f64>> {
    let step = sc.step(op, s).context("no such cell")?;
    world.batches(world.client(&sc.client)?, &sc.cgroup, step)
}
