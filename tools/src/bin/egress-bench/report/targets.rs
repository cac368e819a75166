//! The targets the project tracks, judged on a run's numbers (reported, not asserted).

use serde::Serialize;

use super::Results;
use crate::dns::{AIM_ADDED_US, DnsOutcome, DnsResults};
use crate::report::thousands;

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub met: Option<bool>,
    pub detail: String,
}

impl Target {
    /// `- NAME: **met**. DETAIL.`
    pub fn line(&self) -> String {
        let verdict = match self.met {
            Some(true) => "**met**",
            Some(false) => "**not met**",
            None => "**not measured**",
        };
        format!("- {}: {verdict}. {}.", self.name, self.detail)
    }
}

impl Results {
    /// The three targets of the issue, judged on this run's numbers (reported, not asserted).
    pub(super) fn evaluate_targets(&self) -> Vec<Target> {
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
}

pub(super) fn dns_target(outcome: &DnsOutcome) -> Target {
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
