//! Ways to send past the address the connect/sendmsg hooks judge are closed: routing headers
//! and IP options are refused at setsockopt, ping sockets at creation.

use egress_tests::log;
use egress_tests::policy::PolicyYaml;
use serde_json::Value;

use crate::testbed;

/// The `egress_blocked` lines of `hook`.
fn events(stderr: &str, hook: &str) -> Vec<Value> {
    log::events(stderr, "egress_blocked")
        .into_iter()
        .filter(|v| v["hook"] == hook)
        .collect()
}

/// An unprivileged IPv6 segment-routing header sends a datagram to its first segment, not to
/// the (allowed) address the sendmsg hook judged.
#[test]
fn an_ipv6_routing_header_cannot_carry_traffic_past_the_allowlist() {
    let Some(tb) = testbed() else { return };
    tb.topo
        .add_remote_addr("fd00:e9::66".parse().unwrap())
        .unwrap();
    let op = "srh6 fd00:e9::66 fd00:e9::2 9999 secret";
    // Without the agent the kernel accepts it: the test exercises a real path.
    let control = tb.run_probe(&[op]).unwrap();
    control.assert_ok(op);

    let policy = PolicyYaml::new().allow_cidr("fd00:e9::2/128", &[9999], &["udp"]);
    let out = tb
        .run_agent(&policy, &[op, "sendto udp6 fd00:e9::2 9999 plain"])
        .unwrap();
    assert_eq!(out.exit_code(), Some(0), "{}", out.describe());
    out.assert_errno(op, libc::EPERM);
    out.assert_ok("sendto udp6 fd00:e9::2 9999 plain");
    let refused = events(&out.stderr, "setsockopt");
    assert_eq!(refused.len(), 1, "{}", out.stderr);
    assert_eq!(refused[0]["reason"], "socket_option_refused");
    assert_eq!(refused[0]["option.level"], 41);
    assert_eq!(refused[0]["option.name"], 57);
    assert_eq!(refused[0]["comm"], "egress-probe");
}

/// Ping sockets run no sendmsg hook: they cannot be created, even with other socket types
/// allowed.
#[test]
fn ping_sockets_cannot_send_past_the_allowlist() {
    let Some(tb) = testbed() else { return };
    tb.client()
        .sysctl("net.ipv4.ping_group_range", "0 2147483647")
        .unwrap();
    let control = tb.run_probe(&["ping4 198.18.0.2"]).unwrap();
    control.assert_ok("ping4 198.18.0.2");

    let policy = PolicyYaml::new()
        .allow_cidr("198.18.0.2/32", &[443], &["tcp"])
        .allow_other_socket_types(true);
    let out = tb
        .run_agent(&policy, &["ping4 198.18.0.2", "ping4 127.0.0.1"])
        .unwrap();
    assert_eq!(out.exit_code(), Some(0), "{}", out.describe());
    out.assert_errno("ping4 198.18.0.2", libc::EPERM);
    out.assert_errno("ping4 127.0.0.1", libc::EPERM);
    let refused = events(&out.stderr, "sock_create");
    // A first line, then one "repeated N" line counting the attempts beyond it.
    let attempts: u64 = refused
        .iter()
        .map(|e| e["repeated"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(
        attempts, 2,
        "both ping sockets are reported: {}",
        out.stderr
    );
    assert!(
        refused
            .iter()
            .all(|e| e["reason"] == "socket_type_refused" && e["socket.protocol"] == 1)
    );
    assert!(
        refused.iter().all(|e| e.get("dst.ip").is_none()),
        "no destination for a socket creation"
    );
}
