//! Lifetimes and the query budget: learned addresses expire, floods are refused, a reload
//! filters what was learned.

use std::time::{Duration, Instant};

use egress_tests::agent::AgentRun;
use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::log::events;
use egress_tests::probe::rcode;
use egress_tests::server::assert_arrived;
use libc::EPERM;

use super::{agent, connections_with, finished, policy, wait_connections};
use crate::{ip, scenario};

// --- Lifetimes and the query budget -------------------------------------------------------

/// A learned address lives for the answer's TTL (clamped by --dns-min-ttl/--dns-max-ttl)
/// plus the expiry grace, then stops new connections; asking again opens it again.
#[test]
fn a_learned_address_expires_after_its_ttl() {
    let Some(tb) = scenario()
        .tcp("198.18.0.10:8443")
        .upstream(
            Dnsmasq::config()
                .record("api.example.test", ip("198.18.0.10"))
                .ttl(1),
        )
        .build()
    else {
        return;
    };
    let [l] = tb.listeners();
    let policy = policy().allow_wildcard("example.test", &[8443], &["tcp"]);
    let first = "resolve udp4 198.18.0.2 api.example.test A then-connect tcp4 8443 first";
    let expired = "connect tcp4 198.18.0.10 8443";
    let again = "resolve udp4 198.18.0.2 api.example.test A then-connect tcp4 8443 again";
    let mut run = agent(&tb, &policy);
    for flag in ["--dns-min-ttl", "--dns-max-ttl", "--dns-expiry-grace"] {
        run = run.agent_arg(flag).agent_arg("1");
    }
    let out = finished(&tb, run.args([first, "sleep 4000", expired, again]));
    out.assert_answer(first, rcode::NOERROR, &["198.18.0.10"]);
    out.assert_errno(expired, EPERM);
    out.assert_answer(again, rcode::NOERROR, &["198.18.0.10"]);
    assert_eq!(wait_connections(l, 2), 2, "{}", out.describe());
    assert_eq!(
        (connections_with(l, b"first"), connections_with(l, b"again")),
        (1, 1)
    );
}

/// The proxy bounds a workload's query rate: past `--dns-query-burst` at a low
/// `--dns-query-rate`, queries get REFUSED, are counted as `rate_limited`, and do not reach
/// the upstream server.
#[test]
fn a_workload_query_flood_is_refused_past_its_budget() {
    let Some(tb) = scenario()
        .upstream(Dnsmasq::config().record("example.test", ip("198.18.0.10")))
        .build()
    else {
        return;
    };
    let dns = tb.upstream();
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
        events(&out.stderr, "dns_refused")
            .iter()
            .any(|l| l["result"] == "rate_limited"),
        "{}",
        out.stderr
    );
}

/// A reload judges the addresses learned under the old policy with the new policy's rebinding
/// filter: an address now in a denied range is reported (`source: reload`) and not carried
/// over, like any address the agent installs.
#[test]
fn a_reload_filters_learned_addresses_like_any_other() {
    let Some(tb) = scenario()
        .tcp("198.18.0.40:8443")
        .upstream(Dnsmasq::config().record("x.example.test", ip("198.18.0.40")))
        .build()
    else {
        return;
    };
    let [l] = tb.listeners();
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
    out.assert_answer(learn, rcode::NOERROR, &["198.18.0.40"]);
    assert_arrived(l, b"before", &out);
    out.assert_errno("connect tcp4 198.18.0.40 8443", EPERM);
    let filtered = events(&out.stderr, "dns_rebinding_blocked");
    assert!(
        filtered.iter().any(|e| e["source"] == "reload"
            && e["address"] == "198.18.0.40"
            && e["name"] == "x.example.test"),
        "{filtered:#?}\n{}",
        out.describe()
    );
}
