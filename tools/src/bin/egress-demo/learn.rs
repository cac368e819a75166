//! After the six cases: a policy learned from a workload's run passes the same run enforced.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result};
use egress_tests::agent::AgentRun;
use egress_tests::probe::errno_name;
use egress_tests::server::{Listener, contains};
use egress_tests::testbed::Testbed;
use serde_json::Value;

use crate::output::{LogObject, agent_exit_ok, log_objects};
use crate::{AGENT_TIMEOUT, ARRIVAL_WAIT};

/// The learn -> enforce flow: `learn` runs a workload in audit mode from an allow-nothing
/// policy and writes what it used; the same workload enforced under that policy meets no
/// denial, and a destination it never used is refused.
pub fn learn_then_enforce(
    agent: &Path,
    tb: &Testbed,
    resolv_conf: &Path,
    listeners: &[Listener],
) -> Result<bool> {
    const RUN: [&str; 2] = [
        "resolve udp4 10.0.0.53 api.company.com A then-connect tcp4 443 learned-api",
        "send tcp4 198.18.0.20 5432 learned-db",
    ];
    const NEVER: &str = "send tcp4 198.18.0.66 443 never-used";
    println!(
        "
Learn, then enforce: a policy generated from what a workload really does"
    );
    let dir = tempfile::tempdir().context("a directory for the learned policy")?;
    let learned = dir.path().join("learned.yaml");
    println!(
        "  {} learn --out learned.yaml --user nobody --resolv-conf FILE -- egress-probe \\",
        agent.display()
    );
    println!("      '{}' \\", RUN[0]);
    println!("      '{}'", RUN[1]);
    let learn_run = egress_tests::agent::run_learn(
        tb.client(),
        &learned,
        &tb.cgroups,
        &["--resolv-conf".as_ref(), resolv_conf.as_os_str()],
        tb.probe.path(),
        &RUN,
    )?;
    let mut passed = agent_exit_ok(&learn_run);
    let audited = log_objects(&learn_run)
        .filter(|o| o.get("event").and_then(Value::as_str) == Some("egress_audit"))
        .count();
    println!(
        "  audit mode let {audited} attempt(s) the allow-nothing policy denies through, logged \
         with verdict audit; the workload's operations: {}",
        RUN.iter()
            .map(|op| match learn_run.result(op) {
                Some(r) if r.ok => "ok".to_owned(),
                Some(r) => format!("failed ({})", r.errno.map_or("?".into(), errno_name)),
                None => "no result".to_owned(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    let text = std::fs::read_to_string(&learned)
        .with_context(|| format!("reading {}", learned.display()))?;
    println!("  learned.yaml:");
    for line in text.lines() {
        println!("    {line}");
    }
    let check = Command::new(agent)
        .arg("check")
        .arg(&learned)
        .output()
        .context("running check")?;
    println!(
        "  check learned.yaml: {}",
        if check.status.success() {
            "OK"
        } else {
            "REFUSED"
        }
    );
    passed &= check.status.success();

    let before = [0, 4, 5].map(|i| listeners[i].received().len());
    let enforced = AgentRun::new(&learned, &tb.cgroups, tb.probe.path())?
        .agent_arg("--resolv-conf")
        .agent_arg(resolv_conf)
        .json_log()
        .args(RUN)
        .arg(NEVER)
        .timeout(AGENT_TIMEOUT)
        .run_in(tb.client())?;
    passed &= agent_exit_ok(&enforced);
    let arrived = |i: usize, k: usize, what: &str| {
        let got = listeners[i].wait_for(what.as_bytes(), ARRIVAL_WAIT);
        contains(&got[before[k].min(got.len())..], what.as_bytes())
    };
    let same_run_ok = RUN
        .iter()
        .all(|op| enforced.result(op).is_some_and(|r| r.ok))
        && arrived(0, 0, "learned-api")
        && arrived(4, 1, "learned-db");
    let never_refused = enforced
        .result(NEVER)
        .is_some_and(|r| r.errno == Some(libc::EPERM))
        && listeners[5].received().len() == before[2];
    let blocked: Vec<LogObject> = log_objects(&enforced)
        .filter(|o| o.get("event").and_then(Value::as_str) == Some("egress_blocked"))
        .collect();
    let only_never = blocked.len() == 1
        && blocked[0].get("dst.ip").and_then(Value::as_str) == Some("198.18.0.66");
    println!(
        "  enforced rerun under learned.yaml: the same run {}; {} blocked attempt(s) logged; \
         evil.com (198.18.0.66:443), never used, {}",
        if same_run_ok {
            "passes, bytes arrived"
        } else {
            "FAILED"
        },
        blocked.len(),
        if never_refused {
            "got EPERM, nothing arrived"
        } else {
            "was NOT refused"
        }
    );
    let ok = same_run_ok && never_refused && only_never;
    println!("  learn -> enforce: {}", if ok { "PASS" } else { "FAIL" });
    Ok(passed && ok)
}
