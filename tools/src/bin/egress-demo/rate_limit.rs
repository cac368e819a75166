//! Case 4: a burst of 101 connections under the policy's own `rate_limits`.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result};
use egress_tests::agent::AgentRun;
use egress_tests::probe::errno_name;
use egress_tests::server::Listener;
use egress_tests::testbed::Testbed;

use crate::output::{json_text, log_object, render_log_line};
use crate::world::SERVICES;
use crate::{AGENT_TIMEOUT, BURST, POLICY};

/// Case 4. The demo policy plus MCP-NET-02's `rate_limits` goes to `egress-agent check`
/// first: an agent that refuses it does not enforce rate limits, and the case says so
/// rather than fake it. An agent that accepts it is held to it: a burst of 101 connections
/// to api.company.com under 100 per 60 s must end with the 101st refused. Returns `None` when
/// the agent does not enforce rate limits, else whether the case passed.
pub fn rate_limit_case(
    agent: &Path,
    tb: &Testbed,
    policy_text: &str,
    resolv_conf: &Path,
    listener: &Listener,
) -> Result<Option<bool>> {
    let path = tb.write_policy(policy_text)?;
    let out = Command::new(agent)
        .arg("check")
        .arg(&path)
        .output()
        .with_context(|| format!("running {} check", agent.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    println!(
        "  policy: {POLICY} as written: its rate_limits (per destination 100 per 60 s, global \
         1000 per 60 s)"
    );
    println!("  `egress-agent check` on it -> {}", out.status);
    if !out.status.success() {
        for line in text.lines().filter(|l| !l.trim().is_empty()).take(6) {
            println!("    | {line}");
        }
        println!(
            "  NOT YET ENFORCED: rate limits land in a later version; the agent refuses policies \
             with rate_limits"
        );
        return Ok(None);
    }

    let target = SERVICES[0].addr;
    let op = format!("connect tcp4 {} {}", target.ip(), target.port());
    let accepted_before = listener.connections();
    let run = AgentRun::new(&path, &tb.cgroups, tb.probe.path())?
        .agent_arg("--resolv-conf")
        .agent_arg(resolv_conf)
        .agent_arg("--log-format")
        .agent_arg("json")
        .args(std::iter::repeat_n(&op, BURST))
        .timeout(AGENT_TIMEOUT)
        .run_in(tb.client())
        .context("running the agent for the rate-limit case")?;
    std::thread::sleep(egress_tests::server::SETTLE);
    let accepted = listener.connections() - accepted_before;

    // The probe prints one result per op, in order.
    let results = &run.results;
    let first_ok = results.iter().take(BURST - 1).filter(|r| r.ok).count();
    let last = results.get(BURST - 1);
    let last_text = match last {
        None => "did not run".to_owned(),
        Some(r) if r.ok => "ok".to_owned(),
        Some(r) => r
            .errno
            .map_or_else(|| r.error.clone().unwrap_or_default(), errno_name),
    };
    let passed = results.len() == BURST
        && first_ok == BURST - 1
        && last.is_some_and(|r| r.failed_with(libc::EPERM))
        && accepted == BURST - 1
        && run.exit_code() == Some(0);
    println!(
        "  {}  {:<38} {BURST} x `connect tcp4` in one burst ({:.1?} for the whole agent run)",
        if passed { "PASS" } else { "FAIL" },
        SERVICES[0].dest(),
        run.elapsed
    );
    println!(
        "        connections 1-{}: {first_ok} ok; connection {BURST}: {last_text}; the listener \
         accepted {accepted} new connections (expected {} ok, EPERM, {})",
        BURST - 1,
        BURST - 1,
        BURST - 1
    );
    let blocked_lines: Vec<String> = run
        .stderr
        .lines()
        .filter(|l| {
            log_object(l).is_some_and(|f| f.get("level").map(json_text).as_deref() == Some("WARN"))
        })
        .map(render_log_line)
        .collect();
    for line in &blocked_lines {
        println!("        agent: {line}");
    }
    if !passed {
        println!("{}", run.describe());
    }
    Ok(Some(passed))
}
