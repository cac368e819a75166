//! Statistics over the rounds, the targets the issue tracks, and the report: Markdown for
//! people (stdout, `latest.md`, docs/benchmarks.md) and JSON for tools (`latest.json`).

mod markdown;
mod targets;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

pub use self::markdown::dns_only_markdown;
use self::targets::Target;
use crate::agent_runs::AgentRun;
use crate::dns::DnsOutcome;
use crate::{OPS, Op, Settings};

/// The section of docs/benchmarks.md that a run rewrites.
const BEGIN: &str = "<!-- bench:results:begin (written by `cargo xtask bench`; edit around it) -->";
const END: &str = "<!-- bench:results:end -->";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Group {
    Baseline,
    Egress,
    Iptables,
    Nftables,
    Proxy,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScenarioInfo {
    pub key: String,
    pub label: String,
    pub group: Group,
    pub size: Option<usize>,
}

impl ScenarioInfo {
    pub fn new(key: &str, label: &str, group: Group, size: Option<usize>) -> Self {
        ScenarioInfo {
            key: key.to_owned(),
            label: label.to_owned(),
            group,
            size,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadTimes {
    pub size: usize,
    pub kernel_entries: usize,
    pub port_entries: usize,
    pub parse_secs: f64,
    pub compile_secs: f64,
    /// `Enforcer::start`: compile, load and verify the programs, write the maps.
    pub start_secs: f64,
    pub iptables_secs: Option<f64>,
    pub nft_secs: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub memory_gib: f64,
    pub iptables: String,
    pub nft: String,
    pub commit: String,
    pub date: String,
    pub command: String,
    /// How the benchmark raised its priority (see main.rs).
    pub priority: String,
    pub loadavg_start: Option<String>,
    pub loadavg_end: Option<String>,
}

impl Machine {
    pub fn describe(command: &str) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let root = egress_tests::agent::workspace_root();
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|v| v.split_once(':'))
                .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned()),
            memory_gib: mem_kib / 1024.0 / 1024.0,
            iptables: tool_output("iptables", &["-V"]),
            nft: tool_output("nft", &["-V"]),
            commit: tool_output(
                "git",
                &[
                    "-C",
                    &root.to_string_lossy(),
                    "describe",
                    "--always",
                    "--dirty",
                ],
            ),
            date: tool_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            command: command.to_owned(),
            priority: String::new(),
            loadavg_start: None,
            loadavg_end: None,
        }
    }
}

fn tool_output(tool: &str, args: &[&str]) -> String {
    let Some(path) = egress_tests::find_tool(tool) else {
        return format!("{tool}: not installed");
    };
    Command::new(path)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| format!("{tool}: unknown"))
}

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

pub fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

/// Linear interpolation between closest ranks; NaN for no values.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let pos = q * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// `12,345` (rounded to an integer).
pub fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".to_owned();
    }
    let n = x.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// One (scenario, operation) cell over the rounds. `ratio` and `added` are medians of the
/// per-round comparison with the same round's baseline, so drift between rounds cancels.
#[derive(Clone, Debug, Serialize)]
pub struct CellStats {
    pub ns_per_op: f64,
    pub ratio: f64,
    pub added_ns: f64,
    pub added_p25: f64,
    pub added_p75: f64,
    pub rounds: usize,
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub machine: Machine,
    pub settings: Settings,
    pub quick: bool,
    pub duration_secs: f64,
    pub scenarios: Vec<ScenarioInfo>,
    /// scenario key -> operation -> statistics.
    pub cells: BTreeMap<String, BTreeMap<String, CellStats>>,
    /// scenario key -> hook -> (runs, ns per run).
    pub kernel: BTreeMap<String, crate::kernel::PerRun>,
    pub loads: Vec<LoadTimes>,
    pub agent_runs: Vec<AgentRun>,
    pub notes: Vec<String>,
    pub dns: DnsOutcome,
    pub targets: Vec<Target>,
}

fn op_key(op: Op) -> &'static str {
    match op {
        Op::Tcp4 => "tcp4",
        Op::Udp4 => "udp4",
        Op::Tcp6 => "tcp6",
        Op::Udp6 => "udp6",
    }
}

impl Results {
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site assembles the whole run"
    )]
    pub fn compute(
        machine: Machine,
        settings: Settings,
        quick: bool,
        scenarios: Vec<ScenarioInfo>,
        rounds: &BTreeMap<(usize, Op), Vec<f64>>,
        kernel: BTreeMap<String, crate::kernel::PerRun>,
        loads: Vec<LoadTimes>,
        agent_runs: Vec<AgentRun>,
        notes: Vec<String>,
        dns: DnsOutcome,
        duration: Duration,
    ) -> Self {
        let mut cells: BTreeMap<String, BTreeMap<String, CellStats>> = BTreeMap::new();
        for (si, sc) in scenarios.iter().enumerate() {
            for op in OPS {
                let (Some(v), Some(b)) = (rounds.get(&(si, op)), rounds.get(&(0, op))) else {
                    continue;
                };
                let ratios: Vec<f64> = v.iter().zip(b).map(|(x, y)| x / y).collect();
                let added: Vec<f64> = v.iter().zip(b).map(|(x, y)| x - y).collect();
                cells.entry(sc.key.clone()).or_default().insert(
                    op_key(op).to_owned(),
                    CellStats {
                        ns_per_op: median(v),
                        ratio: median(&ratios),
                        added_ns: median(&added),
                        added_p25: quantile(&added, 0.25),
                        added_p75: quantile(&added, 0.75),
                        rounds: v.len(),
                    },
                );
            }
        }
        let mut r = Results {
            machine,
            settings,
            quick,
            duration_secs: duration.as_secs_f64(),
            scenarios,
            cells,
            kernel,
            loads,
            agent_runs,
            notes,
            dns,
            targets: Vec::new(),
        };
        r.targets = r.evaluate_targets();
        r
    }

    fn cell(&self, key: &str, op: &str) -> Option<&CellStats> {
        self.cells.get(key)?.get(op)
    }

    fn kernel_ns(&self, key: &str, hook: &str) -> Option<f64> {
        self.kernel.get(key)?.get(hook).map(|(_, ns)| *ns)
    }
}

/// Replaces the marked results section of `docs` with `markdown`.
pub fn update_docs(docs: &Path, markdown: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(docs).with_context(|| format!("reading {}", docs.display()))?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        bail!(
            "{} has no results section (the lines {BEGIN} and {END}); results are in the output directory",
            docs.display()
        );
    };
    if e < b {
        bail!("{}: the results markers are out of order", docs.display());
    }
    let updated = format!(
        "{}{BEGIN}\n\n{}\n{END}{}",
        &text[..b],
        markdown.trim_end(),
        &text[e + END.len()..]
    );
    std::fs::write(docs, updated).with_context(|| format!("writing {}", docs.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_and_formatting() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), 2.5);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.25), 2.0);
        assert!(median(&[]).is_nan());
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(-950.0), "-950");
        assert_eq!(thousands(12.0), "12");
    }

    #[test]
    fn replaces_only_the_marked_section() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("b.md");
        std::fs::write(&path, format!("intro\n{BEGIN}\nold\n{END}\nreading\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        update_docs(&path, "new table\n").unwrap_or_else(|e| panic!("{e}"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            text,
            format!("intro\n{BEGIN}\n\nnew table\n{END}\nreading\n")
        );
    }
}
