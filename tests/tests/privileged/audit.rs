//! Audit mode: what the policy denies goes through, and is logged and counted with verdict
//! audit; enforce mode, the same policy, still refuses it.

use std::path::Path;

use egress_tests::agent::AgentRun;
use egress_tests::log::lines;
use egress_tests::policy::PolicyYaml;
use egress_tests::scenario::World;
use egress_tests::server::WAIT;
use libc::EPERM;
use serde_json::Value;

use crate::{PROBE, scenario};

fn policy() -> PolicyYaml {
    PolicyYaml::new()
        .allow_cidr("198.18.0.2/32", &[8080], &["tcp"])
        .deny_cidr("198.18.0.3/32")
}

/// The same policy with `mode: audit` written in it.
fn with_mode(yaml: &str, mode: &str) -> String {
    yaml.replacen(
        "egress_policy:\n",
        &format!("egress_policy:\n  mode: {mode}\n"),
        1,
    )
}

const OPS: [&str; 3] = [
    "send tcp4 198.18.0.2 9090 other-port",
    "send tcp4 198.18.0.3 8080 denied-range",
    "send tcp4 198.18.0.2 8080 allowed",
];

/// A listener on each destination of [`OPS`], in that order.
fn world() -> Option<World> {
    scenario()
        .tcp("198.18.0.2:9090")
        .tcp("198.18.0.3:8080")
        .tcp("198.18.0.2:8080")
        .build()
}

#[test]
fn audit_mode_lets_denied_connections_through_and_logs_them_with_verdict_audit() {
    let Some(tb) = world() else { return };
    let [other_port, denied, allowed] = tb.listeners();

    // `--mode audit` on a policy that leaves the mode out.
    let out = tb
        .agent(&policy())
        .expect("agent")
        .agent_arg("--mode")
        .agent_arg("audit")
        .json_log()
        .args(OPS)
        .run_in(tb.client())
        .expect("agent run");
    out.assert_exit(0);
    for op in OPS {
        out.assert_ok(op);
    }
    assert_eq!(other_port.wait_for(b"other-port", WAIT), b"other-port");
    assert_eq!(denied.wait_for(b"denied-range", WAIT), b"denied-range");
    assert_eq!(allowed.wait_for(b"allowed", WAIT), b"allowed");

    let log = lines(&out.stderr);
    let audited: Vec<&Value> = log
        .iter()
        .filter(|v| v["event"] == "egress_audit")
        .collect();
    let find = |port: u64, ip: &str| {
        audited
            .iter()
            .find(|v| v["dst.port"] == port && v["dst.ip"] == ip)
            .unwrap_or_else(|| panic!("no audit event for {ip}:{port}\n{}", out.describe()))
    };
    let port_event = find(9090, "198.18.0.2");
    assert_eq!(port_event["verdict"], "audit");
    assert_eq!(port_event["reason"], "port_not_allowed");
    assert_eq!(port_event["hook"], "connect4");
    assert_eq!(
        port_event["rule.target"],
        "allowed_destinations[0] 198.18.0.2/32"
    );
    let range_event = find(8080, "198.18.0.3");
    assert_eq!(range_event["verdict"], "audit");
    assert_eq!(range_event["reason"], "denied_by_rule");
    assert!(
        !log.iter().any(|v| v["event"] == "egress_blocked"),
        "nothing was blocked\n{}",
        out.describe()
    );
    assert!(
        log.iter()
            .any(|v| v["mode"] == "audit" && v["message"] == "policy compiled and loaded"),
        "the start-up log names the mode\n{}",
        out.describe()
    );
    let audit_count = |reason: &str| {
        log.iter()
            .filter(|v| {
                v["message"] == "verdict count" && v["verdict"] == "audit" && v["reason"] == reason
            })
            .map(|v| v["count"].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(audit_count("port_not_allowed"), 1, "{}", out.describe());
    assert_eq!(audit_count("denied_by_rule"), 1, "{}", out.describe());
}

#[test]
fn enforce_mode_still_refuses_and_a_policy_saying_enforce_is_never_audited() {
    let Some(tb) = world() else { return };
    let [other_port, denied, allowed] = tb.listeners();
    let yaml = policy().render();

    // `mode: audit` in the file, `--mode enforce` on the command line: enforced.
    let path = tb.write_policy(&with_mode(&yaml, "audit")).expect("policy");
    let out = AgentRun::new(&path, &tb.cgroups, Path::new(PROBE))
        .expect("agent")
        .agent_arg("--mode")
        .agent_arg("enforce")
        .json_log()
        .args(OPS)
        .run_in(tb.client())
        .expect("agent run");
    out.assert_exit(0);
    out.assert_errno(OPS[0], EPERM);
    out.assert_errno(OPS[1], EPERM);
    out.assert_ok(OPS[2]);
    assert_eq!(allowed.wait_for(b"allowed", WAIT), b"allowed");
    std::thread::sleep(egress_tests::server::SETTLE);
    assert_eq!(other_port.connections(), 0);
    assert_eq!(denied.connections(), 0);
    let log = lines(&out.stderr);
    assert_eq!(
        log.iter()
            .filter(|v| v["event"] == "egress_blocked" && v["verdict"] == "deny")
            .count(),
        2,
        "{}",
        out.describe()
    );
    assert!(!log.iter().any(|v| v["event"] == "egress_audit"));

    // `mode: enforce` in the file: `--mode audit` is refused before anything runs.
    let path = tb
        .write_policy(&with_mode(&yaml, "enforce"))
        .expect("policy");
    let out = AgentRun::new(&path, &tb.cgroups, Path::new(PROBE))
        .expect("agent")
        .agent_arg("--mode")
        .agent_arg("audit")
        .args(OPS)
        .run_in(tb.client())
        .expect("agent run");
    out.assert_exit(78);
    assert!(
        out.stderr.contains("never run in audit mode"),
        "{}",
        out.describe()
    );
    assert_eq!(other_port.connections(), 0);
    assert_eq!(denied.connections(), 0);
}
