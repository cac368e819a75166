//! Enforcement tests against the agent's CLI contract:
//! `egress-agent exec --policy FILE --user nobody --cgroup-parent DIR -- egress-probe OPS...`
//! runs inside the client namespace; listeners run in the remote namespace (or, for
//! loopback, in the client namespace). Each test asserts the errno the workload saw and the
//! bytes that did or did not reach the listeners.

#![expect(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test set-up failures abort the test"
)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use egress_tests::cgroup::cgroup2_mount;
use egress_tests::policy::PolicyYaml;
use egress_tests::process::RunOutput;
use egress_tests::server::{Listener, SETTLE};
use egress_tests::testbed::Testbed;
use egress_tests::{NOBODY_GID, NOBODY_UID};
use libc::EPERM;

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
/// How long a positive check waits for bytes to arrive.
const WAIT: Duration = Duration::from_secs(3);

fn testbed() -> Option<Testbed> {
    Testbed::for_test(Path::new(PROBE))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP literal")
}

/// Asserts `listener` received exactly `expected` (waiting up to WAIT for it).
#[track_caller]
fn assert_arrived(listener: &Listener, expected: &[u8], out: &RunOutput) {
    let got = listener.wait_for(expected, WAIT);
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected),
        "bytes at {:?} listener {}\n{}",
        listener.proto(),
        listener.addr(),
        out.describe()
    );
}

/// Asserts none of `listeners` saw a connection or a byte (after letting stragglers land).
#[track_caller]
fn assert_nothing_arrived(listeners: &[&Listener], out: &RunOutput) {
    std::thread::sleep(SETTLE);
    for l in listeners {
        assert!(
            l.connections() == 0 && l.received().is_empty(),
            "{:?} listener {} saw {} connection(s)/datagram(s) with {:?}\n{}",
            l.proto(),
            l.addr(),
            l.connections(),
            String::from_utf8_lossy(&l.received()),
            out.describe()
        );
    }
}

/// (1) An allowed host:port connects over IPv4 and IPv6 and the data arrives.
#[test]
fn allowed_destination_connects_and_data_arrives() {
    let Some(tb) = testbed() else { return };
    let l4 = tb.listen_tcp(sa("198.18.0.2:8080")).expect("listener");
    let l6 = tb.listen_tcp(sa("[fd00:e9::2]:8080")).expect("listener");
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
    assert_arrived(&l4, b"allowed-over-v4", &out);
    assert_arrived(&l6, b"allowed-over-v6", &out);
}

/// (2) Destinations outside the allowlist (other port, other address, other family, other
/// transport) get EPERM and the listeners never see a connection.
#[test]
fn non_allowed_destinations_get_eperm_and_nothing_arrives() {
    let Some(tb) = testbed() else { return };
    tb.topo.add_remote_addr(ip("198.18.1.9")).expect("address");
    let allowed = tb.listen_tcp(sa("198.18.0.2:8080")).expect("listener");
    let other_port = tb.listen_tcp(sa("198.18.0.2:9090")).expect("listener");
    let other_addr = tb.listen_tcp(sa("198.18.1.9:8080")).expect("listener");
    let other_family = tb.listen_tcp(sa("[fd00:e9::2]:8080")).expect("listener");
    let other_transport = tb.listen_udp(sa("198.18.0.2:8080")).expect("listener");
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
    assert_arrived(&allowed, b"the-allowed-one", &out);
    assert_nothing_arrived(
        &[&other_port, &other_addr, &other_family, &other_transport],
        &out,
    );
}

/// (3) Plain HTTP (port 80) to a host whose rule allows only `https` on 443 is refused; 443
/// works. `https` means TCP, so UDP to 443 is refused too.
#[test]
fn http_to_an_https_only_rule_is_refused_while_443_works() {
    let Some(tb) = testbed() else { return };
    let http = tb.listen_tcp(sa("198.18.0.2:80")).expect("listener");
    let https = tb.listen_tcp(sa("198.18.0.2:443")).expect("listener");
    let quic = tb.listen_udp(sa("198.18.0.2:443")).expect("listener");
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
    assert_arrived(&https, b"tls-client-hello", &out);
    assert_nothing_arrived(&[&http, &quic], &out);
}

/// (4) A denied CIDR wins over an allowed address inside it (IPv4 and IPv6).
#[test]
fn denied_cidr_beats_an_allowed_address_inside_it() {
    let Some(tb) = testbed() else { return };
    tb.topo.add_remote_addr(ip("198.18.1.5")).expect("address");
    tb.topo
        .add_remote_addr(ip("fd00:e9:1::5"))
        .expect("address");
    let inside4 = tb.listen_tcp(sa("198.18.1.5:8080")).expect("listener");
    let inside6 = tb.listen_tcp(sa("[fd00:e9:1::5]:8080")).expect("listener");
    let control = tb.listen_tcp(sa("198.18.0.2:8080")).expect("listener");
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
    assert_arrived(&control, b"control", &out);
    assert_nothing_arrived(&[&inside4, &inside6], &out);
}

/// (5) The IPv4-mapped IPv6 spelling (`::ffff:a.b.c.d`) of a non-allowed or denied IPv4
/// address is refused over TCP (connect6 path) and UDP (sendmsg4 path); the mapped spelling
/// of an allowed address works.
#[test]
fn ipv4_mapped_spelling_is_judged_as_the_ipv4_address() {
    let Some(tb) = testbed() else { return };
    tb.topo.add_remote_addr(ip("198.18.1.7")).expect("address");
    tb.topo.add_remote_addr(ip("198.18.2.7")).expect("address");
    let allowed_tcp = tb.listen_tcp(sa("198.18.0.2:8080")).expect("listener");
    let allowed_udp = tb.listen_udp(sa("198.18.0.2:8080")).expect("listener");
    let other_tcp = tb.listen_tcp(sa("198.18.1.7:8080")).expect("listener");
    let other_udp = tb.listen_udp(sa("198.18.1.7:8080")).expect("listener");
    let denied_tcp = tb.listen_tcp(sa("198.18.2.7:8080")).expect("listener");
    let denied_udp = tb.listen_udp(sa("198.18.2.7:8080")).expect("listener");
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
    let ops: Vec<&str> = refused.iter().chain(&allowed).copied().collect();
    let out = tb.run_agent(&policy, &ops).expect("agent run");
    out.assert_exit(0);
    for op in refused {
        out.assert_errno(op, EPERM);
    }
    for op in allowed {
        out.assert_ok(op);
    }
    assert_arrived(&allowed_tcp, b"mapped-allowed-tcp", &out);
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
    assert_nothing_arrived(&[&other_tcp, &other_udp, &denied_tcp, &denied_udp], &out);
}

/// (6) Unconnected UDP (`sendto`) to a non-allowed address or port is refused and nothing
/// arrives; allowed UDP arrives.
#[test]
fn unconnected_udp_is_filtered_per_datagram() {
    let Some(tb) = testbed() else { return };
    tb.topo.add_remote_addr(ip("198.18.1.9")).expect("address");
    let allowed4 = tb.listen_udp(sa("198.18.0.2:5300")).expect("listener");
    let allowed6 = tb.listen_udp(sa("[fd00:e9::2]:5300")).expect("listener");
    let other_port4 = tb.listen_udp(sa("198.18.0.2:5400")).expect("listener");
    let other_port6 = tb.listen_udp(sa("[fd00:e9::2]:5400")).expect("listener");
    let other_addr = tb.listen_udp(sa("198.18.1.9:5300")).expect("listener");
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
    let ops: Vec<&str> = refused.iter().chain(&allowed).copied().collect();
    let out = tb.run_agent(&policy, &ops).expect("agent run");
    out.assert_exit(0);
    for op in refused {
        out.assert_errno(op, EPERM);
    }
    for op in allowed {
        out.assert_ok(op);
    }
    assert_arrived(&allowed4, b"allowed-v4", &out);
    assert_arrived(&allowed6, b"allowed-v6", &out);
    assert_nothing_arrived(&[&other_port4, &other_port6, &other_addr], &out);
}

/// (7) TCP Fast Open (`sendto(MSG_FASTOPEN)`, data in the SYN) to a non-allowed destination
/// is refused; to an allowed one the data arrives.
#[test]
fn tcp_fast_open_to_a_non_allowed_destination_is_refused() {
    let Some(tb) = testbed() else { return };
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
    let ops: Vec<&str> = refused.iter().chain(&allowed).copied().collect();
    let out = tb.run_agent(&policy, &ops).expect("agent run");
    out.assert_exit(0);
    for op in refused {
        out.assert_errno(op, EPERM);
    }
    for op in allowed {
        out.assert_ok(op);
    }
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

/// (10) A policy with 100,000 entries loads and enforces: the real allowed listener works,
/// listed entries deep in the list work, a non-listed address is refused.
#[test]
fn policy_with_100k_entries_loads_and_enforces() {
    let Some(tb) = testbed() else { return };
    const V4_ENTRIES: u32 = 50_000;
    const V6_ENTRIES: u32 = 50_000;
    let mut policy = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);
    // 198.18.32.0 .. 198.18.227.79, one /32 each.
    let v4_entry = |i: u32| format!("198.18.{}.{}", 32 + i / 256, i % 256);
    for i in 0..V4_ENTRIES {
        policy = policy.allow_cidr(&format!("{}/32", v4_entry(i)), &[8080], &["tcp"]);
    }
    let v6_entry = |i: u32| format!("fd00:e9:ff::{i:x}");
    for i in 0..V6_ENTRIES {
        policy = policy.allow_cidr(&format!("{}/128", v6_entry(i)), &[8080], &["tcp"]);
    }
    let listed4 = v4_entry(43_015); // 198.18.200.7
    let listed6 = v6_entry(V6_ENTRIES - 1);
    for a in [
        listed4.as_str(),
        listed6.as_str(),
        "198.18.1.9",
        "fd00:e9:fe::1",
    ] {
        tb.topo.add_remote_addr(ip(a)).expect("address");
    }
    let real = tb.listen_tcp(sa("198.18.0.2:8080")).expect("listener");
    let deep4 = tb
        .listen_tcp(SocketAddr::new(ip(&listed4), 8080))
        .expect("listener");
    let deep6 = tb
        .listen_tcp(SocketAddr::new(ip(&listed6), 8080))
        .expect("listener");
    let unlisted4 = tb.listen_tcp(sa("198.18.1.9:8080")).expect("listener");
    let unlisted6 = tb.listen_tcp(sa("[fd00:e9:fe::1]:8080")).expect("listener");

    let send_deep4 = format!("send tcp4 {listed4} 8080 deep-v4");
    let send_deep6 = format!("send tcp6 {listed6} 8080 deep-v6");
    let out = tb
        .agent(&policy)
        .expect("agent")
        .args([
            "send tcp4 198.18.0.2 8080 real-allowed",
            send_deep4.as_str(),
            send_deep6.as_str(),
            "send tcp4 198.18.1.9 8080 unlisted-v4",
            "send tcp6 fd00:e9:fe::1 8080 unlisted-v6",
        ])
        .timeout(Duration::from_secs(300))
        .run_in(tb.client())
        .expect("agent run");
    eprintln!("100k-entry policy: agent run took {:?}", out.elapsed);
    out.assert_exit(0);
    out.assert_ok("send tcp4 198.18.0.2 8080 real-allowed");
    out.assert_ok(&send_deep4);
    out.assert_ok(&send_deep6);
    out.assert_errno("send tcp4 198.18.1.9 8080 unlisted-v4", EPERM);
    out.assert_errno("send tcp6 fd00:e9:fe::1 8080 unlisted-v6", EPERM);
    assert_arrived(&real, b"real-allowed", &out);
    assert_arrived(&deep4, b"deep-v4", &out);
    assert_arrived(&deep6, b"deep-v6", &out);
    assert_nothing_arrived(&[&unlisted4, &unlisted6], &out);
}

/// (11) The workload runs as uid/gid 65534 without capabilities, in a cgroup below the given
/// parent, and the agent exits with the workload's exit status.
#[test]
fn workload_runs_as_nobody_and_its_exit_status_is_propagated() {
    let Some(tb) = testbed() else { return };
    let policy = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);
    let out = tb
        .run_agent(&policy, &["whoami", "cgroup", "exit 7", "whoami"])
        .expect("agent run");
    out.assert_exit(7);
    let who = out.assert_ok("whoami");
    assert_eq!(
        (who.uid, who.euid, who.gid, who.egid),
        (
            Some(NOBODY_UID),
            Some(NOBODY_UID),
            Some(NOBODY_GID),
            Some(NOBODY_GID)
        ),
        "{}",
        out.describe()
    );
    assert!(
        who.groups
            .as_ref()
            .is_some_and(|g| g.iter().all(|&g| g == NOBODY_GID)),
        "supplementary groups {:?}\n{}",
        who.groups,
        out.describe()
    );
    assert_eq!(
        who.cap_eff.as_deref(),
        Some("0000000000000000"),
        "{}",
        out.describe()
    );
    let parent = tb
        .cgroups
        .path()
        .strip_prefix(cgroup2_mount().expect("cgroup2"))
        .expect("parent below the mount");
    let cgroup = out.assert_ok("cgroup").cgroup.clone().unwrap_or_default();
    assert!(
        cgroup.starts_with(&format!("/{}/", parent.display())),
        "workload cgroup {cgroup:?} is not below {}\n{}",
        parent.display(),
        out.describe()
    );
    assert_eq!(
        out.results.len(),
        3,
        "nothing may run after `exit`\n{}",
        out.describe()
    );

    let out = tb.run_agent(&policy, &["exit 0"]).expect("agent run");
    out.assert_exit(0);
    let out = tb.run_agent(&policy, &["exit 255"]).expect("agent run");
    out.assert_exit(255);
}

/// Two agents running at the same time, each with its own policy, do not see each other's
/// rules: each workload reaches only its own allowed port.
#[test]
fn concurrent_agents_enforce_their_own_policies() {
    let Some(tb) = testbed() else { return };
    let a = tb.listen_tcp(sa("198.18.0.2:8080")).expect("listener");
    let b = tb.listen_tcp(sa("198.18.0.2:9090")).expect("listener");
    let policy_a = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);
    let policy_b = PolicyYaml::new().allow_host("198.18.0.2", &[9090], &["tcp"]);
    // The sleeps make both workloads live while the other agent loads its policy.
    let ops_a = [
        "sleep 1500",
        "send tcp4 198.18.0.2 8080 from-a",
        "send tcp4 198.18.0.2 9090 a-to-b",
    ];
    let ops_b = [
        "sleep 1500",
        "send tcp4 198.18.0.2 9090 from-b",
        "send tcp4 198.18.0.2 8080 b-to-a",
    ];
    let run_a = tb.agent(&policy_a).expect("agent").args(ops_a);
    let run_b = tb.agent(&policy_b).expect("agent").args(ops_b);
    let (out_a, out_b) = std::thread::scope(|s| {
        let ha = s.spawn(|| run_a.run_in(tb.client()).expect("agent run a"));
        let hb = s.spawn(|| run_b.run_in(tb.client()).expect("agent run b"));
        (ha.join().expect("thread a"), hb.join().expect("thread b"))
    });
    out_a.assert_exit(0);
    out_b.assert_exit(0);
    out_a.assert_ok("send tcp4 198.18.0.2 8080 from-a");
    out_a.assert_errno("send tcp4 198.18.0.2 9090 a-to-b", EPERM);
    out_b.assert_ok("send tcp4 198.18.0.2 9090 from-b");
    out_b.assert_errno("send tcp4 198.18.0.2 8080 b-to-a", EPERM);
    assert_arrived(&a, b"from-a", &out_a);
    assert_arrived(&b, b"from-b", &out_b);
    std::thread::sleep(SETTLE);
    assert_eq!((a.connections(), b.connections()), (1, 1));
}

/// MPTCP is TCP on the wire: an MPTCP socket must not reach a non-allowed destination
/// (refused at socket creation or at connect, either way with EPERM and no bytes).
#[test]
fn mptcp_to_a_non_allowed_destination_is_refused() {
    let Some(tb) = testbed() else { return };
    tb.topo.add_remote_addr(ip("198.18.1.9")).expect("address");
    let _allowed = tb.listen_tcp(sa("198.18.0.2:8080")).expect("listener");
    let other = tb.listen_tcp(sa("198.18.1.9:8080")).expect("listener");
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
    assert_nothing_arrived(&[&other], &out);
}

/// MCP-NET-02: blocked attempts appear in the logs (the agent logs to stderr), naming the
/// destination.
#[test]
fn blocked_attempts_are_logged_with_the_destination() {
    let Some(tb) = testbed() else { return };
    tb.topo.add_remote_addr(ip("198.18.1.9")).expect("address");
    let _other = tb.listen_tcp(sa("198.18.1.9:8443")).expect("listener");
    let policy = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);
    let out = tb
        .run_agent(&policy, &["connect tcp4 198.18.1.9 8443", "sleep 500"])
        .expect("agent run");
    out.assert_exit(0);
    out.assert_errno("connect tcp4 198.18.1.9 8443", EPERM);
    assert!(
        out.stderr.contains("198.18.1.9") && out.stderr.contains("8443"),
        "agent stderr does not mention the blocked destination 198.18.1.9:8443\n{}",
        out.describe()
    );
}

/// nobody's passwd entry: (home, shell).
fn nobody_entry() -> (String, String) {
    let out = std::process::Command::new("getent")
        .args(["passwd", "nobody"])
        .output()
        .expect("getent");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let f: Vec<&str> = line.split(':').collect();
    assert_eq!(f.len(), 7, "passwd entry {line:?}");
    (f[5].to_owned(), f[6].to_owned())
}

/// Under `--user`, the workload's environment names its own user, not the invoking root's,
/// keeps what the MCP client passed, and it starts in a directory it can use: its home, else
/// `/`, or `--cwd`; `--env-clear` and `--env` shape the rest.
#[test]
fn the_workload_gets_its_users_environment_and_a_usable_working_directory() {
    let Some(tb) = testbed() else { return };
    let (home, shell) = nobody_entry();
    let policy = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);
    let as_root_under_sudo = |run: egress_tests::agent::AgentRun| {
        run.agent_env("HOME", "/root")
            .agent_env("USER", "root")
            .agent_env("LOGNAME", "root")
            .agent_env("MAIL", "/var/mail/root")
            .agent_env("XDG_CONFIG_HOME", "/root/.config")
            .agent_env("GITHUB_TOKEN", "t0ken")
            .agent_env("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    };
    let out = as_root_under_sudo(tb.agent(&policy).unwrap())
        .arg("environ")
        .run_in(tb.client())
        .unwrap();
    out.assert_exit(0);
    let r = out.assert_ok("environ");
    let env = r.env.clone().unwrap_or_default();
    let get = |k: &str| env.get(k).map(String::as_str);
    assert_eq!(get("HOME"), Some(home.as_str()), "{env:#?}");
    assert_eq!(get("USER"), Some("nobody"));
    assert_eq!(get("LOGNAME"), Some("nobody"));
    assert_eq!(get("SHELL"), Some(shell.as_str()));
    assert_eq!(get("MAIL"), None);
    assert_eq!(get("XDG_CONFIG_HOME"), None);
    assert_eq!(get("GITHUB_TOKEN"), Some("t0ken"));
    assert_eq!(
        get("SSL_CERT_FILE"),
        Some("/etc/ssl/certs/ca-certificates.crt")
    );
    let expected_cwd = if Path::new(&home).is_dir() {
        home.as_str()
    } else {
        "/"
    };
    assert_eq!(r.cwd.as_deref(), Some(expected_cwd), "{}", out.describe());

    let out = tb
        .agent(&policy)
        .unwrap()
        .agent_arg("--cwd")
        .agent_arg("/tmp")
        .agent_arg("--env-clear")
        .agent_arg("--env")
        .agent_arg("GITHUB_TOKEN")
        .agent_arg("--env")
        .agent_arg("MODE=read-only")
        .agent_env("GITHUB_TOKEN", "t0ken")
        .agent_env("OTHER", "x")
        .arg("environ")
        .run_in(tb.client())
        .unwrap();
    out.assert_exit(0);
    let r = out.assert_ok("environ");
    assert_eq!(r.cwd.as_deref(), Some("/tmp"));
    let names: Vec<&str> = r
        .env
        .as_ref()
        .map(|e| e.keys().map(String::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        names,
        [
            "GITHUB_TOKEN",
            "HOME",
            "LOGNAME",
            "MODE",
            "PATH",
            "SHELL",
            "USER"
        ],
        "{}",
        out.describe()
    );

    // A --cwd the user cannot enter: the workload does not start, and the agent says why.
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        private.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let out = tb
        .agent(&policy)
        .unwrap()
        .agent_arg("--cwd")
        .agent_arg(private.path())
        .arg("environ")
        .run_in(tb.client())
        .unwrap();
    assert_ne!(out.exit_code(), Some(0), "{}", out.describe());
    assert!(out.results.is_empty(), "{}", out.describe());
    assert!(
        out.stderr.contains("working directory"),
        "{}",
        out.describe()
    );
}
