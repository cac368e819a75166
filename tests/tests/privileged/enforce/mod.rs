//! Enforcement tests against the agent's CLI contract:
//! `egress-agent exec --policy FILE --user nobody --cgroup-parent DIR -- egress-probe OPS...`
//! runs inside the client namespace; listeners run in the remote namespace (or, for
//! loopback, in the client namespace). Each test asserts the errno the workload saw and the
//! bytes that did or did not reach the listeners.

mod kinds;
mod workload;

use egress_tests::policy::PolicyYaml;
use egress_tests::process::RunOutput;
use egress_tests::server::{WAIT, assert_arrived, assert_nothing_arrived};
use egress_tests::testbed::Testbed;
use libc::EPERM;

use crate::{ip, sa, scenario, testbed};

/// Runs `refused` then `allowed` under `policy` in the client namespace: the agent exits 0,
/// every refused op fails with EPERM and every allowed one succeeds.
#[track_caller]
fn refused_then_allowed(
    tb: &Testbed,
    policy: &PolicyYaml,
    refused: &[&str],
    allowed: &[&str],
) -> RunOutput {
    let ops: Vec<&str> = refused.iter().chain(allowed).copied().collect();
    let out = tb.run_agent(policy, &ops).expect("agent run");
    out.assert_exit(0);
    for op in refused {
        out.assert_errno(op, EPERM);
    }
    for op in allowed {
        out.assert_ok(op);
    }
    out
}

/// (1) An allowed host:port connects over IPv4 and IPv6 and the data arrives.
#[test]
fn allowed_destination_connects_and_data_arrives() {
    let Some(tb) = scenario()
        .tcp("198.18.0.2:8080")
        .tcp("[fd00:e9::2]:8080")
        .build()
    else {
        return;
    };
    let [l4, l6] = tb.listeners();
    let policy = PolicyYaml::new()
        .allow_host("198.18.0.2", &[8080], &["tcp"])
        .allow_host("fd00:e9::2", &[8080], &["tcp"]);
    let out = tb
        .run_agent(
            &policy,
            &[
                "send tcp4 198.18.0.2 8080 allowed-over-v4",
                "send tcp6 fd00:e9::2 8080 allowed-over-v6",
            ],
        )
        .expect("agent run");
    out.assert_exit(0);
    out.assert_ok("send tcp4 198.18.0.2 8080 allowed-over-v4");
    out.assert_ok("send tcp6 fd00:e9::2 8080 allowed-over-v6");
    assert_arrived(l4, b"allowed-over-v4", &out);
    assert_arrived(l6, b"allowed-over-v6", &out);
}

/// (2) Destinations outside the allowlist (other port, other address, other family, other
/// transport) get EPERM and the listeners never see a connection.
#[test]
fn non_allowed_destinations_get_eperm_and_nothing_arrives() {
    let Some(tb) = scenario()
        .tcp("198.18.0.2:8080")
        .tcp("198.18.0.2:9090")
        .tcp("198.18.1.9:8080")
        .tcp("[fd00:e9::2]:8080")
        .udp("198.18.0.2:8080")
        .build()
    else {
        return;
    };
    let [
        allowed,
        other_port,
        other_addr,
        other_family,
        other_transport,
    ] = tb.listeners();
    let policy = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);
    let denied = [
        "send tcp4 198.18.0.2 9090 wrong-port",
        "send tcp4 198.18.1.9 8080 wrong-address",
        "connect tcp4 198.18.1.9 8080",
        "send tcp6 fd00:e9::2 8080 wrong-family",
        "sendto udp4 198.18.0.2 8080 wrong-transport",
    ];
    let mut ops = denied.to_vec();
    ops.push("send tcp4 198.18.0.2 8080 the-allowed-one");
    let out = tb.run_agent(&policy, &ops).expect("agent run");
    out.assert_exit(0);
    for op in denied {
        out.assert_errno(op, EPERM);
    }
    out.assert_ok("send tcp4 198.18.0.2 8080 the-allowed-one");
    assert_arrived(allowed, b"the-allowed-one", &out);
    assert_nothing_arrived(
        &[other_port, other_addr, other_family, other_transport],
        &out,
    );
}

/// (3) Plain HTTP (port 80) to a host whose rule allows only `https` on 443 is refused; 443
/// works. `https` means TCP, so UDP to 443 is refused too.
#[test]
fn http_to_an_https_only_rule_is_refused_while_443_works() {
    let Some(tb) = scenario()
        .tcp("198.18.0.2:80")
        .tcp("198.18.0.2:443")
        .udp("198.18.0.2:443")
        .build()
    else {
        return;
    };
    let [http, https, quic] = tb.listeners();
    let policy = PolicyYaml::new().allow_host("198.18.0.2", &[443], &["https"]);
    let out = tb
        .run_agent(
            &policy,
            &[
                "send tcp4 198.18.0.2 80 GET / HTTP/1.0",
                "send tcp4 198.18.0.2 443 tls-client-hello",
                "sendto udp4 198.18.0.2 443 quic-initial",
            ],
        )
        .expect("agent run");
    out.assert_exit(0);
    out.assert_errno("send tcp4 198.18.0.2 80 GET / HTTP/1.0", EPERM);
    out.assert_ok("send tcp4 198.18.0.2 443 tls-client-hello");
    out.assert_errno("sendto udp4 198.18.0.2 443 quic-initial", EPERM);
    assert_arrived(https, b"tls-client-hello", &out);
    assert_nothing_arrived(&[http, quic], &out);
}

/// (4) A denied CIDR wins over an allowed address inside it (IPv4 and IPv6).
#[test]
fn denied_cidr_beats_an_allowed_address_inside_it() {
    let Some(tb) = scenario()
        .tcp("198.18.1.5:8080")
        .tcp("[fd00:e9:1::5]:8080")
        .tcp("198.18.0.2:8080")
        .build()
    else {
        return;
    };
    let [inside4, inside6, control] = tb.listeners();
    let policy = PolicyYaml::new()
        .deny_cidr("198.18.1.0/24")
        .deny_cidr("fd00:e9:1::/48")
        .allow_cidr("198.18.1.5", &[8080], &["tcp"])
        .allow_cidr("fd00:e9:1::5", &[8080], &["tcp"])
        .allow_host("198.18.0.2", &[8080], &["tcp"]);
    let out = tb
        .run_agent(
            &policy,
            &[
                "send tcp4 198.18.1.5 8080 inside-denied-v4",
                "send tcp6 fd00:e9:1::5 8080 inside-denied-v6",
                "send tcp4 198.18.0.2 8080 control",
            ],
        )
        .expect("agent run");
    out.assert_exit(0);
    out.assert_errno("send tcp4 198.18.1.5 8080 inside-denied-v4", EPERM);
    out.assert_errno("send tcp6 fd00:e9:1::5 8080 inside-denied-v6", EPERM);
    out.assert_ok("send tcp4 198.18.0.2 8080 control");
    assert_arrived(control, b"control", &out);
    assert_nothing_arrived(&[inside4, inside6], &out);
}

/// (5) The IPv4-mapped IPv6 spelling (`::ffff:a.b.c.d`) of a non-allowed or denied IPv4
/// address is refused over TCP (connect6 path) and UDP (sendmsg4 path); the mapped spelling
/// of an allowed address works.
#[test]
fn ipv4_mapped_spelling_is_judged_as_the_ipv4_address() {
    let Some(tb) = scenario()
        .tcp("198.18.0.2:8080")
        .udp("198.18.0.2:8080")
        .tcp("198.18.1.7:8080")
        .udp("198.18.1.7:8080")
        .tcp("198.18.2.7:8080")
        .udp("198.18.2.7:8080")
        .build()
    else {
        return;
    };
    let [
        allowed_tcp,
        allowed_udp,
        other_tcp,
        other_udp,
        denied_tcp,
        denied_udp,
    ] = tb.listeners();
    let policy = PolicyYaml::new()
        .allow_host("198.18.0.2", &[8080], &["tcp", "udp"])
        .deny_cidr("198.18.2.0/24");
    let refused = [
        "connect tcp6 ::ffff:198.18.1.7 8080",
        "send tcp6 ::ffff:198.18.1.7 8080 mapped-not-allowed",
        "send tcp6 ::ffff:198.18.2.7 8080 mapped-denied",
        "sendto udp6 ::ffff:198.18.1.7 8080 mapped-not-allowed-udp",
        "sendto udp6 ::ffff:198.18.2.7 8080 mapped-denied-udp",
        "udpconnect-send udp6 ::ffff:198.18.1.7 8080 mapped-connected-udp",
        "tfo tcp6 ::ffff:198.18.1.7 8080 mapped-tfo",
    ];
    let allowed = [
        "send tcp6 ::ffff:198.18.0.2 8080 mapped-allowed-tcp",
        "sendto udp6 ::ffff:198.18.0.2 8080 mapped-allowed-udp",
        "udpconnect-send udp6 ::ffff:198.18.0.2 8080 mapped-allowed-connected",
    ];
    let out = refused_then_allowed(&tb, &policy, &refused, &allowed);
    assert_arrived(allowed_tcp, b"mapped-allowed-tcp", &out);
    allowed_udp.wait_for(b"mapped-allowed-connected", WAIT);
    assert_eq!(
        allowed_udp.messages(),
        vec![
            b"mapped-allowed-udp".to_vec(),
            b"mapped-allowed-connected".to_vec()
        ],
        "{}",
        out.describe()
    );
    assert_nothing_arrived(&[other_tcp, other_udp, denied_tcp, denied_udp], &out);
}

/// (6) Unconnected UDP (`sendto`) to a non-allowed address or port is refused and nothing
/// arrives; allowed UDP arrives.
#[test]
fn unconnected_udp_is_filtered_per_datagram() {
    let Some(tb) = scenario()
        .udp("198.18.0.2:5300")
        .udp("[fd00:e9::2]:5300")
        .udp("198.18.0.2:5400")
        .udp("[fd00:e9::2]:5400")
        .udp("198.18.1.9:5300")
        .build()
    else {
        return;
    };
    let [allowed4, allowed6, other_port4, other_port6, other_addr] = tb.listeners();
    let policy = PolicyYaml::new()
        .allow_host("198.18.0.2", &[5300], &["udp"])
        .allow_host("fd00:e9::2", &[5300], &["udp"]);
    let refused = [
        "sendto udp4 198.18.1.9 5300 to-other-address",
        "sendto udp4 198.18.0.2 5400 to-other-port",
        "sendto udp6 fd00:e9::2 5400 to-other-port-v6",
        "connect udp4 198.18.1.9 5300",
        "udpconnect-send udp4 198.18.1.9 5300 connected-to-other",
    ];
    let allowed = [
        "sendto udp4 198.18.0.2 5300 allowed-v4",
        "sendto udp6 fd00:e9::2 5300 allowed-v6",
    ];
    let out = refused_then_allowed(&tb, &policy, &refused, &allowed);
    assert_arrived(allowed4, b"allowed-v4", &out);
    assert_arrived(allowed6, b"allowed-v6", &out);
    assert_nothing_arrived(&[other_port4, other_port6, other_addr], &out);
}

/// (7) TCP Fast Open (`sendto(MSG_FASTOPEN)`, data in the SYN) to a non-allowed destination
/// is refused; to an allowed one the data arrives.
#[test]
fn tcp_fast_open_to_a_non_allowed_destination_is_refused() {
    let Some(tb) = testbed() else { return };
    // Before the listeners: listen() reads the server side's setting.
    tb.topo
        .enable_fast_open_without_cookies()
        .expect("tcp_fastopen sysctls in the test namespaces");
    tb.topo.add_remote_addr(ip("198.18.1.9")).expect("address");
    let allowed4 = tb.listen_tcp(sa("198.18.0.2:8080")).expect("listener");
    let allowed6 = tb.listen_tcp(sa("[fd00:e9::2]:8080")).expect("listener");
    let other_addr = tb.listen_tcp(sa("198.18.1.9:8080")).expect("listener");
    let other_port6 = tb.listen_tcp(sa("[fd00:e9::2]:9090")).expect("listener");
    let policy = PolicyYaml::new()
        .allow_host("198.18.0.2", &[8080], &["tcp"])
        .allow_host("fd00:e9::2", &[8080], &["tcp"]);
    let refused = [
        "tfo tcp4 198.18.1.9 8080 tfo-other-address",
        "tfo tcp6 fd00:e9::2 9090 tfo-other-port",
    ];
    let allowed = [
        "tfo tcp4 198.18.0.2 8080 tfo-allowed-v4",
        "tfo tcp6 fd00:e9::2 8080 tfo-allowed-v6",
    ];
    let out = refused_then_allowed(&tb, &policy, &refused, &allowed);
    assert_arrived(&allowed4, b"tfo-allowed-v4", &out);
    assert_arrived(&allowed6, b"tfo-allowed-v6", &out);
    assert_nothing_arrived(&[&other_addr, &other_port6], &out);
    // The allowed sends really carried their data in the SYN.
    assert_eq!(
        tb.remote()
            .tcp_ext_counter("TCPFastOpenPassive")
            .expect("netstat"),
        2,
        "{}",
        out.describe()
    );
}
