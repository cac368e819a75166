//! Per-rule counters: each decision the kernel makes by a rule is counted under that rule.

use egress_tests::policy::PolicyYaml;
use libc::EPERM;

use crate::{sa, testbed};

#[test]
fn decisions_are_counted_per_rule() {
    let Some(tb) = testbed() else { return };
    tb.topo
        .add_remote_addr("198.18.0.4".parse().expect("ip"))
        .expect("address");
    let _allowed = tb.listen_tcp(sa("198.18.0.2:8080")).expect("listener");
    let policy = PolicyYaml::new()
        .allow_cidr("198.18.0.2/32", &[8080], &["tcp"])
        .allow_cidr("198.18.0.3/32", &[443], &["tcp"])
        .deny_cidr("198.18.0.4/32");
    let allowed = "send tcp4 198.18.0.2 8080 one";
    let again = "send tcp4 198.18.0.2 8080 two";
    let port = "send tcp4 198.18.0.2 9090 wrong-port";
    let denied = "send tcp4 198.18.0.4 80 denied";
    let no_rule = "send tcp4 198.18.0.9 80 no-rule";
    let out = tb
        .agent(&policy)
        .expect("agent")
        .json_log()
        .args([allowed, again, port, denied, no_rule])
        .run_in(tb.client())
        .expect("agent run");
    out.assert_exit(0);
    out.assert_ok(allowed);
    out.assert_ok(again);
    for op in [port, denied, no_rule] {
        out.assert_errno(op, EPERM);
    }
    let counts: Vec<(String, u64, u64, u64)> = egress_tests::log::lines(&out.stderr)
        .into_iter()
        .filter(|v| v["message"] == "rule count")
        .map(|v| {
            (
                v["list"].as_str().unwrap_or_default().to_owned(),
                v["rule"].as_u64().unwrap_or(u64::MAX),
                v["allowed"].as_u64().unwrap_or(u64::MAX),
                v["denied"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    assert_eq!(
        counts,
        vec![
            ("allowed_destinations".to_owned(), 0, 2, 1),
            ("denied_destinations".to_owned(), 0, 0, 1),
        ],
        "{}",
        out.describe()
    );
}
