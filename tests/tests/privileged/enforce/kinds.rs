//! Kinds of socket beyond plain TCP and UDP: ping, UDP-Lite, SCTP and raw sockets, MPTCP, and
//! loopback.

use egress_tests::policy::PolicyYaml;
use egress_tests::server::{Listener, SETTLE, WAIT, assert_arrived, assert_nothing_arrived};
use libc::EPERM;

use crate::{sa, scenario, testbed};

/// (8) Inet sockets other than TCP/UDP (ICMP ping, UDP-Lite, SCTP, raw) are refused with
/// EPERM at creation by default, and creatable with `allow_other_socket_types: true` except
/// ping and SCTP sockets. Raw sockets stay refused either way: nobody lacks CAP_NET_RAW.
#[test]
fn other_socket_types_are_refused_unless_allowed() {
    let Some(tb) = testbed() else { return };
    // Lets nobody create ping sockets, inside the client namespace only.
    tb.client()
        .sysctl("net.ipv4.ping_group_range", "0 2147483647")
        .expect("ping_group_range");
    let other = [
        "socket icmp4",
        "socket icmp6",
        "socket udplite4",
        "socket udplite6",
        "socket sctp4",
        "socket sctp6",
    ];
    let plain = ["socket tcp4", "socket udp4", "socket tcp6", "socket udp6"];
    let mut ops: Vec<&str> = other.iter().chain(&plain).copied().collect();
    ops.push("socket raw4");

    // What this kernel supports for nobody without the agent.
    let baseline = tb.run_probe(&ops).expect("baseline run");
    let supported: Vec<&str> = other
        .iter()
        .copied()
        .filter(|op| baseline.result(op).is_some_and(|r| r.ok))
        .collect();
    for op in other.iter().filter(|op| !supported.contains(op)) {
        eprintln!(
            "NOTE: `{op}` fails without the agent on this kernel ({:?}); not checked",
            baseline.result(op).and_then(|r| r.error.clone())
        );
    }
    assert!(
        supported.contains(&"socket icmp4") && supported.contains(&"socket udplite4"),
        "baseline without the agent should allow ping and UDP-Lite sockets\n{}",
        baseline.describe()
    );

    let policy = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);
    let out = tb.run_agent(&policy, &ops).expect("agent run");
    out.assert_exit(0);
    for op in &supported {
        out.assert_errno(op, EPERM);
    }
    for op in plain {
        out.assert_ok(op);
    }
    out.assert_errno("socket raw4", EPERM);

    let out = tb
        .run_agent(&policy.allow_other_socket_types(true), &ops)
        .expect("agent run");
    out.assert_exit(0);
    // Ping and SCTP sockets send without the address hooks seeing every destination: they
    // stay refused even when other socket types are allowed.
    let unjudged = |op: &str| op.contains("icmp") || op.contains("sctp");
    for op in supported.iter().filter(|op| !unjudged(op)).chain(&plain) {
        out.assert_ok(op);
    }
    for op in supported.iter().filter(|op| unjudged(op)) {
        out.assert_errno(op, EPERM);
    }
    out.assert_errno("socket raw4", EPERM);
}

/// (9) Loopback is allowed by default and refused with `allow_loopback: false`; 0.0.0.0, ::
/// and ::ffff:127.0.0.1 count as loopback.
#[test]
fn loopback_is_allowed_by_default_and_refusable() {
    let Some(tb) = testbed() else { return };
    let lo4 = Listener::tcp(tb.client(), sa("127.0.0.1:7000")).expect("listener");
    let lo6 = Listener::tcp(tb.client(), sa("[::1]:7000")).expect("listener");
    let lo_udp = Listener::udp(tb.client(), sa("127.0.0.1:7001")).expect("listener");
    let ops = |tag: &str| -> Vec<String> {
        vec![
            format!("send tcp4 127.0.0.1 7000 lo4-{tag}"),
            format!("send tcp4 0.0.0.0 7000 any4-{tag}"),
            format!("send tcp6 ::1 7000 lo6-{tag}"),
            format!("send tcp6 :: 7000 any6-{tag}"),
            format!("send tcp6 ::ffff:127.0.0.1 7000 mapped-{tag}"),
            format!("sendto udp4 127.0.0.1 7001 udp-{tag}"),
        ]
    };
    let policy = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);

    let default_ops = ops("default");
    let out = tb
        .agent(&policy)
        .expect("agent")
        .args(&default_ops)
        .run_in(tb.client())
        .expect("agent run");
    out.assert_exit(0);
    for op in &default_ops {
        out.assert_ok(op);
    }
    lo4.wait_for(b"mapped-default", WAIT);
    assert_eq!(
        lo4.messages(),
        vec![
            b"lo4-default".to_vec(),
            b"any4-default".to_vec(),
            b"mapped-default".to_vec()
        ],
        "{}",
        out.describe()
    );
    lo6.wait_for(b"any6-default", WAIT);
    assert_eq!(
        lo6.messages(),
        vec![b"lo6-default".to_vec(), b"any6-default".to_vec()],
        "{}",
        out.describe()
    );
    assert_arrived(&lo_udp, b"udp-default", &out);

    let refused_ops = ops("refused");
    let (before4, before6, before_udp) =
        (lo4.connections(), lo6.connections(), lo_udp.connections());
    let out = tb
        .agent(&policy.allow_loopback(false))
        .expect("agent")
        .args(&refused_ops)
        .run_in(tb.client())
        .expect("agent run");
    out.assert_exit(0);
    for op in &refused_ops {
        out.assert_errno(op, EPERM);
    }
    std::thread::sleep(SETTLE);
    assert_eq!(
        (lo4.connections(), lo6.connections(), lo_udp.connections()),
        (before4, before6, before_udp),
        "loopback listeners saw new traffic with allow_loopback: false\n{}",
        out.describe()
    );
}

/// MPTCP is TCP on the wire: an MPTCP socket must not reach a non-allowed destination
/// (refused at socket creation or at connect, either way with EPERM and no bytes).
#[test]
fn mptcp_to_a_non_allowed_destination_is_refused() {
    let Some(tb) = scenario()
        .tcp("198.18.0.2:8080")
        .tcp("198.18.1.9:8080")
        .build()
    else {
        return;
    };
    let [_allowed, other] = tb.listeners();
    let policy = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);
    let out = tb
        .run_agent(
            &policy,
            &[
                "send mptcp4 198.18.1.9 8080 mptcp-other",
                "tfo mptcp4 198.18.1.9 8080 mptcp-tfo-other",
                "send mptcp6 ::ffff:198.18.1.9 8080 mptcp-mapped-other",
                "send mptcp4 198.18.0.2 8080 mptcp-allowed",
            ],
        )
        .expect("agent run");
    out.assert_exit(0);
    out.assert_errno("send mptcp4 198.18.1.9 8080 mptcp-other", EPERM);
    out.assert_errno("tfo mptcp4 198.18.1.9 8080 mptcp-tfo-other", EPERM);
    out.assert_errno(
        "send mptcp6 ::ffff:198.18.1.9 8080 mptcp-mapped-other",
        EPERM,
    );
    eprintln!(
        "MPTCP to the allowed destination: {:?} (not asserted: policy choice)",
        out.result("send mptcp4 198.18.0.2 8080 mptcp-allowed")
    );
    assert_nothing_arrived(&[other], &out);
}
