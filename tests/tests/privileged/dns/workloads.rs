//! Per workload: two workloads side by side, a workload in its own network namespace, DNS over
//! TCP and hostile input.

use std::time::Duration;

use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::netns::Netns;
use egress_tests::probe::{errno_name, rcode};
use egress_tests::scenario::UPSTREAM;
use egress_tests::server::{Listener, SETTLE, assert_arrived};
use libc::EPERM;

use super::{agent, assert_not_forwarded, finished, policy};
use crate::{ip, sa, scenario};

// --- 8. Per workload ----------------------------------------------------------------------

/// Two workloads under two agents with different policies, side by side in one namespace:
/// what one learns from its lookups opens nothing for the other, while both stay alive (so
/// each one's learned addresses are in force when the other tries them). The workloads sync
/// through files, not sleeps.
#[test]
fn addresses_learned_by_one_workload_open_nothing_for_another() {
    let Some(tb) = scenario()
        .tcp("198.18.0.10:8443")
        .tcp("198.18.0.11:8443")
        .upstream(
            Dnsmasq::config()
                .record("x.a.example.test", ip("198.18.0.10"))
                .record("x.b.example.test", ip("198.18.0.11")),
        )
        .build()
    else {
        return;
    };
    let [la, lb] = tb.listeners();
    let dns = tb.upstream();
    let sync = tb.sync_dir().expect("sync dir");
    let file = |f: &str| sync.path().join(f).display().to_string();
    let ops = |me: &str, peer: &str, peer_addr: &str, own_addr: &str| -> Vec<String> {
        vec![
            format!("resolve udp4 198.18.0.2 x.{me}.example.test A then-connect tcp4 8443 {me}"),
            format!("touch {}", file(&format!("{me}-resolved"))),
            format!("wait-file {} 30000", file(&format!("{peer}-resolved"))),
            format!("connect tcp4 {peer_addr} 8443"),
            format!("resolve udp4 198.18.0.2 x.{peer}.example.test A"),
            format!("connect tcp4 {own_addr} 8443"),
            format!("touch {}", file(&format!("{me}-done"))),
            format!("wait-file {} 30000", file(&format!("{peer}-done"))),
        ]
    };
    let ops_a = ops("a", "b", "198.18.0.11", "198.18.0.10");
    let ops_b = ops("b", "a", "198.18.0.10", "198.18.0.11");
    let run_a = agent(
        &tb,
        &policy()
            .name("dns-a")
            .allow_wildcard("a.example.test", &[8443], &["tcp"]),
    )
    .args(&ops_a);
    let run_b = agent(
        &tb,
        &policy()
            .name("dns-b")
            .allow_wildcard("b.example.test", &[8443], &["tcp"]),
    )
    .args(&ops_b);
    let (out_a, out_b) = std::thread::scope(|s| {
        let a = s.spawn(|| run_a.run_in(tb.client()).expect("agent run a"));
        let b = s.spawn(|| run_b.run_in(tb.client()).expect("agent run b"));
        (a.join().expect("thread a"), b.join().expect("thread b"))
    });
    for (out, ops, own) in [
        (&out_a, &ops_a, "198.18.0.10"),
        (&out_b, &ops_b, "198.18.0.11"),
    ] {
        out.assert_exit(0);
        out.assert_answer(&ops[0], rcode::NOERROR, &[own]);
        for op in &ops[1..3] {
            out.assert_ok(op);
        }
        out.assert_errno(&ops[3], EPERM);
        out.assert_nxdomain(&ops[4]);
        out.assert_ok(&ops[5]);
    }
    assert_arrived(la, b"a", &out_a);
    assert_arrived(lb, b"b", &out_b);
    std::thread::sleep(SETTLE);
    // Each listener saw its own workload twice (then-connect and the later connect) and the
    // other workload never.
    assert_eq!((la.connections(), lb.connections()), (2, 2));
    // Each name was asked upstream by its own workload only: once.
    assert_eq!(
        dns.queries_for("x.a.example.test").len(),
        1,
        "{:?}",
        dns.queried()
    );
    assert_eq!(
        dns.queries_for("x.b.example.test").len(),
        1,
        "{:?}",
        dns.queried()
    );
}

// --- 10. A workload in its own network namespace ------------------------------------------

/// `--netns`: the workload runs in a namespace of its own (as in a pod) whose only addresses
/// are on its loopback and which has no route anywhere; its queries to any resolver address
/// reach the proxy listening inside that namespace, and the proxy's upstream queries leave
/// from the agent's namespace. The allowed name's pod-local address opens at once; other
/// names get NXDOMAIN.
#[test]
fn a_workload_in_its_own_network_namespace_gets_the_same_dns_control() {
    let Some(tb) = scenario()
        .upstream(
            Dnsmasq::config()
                .record("svc.example.test", ip("198.18.7.1"))
                .record("evil.test", ip("198.18.7.1")),
        )
        .build()
    else {
        return;
    };
    let dns = tb.upstream();
    let pod = Netns::new("pod").expect("pod namespace");
    pod.add_local_addr(ip("198.18.7.1")).expect("pod address");
    assert!(
        !pod.has_route_to(ip(UPSTREAM)),
        "the pod must not reach the resolver itself"
    );
    let svc = Listener::tcp(&pod, sa("198.18.7.1:8443")).expect("listener in the pod");
    let policy = policy().allow_wildcard("example.test", &[8443], &["tcp"]);
    let before = "connect tcp4 198.18.7.1 8443";
    let udp = "resolve udp4 198.18.0.2 svc.example.test A then-connect tcp4 8443 from-the-pod";
    let tcp = "resolve tcp4 198.18.0.2 svc.example.test A";
    let stub = "resolve udp4-sendto 127.0.0.53 svc.example.test A";
    let v6 = "resolve udp6 fd00:e9::2 svc.example.test A";
    let evil = "resolve udp4 198.18.0.2 evil.test A";
    let out = finished(
        &tb,
        agent(&tb, &policy)
            .workload_netns(&pod)
            .args([before, udp, tcp, stub, v6, evil]),
    );
    // The wildcard cannot be resolved in advance: the pod's address opens with the answer.
    out.assert_errno(before, EPERM);
    for op in [udp, tcp, stub, v6] {
        out.assert_answer(op, rcode::NOERROR, &["198.18.7.1"]);
    }
    out.assert_from(udp, "198.18.0.2:53");
    out.assert_from(stub, "127.0.0.53:53");
    out.assert_nxdomain(evil);
    assert_arrived(&svc, b"from-the-pod", &out);
    assert_not_forwarded(dns, "evil.test", &out);
    let asked = dns.queries_for("svc.example.test");
    assert!(
        !asked.is_empty() && asked.iter().all(|q| q.from == "198.18.0.1"),
        "upstream queries must come from the agent's namespace (198.18.0.1): {asked:?}"
    );
}

// --- 11. DNS over TCP and hostile input ---------------------------------------------------

/// The header, then `labels` labels of 63 `a`s: a name longer than 255 bytes.
fn long_name_query(labels: usize) -> String {
    let mut hex = String::from("abcd01000001000000000000");
    for _ in 0..labels {
        hex.push_str("3f");
        hex.push_str(&"61".repeat(63));
    }
    hex.push_str("0000010001");
    hex
}

/// DNS over TCP is answered like UDP (length framing, the same refusals). Malformed
/// queries over UDP and TCP (too short, a question count with no question, a compression
/// loop, a label running past the end, an over-long name, a response instead of a query,
/// bytes that are not framed) get FORMERR or no answer, and the proxy keeps serving: the
/// valid queries after them are answered.
#[test]
fn tcp_queries_are_answered_and_malformed_ones_get_formerr_or_nothing() {
    let Some(tb) = scenario()
        .tcp("198.18.0.10:8443")
        .upstream(
            Dnsmasq::config()
                .record("example.test", ip("198.18.0.10"))
                .record("evil.test", ip("198.18.0.11")),
        )
        .build()
    else {
        return;
    };
    let [api] = tb.listeners();
    let dns = tb.upstream();
    let policy = policy().allow_wildcard("example.test", &[8443], &["tcp"]);
    let tcp = "resolve tcp4 198.18.0.2 api.example.test A then-connect tcp4 8443 over-tcp";
    let tcp6 = "resolve tcp6 fd00:e9::2 api.example.test A";
    let tcp_repeat = "resolve tcp4 198.18.0.2 n{i}.example.test A repeat 20";
    let tcp_evil = "resolve tcp4 198.18.0.2 evil.test A";
    let bad_messages = [
        "1234".to_owned(),
        "123401000001000000000000".to_owned(),
        "123401000001000000000000c00c00010001".to_owned(),
        "1234010000010000000000003f61".to_owned(),
        long_name_query(5),
        "12348180000100000000000001610474657374000001 0001".replace(' ', ""),
    ];
    let mut malformed = Vec::new();
    for hex in &bad_messages {
        malformed.push(format!("dnsraw udp4 198.18.0.2 {hex}"));
    }
    for hex in &bad_messages[1..4] {
        malformed.push(format!("dnsraw tcp4 198.18.0.2 {hex}"));
    }
    let unframed = "send tcp4 198.18.0.2 53 this is not a DNS message";
    let after_udp = "resolve udp4 198.18.0.2 after.example.test A";
    let after_tcp = "resolve tcp4 198.18.0.2 after.example.test A";
    let out = finished(
        &tb,
        agent(&tb, &policy)
            .timeout(Duration::from_secs(120))
            .args([tcp, tcp6, tcp_repeat, tcp_evil])
            .args(&malformed)
            .args([unframed, after_udp, after_tcp]),
    );
    out.assert_answer(tcp, rcode::NOERROR, &["198.18.0.10"]);
    out.assert_from(tcp, "198.18.0.2:53");
    out.assert_answer(tcp6, rcode::NOERROR, &["198.18.0.10"]);
    out.assert_from(tcp6, "[fd00:e9::2]:53");
    assert_eq!(
        out.assert_answer(tcp_repeat, rcode::NOERROR, &["198.18.0.10"])
            .count,
        Some(20)
    );
    out.assert_nxdomain(tcp_evil);
    assert_arrived(api, b"over-tcp", &out);
    for op in &malformed {
        let r = out.result(op).expect("ran");
        let formerr = r.ok && r.rcode == Some(rcode::FORMERR);
        let nothing = !r.ok
            && (r.errno == Some(libc::ETIMEDOUT)
                || r.errno.is_none() && r.error.as_deref().is_some_and(|e| e.contains("closed")));
        assert!(
            formerr || nothing,
            "`{op}`: expected FORMERR or no answer, got {} rcode {:?}\n{}",
            if r.ok {
                "a reply".to_owned()
            } else {
                r.error.clone().unwrap_or_default()
            },
            r.rcode,
            out.describe()
        );
        if let Some(errno) = r.errno.filter(|e| *e != libc::ETIMEDOUT) {
            panic!("`{op}` failed with {}", errno_name(errno));
        }
    }
    out.assert_answer(after_udp, rcode::NOERROR, &["198.18.0.10"]);
    out.assert_answer(after_tcp, rcode::NOERROR, &["198.18.0.10"]);
    assert_not_forwarded(dns, "evil.test", &out);
    assert!(
        !out.stderr.contains("panicked"),
        "the agent panicked\n{}",
        out.stderr
    );
}
