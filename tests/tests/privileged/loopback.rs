//! Loopback scoped by port (`loopback: {ports: [...]}`) on the real kernel: the workload, as
//! uid nobody, reaches a local service at a listed port over TCP and UDP, IPv4 and IPv6 (and
//! the IPv4-mapped spelling), and is refused with EPERM, an event and a counter at any other
//! loopback port, where nothing arrives; its DNS, which goes to the agent's proxy on loopback,
//! keeps working.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::policy::PolicyYaml;
use egress_tests::process::RunOutput;
use egress_tests::server::{Listener, Proto, SETTLE};
use egress_tests::testbed::Testbed;

use crate::testbed;
use serde_json::Value;

const UPSTREAM: &str = "198.18.0.2";
const WAIT: Duration = Duration::from_secs(3);

fn log(out: &RunOutput) -> Vec<Value> {
    out.stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// The agent's exact kernel counts (its `verdict count` lines) of `reason` over `protocol`.
fn verdict_count(out: &RunOutput, reason: &str, protocol: &str) -> u64 {
    log(out)
        .iter()
        .filter(|v| {
            v["message"] == "verdict count" && v["reason"] == reason && v["protocol"] == protocol
        })
        .filter_map(|v| v["count"].as_u64())
        .sum()
}

/// Listeners on 127.0.0.1 and [::1] at one port: `port`, or for 0 the one the system picks
/// for the first.
fn local(tb: &Testbed, proto: Proto, port: u16) -> (Listener, Listener) {
    let v4 = Listener::start(
        tb.client(),
        proto,
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
    )
    .expect("listener");
    let v6 = Listener::start(
        tb.client(),
        proto,
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), v4.port()),
    )
    .expect("listener");
    (v4, v6)
}

#[test]
fn loopback_is_reachable_at_the_listed_ports_only_and_dns_keeps_working() {
    let Some(tb) = testbed() else { return };
    // The service the policy lists, and another local service it does not, over TCP and
    // UDP on the same port numbers.
    let allowed_tcp = local(&tb, Proto::Tcp, 0);
    let p = allowed_tcp.0.port();
    let allowed_udp = local(&tb, Proto::Udp, p);
    let other_tcp = local(&tb, Proto::Tcp, 0);
    let q = other_tcp.0.port();
    let other_udp = local(&tb, Proto::Udp, 0);
    let q_udp = other_udp.0.port();
    let _dns = Dnsmasq::config()
        .record("api.example.test", UPSTREAM.parse::<IpAddr>().expect("ip"))
        .listen(UPSTREAM.parse().expect("ip"))
        .start(tb.remote())
        .expect("starting the upstream dnsmasq");
    let policy = PolicyYaml::new()
        .loopback_ports(&[p, 5432])
        .allowed_resolvers(&[UPSTREAM])
        .allow_host("api.example.test", &[443], &["tcp"]);

    let allowed_ops = [
        format!("send tcp4 127.0.0.1 {p} tcp4-to-p"),
        format!("send tcp6 ::1 {p} tcp6-to-p"),
        // An IPv6 socket to 127.0.0.1 (mapped): the same loopback port.
        format!("send tcp6 127.0.0.1 {p} mapped-to-p"),
        format!("sendto udp4 127.0.0.1 {p} udp4-to-p"),
        format!("sendto udp6 ::1 {p} udp6-to-p"),
    ];
    let refused_ops = [
        (format!("send tcp4 127.0.0.1 {q} tcp4-to-q"), "tcp"),
        (format!("send tcp6 ::1 {q} tcp6-to-q"), "tcp"),
        (format!("send tcp6 127.0.0.1 {q} mapped-to-q"), "tcp"),
        (format!("send tcp4 127.0.0.2 {q} tcp4-to-q2"), "tcp"),
        (format!("sendto udp4 127.0.0.1 {q_udp} udp4-to-q"), "udp"),
        (format!("sendto udp6 ::1 {q_udp} udp6-to-q"), "udp"),
    ];
    // DNS to the upstream resolver and to a local stub (port 53 on loopback, not listed):
    // both are answered by the agent's proxy on loopback.
    let dns_ops = [
        format!("resolve udp4 {UPSTREAM} api.example.test A"),
        "resolve udp4 127.0.0.53 api.example.test A".to_owned(),
        format!("resolve tcp6 {UPSTREAM} api.example.test A"),
    ];
    let ops: Vec<&str> = allowed_ops
        .iter()
        .map(String::as_str)
        .chain(refused_ops.iter().map(|(op, _)| op.as_str()))
        .chain(dns_ops.iter().map(String::as_str))
        .collect();
    let out = tb
        .agent(&policy)
        .expect("agent command")
        .json_log()
        .args(&ops)
        .run_in(tb.client())
        .expect("agent run");
    out.assert_exit(0);

    for op in &allowed_ops {
        out.assert_ok(op);
    }
    for (op, _) in &refused_ops {
        out.assert_errno(op, libc::EPERM);
    }
    for op in &dns_ops {
        let r = out.assert_ok(op);
        assert_eq!(
            (r.rcode, r.addrs.clone()),
            (Some(0), Some(vec![UPSTREAM.parse::<IpAddr>().expect("ip")])),
            "`{op}`\n{}",
            out.describe()
        );
    }

    // What arrived: the listed port got every byte, the other nothing.
    allowed_tcp.0.wait_for(b"mapped-to-p", WAIT);
    assert_eq!(
        allowed_tcp.0.messages(),
        [b"tcp4-to-p".to_vec(), b"mapped-to-p".to_vec()],
        "127.0.0.1:{p}\n{}",
        out.describe()
    );
    assert_eq!(allowed_tcp.1.wait_for(b"tcp6-to-p", WAIT), b"tcp6-to-p");
    assert_eq!(allowed_udp.0.wait_for(b"udp4-to-p", WAIT), b"udp4-to-p");
    assert_eq!(allowed_udp.1.wait_for(b"udp6-to-p", WAIT), b"udp6-to-p");
    std::thread::sleep(SETTLE);
    for l in [&other_tcp.0, &other_tcp.1, &other_udp.0, &other_udp.1] {
        assert_eq!(
            (l.connections(), l.received()),
            (0, Vec::new()),
            "{}: reached though its port is not listed\n{}",
            l.addr(),
            out.describe()
        );
    }

    // One event per refusal, naming the destination and the reason; counted exactly.
    let blocked: Vec<Value> = log(&out)
        .into_iter()
        .filter(|v| v["event"] == "egress_blocked" && v["reason"] == "loopback_port_not_allowed")
        .collect();
    for (dst, port) in [
        ("127.0.0.1", q),
        ("::1", q),
        ("127.0.0.2", q),
        ("127.0.0.1", q_udp),
        ("::1", q_udp),
    ] {
        assert!(
            blocked
                .iter()
                .any(|v| v["dst.ip"] == dst && v["dst.port"] == port),
            "no loopback_port_not_allowed event for {dst}:{port}: {blocked:#?}\n{}",
            out.describe()
        );
    }
    assert_eq!(
        (
            verdict_count(&out, "loopback_port_not_allowed", "tcp"),
            verdict_count(&out, "loopback_port_not_allowed", "udp"),
        ),
        (4, 2),
        "{}",
        out.describe()
    );
    assert!(
        verdict_count(&out, "loopback", "tcp") >= 3 && verdict_count(&out, "loopback", "udp") >= 2,
        "{}",
        out.describe()
    );
}
