//! The agent as users run it (`egress-agent exec`): how long it takes to start under a large
//! policy, how many denied-attempt events it drains per second and whether it loses any,
//! and how much memory it holds at rest and under a flood.
//!
//! The workload marks its phases on stdout (`rest`, `flood`, `after`); meanwhile the agent's
//! resident set (VmRSS) is sampled from /proc. The agent's own log on stderr gives what it
//! drained: one line per first attempt plus `repeated: N` lines (docs/events.md), and the
//! `lost` count of events the ring buffer could not hold.

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use crate::world::{Client, FLOOD_PORT, FLOOD_TARGET, World};

const AGENT_TIMEOUT: Duration = Duration::from_secs(240);
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
const REST: Duration = Duration::from_millis(1000);

const PHASE_START: u8 = 0;
const PHASE_REST: u8 = 1;
const PHASE_FLOOD: u8 = 2;
const PHASE_AFTER: u8 = 3;

#[derive(Clone, Debug, serde::Serialize)]
pub struct AgentRun {
    pub policy_entries: usize,
    pub threads: u64,
    pub attempts: u64,
    pub eperm: u64,
    pub flood_secs: f64,
    /// Events the agent read from the ring buffer and logged (first lines + repeats).
    pub drained: u64,
    pub lost: u64,
    /// Denials the kernel counted (exact, independent of the ring buffer).
    pub denied_counted: u64,
    pub log_lines: usize,
    /// From spawning `egress-agent exec` to the workload's first line.
    pub startup_secs: f64,
    pub rss_rest_kib: Option<u64>,
    pub rss_flood_kib: Option<u64>,
    /// VmHWM at the end: the largest the resident set ever was (start-up included).
    pub rss_peak_kib: Option<u64>,
    /// Kernel memory of the agent's BPF maps (memlock in fdinfo), at rest.
    pub maps_kib: Option<u64>,
    /// Where the start-up time went, as the agent logs it with "workload started":
    /// policy, cgroup, programs (load, resolution, DNS proxy), attach, spawn (probe
    /// included), in milliseconds.
    pub startup_phases_ms: Option<[f64; 5]>,
}

/// The phases of the agent's "workload started" line.
fn startup_phases(stderr: &str) -> Option<[f64; 5]> {
    let v = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["startup_ms"].is_number())?;
    let f = |k: &str| v[k].as_f64();
    Some([
        f("policy_ms")?,
        f("cgroup_ms")?,
        f("programs_ms")?,
        f("attach_ms")?,
        f("spawn_ms")?,
    ])
}

/// One `egress-agent exec` run: rest, a flood of `attempts` denied connects from `threads`
/// threads, a short pause, exit.
pub fn run(
    world: &World,
    client: &Client,
    agent: &Path,
    policy: &Path,
    policy_entries: usize,
    attempts: u64,
    threads: u64,
) -> Result<AgentRun> {
    let steps = [
        "mark rest".to_owned(),
        format!("sleep {}", REST.as_millis()),
        "mark flood".to_owned(),
        format!("flood {FLOOD_TARGET}:{FLOOD_PORT} {attempts} {threads}"),
        "mark after".to_owned(),
        "sleep 300".to_owned(),
    ];
    let mut cmd = Command::new(agent);
    cmd.args([
        "--log-format",
        "json",
        "--log-level",
        "info",
        "exec",
        "--policy",
    ])
    .arg(policy)
    .args(["--user", "nobody", "--cgroup-parent"])
    .arg(world.cgroups.path())
    .arg("--")
    .arg(world.workload_path())
    .args(&steps)
    .current_dir("/")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    client.ns.run_in(&mut cmd);

    let start = Instant::now();
    let mut child = cmd.spawn().context("starting egress-agent exec")?;
    let pid = child.id();
    let phase = Arc::new(AtomicU8::new(PHASE_START));
    let rest_at: Arc<Mutex<Option<Duration>>> = Arc::new(Mutex::new(None));
    let stdout_lines = Arc::new(Mutex::new(Vec::<Value>::new()));
    let stdout = child.stdout.take().context("agent stdout")?;
    let reader = {
        let (phase, rest_at, lines) = (
            Arc::clone(&phase),
            Arc::clone(&rest_at),
            Arc::clone(&stdout_lines),
        );
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                match v["mark"].as_str() {
                    Some("rest") => {
                        *rest_at.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some(start.elapsed());
                        phase.store(PHASE_REST, Ordering::SeqCst);
                    }
                    Some("flood") => phase.store(PHASE_FLOOD, Ordering::SeqCst),
                    Some("after") => phase.store(PHASE_AFTER, Ordering::SeqCst),
                    _ => {}
                }
                lines.lock().unwrap_or_else(PoisonError::into_inner).push(v);
            }
        })
    };
    let mut stderr = child.stderr.take().context("agent stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let mut rest_samples = Vec::new();
    let mut flood_peak: Option<u64> = None;
    let mut hwm = None;
    let mut maps_kib = None;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the agent")? {
            break status;
        }
        if start.elapsed() > AGENT_TIMEOUT {
            let _ = child.kill();
            let _ = world.cgroups.kill_all();
            let _ = child.wait();
            anyhow::bail!("egress-agent exec did not finish within {AGENT_TIMEOUT:?}");
        }
        let p = phase.load(Ordering::SeqCst);
        if let Some((rss, peak)) = memory(pid) {
            hwm = Some(peak);
            match p {
                PHASE_REST => rest_samples.push(rss),
                PHASE_FLOOD | PHASE_AFTER => {
                    flood_peak = Some(flood_peak.map_or(rss, |m| m.max(rss)));
                }
                _ => {}
            }
        }
        if p == PHASE_REST && maps_kib.is_none() {
            maps_kib = maps_memlock(pid).map(|b| b / 1024);
        }
        std::thread::sleep(SAMPLE_EVERY);
    };
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    ensure!(
        status.success(),
        "egress-agent exec failed ({status}); its log:\n{}",
        tail(&stderr)
    );
    let lines = std::mem::take(&mut *stdout_lines.lock().unwrap_or_else(PoisonError::into_inner));
    let flood = lines
        .iter()
        .find(|v| v["step"].as_str().is_some_and(|s| s.starts_with("flood")))
        .with_context(|| {
            format!(
                "the workload reported no flood; agent log:\n{}",
                tail(&stderr)
            )
        })?;
    let log = parse_log(&stderr);
    rest_samples.sort_unstable();
    Ok(AgentRun {
        policy_entries,
        threads,
        attempts: flood["attempts"].as_u64().unwrap_or(0),
        eperm: flood["eperm"].as_u64().unwrap_or(0),
        flood_secs: flood["ns"].as_u64().unwrap_or(0) as f64 / 1e9,
        drained: log.drained,
        lost: log.lost,
        denied_counted: log.denied,
        log_lines: stderr.lines().count(),
        startup_secs: rest_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map_or(f64::NAN, |d| d.as_secs_f64()),
        rss_rest_kib: rest_samples.get(rest_samples.len() / 2).copied(),
        rss_flood_kib: flood_peak,
        rss_peak_kib: hwm,
        maps_kib,
        startup_phases_ms: startup_phases(&stderr),
    })
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

struct LogCounts {
    drained: u64,
    lost: u64,
    denied: u64,
}

/// Events drained, events lost and denials counted, from the agent's JSON log.
fn parse_log(stderr: &str) -> LogCounts {
    let mut c = LogCounts {
        drained: 0,
        lost: 0,
        denied: 0,
    };
    for v in stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        match v["event"].as_str() {
            // A first line stands for one event; a collapse line for `repeated` more.
            Some("egress_blocked") => c.drained += v["repeated"].as_u64().unwrap_or(1),
            Some("egress_blocked_overflow") => c.drained += v["count"].as_u64().unwrap_or(0),
            _ => {}
        }
        c.lost += v["lost"].as_u64().unwrap_or(0);
        if v["message"] == "verdict count"
            && v["verdict"] == "deny"
            && v["reason"] != "startup_probe"
        {
            c.denied += v["count"].as_u64().unwrap_or(0);
        }
    }
    c
}

/// (VmRSS, VmHWM) in KiB.
fn memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Sum of `memlock` over the process's BPF map descriptors, in bytes.
fn maps_memlock(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?;
    let mut total = 0;
    let mut any = false;
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if !info.lines().any(|l| l.starts_with("map_type:")) {
            continue;
        }
        if let Some(bytes) = info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            total += bytes;
            any = true;
        }
    }
    any.then_some(total)
}

#[cfg(test)]
mod tests {
    use super::parse_log;

    #[test]
    fn counts_first_lines_repeats_and_losses() {
        let log = r#"{"event":"egress_probe","message":"start-up probe"}
{"event":"egress_blocked","message":"egress blocked"}
{"event":"egress_blocked","repeated":9,"message":"egress blocked (repeated)"}
{"message":"verdict count","verdict":"deny","reason":"port_not_allowed","count":12}
{"message":"verdict count","verdict":"deny","reason":"startup_probe","count":2}
{"message":"events lost in the kernel ring buffer","lost":2}"#;
        let c = parse_log(log);
        assert_eq!((c.drained, c.lost, c.denied), (10, 2, 12));
    }
}
