//! Loading the scenarios: egress through the agent's library, iptables and nftables inside
//! their own client namespaces, and the proxy.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, ensure};
use egress_agent::compile::{Resolved, SetIds, compile};
use egress_agent::enforcer::Enforcer;
use egress_agent::policy;
use egress_tools::interrupt;

use crate::allowlist::Allowlist;
use crate::report::{self, Group, LoadTimes, ScenarioInfo};
use crate::world::{World, run_tool_in};
use crate::{RATE_LIMIT_SLOT, RATE_LIMITS, Scenario, progress, proxy};

fn size_key(size: usize) -> String {
    match size {
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

/// Everything the scenarios need, alive until the measurements are done.
pub struct Setup {
    pub scenarios: Vec<Scenario>,
    pub loads: Vec<LoadTimes>,
    pub notes: Vec<String>,
    // Guards: the programs stay attached and the proxy serves while these live.
    _enforcers: Vec<Enforcer>,
    _proxy: proxy::Proxy,
}

/// Loads each filter with each allowlist, in its own cgroup or namespace.
pub fn set_up(world: &mut World, lists: &[Allowlist]) -> Result<Setup> {
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
        interrupt::check()?;
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
        interrupt::check()?;
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
