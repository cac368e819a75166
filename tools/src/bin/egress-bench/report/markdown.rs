//! The report in Markdown: stdout, `latest.md` and the results section of docs/benchmarks.md.

use std::fmt::Write as _;
use std::time::Duration;

use super::{Group, LoadTimes, Machine, Results, thousands};
use crate::dns::DnsOutcome;
use crate::report::targets::dns_target;

impl Results {
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
