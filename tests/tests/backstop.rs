//! The packet backstop: what the socket-address hooks cannot see is refused per packet.
#![expect(clippy::unwrap_used, reason = "test code: a failure is a test failure")]

use egress_tests::policy::PolicyYaml;
use egress_tests::testbed::Testbed;
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");

fn packet_events(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "egress_blocked" && v["hook"] == "packet")
        .collect()
}

/// An unprivileged IPv6 segment-routing header sends a datagram to its first segment, not to
/// the (allowed) address the sendmsg hook judged.
#[test]
fn an_ipv6_routing_header_cannot_carry_traffic_past_the_allowlist() {
    let Some(tb) = Testbed::for_test(PROBE.as_ref()) else {
        return;
    };
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
    let events = packet_events(&out.stderr);
    assert_eq!(events.len(), 1, "{}", out.stderr);
    assert_eq!(events[0]["reason"], "packet_refused");
}

/// Ping sockets run no sendmsg hook: with other socket types allowed, their packets are
/// still judged (loopback allowed, anything else refused).
#[test]
fn ping_sockets_cannot_send_past_the_allowlist() {
    let Some(tb) = Testbed::for_test(PROBE.as_ref()) else {
        return;
    };
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
    out.assert_ok("ping4 127.0.0.1");
    let events = packet_events(&out.stderr);
    assert_eq!(events.len(), 1, "{}", out.stderr);
    assert_eq!(events[0]["reason"], "protocol_not_allowed");
    assert_eq!(events[0]["dst.ip"], "198.18.0.2");
}
