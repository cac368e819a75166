//! Regression tests for the escapes an independent review found around the DNS proxy, on the
//! real kernel:
//!
//! 1. socket options that bind a socket to an interface (and so could put even a loopback
//!    destination, the proxy's included, onto the wire) are refused at setsockopt;
//! 2. an interface named per message (IP_PKTINFO / IPV6_PKTINFO ancillary data, or the scope
//!    of a link-local address) cannot take a loopback or redirected DNS send onto the wire;
//! 3. workloads sharing a network namespace cannot use each other's DNS proxy;
//! 4. once a `run` agent is gone, DNS is denied within seconds, so that whatever binds the
//!    dead proxy's port is never believed; a restarted agent serves DNS again;
//! 5. an allowed name that is an alias (CNAME) of a denied name is refused like that name.
//!
//! Each test asserts what a user would check: the errno the workload got, the frames that did
//! or did not cross the veth pair (an AF_PACKET capture on its remote end), the answers, what
//! the upstream server and the other agent saw, and the agents' JSON logs. Where the point is
//! that the kernel would otherwise allow something, a control run without the agent shows it
//! does. Traffic only goes to loopback or to addresses of the test's own namespaces.

mod interfaces;
mod liveness;
mod proxies;

use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::log::refused;
use egress_tests::policy::PolicyYaml;
use egress_tests::probe::rcode;
use egress_tests::process::RunOutput;
use egress_tests::scenario::UPSTREAM;
use egress_tests::server::{SETTLE, WAIT};
use egress_tests::testbed::Testbed;
use libc::EPERM;

use crate::{ip, scenario};

/// A policy whose DNS goes to the test's dnsmasq.
fn policy() -> PolicyYaml {
    PolicyYaml::new().allowed_resolvers(&[UPSTREAM])
}

/// Runs `egress-agent exec` around the probe in the client namespace; checks it exited 0.
fn finished(tb: &Testbed, policy: &PolicyYaml, ops: &[String]) -> RunOutput {
    finished_with(tb, policy, &[], ops)
}

/// As [`finished`], with extra agent arguments.
fn finished_with(
    tb: &Testbed,
    policy: &PolicyYaml,
    agent_args: &[&str],
    ops: &[String],
) -> RunOutput {
    let mut run = tb.agent(policy).expect("agent command").json_log();
    for a in agent_args {
        run = run.agent_arg(a);
    }
    let out = run.args(ops).run_in(tb.client()).expect("agent run");
    out.assert_exit(0);
    out
}

// --- 5. An alias of a denied name -------------------------------------------------------------

/// `alias.example.test` is allowed by `*.example.test`, but the upstream answer makes it a
/// CNAME of `x.evil.test`, which `*.evil.test` denies: the workload gets NXDOMAIN over UDP and
/// TCP, the target's address stays closed, and the refusal is logged with result `denied`.
/// An alias of an allowed name still resolves and connects.
#[test]
fn an_alias_of_a_denied_name_is_refused_like_that_name() {
    let Some(tb) = scenario()
        .tcp("198.18.0.30:8443")
        .tcp("198.18.0.31:8443")
        .upstream(
            Dnsmasq::config()
                .host("x.evil.test", ip("198.18.0.30"))
                .cname("alias.example.test", "x.evil.test")
                .host("y.example.test", ip("198.18.0.31"))
                .cname("fine.example.test", "y.example.test"),
        )
        .build()
    else {
        return;
    };
    let [evil, good] = tb.listeners();
    let policy = policy()
        .allow_wildcard("example.test", &[8443], &["tcp"])
        .deny_host("*.evil.test");
    let udp = "resolve udp4 198.18.0.2 alias.example.test A".to_owned();
    let tcp = "resolve tcp4 198.18.0.2 alias.example.test A".to_owned();
    let connect = "connect tcp4 198.18.0.30 8443".to_owned();
    let fine = "resolve udp4 198.18.0.2 fine.example.test A then-connect tcp4 8443 fine".to_owned();
    let out = finished(
        &tb,
        &policy,
        &[udp.clone(), tcp.clone(), connect.clone(), fine.clone()],
    );
    for op in [&udp, &tcp] {
        let r = out.assert_ok(op);
        assert!(
            r.rcode == Some(rcode::NXDOMAIN)
                || (r.rcode == Some(rcode::NOERROR) && r.addrs.as_deref() == Some(&[])),
            "`{op}`: NXDOMAIN or no address expected, got rcode {:?} {:?}\n{}",
            r.rcode,
            r.addrs,
            out.describe()
        );
        assert!(
            !r.addrs
                .as_deref()
                .unwrap_or_default()
                .contains(&ip("198.18.0.30")),
            "{}",
            out.describe()
        );
    }
    out.assert_errno(&connect, EPERM);
    out.assert_answer(&fine, rcode::NOERROR, &["198.18.0.31"]);
    assert_eq!(
        String::from_utf8_lossy(&good.wait_for(b"fine", WAIT)),
        "fine"
    );
    std::thread::sleep(SETTLE);
    assert_eq!(evil.connections(), 0, "{}", out.describe());
    let lines = refused(&out.stderr, "alias.example.test");
    assert!(
        lines.iter().any(|l| l["result"] == "denied"),
        "no dns_refused line with result denied for alias.example.test: {lines:#?}\n{}",
        out.stderr
    );
}
