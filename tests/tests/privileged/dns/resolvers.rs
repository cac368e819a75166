//! Resolver control: another resolver, DNS over TLS, DNS over HTTPS providers, rebinding.

use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::log::{blocked, events, refused, verdict_count};
use egress_tests::policy::PolicyYaml;
use egress_tests::probe::rcode;
use egress_tests::scenario::UPSTREAM;
use egress_tests::server::{assert_arrived, assert_nothing_arrived};
use libc::EPERM;

use super::{agent, assert_forwarded, assert_no_way_out, assert_not_forwarded, finished, policy};
use crate::{ip, scenario};

// --- 3. Resolver control ------------------------------------------------------------------

/// A query sent straight to a resolver the policy does not name is answered by the proxy,
/// never by that resolver: the rogue server (serving other addresses) receives nothing,
/// the workload gets the allowed upstream's address (or NXDOMAIN for a name the policy does
/// not allow), and the reply still appears to come from the address it asked. The control
/// run without the agent shows the rogue server does answer.
#[test]
fn a_query_to_another_resolver_is_answered_by_the_proxy_not_by_that_resolver() {
    let Some(tb) = scenario()
        .remote_addr("198.18.0.53")
        .remote_addr("fd00:e9::53")
        .tcp("198.18.0.10:8443")
        .tcp("198.18.0.66:8443")
        .upstream(Dnsmasq::config().record("api.example.test", ip("198.18.0.10")))
        .build()
    else {
        return;
    };
    let [api, rogue_target] = tb.listeners();
    let dns = tb.upstream();
    let rogue = Dnsmasq::config()
        .listen(ip("198.18.0.53"))
        .listen(ip("fd00:e9::53"))
        .record("api.example.test", ip("198.18.0.66"))
        .record("evil.test", ip("198.18.0.67"))
        .start(tb.remote())
        .expect("rogue dnsmasq");
    let policy = policy().allow_host("api.example.test", &[8443], &["tcp"]);
    let udp = "resolve udp4 198.18.0.53 api.example.test A then-connect tcp4 8443 via-rogue";
    let sendto = "resolve udp4-sendto 198.18.0.53 api.example.test A";
    let tcp = "resolve tcp4 198.18.0.53 api.example.test A";
    let v6 = "resolve udp6 fd00:e9::53 api.example.test A";
    let evil = "resolve udp4 198.18.0.53 evil.test A";
    let many = "dns connect udp4 198.18.0.53 53 api.example.test 20";
    let rogue_addr = "connect tcp4 198.18.0.66 8443";
    let allowed = "resolve udp4 198.18.0.2 api.example.test A";
    let out = finished(
        &tb,
        agent(&tb, &policy).args([udp, sendto, tcp, v6, evil, many, rogue_addr, allowed]),
    );
    for op in [udp, sendto, tcp, v6] {
        out.assert_answer(op, rcode::NOERROR, &["198.18.0.10"]);
    }
    for op in [udp, sendto, tcp, evil] {
        out.assert_from(op, "198.18.0.53:53");
    }
    out.assert_from(v6, "[fd00:e9::53]:53");
    out.assert_nxdomain(evil);
    assert_eq!(out.assert_ok(many).count, Some(20), "{}", out.describe());
    out.assert_errno(rogue_addr, EPERM);
    assert_arrived(api, b"via-rogue", &out);
    assert_nothing_arrived(&[rogue_target], &out);
    assert!(
        rogue.queries().is_empty(),
        "the rogue resolver received queries: {:?}\n{}",
        rogue.queries(),
        out.describe()
    );
    assert_forwarded(dns, "api.example.test", &out);
    assert_not_forwarded(dns, "evil.test", &out);
    out.assert_answer(allowed, rcode::NOERROR, &["198.18.0.10"]);

    // Each query to the rogue resolver is a blocked attempt: one event naming the resolver,
    // the name and the process, and an exact kernel count. The one to the allowed resolver
    // is not flagged.
    let attempts = blocked(&out.stderr, "dns_unauthorized_resolver");
    let pid = out.result(udp).and_then(|r| r.pid);
    let has = |resolver: &str, name: &str, protocol: &str| {
        attempts.iter().any(|e| {
            e["dst.ip"] == resolver
                && e["dst.port"] == 53
                && e["dns.name"] == name
                && e["protocol"] == protocol
                && e["comm"] == "egress-probe"
                && (pid.is_none() || e["pid"].as_u64() == pid.map(u64::from))
        })
    };
    for (resolver, name, protocol) in [
        ("198.18.0.53", "api.example.test", "udp"),
        ("198.18.0.53", "api.example.test", "tcp"),
        ("fd00:e9::53", "api.example.test", "udp"),
        ("198.18.0.53", "evil.test", "udp"),
    ] {
        assert!(
            has(resolver, name, protocol),
            "no unauthorized-resolver event for {name} via {resolver} over {protocol}: {attempts:#?}\n{}",
            out.describe()
        );
    }
    assert!(
        attempts.iter().all(|e| e["dst.ip"] != UPSTREAM),
        "a query to the allowed resolver was flagged: {attempts:#?}"
    );
    // udp, sendto, tcp, v6, evil and the connect of `many`: six redirects.
    assert!(
        verdict_count(&out.stderr, "dns_unauthorized_resolver") >= 6,
        "{}",
        out.describe()
    );

    // Control: without the agent the same query reaches the rogue server and its answer.
    let control = "resolve udp4 198.18.0.53 api.example.test A";
    let bare = tb.run_probe(&[control]).expect("probe run");
    bare.assert_answer(control, rcode::NOERROR, &["198.18.0.66"]);
    assert!(
        !rogue.queries().is_empty(),
        "the control query did not reach the rogue server"
    );
}

// --- 4. DoT -------------------------------------------------------------------------------

/// `block_dot`: TCP and UDP to port 853 are refused to every destination, even one an
/// allow rule names with that port (by address or by name); other ports of the same host
/// still work. Without `block_dot` the same rule lets DoT through.
#[test]
fn dns_over_tls_is_blocked_to_every_host() {
    let Some(tb) = scenario()
        .tcp("198.18.0.2:853")
        .udp("198.18.0.2:853")
        .tcp("[fd00:e9::2]:853")
        .tcp("198.18.0.2:8443")
        .upstream(Dnsmasq::config().record("dot.example.test", ip("198.18.0.2")))
        .build()
    else {
        return;
    };
    let [dot_tcp, dot_udp, dot_tcp6, other] = tb.listeners();
    let rules = |p: PolicyYaml| {
        p.allow_host("198.18.0.2", &[853, 8443], &["tcp", "udp"])
            .allow_host("fd00:e9::2", &[853], &["tcp", "udp"])
            .allow_host("dot.example.test", &[853], &["tcp"])
    };
    let ops = [
        "connect tcp4 198.18.0.2 853",
        "send tcp4 198.18.0.2 853 dot-tcp",
        "sendto udp4 198.18.0.2 853 dot-udp",
        "udpconnect-send udp4 198.18.0.2 853 dot-udp-connected",
        "send tcp6 fd00:e9::2 853 dot-tcp6",
        "sendto udp6 ::ffff:198.18.0.2 853 dot-mapped",
        "resolve udp4 198.18.0.2 dot.example.test A then-connect tcp4 853 dot-by-name",
    ];
    let control = "send tcp4 198.18.0.2 8443 not-dot";
    let out = finished(
        &tb,
        agent(&tb, &rules(policy().block_dot(true)))
            .args(ops)
            .arg(control),
    );
    for op in ops {
        out.assert_errno(op, EPERM);
    }
    // The name resolved; the connection to its address on 853 was what failed.
    let by_name = out.result(ops[6]).unwrap();
    assert_eq!(
        by_name.addrs.as_deref(),
        Some(&[ip("198.18.0.2")][..]),
        "{}",
        out.describe()
    );
    out.assert_ok(control);
    assert_arrived(other, b"not-dot", &out);
    assert_nothing_arrived(&[dot_tcp, dot_udp, dot_tcp6], &out);
    // The UDP connect sends nothing: it is refused as `udp_connect_refused`, with the DoT
    // block as its cause; every other attempt is a dns_over_tls_blocked verdict.
    assert_eq!(
        verdict_count(&out.stderr, "dns_over_tls_blocked"),
        ops.len() as u64 - 1,
        "one dns_over_tls_blocked verdict per attempt but the UDP connect\n{}",
        out.stderr
    );
    assert_eq!(verdict_count(&out.stderr, "udp_connect_refused"), 1);
    let no_data = events(&out.stderr, "egress_refused_no_data");
    assert!(
        no_data.iter().any(|e| e["reason"] == "udp_connect_refused"
            && e["cause"] == "dns_over_tls_blocked"
            && e["carries_data"] == false
            && e["dst.port"] == 853),
        "{no_data:#?}"
    );
    let events = blocked(&out.stderr, "dns_over_tls_blocked");
    for hook in ["connect4", "sendmsg4", "connect6"] {
        assert!(
            events
                .iter()
                .any(|e| e["hook"] == hook && e["dst.port"] == 853),
            "no dns_over_tls_blocked event from {hook}: {events:#?}\n{}",
            out.stderr
        );
    }

    // Control: the same rules without block_dot let DoT through.
    let allowed = "send tcp4 198.18.0.2 853 dot-allowed";
    let out = finished(&tb, agent(&tb, &rules(policy())).arg(allowed));
    out.assert_ok(allowed);
    assert_arrived(dot_tcp, b"dot-allowed", &out);
}

// --- 5. DoH -------------------------------------------------------------------------------

/// `block_doh`: a DoH provider's name is refused by the proxy although a wildcard covers it
/// (and never forwarded), an answer that points an allowed name at a provider address loses
/// that address, and the provider's addresses are denied even where an allow rule's range
/// covers them. The addresses are real ones, but the client namespace has no route to them:
/// had enforcement failed, the connect would end in ENETUNREACH without a packet sent.
#[test]
fn doh_providers_are_blocked_by_name_and_by_address_even_under_a_wildcard() {
    let Some(tb) = scenario()
        .tcp("198.18.0.20:443")
        .tcp("198.18.0.21:443")
        .upstream(
            Dnsmasq::config()
                .record("dns.quad9.net", ip("198.18.0.20"))
                .record("www.quad9.net", ip("198.18.0.21"))
                .record("alias.quad9.net", ip("9.9.9.9")),
        )
        .build()
    else {
        return;
    };
    let doh = egress_agent::dns::doh_list();
    assert!(doh.provider_for_name("dns.quad9.net").is_some());
    assert!(doh.provider_for_name("www.quad9.net").is_none());
    for a in ["9.9.9.9", "2620:fe::fe"] {
        assert!(
            doh.provider_for_address(ip(a)).is_some(),
            "{a} is not listed"
        );
    }
    assert_no_way_out(tb.client(), &["9.9.9.9", "2620:fe::fe"]);
    let [doh_host, www] = tb.listeners();
    let dns = tb.upstream();
    let policy = policy()
        .allow_wildcard("quad9.net", &[443], &["tcp"])
        .allow_cidr("9.9.9.0/24", &[443], &["tcp"])
        .allow_cidr("2620:fe::/48", &[443], &["tcp"])
        .block_doh(true);
    let by_name = "resolve udp4 198.18.0.2 dns.quad9.net A";
    let by_name_tcp = "resolve tcp4 198.18.0.2 DNS.Quad9.net. A";
    let doh_addr = "connect tcp4 198.18.0.20 443";
    let not_doh = "resolve udp4 198.18.0.2 www.quad9.net A then-connect tcp4 443 www";
    let answer_with_doh_addr = "resolve udp4 198.18.0.2 alias.quad9.net A";
    let addr4 = "connect tcp4 9.9.9.9 443";
    let addr6 = "connect tcp6 2620:fe::fe 443";
    let mapped = "connect tcp6 ::ffff:9.9.9.9 443";
    let out = finished(
        &tb,
        agent(&tb, &policy).args([
            by_name,
            by_name_tcp,
            doh_addr,
            not_doh,
            answer_with_doh_addr,
            addr4,
            addr6,
            mapped,
        ]),
    );
    out.assert_nxdomain(by_name);
    out.assert_nxdomain(by_name_tcp);
    out.assert_errno(doh_addr, EPERM);
    out.assert_answer(not_doh, rcode::NOERROR, &["198.18.0.21"]);
    out.assert_answer(answer_with_doh_addr, rcode::NOERROR, &[]);
    for op in [addr4, addr6, mapped] {
        out.assert_errno(op, EPERM);
    }
    assert_arrived(www, b"www", &out);
    assert_nothing_arrived(&[doh_host], &out);
    assert_not_forwarded(dns, "dns.quad9.net", &out);
    assert_forwarded(dns, "www.quad9.net", &out);
    let lines = refused(&out.stderr, "dns.quad9.net");
    assert!(
        lines.iter().any(|l| l["result"] == "doh_provider"),
        "no dns_refused line with result doh_provider: {lines:?}\n{}",
        out.stderr
    );
    let events = blocked(&out.stderr, "doh_provider_blocked");
    for dst in ["9.9.9.9", "2620:fe::fe"] {
        assert!(
            events
                .iter()
                .any(|e| e["dst.ip"] == dst && e["dst.port"] == 443),
            "no doh_provider_blocked event for {dst}: {events:#?}\n{}",
            out.stderr
        );
    }
    assert_eq!(
        verdict_count(&out.stderr, "doh_provider_blocked"),
        3,
        "{}",
        out.stderr
    );
}

// --- 7. Rebinding -------------------------------------------------------------------------

/// An allowed name answered with a metadata or link-local address (directly, among other
/// addresses, or at the end of a CNAME chain), or with an address in one of the policy's
/// denied ranges, loses that address: the workload never sees it, a connect to it gets
/// EPERM, and the agent logs it. The other addresses of the same answer still work.
#[test]
fn an_answer_pointing_into_a_denied_range_is_not_installed() {
    let Some(tb) = scenario()
        .tcp("198.18.0.10:8443")
        .tcp("198.18.9.9:8443")
        .upstream(
            Dnsmasq::config()
                .host("meta.example.test", ip("169.254.169.254"))
                .host("mixed.example.test", ip("198.18.0.10"))
                .host("mixed.example.test", ip("169.254.169.254"))
                .host("target.example.test", ip("169.254.169.254"))
                .cname("alias.example.test", "target.example.test")
                .host("inner.example.test", ip("198.18.9.9"))
                .record("meta6.example.test", ip("fd00:ec2::254")),
        )
        .build()
    else {
        return;
    };
    assert_no_way_out(tb.client(), &["169.254.169.254", "fd00:ec2::254"]);
    let [good, denied_range] = tb.listeners();
    let dns = tb.upstream();
    let policy = policy()
        .allow_wildcard("example.test", &[80, 8443], &["tcp"])
        .deny_cidr("198.18.9.0/24");
    let meta = "resolve udp4 198.18.0.2 meta.example.test A";
    let meta_connect = "connect tcp4 169.254.169.254 80";
    let mixed = "resolve udp4 198.18.0.2 mixed.example.test A then-connect tcp4 8443 mixed";
    let alias = "resolve udp4 198.18.0.2 alias.example.test A";
    let meta6 = "resolve udp6 fd00:e9::2 meta6.example.test AAAA";
    let meta6_connect = "connect tcp6 fd00:ec2::254 80";
    let inner = "resolve tcp4 198.18.0.2 inner.example.test A";
    let inner_connect = "connect tcp4 198.18.9.9 8443";
    let out = finished(
        &tb,
        agent(&tb, &policy).args([
            meta,
            meta_connect,
            mixed,
            alias,
            meta6,
            meta6_connect,
            inner,
            inner_connect,
        ]),
    );
    for op in [meta, alias, meta6, inner] {
        let r = out.assert_ok(op);
        assert_eq!(
            r.addrs.as_deref(),
            Some(&[][..]),
            "`{op}`: the denied address reached the workload\n{}",
            out.describe()
        );
    }
    out.assert_answer(mixed, rcode::NOERROR, &["198.18.0.10"]);
    for op in [meta_connect, meta6_connect, inner_connect] {
        out.assert_errno(op, EPERM);
    }
    assert_arrived(good, b"mixed", &out);
    assert_nothing_arrived(&[denied_range], &out);
    for name in [
        "meta.example.test",
        "mixed.example.test",
        "alias.example.test",
    ] {
        assert_forwarded(dns, name, &out);
    }
    let rebinding = events(&out.stderr, "dns_rebinding_blocked");
    for (name, addr) in [
        ("meta.example.test", "169.254.169.254"),
        ("mixed.example.test", "169.254.169.254"),
        ("alias.example.test", "169.254.169.254"),
        ("meta6.example.test", "fd00:ec2::254"),
        ("inner.example.test", "198.18.9.9"),
    ] {
        assert!(
            rebinding
                .iter()
                .any(|e| e["name"] == name && e["address"] == addr),
            "no dns_rebinding_blocked line for {name} -> {addr}: {rebinding:#?}\n{}",
            out.stderr
        );
    }
}
