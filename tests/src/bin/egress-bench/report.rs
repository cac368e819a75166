//! Statistics over the rounds, the targets the issue tracks, and the report: Markdown for
//! people (stdout, `latest.md`, docs/benchmarks.md) and JSON for tools (`latest.json`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::agent_runs::AgentRun;
use crate::dns::{AIM_ADDED_US, DnsOutcome, DnsResults};
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

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub met: Option<bool>,
    pub detail: String,
}

impl Target {
    /// `- NAME: **met**. DETAIL.`
    fn line(&self) -> String {
        let verdict = match self.met {
            Some(true) => "**met**",
            Some(false) => "**not met**",
            None => "**not measured**",
        };
        format!("- {}: {verdict}. {}.", self.name, self.detail)
    }
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

    /// The three targets of the issue, judged on this run's numbers (reported, not asserted).
    fn evaluate_targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();

        // 1. Per decision: a UDP sendto is one decision for egress (sendmsg4/6) and one
        // packet for nftables, so the added cost per operation is the cost per decision.
        let mut parts = Vec::new();
        let mut met = Some(true);
        for op in ["udp4", "udp6"] {
            match (self.cell("egress-100k", op), self.cell("nft-10k", op)) {
                (Some(e), Some(n)) => {
                    let ok = e.added_ns <= n.added_ns;
                    met = met.map(|m| m && ok);
                    parts.push(format!(
                        "{op}: egress at 100,000 adds {:+.0} ns, the nftables hash set at 10,000 adds {:+.0} ns ({})",
                        e.added_ns,
                        n.added_ns,
                        if ok { "met" } else { "not met" }
                    ));
                }
                _ => {
                    met = None;
                    parts.push(format!("{op}: not measured"));
                }
            }
        }
        if let Some(k) = self.kernel_ns("egress-100k", "sendmsg4") {
            parts.push(format!(
                "inside the kernel egress's sendmsg4 program takes {k:.0} ns per decision at 100,000 entries"
            ));
        }
        targets.push(Target {
            name: "egress's added cost per decision at 100,000 entries ≤ the nftables hash set's at 10,000".into(),
            met,
            detail: parts.join("; "),
        });

        // 2. Growth from 10 to 100,000 entries, from the kernel's run time per decision (wall
        // clock differences of tens of nanoseconds drown in a 4-30 µs operation's noise).
        let mut parts = Vec::new();
        let mut worst: Option<f64> = None;
        for hook in ["connect4", "sendmsg4", "connect6", "sendmsg6"] {
            if let (Some(a), Some(b)) = (
                self.kernel_ns("egress-10", hook),
                self.kernel_ns("egress-100k", hook),
            ) {
                let growth = b / a - 1.0;
                worst = Some(worst.map_or(growth, |w: f64| w.max(growth)));
                parts.push(format!(
                    "{hook} {a:.0} → {b:.0} ns ({:+.0}%)",
                    growth * 100.0
                ));
            }
        }
        for op in ["udp4", "tcp4"] {
            if let (Some(a), Some(b)) = (self.cell("egress-10", op), self.cell("egress-100k", op)) {
                parts.push(format!(
                    "wall clock, {op} added: {:+.0} → {:+.0} ns",
                    a.added_ns, b.added_ns
                ));
            }
        }
        targets.push(Target {
            name: "egress's cost grows by at most 30% from 10 to 100,000 entries".into(),
            met: worst.map(|w| w <= 0.30),
            detail: format!(
                "kernel run time per decision: {}{}",
                parts.join("; "),
                worst.map_or(String::new(), |w| format!(
                    "; largest growth {:+.0}%",
                    w * 100.0
                ))
            ),
        });

        // 3. Loading 100,000 entries.
        let big = self.loads.iter().find(|l| l.size == 100_000);
        targets.push(Target {
            name: "loading 100,000 entries takes under one second".into(),
            met: big.map(|l| l.start_secs < 1.0),
            detail: big.map_or_else(
                || "not measured".to_owned(),
                |l| {
                    format!(
                        "compile + load programs + write maps: {:.3} s (compile alone {:.3} s); \
                         with parsing the YAML first: {:.3} s{}",
                        l.start_secs,
                        l.compile_secs,
                        l.parse_secs + l.start_secs,
                        self.agent_runs
                            .iter()
                            .find(|a| a.policy_entries == 100_000)
                            .map_or(String::new(), |a| format!(
                                "; `egress-agent exec` from spawn to a running workload: {:.3} s",
                                a.startup_secs
                            ))
                    )
                },
            ),
        });

        // 4. The DNS proxy's added latency per query (issue #3's aim).
        targets.push(dns_target(&self.dns));
        targets
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let s = &self.settings;
        let _ = writeln!(md, "### This run\n");
        let _ = writeln!(
            md,
            "- Machine: {} CPUs, {}, Linux {}, {:.0} GiB memory",
            m.nproc, m.cpu, m.kernel, m.memory_gib
        );
        let _ = writeln!(
            md,
            "- Command: `{}`{}",
            m.command,
            if self.quick {
                " (quick: fewer rounds, shorter batches; not a reference run)"
            } else {
                ""
            }
        );
        let _ = writeln!(md, "- Date: {}; checkout: `{}`", m.date, m.commit);
        let _ = writeln!(md, "- Tools: {}; {}", m.iptables, m.nft);
        let _ = writeln!(
            md,
            "- Measurement: {} rounds; each runs every (scenario, operation) cell once, in a \
             shuffled order, as {} batches of at most {} ms (TCP) / {} ms (UDP) after one \
             warm-up batch, and keeps its fastest batch (interference from the rest of the \
             machine only adds time). Figures are medians over rounds; \"added\" is the \
             median of (scenario − no filter) within each round, ± half its interquartile \
             range. The workload runs as uid nobody, pinned to the last CPU; the benchmark \
             and its children run at {}. The whole run took {:.0} s.",
            s.rounds, s.batches, s.tcp_batch_ms, s.udp_batch_ms, m.priority, self.duration_secs
        );
        if let (Some(a), Some(b)) = (&m.loadavg_start, &m.loadavg_end) {
            let _ = writeln!(md, "- Load average before / after the rounds: {a} / {b}");
        }

        for (family, tcp, udp) in [("IPv4", "tcp4", "udp4"), ("IPv6", "tcp6", "udp6")] {
            let _ = writeln!(
                md,
                "\n### Cost per operation, {family}\n\n\
                 | scenario | TCP connect ns/op | × no filter | added ns | UDP sendto ns/op | × no filter | added ns |\n\
                 | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
            for sc in &self.scenarios {
                let col = |op: &str| match self.cell(&sc.key, op) {
                    Some(c) if sc.key == "baseline" => {
                        format!("{} | 1 | —", thousands(c.ns_per_op))
                    }
                    Some(c) => format!(
                        "{} | {} | {}{} ±{}",
                        thousands(c.ns_per_op),
                        ratio(c.ratio),
                        if c.added_ns >= 0.0 { "+" } else { "" },
                        thousands(c.added_ns),
                        thousands((c.added_p75 - c.added_p25) / 2.0)
                    ),
                    None => "n/a | | ".to_owned(),
                };
                let _ = writeln!(md, "| {} | {} | {} |", sc.label, col(tcp), col(udp));
            }
        }

        let _ = writeln!(
            md,
            "\n### Inside the kernel: egress's programs, ns per run\n\n\
             From BPF run-time statistics (on only for this phase), the median over {} rounds \
             of each scenario's four operations. A TCP connect runs sock_create and \
             connect4/6; a UDP sendto runs sendmsg4/6.\n\n\
             | scenario | sock_create | connect4 | sendmsg4 | connect6 | sendmsg6 |\n\
             | --- | ---: | ---: | ---: | ---: | ---: |",
            s.kernel_rounds
        );
        for sc in self.scenarios.iter().filter(|s| s.group == Group::Egress) {
            let hooks = [
                "sock_create",
                "connect4",
                "sendmsg4",
                "connect6",
                "sendmsg6",
            ];
            let cols: Vec<String> = hooks
                .iter()
                .map(|h| {
                    self.kernel_ns(&sc.key, h)
                        .map_or_else(|| "n/a".to_owned(), |ns| format!("{ns:.0}"))
                })
                .collect();
            let _ = writeln!(md, "| {} | {} |", sc.label, cols.join(" | "));
        }

        let _ = writeln!(md, "\n### Loading an allowlist\n");
        let sizes: Vec<String> = self
            .loads
            .iter()
            .map(|l| thousands(l.size as f64))
            .collect();
        let _ = writeln!(
            md,
            "| entries | {} |\n| --- |{}",
            sizes.join(" | "),
            " ---: |".repeat(self.loads.len())
        );
        let row = |name: &str, f: &dyn Fn(&LoadTimes) -> String| {
            let cols: Vec<String> = self.loads.iter().map(f).collect();
            format!("| {name} | {} |\n", cols.join(" | "))
        };
        md.push_str(&row("egress: parse the YAML", &|l| secs(l.parse_secs)));
        md.push_str(&row("egress: compile", &|l| secs(l.compile_secs)));
        md.push_str(&row("egress: compile + load programs + write maps", &|l| {
            secs(l.start_secs)
        }));
        md.push_str(&row("egress: prefix entries in the kernel", &|l| {
            thousands(l.kernel_entries as f64)
        }));
        md.push_str(&row(
            "egress-agent exec: spawn → workload running",
            &|l| {
                self.agent_runs
                    .iter()
                    .find(|a| a.policy_entries == l.size)
                    .map_or_else(|| "—".to_owned(), |a| secs(a.startup_secs))
            },
        ));
        md.push_str(&row(
            "… of which (ms): policy / cgroup / programs, names, proxy / attach / probe + spawn",
            &|l| {
                self.agent_runs
                    .iter()
                    .find(|a| a.policy_entries == l.size)
                    .and_then(|a| a.startup_phases_ms)
                    .map_or_else(
                        || "—".to_owned(),
                        |p| {
                            p.iter()
                                .map(|ms| format!("{ms:.0}"))
                                .collect::<Vec<_>>()
                                .join(" / ")
                        },
                    )
            },
        ));
        md.push_str(&row("iptables-restore + ip6tables-restore", &|l| {
            l.iptables_secs.map_or_else(|| "n/a".to_owned(), secs)
        }));
        md.push_str(&row("nft -f", &|l| {
            l.nft_secs.map_or_else(|| "n/a".to_owned(), secs)
        }));

        let _ = writeln!(
            md,
            "\n### Events: denied connects drained by the agent\n\n\
             `egress-agent exec` with the workload flooding one denied destination. \"Drained\" \
             counts the events the agent read and logged (first lines plus `repeated` counts); \
             \"lost\" is its count of events the 4 MiB ring buffer could not hold; the kernel's \
             counters are exact either way.\n\n\
             | policy entries | flood threads | denied connects | flood time | connects/s | events drained | lost | drained/s | kernel-counted denials | log lines |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for a in &self.agent_runs {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.2} s | {} | {} | {} | {} | {} | {} |",
                thousands(a.policy_entries as f64),
                a.threads,
                thousands(a.attempts as f64),
                a.flood_secs,
                thousands(a.attempts as f64 / a.flood_secs),
                thousands(a.drained as f64),
                thousands(a.lost as f64),
                thousands(a.drained as f64 / a.flood_secs),
                thousands(a.denied_counted as f64),
                a.log_lines
            );
        }

        let _ = writeln!(
            md,
            "\n### Agent memory\n\n\
             | policy entries | flood threads | RSS at rest | RSS peak during the flood | VmHWM (whole run) | BPF maps (kernel, memlock) |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for a in &self.agent_runs {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                thousands(a.policy_entries as f64),
                a.threads,
                mib(a.rss_rest_kib),
                mib(a.rss_flood_kib),
                mib(a.rss_peak_kib),
                mib(a.maps_kib)
            );
        }

        md.push_str(&dns_section(&self.dns));

        let _ = writeln!(md, "\n### Targets\n");
        for t in &self.targets {
            let _ = writeln!(md, "{}", t.line());
        }
        if !self.notes.is_empty() {
            let _ = writeln!(md, "\n### Notes\n");
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        md
    }
}

/// The DNS section: both paths side by side and the proxy's added latency.
fn dns_section(outcome: &DnsOutcome) -> String {
    let mut md = String::from("\n### DNS proxy\n\n");
    let r = match outcome {
        DnsOutcome::Measured(r) => r,
        DnsOutcome::NotMeasured(why) => {
            let _ = writeln!(
                md,
                "| scenario | added latency per query | queries/s |\n| --- | --- | --- |\n\
                 | DNS through egress's proxy vs direct | not measured: {} | not measured |",
                why.replace('|', "\\|").replace('\n', " ")
            );
            return md;
        }
    };
    let s = &r.settings;
    let _ = writeln!(
        md,
        "dnsmasq in the remote namespace answers `{}` (A); `egress-dns-client` as uid nobody \
         sends A queries to `{}` on a connected UDP socket, each after the previous answer \
         ({} unrecorded, then {} recorded per run; no process is pinned to a CPU), \
         then {} threads × {} queries for the throughput. Direct: the client alone. Through the \
         proxy: the client under `egress-agent exec` (policy allowing the name, \
         `allowed_resolvers: [{}]`, query budget raised out of the way); the kernel redirects \
         its queries to the agent's proxy, which forwards them to dnsmasq and writes the \
         answer's address into the workload's allow map before answering. {} rounds, each \
         running both paths once in a shuffled order; figures are medians over rounds, \
         \"added\" the median of (proxy − direct) within each round ± half its interquartile \
         range. {} queries were answered through the proxy and {} directly; failures: {}.\n",
        r.name,
        r.server,
        s.warmup,
        s.queries,
        s.par_threads,
        s.par_queries,
        r.server.ip(),
        s.rounds,
        thousands(r.proxy.queries as f64),
        thousands(r.direct.queries as f64),
        r.proxy.failures + r.direct.failures
    );
    let _ = writeln!(
        md,
        "| path | median µs | p90 µs | p99 µs | queries/s, one at a time | queries/s, {} threads | median µs, {} threads |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        s.par_threads, s.par_threads
    );
    for (label, p) in [
        ("direct to dnsmasq", &r.direct),
        ("through egress's DNS proxy", &r.proxy),
    ] {
        let _ = writeln!(
            md,
            "| {label} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1} |",
            p.median_us,
            p.p90_us,
            p.p99_us,
            thousands(p.seq_qps),
            thousands(p.par_qps),
            p.par_median_us
        );
    }
    let _ = writeln!(
        md,
        "\nAdded by the proxy per query: **{:+.1} µs** ±{:.1} (median), {:+.1} µs at p99; \
         throughput with {} threads: {:.2} × direct.",
        r.added_us,
        (r.added_p75_us - r.added_p25_us) / 2.0,
        r.added_p99_us,
        s.par_threads,
        r.par_qps_ratio
    );
    md
}

fn dns_target(outcome: &DnsOutcome) -> Target {
    let name = format!(
        "the DNS proxy adds under {AIM_ADDED_US:.0} µs per query (median, against a direct query)"
    );
    match outcome {
        DnsOutcome::Measured(r) => Target {
            name,
            met: Some(r.added_us < AIM_ADDED_US),
            detail: dns_detail(r),
        },
        DnsOutcome::NotMeasured(why) => Target {
            name,
            met: None,
            detail: format!("not measured: {}", why.replace('\n', " ")),
        },
    }
}

fn dns_detail(r: &DnsResults) -> String {
    format!(
        "median {:.1} µs through the proxy against {:.1} µs direct: {:+.1} µs added; {} queries/s \
         through the proxy against {} direct with {} threads",
        r.proxy.median_us,
        r.direct.median_us,
        r.added_us,
        thousands(r.proxy.par_qps),
        thousands(r.direct.par_qps),
        r.settings.par_threads
    )
}

/// The report of `egress-bench --only dns`: the run's circumstances and the DNS section.
pub fn dns_only_markdown(
    m: &Machine,
    quick: bool,
    outcome: &DnsOutcome,
    duration: Duration,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### This run (DNS only)\n");
    let _ = writeln!(
        md,
        "- Machine: {} CPUs, {}, Linux {}, {:.0} GiB memory",
        m.nproc, m.cpu, m.kernel, m.memory_gib
    );
    let _ = writeln!(
        md,
        "- Command: `{} --only dns`{}",
        m.command,
        if quick { " (quick)" } else { "" }
    );
    let _ = writeln!(md, "- Date: {}; checkout: `{}`", m.date, m.commit);
    let _ = writeln!(
        md,
        "- The benchmark and its children run at {}. The whole run took {:.0} s.",
        m.priority,
        duration.as_secs_f64()
    );
    if let (Some(a), Some(b)) = (&m.loadavg_start, &m.loadavg_end) {
        let _ = writeln!(md, "- Load average before / after: {a} / {b}");
    }
    md.push_str(&dns_section(outcome));
    let _ = writeln!(md, "\n{}", dns_target(outcome).line());
    md
}

fn ratio(r: f64) -> String {
    if r < 2.0 {
        format!("{r:.3}")
    } else {
        format!("{r:.2}")
    }
}

fn secs(s: f64) -> String {
    format!("{s:.3} s")
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "n/a".to_owned(),
        |k| format!("{:.1} MiB", k as f64 / 1024.0),
    )
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
