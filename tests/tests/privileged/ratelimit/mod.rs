//! Connection rate limits on the real kernel: `rate_limits.per_destination`,
//! `rate_limits.global` and per-rule `rate_limit`, decided in the same hooks as the
//! allowlist (see docs/rate-limits.md).
//!
//! Most tests run `egress-agent exec` around the probe as uid nobody and assert the errno of
//! each attempt, what reached the listeners, and the agent's JSON log (the `egress_blocked`
//! event and the verdict counters). The table-full and reload tests drive the programs
//! through the agent's library to reach into the bucket map.

mod direct;
mod reference;

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use egress_agent::policy::{self, Policy};
use egress_common::Reason;
use egress_tests::agent::AgentRun;
use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::log;
use egress_tests::netns::REMOTE_V4;
use egress_tests::process::RunOutput;
use egress_tests::server::{Listener, SETTLE};
use egress_tests::testbed::Testbed;
use libc::EPERM;
use serde_json::Value;

use crate::{ip, sa, testbed};

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

/// The agent's final verdict count for `reason` (summed over protocols).
fn verdict_count(out: &RunOutput, reason: Reason) -> u64 {
    log::verdict_count(&out.stderr, reason.as_str())
}

/// The `egress_blocked` events with `reason`.
fn blocked_events(out: &RunOutput, reason: Reason) -> Vec<Value> {
    log::blocked(&out.stderr, reason.as_str())
}

fn parse_policy(tb: &Testbed, yaml: &str) -> Policy {
    let path = tb.write_policy(yaml).expect("writing the policy");
    policy::load_file(&path).expect("the policy parses")
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
