//! What the demo prints besides the per-attempt lines: the policy, the agent's runs and log,
//! the DNS server's log, the metrics it scraped and the kernel's counters.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result};
use egress_tests::agent::AgentRun;
use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::process::RunOutput;
use egress_tests::testbed::Testbed;

use crate::attempts::{ATTEMPTS, Expect};
use crate::world::SERVICES;
use crate::{METRICS_ADDR, POLICY, SCRAPE_EVERY};

/// `egress-agent exec` of `program` under `policy`, resolving through the demo's DNS server,
/// logging JSON and serving metrics for [`run_scraping_metrics`].
pub fn scraped_agent_run(
    policy: &Path,
    tb: &Testbed,
    program: &Path,
    resolv_conf: &Path,
) -> Result<AgentRun> {
    Ok(AgentRun::new(policy, &tb.cgroups, program)?
        .agent_arg("--resolv-conf")
        .agent_arg(resolv_conf)
        .agent_arg("--log-format")
        .agent_arg("json")
        .agent_arg("--metrics-addr")
        .agent_arg(METRICS_ADDR.to_string()))
}

pub fn print_policy(policy_text: &str) {
    println!("\nPolicy {POLICY} (comments left out):");
    for line in policy_text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
    {
        println!("  | {line}");
    }
}

/// The agent's exit status (the workload's own when all went well) and its log lines.
pub fn print_agent_output(label: &str, run: &RunOutput) {
    println!(
        "\nAgent run ({label}): {}{} after {:.1?}",
        run.status,
        if run.timed_out {
            " (TIMED OUT, killed)"
        } else {
            ""
        },
        run.elapsed
    );
    println!("Agent log (stderr, JSON lines rendered):");
    for line in run.stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("  {}", render_log_line(line));
    }
    for line in &run.other_stdout {
        println!("  workload stdout: {line}");
    }
}

/// What the demo's DNS server was asked during the agent runs (from `since` on in its log):
/// the agent's own lookups of the policy's names and what its proxy forwarded, each distinct
/// query once with its count. The workload never reaches it directly.
pub fn print_dns_queries(dns: &Dnsmasq, since: usize) {
    let mut queries = dns.queries();
    let queries = queries.split_off(since.min(queries.len()));
    let mut distinct: Vec<(&str, usize)> = Vec::new();
    for q in &queries {
        // Without dnsmasq's `Mon dd hh:mm:ss dnsmasq[pid]: ` prefix.
        let text = q.split_once("]: ").map_or(q.as_str(), |(_, rest)| rest);
        match distinct.iter_mut().find(|(t, _)| *t == text) {
            Some((_, n)) => *n += 1,
            None => distinct.push((text, 1)),
        }
    }
    println!(
        "\nDNS queries the demo's DNS server received during the agent runs ({} in dnsmasq's log: \
         the agent's lookups of the policy's names and the allowed queries its proxy forwarded):",
        queries.len()
    );
    for (text, n) in distinct {
        println!("  {n:>3} x {text}");
    }
}

/// Runs the agent while a thread in the workload's namespace scrapes its metrics endpoint;
/// returns the run and the last exposition scraped (taken after the attempts, while the
/// workload lingers).
pub fn run_scraping_metrics(
    agent_run: &AgentRun,
    tb: &Testbed,
) -> Result<(RunOutput, Option<String>)> {
    let done = AtomicBool::new(false);
    let last = Mutex::new(None);
    let netns = tb.client().handle();
    let run = std::thread::scope(|scope| {
        scope.spawn(|| {
            if netns.enter_current_thread().is_err() {
                return;
            }
            while !done.load(Ordering::SeqCst) {
                if let Ok(body) = scrape_metrics() {
                    *last.lock().unwrap_or_else(PoisonError::into_inner) = Some(body);
                }
                std::thread::sleep(SCRAPE_EVERY);
            }
        });
        let run = agent_run.run_in(tb.client());
        done.store(true, Ordering::SeqCst);
        run
    })
    .context("running the agent")?;
    Ok((
        run,
        last.into_inner().unwrap_or_else(PoisonError::into_inner),
    ))
}

/// One `GET /metrics`; the body of a 200 answer.
fn scrape_metrics() -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&METRICS_ADDR, SCRAPE_EVERY)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.split_whitespace().nth(1) == Some("200") => Ok(body.to_owned()),
        _ => Err(std::io::Error::other(format!(
            "unexpected answer: {:?}",
            answer.lines().next().unwrap_or_default()
        ))),
    }
}

/// The agent's Prometheus samples whose names start with `prefix` (without HELP/TYPE
/// comments).
pub fn print_metrics(label: &str, exposition: Option<&str>, prefix: &str) {
    let Some(text) = exposition else {
        println!(
            "\nMetrics ({label}): no answer from http://{METRICS_ADDR}/metrics while the agent ran"
        );
        return;
    };
    println!(
        "\nMetrics ({label}) scraped from http://{METRICS_ADDR}/metrics after the attempts, \
         {prefix}*:"
    );
    for line in text.lines().filter(|l| l.starts_with(prefix)) {
        println!("  {line}");
    }
}

/// The verdict counters the agent logs when the workload has exited, as a table.
pub fn print_counters(run: &RunOutput) {
    let rows: Vec<[String; 4]> = log_objects(run)
        .filter(|f| f.get("message").and_then(|m| m.as_str()) == Some("verdict count"))
        .map(|f| {
            ["verdict", "reason", "protocol", "count"]
                .map(|k| f.get(k).map(json_text).unwrap_or_default())
        })
        .collect();
    if rows.is_empty() {
        println!("\nKernel verdict counters: none in the agent's log");
        return;
    }
    println!("\nKernel verdict counters, as the agent logged them when the workload had exited:");
    println!(
        "  {:<8} {:<20} {:<9} {:>5}",
        "verdict", "reason", "protocol", "count"
    );
    for [verdict, reason, protocol, count] in rows {
        println!("  {verdict:<8} {reason:<20} {protocol:<9} {count:>5}");
    }
}

/// MCP-NET-02 wants blocked attempts in the logs: say how many of the demo's blocked
/// destinations (address and port) a line of the agent's log names. Informational: it
/// depends on what this version logs.
pub fn print_blocked_in_log(run: &RunOutput) {
    let mut blocked: Vec<SocketAddr> = ATTEMPTS
        .iter()
        .filter(|a| a.expect == Expect::Blocked)
        .map(|a| SERVICES[a.service].addr)
        .collect();
    blocked.sort();
    blocked.dedup();
    let lines: Vec<Vec<String>> = log_objects(run)
        .map(|f| f.values().map(json_text).collect())
        .collect();
    let named = blocked
        .iter()
        .filter(|addr| {
            let (ip, port, both) = (
                addr.ip().to_string(),
                addr.port().to_string(),
                addr.to_string(),
            );
            lines.iter().any(|values| {
                values.iter().any(|v| v.contains(&both))
                    || (values.iter().any(|v| v == &ip) && values.iter().any(|v| v == &port))
            })
        })
        .count();
    println!(
        "Blocked destinations named in the agent's log: {named} of {}{}",
        blocked.len(),
        if named == 0 {
            " (no line of the log above names a blocked address and port)"
        } else {
            ""
        }
    );
}

pub fn agent_exit_ok(run: &RunOutput) -> bool {
    let ok = !run.timed_out && run.exit_code() == Some(0);
    if !ok {
        println!(
            "FAIL: the agent run did not end cleanly (expected exit status 0, the workload's)\n{}",
            run.describe()
        );
    }
    ok
}

pub type LogObject = serde_json::Map<String, serde_json::Value>;

pub fn log_object(line: &str) -> Option<LogObject> {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(fields)) => Some(fields),
        _ => None,
    }
}

/// The agent's JSON log lines.
pub fn log_objects(run: &RunOutput) -> impl Iterator<Item = LogObject> + '_ {
    run.stderr.lines().filter_map(log_object)
}

pub fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Long field values (the workload's command line holds every op) cut to a readable length.
fn shorten(value: &str) -> String {
    const MAX: usize = 60;
    match value.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &value[..end]),
        None => value.to_owned(),
    }
}

/// `LEVEL message key=value ...` from a tracing JSON line; other lines unchanged.
pub fn render_log_line(line: &str) -> String {
    let Some(fields) = log_object(line) else {
        return line.to_owned();
    };
    let level = fields.get("level").map(json_text).unwrap_or_default();
    let message = fields.get("message").map(json_text).unwrap_or_default();
    let mut out = format!("{level:<5} {message}");
    for (key, value) in &fields {
        if !matches!(key.as_str(), "level" | "message" | "timestamp" | "target") {
            let _ = write!(out, " {key}={}", shorten(&json_text(value)));
        }
    }
    out
}
