//! `egress-agent learn`: a policy learned from a real run lets the same run through when
//! enforced, with no denial, and refuses what the run never used.

use std::process::Command;

use egress_tests::agent::{AgentRun, agent_bin, run_learn};
use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::log;
use egress_tests::policy::PolicyYaml;
use egress_tests::scenario::UPSTREAM;
use egress_tests::server::{SETTLE, WAIT};
use libc::EPERM;
use serde_json::Value;

use crate::{ip, scenario};

/// The workload: a lookup and a connection by name, a connection by address.
const RUN: [&str; 2] = [
    "resolve udp4 198.18.0.2 api.learn.example.test A then-connect tcp4 8443 by-name",
    "send tcp4 198.18.0.23 9000 by-address",
];

#[test]
fn a_learned_policy_passes_an_enforced_rerun_and_refuses_what_was_never_used() {
    let Some(tb) = scenario()
        .tcp("198.18.0.21:8443")
        .tcp("198.18.0.22:8443")
        .tcp("198.18.0.23:9000")
        .upstream(
            Dnsmasq::config()
                .record("api.learn.example.test", ip("198.18.0.21"))
                .record("other.learn.example.test", ip("198.18.0.22")),
        )
        .build()
    else {
        return;
    };
    let [named, unused, direct] = tb.listeners();
    // The starting policy allows nothing; it only names the test's resolver.
    let start = tb
        .write_policy(&PolicyYaml::new().allowed_resolvers(&[UPSTREAM]).render())
        .expect("policy");
    let out_dir = tempfile::tempdir().expect("temp dir");
    let learned = out_dir.path().join("learned.yaml");

    let out = run_learn(
        tb.client(),
        &learned,
        &tb.cgroups,
        &["--policy".as_ref(), start.as_os_str()],
        tb.probe.path(),
        &RUN,
    )
    .expect("learn run");
    out.assert_exit(0);
    // Audit mode: both went through while learning.
    out.assert_ok(RUN[0]);
    out.assert_ok(RUN[1]);
    assert_eq!(
        named.wait_for(b"by-name", WAIT),
        b"by-name",
        "{}",
        out.describe()
    );
    assert_eq!(direct.wait_for(b"by-address", WAIT), b"by-address");
    let audited: Vec<Value> = log::lines(&out.stderr)
        .into_iter()
        .filter(|v| v["event"] == "egress_audit")
        .collect();
    assert!(
        audited.iter().any(|v| v["hook"] == "dns_proxy"
            && v["dns.name"] == "api.learn.example.test"
            && v["verdict"] == "audit"),
        "the refused name was resolved and audited\n{}",
        out.describe()
    );

    let text = std::fs::read_to_string(&learned).expect("learned policy");
    assert!(text.contains("host: \"api.learn.example.test\""), "{text}");
    assert!(text.contains("cidr: \"198.18.0.23/32\""), "{text}");
    assert!(
        !text.contains("198.18.0.21/32"),
        "a named address is not a cidr\n{text}"
    );
    let check = Command::new(agent_bin().expect("agent"))
        .arg("check")
        .arg(&learned)
        .output()
        .expect("check");
    assert!(
        check.status.success(),
        "check refuses the learned policy: {}\n{text}",
        String::from_utf8_lossy(&check.stderr)
    );

    // The same run, enforced under the learned policy: nothing denied.
    let enforced = AgentRun::new(&learned, &tb.cgroups, tb.probe.path())
        .expect("agent")
        .json_log()
        .args(RUN)
        .args([
            "resolve udp4 198.18.0.2 other.learn.example.test A",
            "send tcp4 198.18.0.22 8443 never-used",
        ])
        .run_in(tb.client())
        .expect("enforced run");
    enforced.assert_exit(0);
    enforced.assert_ok(RUN[0]);
    enforced.assert_ok(RUN[1]);
    assert_eq!(named.wait_for(b"by-nameby-name", WAIT), b"by-nameby-name");
    assert_eq!(
        direct.wait_for(b"by-addressby-address", WAIT),
        b"by-addressby-address"
    );
    // What the run never used is refused: the other name, and its address.
    enforced.assert_errno("send tcp4 198.18.0.22 8443 never-used", EPERM);
    std::thread::sleep(SETTLE);
    assert_eq!(unused.connections(), 0);
    let lines = log::lines(&enforced.stderr);
    let denials: Vec<&Value> = lines
        .iter()
        .filter(|v| v["event"] == "egress_blocked")
        .collect();
    // Exactly the two extra attempts, none of the learned run.
    assert_eq!(denials.len(), 2, "{}", enforced.describe());
    assert!(
        denials
            .iter()
            .any(|v| v["dns.name"] == "other.learn.example.test"),
        "{}",
        enforced.describe()
    );
    assert!(
        denials
            .iter()
            .any(|v| v["dst.ip"] == "198.18.0.22" && v["dst.port"] == 8443),
        "{}",
        enforced.describe()
    );
}
