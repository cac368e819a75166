//! Workloads sharing a network namespace cannot use each other's DNS proxy.

use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::log::{self, blocked, refused, verdict_count};
use egress_tests::probe::rcode;
use egress_tests::run_agent::RunAgent;
use egress_tests::server::WAIT;
use libc::EPERM;
use nix::sys::signal::Signal;
use serde_json::Value;

use super::policy;
use crate::{ip, scenario};

// --- 3. Another workload's proxy --------------------------------------------------------------

/// Two `run` agents protect two cgroups in one network namespace. A workload reaches its own
/// proxy on its port directly (UDP, TCP, IPv6) and gets answers; every way to the other
/// proxy's port (UDP sendto and connect, TCP, ::1, the mapped form, a plain connect or
/// datagram) fails with EPERM, reason `dns_proxy_of_another_workload`, and nothing reaches
/// the other proxy: it logs nothing about those names and the upstream server is not asked.
#[test]
fn a_workload_cannot_use_another_workloads_dns_proxy() {
    let Some(tb) = scenario()
        .tcp("198.18.0.10:8443")
        .tcp("198.18.0.11:8443")
        .upstream(
            Dnsmasq::config()
                .record("a.example.test", ip("198.18.0.10"))
                .record("b.example.test", ip("198.18.0.11")),
        )
        .build()
    else {
        return;
    };
    let [la, lb] = tb.listeners();
    let dns = tb.upstream();
    let _dir = tempfile::tempdir().unwrap();
    let start = |name: &str, wildcard: &str| {
        let cg = tb.cgroups.child(name).unwrap();
        let path = tb
            .write_policy(
                &policy()
                    .name(&format!("proxy-{name}"))
                    .allow_wildcard(wildcard, &[8443], &["tcp"])
                    .render(),
            )
            .unwrap();
        let agent = RunAgent::start(tb.client(), &path, &cg, &[]);
        (cg, agent)
    };
    let (cg_a, mut agent_a) = start("a", "a.example.test");
    let (cg_b, mut agent_b) = start("b", "b.example.test");
    let (pa, pb) = (agent_a.proxy_port(), agent_b.proxy_port());
    assert_ne!(pa, pb);

    let own = |me: &str, port: u16| {
        vec![
            format!("resolve udp4-sendto 127.0.0.1 x.{me}.example.test A port {port}"),
            format!("resolve tcp4 127.0.0.1 x.{me}.example.test A port {port}"),
            format!("resolve udp6 ::1 x.{me}.example.test A port {port}"),
            format!("resolve udp4 198.18.0.2 x.{me}.example.test A then-connect tcp4 8443 {me}"),
        ]
    };
    // Names the other proxy would forward (allowed by its policy) or refuse (logging them).
    let foreign = |peer: &str, port: u16| {
        vec![
            format!("resolve udp4-sendto 127.0.0.1 stolen.{peer}.example.test A port {port}"),
            format!("resolve udp4 127.0.0.1 stolen.{peer}.example.test A port {port}"),
            format!("resolve tcp4 127.0.0.1 stolen.{peer}.example.test A port {port}"),
            format!("resolve udp6 ::1 stolen.{peer}.example.test A port {port}"),
            format!("resolve tcp6 ::ffff:127.0.0.1 stolen.{peer}.example.test A port {port}"),
            format!("resolve udp4-sendto 127.0.0.1 stolen-{peer}.evil.test A port {port}"),
            format!("connect tcp4 127.0.0.1 {port}"),
            format!("sendto udp4 127.0.0.1 {port} raw-to-{peer}"),
        ]
    };
    let (own_a, foreign_a) = (own("a", pa), foreign("b", pb));
    let (own_b, foreign_b) = (own("b", pb), foreign("a", pa));
    let out_a = tb.run_in_cgroup(&cg_a, &[own_a.clone(), foreign_a.clone()].concat());
    let out_b = tb.run_in_cgroup(&cg_b, &[own_b.clone(), foreign_b.clone()].concat());
    assert!(agent_a.signal(Signal::SIGTERM).success());
    assert!(agent_b.signal(Signal::SIGTERM).success());
    let (log_a, log_b) = (agent_a.log(), agent_b.log());

    for (out, own, foreign, addr, port, log, other_log, peer) in [
        (
            &out_a,
            &own_a,
            &foreign_a,
            "198.18.0.10",
            pb,
            &log_a,
            &log_b,
            "b",
        ),
        (
            &out_b,
            &own_b,
            &foreign_b,
            "198.18.0.11",
            pa,
            &log_b,
            &log_a,
            "a",
        ),
    ] {
        for op in own {
            out.assert_answer(op, rcode::NOERROR, &[addr]);
        }
        for op in foreign {
            out.assert_errno(op, EPERM);
        }
        // The two connected-UDP resolves (`udp4`, `udp6`) are refused at their connect, which
        // sends nothing: counted as udp_connect_refused with this refusal as the cause.
        assert_eq!(
            verdict_count(log, "dns_proxy_of_another_workload"),
            foreign.len() as u64 - 2,
            "{log}"
        );
        assert_eq!(verdict_count(log, "udp_connect_refused"), 2, "{log}");
        let lines = blocked(log, "dns_proxy_of_another_workload");
        let no_data: Vec<Value> = log::lines(log)
            .into_iter()
            .filter(|v| {
                v["event"] == "egress_refused_no_data"
                    && v["cause"] == "dns_proxy_of_another_workload"
            })
            .collect();
        for (dst, lines) in [
            ("127.0.0.1", &lines),
            ("127.0.0.1", &no_data),
            ("::1", &no_data),
        ] {
            assert!(
                lines
                    .iter()
                    .any(|v| v["dst.ip"] == dst && v["dst.port"] == port),
                "no dns_proxy_of_another_workload line for {dst}:{port}: {lines:#?}\n{log}"
            );
        }
        let stolen = format!("stolen.{peer}.example.test");
        let evil = format!("stolen-{peer}.evil.test");
        assert!(
            !other_log.contains(&stolen) && !other_log.contains(&evil),
            "the other proxy saw {stolen} or {evil}:\n{other_log}"
        );
        assert!(refused(other_log, &evil).is_empty());
        assert!(
            dns.queries_for(&stolen).is_empty(),
            "the upstream server was asked for {stolen}: {:?}",
            dns.queried()
        );
    }
    assert_eq!(
        String::from_utf8_lossy(&la.wait_for(b"a", WAIT)),
        "a",
        "{}",
        out_a.describe()
    );
    assert_eq!(
        String::from_utf8_lossy(&lb.wait_for(b"b", WAIT)),
        "b",
        "{}",
        out_b.describe()
    );
}
