//! Connection rate limits on the real kernel: `rate_limits.per_destination`,
//! `rate_limits.global` and per-rule `rate_limit`, decided in the same hooks as the
//! allowlist (see docs/rate-limits.md).
//!
//! Most tests run `egress-agent exec` around the probe as uid nobody and assert the errno of
//! each attempt, what reached the listeners, and the agent's JSON log (the `egress_blocked`
//! event and the verdict counters). The table-full and reload tests drive the programs
//! through the agent's library to reach into the bucket map.
#![expect(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failure is a test failure"
)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use egress_agent::compile::{Compiled, Resolved, SetIds, compile};
use egress_agent::enforcer::Enforcer;
use egress_agent::loader::Programs;
use egress_agent::maps::MapSet;
use egress_agent::policy::{self, Policy};
use egress_agent::ratelimit::{CompiledLimits, RateMaps, compile_limits, monotonic_ns};
use egress_agent::{ratelimit, reference};
use egress_common::ratelimit::{BUCKET_DESTINATION, Bucket, BucketKey, MAX_BUCKETS};
use egress_common::{Dest, Proto, Reason, SlotConfig};
use egress_tests::agent::AgentRun;
use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::netns::{Netns, REMOTE_V4};
use egress_tests::process::RunOutput;
use egress_tests::server::{Listener, SETTLE};
use egress_tests::testbed::{Testbed, run_probe_in_cgroup};
use libc::EPERM;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");

fn testbed() -> Option<Testbed> {
    Testbed::for_test(Path::new(PROBE))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP literal")
}

/// An allow rule in flow style, optionally with its own `rate_limit`.
fn rule(
    key: &str,
    target: &str,
    ports: &[u16],
    protocols: &str,
    limit: Option<(u32, u32)>,
) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut r = format!(
        "{{{key}: \"{target}\", ports: [{}], protocols: [{protocols}]",
        ports.join(", ")
    );
    if let Some((max, window)) = limit {
        let _ = write!(
            r,
            ", rate_limit: {{max_connections: {max}, time_window: {window}}}"
        );
    }
    r.push('}');
    r
}

/// A policy with `rules` and the `rate_limits` section (either part may be absent).
fn policy_yaml(
    rules: &[String],
    per_destination: Option<(u32, u32)>,
    global: Option<(u32, u32)>,
) -> String {
    let mut y = String::from("egress_policy:\n  default_action: DENY\n  allowed_destinations:\n");
    for r in rules {
        let _ = writeln!(y, "    - {r}");
    }
    if per_destination.is_some() || global.is_some() {
        y.push_str("  rate_limits:\n");
    }
    if let Some((max, window)) = per_destination {
        let _ = writeln!(
            y,
            "    per_destination: {{max_connections: {max}, time_window: {window}}}"
        );
    }
    if let Some((max, window)) = global {
        let _ = writeln!(
            y,
            "    global: {{max_new_connections: {max}, time_window: {window}}}"
        );
    }
    y
}

/// An agent run of the probe with `ops` under the policy text `yaml`, logging JSON.
fn agent(tb: &Testbed, yaml: &str) -> AgentRun {
    let path = tb.write_policy(yaml).expect("writing the policy");
    AgentRun::new(&path, &tb.cgroups, tb.probe.path())
        .expect("agent command")
        .agent_arg("--log-format")
        .agent_arg("json")
}

/// Every JSON log line of the agent (fields at the top level, see docs/events.md).
fn log_fields(out: &RunOutput) -> Vec<Value> {
    out.stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// The agent's final verdict count for `reason` (summed over protocols).
fn verdict_count(out: &RunOutput, reason: Reason) -> u64 {
    log_fields(out)
        .iter()
        .filter(|f| f["message"] == "verdict count" && f["reason"] == reason.as_str())
        .filter_map(|f| f["count"].as_u64())
        .sum()
}

/// The `egress_blocked` events with `reason`.
fn blocked_events(out: &RunOutput, reason: Reason) -> Vec<Value> {
    log_fields(out)
        .into_iter()
        .filter(|f| f["event"] == "egress_blocked" && f["reason"] == reason.as_str())
        .collect()
}

/// MCP-NET-02 dynamic test case 4 with the seed's numbers (100 per 60 s): in a burst the first
/// 100 connections succeed and the 101st fails with EPERM, an event names the reason and the
/// rule; one connection comes back every 0.6 s; another destination has its own budget.
#[test]
fn the_101st_connection_of_a_burst_gets_eperm_and_an_event_says_why() {
    let Some(tb) = testbed() else { return };
    tb.topo.add_remote_addr(ip("198.18.0.3")).expect("address");
    let api = tb.listen_tcp(sa("198.18.0.2:8443")).expect("listener");
    let other = tb.listen_tcp(sa("198.18.0.3:8443")).expect("listener");
    let yaml = policy_yaml(
        &[
            rule("host", "198.18.0.2", &[8443], "https", None),
            rule("host", "198.18.0.3", &[8443], "https", None),
        ],
        Some((100, 60)),
        None,
    );
    let mut ops = vec!["connect tcp4 198.18.0.2 8443"; 101];
    // One refill interval later (0.6 s): exactly one more.
    ops.extend([
        "sleep 700",
        "connect tcp4 198.18.0.2 8443",
        "connect tcp4 198.18.0.2 8443",
        "connect tcp4 198.18.0.3 8443",
    ]);
    let out = agent(&tb, &yaml)
        .args(&ops)
        .run_in(tb.client())
        .expect("agent run");
    out.assert_exit(0);
    assert_eq!(out.results.len(), ops.len(), "{}", out.describe());
    for (i, r) in out.results[..100].iter().enumerate() {
        assert!(
            r.ok,
            "connection {} of the burst failed: {:?}\n{}",
            i + 1,
            r.error,
            out.describe()
        );
    }
    assert!(
        out.results[100].failed_with(EPERM),
        "the 101st: {:?}\n{}",
        out.results[100],
        out.describe()
    );
    assert!(
        out.results[102].ok,
        "after 0.7 s one connection is back\n{}",
        out.describe()
    );
    assert!(
        out.results[103].failed_with(EPERM),
        "only one is back\n{}",
        out.describe()
    );
    assert!(
        out.results[104].ok,
        "another destination has its own budget\n{}",
        out.describe()
    );

    std::thread::sleep(SETTLE);
    assert_eq!(api.connections(), 101, "{}", out.describe());
    assert_eq!(other.connections(), 1);
    let events = blocked_events(&out, Reason::RateLimitedDestination);
    assert!(
        !events.is_empty(),
        "no rate_limited_destination event\n{}",
        out.describe()
    );
    let e = &events[0];
    assert_eq!(e["dst.ip"], "198.18.0.2", "{e}");
    assert_eq!(e["dst.port"], 8443, "{e}");
    assert_eq!(e["rule.id"], 0, "{e}");
    assert_eq!(e["hook"], "connect4", "{e}");
    assert_eq!(
        verdict_count(&out, Reason::RateLimitedDestination),
        2,
        "{}",
        out.describe()
    );
    assert_eq!(
        verdict_count(&out, Reason::AllowRule),
        102,
        "{}",
        out.describe()
    );
}

/// A budget refills at its rate up to its size, not beyond: 2 per 2 s is one connection per
/// second, at most two at once however long the workload waits.
#[test]
fn the_budget_refills_at_the_configured_rate_and_never_beyond_its_size() {
    let Some(tb) = testbed() else { return };
    let _l = tb.listen_tcp(sa("198.18.0.2:8080")).expect("listener");
    let yaml = policy_yaml(
        &[rule("cidr", "198.18.0.0/24", &[8080], "tcp", Some((2, 2)))],
        None,
        None,
    );
    let c = "connect tcp4 198.18.0.2 8080";
    let ops = [c, c, c, "sleep 1300", c, c, "sleep 2600", c, c, c];
    let out = agent(&tb, &yaml)
        .args(ops)
        .run_in(tb.client())
        .expect("agent run");
    out.assert_exit(0);
    let got: Vec<bool> = out
        .results
        .iter()
        .filter(|r| r.op == c)
        .map(|r| r.ok)
        .collect();
    assert_eq!(
        got,
        vec![true, true, false, true, false, true, true, false],
        "{}",
        out.describe()
    );
    for r in out.results.iter().filter(|r| r.op == c && !r.ok) {
        assert!(r.failed_with(EPERM), "{r:?}");
    }
}

/// Eight threads released together on two CPUs, 100 connects each, get exactly the budget
/// between them: the buckets are shared and updated atomically, not per CPU.
#[test]
fn eight_threads_hammering_one_destination_get_exactly_the_budget() {
    let Some(tb) = testbed() else { return };
    let listener = tb.listen_tcp(sa("198.18.0.2:8080")).expect("listener");
    // 3600 s: the budget cannot refill during the test.
    let yaml = policy_yaml(
        &[rule(
            "cidr",
            "198.18.0.2/32",
            &[8080],
            "tcp",
            Some((200, 3600)),
        )],
        None,
        None,
    );
    let hammer = "hammer 8 100 connect tcp4 198.18.0.2 8080";
    for round in 0..3 {
        let before = listener.connections();
        let out = agent(&tb, &yaml)
            .arg(hammer)
            .run_in(tb.client())
            .expect("agent run");
        out.assert_exit(0);
        let r = out.assert_ok(hammer);
        eprintln!(
            "round {round}: attempts {:?}, connected {:?}, EPERM {:?}",
            r.attempts, r.count, r.eperm
        );
        assert_eq!(r.attempts, Some(800), "{}", out.describe());
        assert_eq!(
            r.count,
            Some(200),
            "connections allowed\n{}",
            out.describe()
        );
        assert_eq!(r.eperm, Some(600), "{}", out.describe());
        assert_eq!(r.error, None, "unexpected failures\n{}", out.describe());
        std::thread::sleep(SETTLE);
        assert_eq!(listener.connections() - before, 200);
        assert_eq!(verdict_count(&out, Reason::RateLimitedDestination), 600);
    }
}

/// The global limit caps the sum over destinations; a destination over its own budget is
/// refused as such, without using the global budget.
#[test]
fn the_global_limit_caps_the_sum_over_several_destinations() {
    let Some(tb) = testbed() else { return };
    let addrs = ["198.18.0.2", "198.18.0.3", "198.18.0.4", "198.18.0.5"];
    for a in &addrs[1..] {
        tb.topo.add_remote_addr(ip(a)).expect("address");
    }
    let listeners: Vec<Listener> = addrs
        .iter()
        .map(|a| {
            tb.listen_tcp(SocketAddr::new(ip(a), 8080))
                .expect("listener")
        })
        .collect();
    // Five per address, eight in all.
    let yaml = policy_yaml(
        &[rule("cidr", "198.18.0.0/24", &[8080], "tcp", None)],
        Some((5, 3600)),
        Some((8, 3600)),
    );
    let op = |a: &str| format!("connect tcp4 {a} 8080");
    let mut ops = vec![op(addrs[0]); 6]; // 5 allowed, then over its own budget
    ops.extend([op(addrs[1]), op(addrs[1])]); // 7 in all
    ops.extend([op(addrs[2]), op(addrs[2])]); // the 8th, then over the global budget
    ops.push(op(addrs[3])); // a fresh destination: over the global budget
    let out = agent(&tb, &yaml)
        .args(&ops)
        .run_in(tb.client())
        .expect("agent run");
    out.assert_exit(0);
    let got: Vec<bool> = out.results.iter().map(|r| r.ok).collect();
    assert_eq!(
        got,
        vec![
            true, true, true, true, true, false, true, true, true, false, false
        ],
        "{}",
        out.describe()
    );
    std::thread::sleep(SETTLE);
    let arrived: Vec<usize> = listeners.iter().map(Listener::connections).collect();
    assert_eq!(arrived, vec![5, 2, 1, 0]);
    assert_eq!(
        verdict_count(&out, Reason::RateLimitedDestination),
        1,
        "{}",
        out.describe()
    );
    assert_eq!(
        verdict_count(&out, Reason::RateLimitedGlobal),
        2,
        "{}",
        out.describe()
    );
    let global = blocked_events(&out, Reason::RateLimitedGlobal);
    assert!(
        global.iter().any(|e| e["dst.ip"] == "198.18.0.5"),
        "no rate_limited_global event for 198.18.0.5\n{}",
        out.describe()
    );
}

/// A DNS client is never throttled by connection rate limits: every port-53 send goes to the
/// agent's DNS proxy, which answers the allowed name, whether the client connect()s a new
/// socket per query (glibc, Go), sends from one socket, uses an IPv4-mapped address, or asks
/// over TCP, far past the destination budget. The budget itself still holds for the
/// resolver host's other ports.
#[test]
fn a_dns_client_is_not_throttled_by_the_per_destination_budget() {
    let Some(tb) = testbed() else { return };
    let resolver: IpAddr = REMOTE_V4.into();
    let _web = tb.listen_tcp(sa("198.18.0.2:8080")).expect("listener");
    let dns = Dnsmasq::start(
        tb.remote(),
        resolver,
        &[("api.company.test", ip("198.18.0.10"))],
    )
    .expect("dnsmasq");
    let mut yaml = policy_yaml(
        &[
            rule("host", "api.company.test", &[443], "tcp", None),
            rule("host", "198.18.0.2", &[8080], "tcp", None),
        ],
        Some((3, 3600)),
        None,
    );
    yaml.push_str("  dns_policy:\n    allowed_resolvers: [\"198.18.0.2\"]\n");
    let per_socket = "dns connect udp4 198.18.0.2 53 api.company.test 150";
    let one_socket = "dns socket udp4 198.18.0.2 53 api.company.test 150";
    let v6_mapped = "dns connect udp6 ::ffff:198.18.0.2 53 api.company.test 20";
    let over_tcp = "resolve tcp4 198.18.0.2 api.company.test A repeat 20";
    let web = "connect tcp4 198.18.0.2 8080";
    let ops = [
        per_socket, one_socket, v6_mapped, over_tcp, web, web, web, web,
    ];
    let out = agent(&tb, &yaml)
        .args(ops)
        .run_in(tb.client())
        .expect("agent run");
    out.assert_exit(0);
    for (op, n) in [
        (per_socket, 150),
        (one_socket, 150),
        (v6_mapped, 20),
        (over_tcp, 20),
    ] {
        let r = out.assert_ok(op);
        assert_eq!(r.count, Some(n), "{op}\n{}", out.describe());
    }
    let web_results: Vec<bool> = out
        .results
        .iter()
        .filter(|r| r.op == web)
        .map(|r| r.ok)
        .collect();
    assert_eq!(
        web_results,
        vec![true, true, true, false],
        "{}",
        out.describe()
    );
    assert!(out.results.last().is_some_and(|r| r.failed_with(EPERM)));
    assert!(
        dns.queries().iter().any(|q| q.contains("api.company.test")),
        "the queries did not reach the upstream resolver: {:?}",
        dns.queries()
    );
    assert_eq!(
        verdict_count(&out, Reason::RateLimitedDestination),
        1,
        "{}",
        out.describe()
    );
}

// --- Through the library: the bucket map itself --------------------------------------------

/// Runs the probe with `ops` inside `cgroup` as nobody in `ns`.
fn probe_in_cgroup(tb: &Testbed, cgroup: &Path, ns: &Netns, ops: &[&str]) -> RunOutput {
    run_probe_in_cgroup(ns, cgroup, tb.probe.path(), ops, Duration::from_secs(60))
        .expect("running the probe")
}

fn parse_policy(tb: &Testbed, yaml: &str) -> Policy {
    let path = tb.write_policy(yaml).expect("writing the policy");
    policy::load_file(&path).expect("the policy parses")
}

/// `ok`: the hook let the connect through (in a namespace with only loopback it then fails
/// with ENETUNREACH); otherwise it must have been refused with EPERM.
#[track_caller]
fn assert_verdicts(out: &RunOutput, want: &[bool]) {
    let got: Vec<bool> = out
        .results
        .iter()
        .map(|r| {
            assert!(
                r.failed_with(EPERM) || r.failed_with(libc::ENETUNREACH),
                "unexpected outcome {r:?}\n{}",
                out.describe()
            );
            r.failed_with(libc::ENETUNREACH)
        })
        .collect();
    assert_eq!(got, want, "{}", out.describe());
}

/// A full bucket table fails closed: a destination that needs a new bucket is refused
/// (`rate_limit_table_full`, counted), a destination with a bucket keeps exactly the budget
/// it had (no reset), and once there is room again new destinations get their budget. The
/// collector deletes only full buckets.
#[test]
fn a_full_bucket_table_refuses_new_destinations_and_resets_no_budget() {
    let Some(tb) = testbed() else { return };
    let ns = Netns::new("rlfull").expect("namespace");
    let cgroup = tb.cgroups.child("rlfull").expect("child cgroup");
    let yaml = policy_yaml(
        &[rule("cidr", "198.18.0.0/24", &[9], "tcp", Some((2, 3600)))],
        None,
        None,
    );
    let slot = 3;
    let mut enforcer =
        Enforcer::start(parse_policy(&tb, &yaml), Resolved::new(), slot).expect("enforcer");
    enforcer.attach(&cgroup).expect("attaching");
    let a = "connect tcp4 198.18.0.1 9";
    let b = "connect tcp4 198.18.0.7 9";

    let out = probe_in_cgroup(&tb, &cgroup, &ns, &[a]);
    assert_verdicts(&out, &[true]);

    // Fill the table with buckets that are far from full (the collector leaves them).
    let rate = enforcer.rate_limits();
    let mut filler = Vec::new();
    for i in 0..u64::from(MAX_BUCKETS) {
        let key = BucketKey {
            slot,
            kind: BUCKET_DESTINATION,
            family: 0,
            _pad: [0; 2],
            budget: 0xf111_0000_0000_0000 | i,
            addr: [0; 16],
        };
        match rate.insert_bucket(
            &key,
            &Bucket {
                tat_ns: u64::MAX / 2,
            },
        ) {
            Ok(()) => filler.push(key),
            Err(_) => break,
        }
    }
    let total = rate.buckets().expect("buckets").len();
    assert_eq!(total, MAX_BUCKETS as usize, "the table should be full");

    // A has one connection left, and only one; B cannot get a bucket.
    let out = probe_in_cgroup(&tb, &cgroup, &ns, &[a, a, b, b]);
    assert_verdicts(&out, &[true, false, false, false]);
    let maps = enforcer.maps();
    assert_eq!(
        maps.counter(slot, Reason::RateLimitTableFull, Proto::Tcp)
            .unwrap(),
        2
    );
    assert_eq!(
        maps.counter(slot, Reason::RateLimitedDestination, Proto::Tcp)
            .unwrap(),
        1
    );

    // The collector deletes a full bucket and none of the others.
    let stale = BucketKey {
        budget: 0xdead,
        ..filler[0]
    };
    rate.remove_bucket(&filler[0]).expect("remove");
    rate.insert_bucket(&stale, &Bucket { tat_ns: 1 })
        .expect("insert");
    // (The background collector may have got there first.)
    assert!(rate.collect_full(slot, monotonic_ns()).expect("collect") <= 1);
    let left = rate.buckets().expect("buckets");
    assert_eq!(left.len(), MAX_BUCKETS as usize - 1);
    assert!(left.iter().all(|(k, _)| *k != stale));

    // Room for one: B gets its whole budget, A still has nothing.
    let out = probe_in_cgroup(&tb, &cgroup, &ns, &[b, b, b, a]);
    assert_verdicts(&out, &[true, true, false, false]);
    for k in &filler[1..] {
        rate.remove_bucket(k).expect("remove");
    }
}

/// The programs of one slot, loaded and attached to a fresh cgroup through the library, with
/// their maps, for tests that write the maps themselves.
struct Direct {
    _programs: Programs,
    maps: MapSet,
    rate: RateMaps,
    slot: u32,
    cgroup: PathBuf,
    ns: Netns,
    /// What is in force.
    current: (Compiled, CompiledLimits),
}

impl Direct {
    fn new(tb: &Testbed, label: &str, slot: u32) -> Self {
        let ns = Netns::new(label).expect("namespace");
        let cgroup = tb.cgroups.child(label).expect("child cgroup");
        let mut programs = Programs::load(slot).expect("loading");
        let maps = MapSet::take(&mut programs).expect("maps");
        let rate = RateMaps::take(&mut programs).expect("rate maps");
        programs.attach(&cgroup).expect("attaching");
        Direct {
            _programs: programs,
            maps,
            rate,
            slot,
            cgroup,
            ns,
            current: (Compiled::default(), CompiledLimits::default()),
        }
    }

    /// What a reload does: writes `next` (compiled under a new policy id) next to what is in
    /// force, switches the slot to it in one write, then removes the old entries.
    fn switch(&mut self, next: (Compiled, CompiledLimits)) {
        let (c, l) = &next;
        self.maps.apply(&Compiled::default(), c).expect("rules");
        self.rate
            .apply(&CompiledLimits::default(), l)
            .expect("limits");
        let config = SlotConfig {
            policy_id: c.policy_id,
            flags: c.slot_flags,
            ..SlotConfig::default()
        };
        self.maps.set_slot(self.slot, config).expect("slot");
        self.maps
            .apply(&self.current.0, &Compiled::default())
            .expect("old rules");
        self.rate
            .apply(&self.current.1, &CompiledLimits::default())
            .expect("old limits");
        self.current = next;
    }

    fn probe(&self, tb: &Testbed, ops: &[&str]) -> RunOutput {
        probe_in_cgroup(tb, &self.cgroup, &self.ns, ops)
    }
}

fn compiled(p: &Policy, policy_id: u32) -> (Compiled, CompiledLimits) {
    (
        compile(
            p,
            policy_id,
            &Resolved::new(),
            egress_agent::dns::doh_list(),
            &mut SetIds::default(),
        ),
        compile_limits(p, policy_id),
    )
}

/// Budgets are keyed by what the policy says about them, not by the policy id: switching the
/// slot to a recompiled policy (what a reload does) keeps the budgets it leaves unchanged,
/// with what they have used, and starts a changed budget afresh.
#[test]
fn budgets_survive_a_policy_switch_unless_the_switch_changes_them() {
    let Some(tb) = testbed() else { return };
    let mut d = Direct::new(&tb, "rlswitch", 4);
    let v1 = parse_policy(
        &tb,
        &policy_yaml(
            &[
                rule("cidr", "198.18.0.1/32", &[9], "tcp", Some((3, 3600))),
                rule("cidr", "198.18.0.2/32", &[9], "tcp", Some((3, 3600))),
            ],
            None,
            None,
        ),
    );
    // v2: an unrelated rule in front (rule ids move), A's budget unchanged, B's changed.
    let v2 = parse_policy(
        &tb,
        &policy_yaml(
            &[
                rule("cidr", "198.18.0.9/32", &[9], "tcp", None),
                rule("cidr", "198.18.0.1/32", &[9], "tcp", Some((3, 3600))),
                rule("cidr", "198.18.0.2/32", &[9], "tcp", Some((4, 3600))),
            ],
            None,
            None,
        ),
    );
    let a = "connect tcp4 198.18.0.1 9";
    let b = "connect tcp4 198.18.0.2 9";
    d.switch(compiled(&v1, 1));
    let out = d.probe(&tb, &[a, a, b, b, b, b]);
    assert_verdicts(&out, &[true, true, true, true, true, false]);

    d.switch(compiled(&v2, 2));
    // A: one left of three. B: a new budget of four.
    let out = d.probe(&tb, &[a, a, b, b, b, b, b]);
    assert_verdicts(&out, &[true, false, true, true, true, true, false]);
}

/// A limit entry the agent never writes (a budget of zero connections, or no refill
/// interval) denies, counted as the destination's rate limit; it never allows.
#[test]
fn a_limit_entry_the_agent_never_writes_denies() {
    let Some(tb) = testbed() else { return };
    let mut d = Direct::new(&tb, "rlbad", 5);
    let p = parse_policy(
        &tb,
        &policy_yaml(
            &[
                rule("cidr", "198.18.0.1/32", &[9], "tcp", Some((5, 3600))),
                rule("cidr", "198.18.0.2/32", &[9], "tcp", Some((5, 3600))),
            ],
            None,
            None,
        ),
    );
    let (c, mut l) = compiled(&p, 1);
    let mut entries = l.limits.values_mut();
    entries.next().expect("rule 0").destination.burst = 0;
    entries.next().expect("rule 1").destination.interval_ns = 0;
    d.switch((c, l));
    let out = d.probe(
        &tb,
        &["connect tcp4 198.18.0.1 9", "connect tcp4 198.18.0.2 9"],
    );
    assert_verdicts(&out, &[false, false]);
    let count = |r| d.maps.counter(d.slot, r, Proto::Tcp).unwrap();
    assert_eq!(count(Reason::RateLimitedDestination), 2);
    assert_eq!(count(Reason::AllowRule), 0);
}

// --- The kernel agrees with the reference ----------------------------------------------------

fn random_v4(rng: &mut StdRng) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, rng.random_range(0..2), rng.random_range(0..6))
}

fn random_v6(rng: &mut StdRng) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xe9, 0, 0, 0, 0, 0, rng.random_range(0..6))
}

/// `round` chooses the budgets in force, so that every kind occurs: even rounds have a
/// global budget, odd ones a default per-destination budget, and most rules their own.
fn random_limited_policy(rng: &mut StdRng, round: usize) -> String {
    let protos = ["tcp", "udp", "dns", "tcp, udp"];
    let mut rules = Vec::new();
    for _ in 0..rng.random_range(4..9) {
        let (key, target) = match rng.random_range(0..4) {
            0 => ("host", random_v4(rng).to_string()),
            1 => (
                "cidr",
                ipnet::Ipv4Net::new(random_v4(rng), [23, 24, 30][rng.random_range(0..3)])
                    .unwrap()
                    .trunc()
                    .to_string(),
            ),
            2 => ("host", random_v6(rng).to_string()),
            _ => (
                "cidr",
                ipnet::Ipv6Net::new(random_v6(rng), [64, 125, 126][rng.random_range(0..3)])
                    .unwrap()
                    .trunc()
                    .to_string(),
            ),
        };
        let mut ports: Vec<u16> = (0..rng.random_range(1..3))
            .map(|_| 1000 + rng.random_range(0..2))
            .collect();
        ports.sort();
        ports.dedup();
        let limit = rng.random_bool(0.7).then(|| (rng.random_range(1..6), 3600));
        rules.push(rule(
            key,
            &target,
            &ports,
            protos[rng.random_range(0..protos.len())],
            limit,
        ));
    }
    let per_destination = (!round.is_multiple_of(2)).then(|| (rng.random_range(2..8), 3600));
    let global = (round.is_multiple_of(2)).then(|| (rng.random_range(10..40), 3600));
    policy_yaml(&rules, per_destination, global)
}

/// One probe op and the destination the reference judges.
fn random_op(rng: &mut StdRng) -> (String, Dest) {
    let port = 1000 + rng.random_range(0..2);
    let (addr, v6_socket): (IpAddr, bool) = match rng.random_range(0..10) {
        0 => (Ipv4Addr::new(127, 0, 0, 1).into(), false),
        1..=6 => (random_v4(rng).into(), rng.random_bool(0.3)),
        _ => (random_v6(rng).into(), true),
    };
    let family = if v6_socket { "6" } else { "4" };
    let (kind, proto) = match rng.random_range(0..3) {
        0 => ("connect tcp", Proto::Tcp),
        1 => ("connect udp", Proto::Udp),
        _ => ("sendto udp", Proto::Udp),
    };
    let data = if kind.starts_with("sendto") { " x" } else { "" };
    let dst = match (addr, v6_socket) {
        (IpAddr::V4(a), false) => Dest::v4(a.octets(), port, proto),
        (IpAddr::V4(a), true) => Dest::v6(a.to_ipv6_mapped().octets(), port, proto),
        (IpAddr::V6(a), _) => Dest::v6(a.octets(), port, proto),
    };
    (format!("{kind}{family} {addr} {port}{data}"), dst)
}

/// Random policies with per-rule, default and global budgets; random sequences of TCP
/// connects, UDP connects and UDP sends (IPv4, IPv6, mapped, loopback). The kernel refuses
/// exactly the attempts the reference (plain token buckets read off the policy) refuses.
/// Windows are an hour, so nothing refills while the sequence runs and the order alone
/// decides.
#[test]
fn kernel_rate_limits_agree_with_the_reference() {
    let Some(tb) = testbed() else { return };
    let seed: u64 = std::env::var("EGRESS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_7a7e);
    eprintln!("seed {seed} (set EGRESS_TEST_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let isolated = Netns::new("rlagree").expect("namespace");
    let mut tally: BTreeMap<&'static str, usize> = BTreeMap::new();
    for round in 0..4 {
        let yaml = random_limited_policy(&mut rng, round);
        let policy = parse_policy(&tb, &yaml);
        let ops: Vec<(String, Dest)> = (0..500).map(|_| random_op(&mut rng)).collect();
        let args: Vec<&str> = ops.iter().map(|(op, _)| op.as_str()).collect();
        let out = agent(&tb, &yaml)
            .args(&args)
            .run_in(&isolated)
            .expect("agent run");
        assert_eq!(
            out.exit_code(),
            Some(0),
            "round {round}: {}",
            out.describe()
        );
        assert_eq!(
            out.results.len(),
            ops.len(),
            "round {round}: {}",
            out.describe()
        );
        let mut rates = ratelimit::reference::Reference::new();
        let mut disagreements = Vec::new();
        for ((op, dst), result) in ops.iter().zip(&out.results) {
            let base = reference::decide(
                &policy,
                &Resolved::new(),
                egress_agent::dns::doh_list(),
                dst,
            );
            let want = rates.judge(&policy, base, dst, 0);
            *tally.entry(want.reason.as_str()).or_default() += 1;
            if result.failed_with(EPERM) == want.allowed() {
                disagreements.push(format!(
                    "{op}: reference {:?}, kernel {:?}",
                    want.reason, result.error
                ));
            }
        }
        assert!(
            disagreements.is_empty(),
            "round {round}: {} disagreements under\n{yaml}\nfirst: {:#?}",
            disagreements.len(),
            &disagreements[..disagreements.len().min(10)]
        );
    }
    eprintln!("reference verdicts: {tally:?}");
    for reason in [
        Reason::AllowRule,
        Reason::RateLimitedDestination,
        Reason::RateLimitedGlobal,
    ] {
        assert!(
            tally.get(reason.as_str()).copied().unwrap_or(0) >= 10,
            "too few {reason:?} to mean anything: {tally:?}"
        );
    }
}

/// "per_destination" under a wildcard is per name: 200 names below `*.wild.example.test`,
/// each answering its own address and connected once, all succeed under 100 per hour; 101
/// connections to one further name block the 101st. The budget is the name's, not the
/// wildcard rule's.
#[test]
fn every_name_under_a_wildcard_is_its_own_destination_budget() {
    let Some(tb) = testbed() else { return };
    tb.topo
        .add_remote_net("198.18.1.0/24")
        .expect("remote range");
    let listener = tb.listen_tcp(sa("0.0.0.0:8443")).expect("listener");
    let upstream: IpAddr = REMOTE_V4.into();
    let mut records: Vec<(String, IpAddr)> = (0..200)
        .map(|i| {
            (
                format!("n{i}.wild.example.test"),
                ip(&format!("198.18.1.{}", i + 1)),
            )
        })
        .collect();
    records.push(("many.wild.example.test".into(), ip("198.18.1.250")));
    let refs: Vec<(&str, IpAddr)> = records.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let _dns = Dnsmasq::start(tb.remote(), upstream, &refs).expect("dnsmasq");
    let mut yaml = policy_yaml(
        &[rule("host", "*.wild.example.test", &[8443], "tcp", None)],
        Some((100, 3600)),
        Some((1000, 3600)),
    );
    yaml.push_str("  dns_policy:\n    allowed_resolvers: [198.18.0.2]\n");
    let each =
        "resolve udp4 198.18.0.2 n{i}.wild.example.test A repeat 200 then-connect tcp4 8443 n";
    let resolve = "resolve udp4 198.18.0.2 many.wild.example.test A";
    let flood = "flood tcp4 198.18.1.250 8443 101";
    let out = agent(&tb, &yaml)
        .timeout(Duration::from_secs(120))
        .args([each, resolve, flood])
        .run_in(tb.client())
        .expect("agent run");
    out.assert_exit(0);
    let r = out.assert_ok(each);
    assert_eq!(r.count, Some(200), "{}", out.describe());
    out.assert_ok(resolve);
    let f = out.assert_ok(flood);
    assert_eq!(
        (f.attempts, f.eperm),
        (Some(101), Some(1)),
        "101 connections to one name: the 101st is refused\n{}",
        out.describe()
    );
    std::thread::sleep(SETTLE);
    assert_eq!(listener.connections(), 300, "{}", out.describe());
    assert_eq!(
        verdict_count(&out, Reason::RateLimitedDestination),
        1,
        "{}",
        out.describe()
    );
    let events = blocked_events(&out, Reason::RateLimitedDestination);
    assert_eq!(events.len(), 1, "{}", out.describe());
    assert_eq!(events[0]["dst.ip"], "198.18.1.250");
}
