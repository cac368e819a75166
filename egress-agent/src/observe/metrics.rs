//! Prometheus metrics (text exposition at `/metrics`). Kernel counters are read at scrape
//! time, so they are exact; labels take bounded values only (policy, verdict, reason,
//! protocol, result) — never an address or a host name. docs/metrics.md lists every metric.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge,
        info::Info,
    },
    registry::Registry,
};

use crate::kernel::counters::{Counters, proto_name};

/// The `result` values of `egress_dns_queries_total` (docs/metrics.md).
pub const DNS_QUERY_RESULTS: [&str; 11] = [
    "allowed",
    "not_allowed",
    "denied",
    "doh_provider",
    "restriction_region",
    "restriction_service",
    "restriction_unclassified",
    "restriction_address",
    "rate_limited",
    "malformed",
    "upstream_failure",
];

/// What the collector knows about each slot it reports.
#[derive(Clone, Debug, Default)]
pub struct SlotInfo {
    pub policy: String,
    pub allowlist_entries: u64,
    /// Entries of `allowed_destinations` and `denied_destinations`, for the per-rule counts.
    pub allowed_rules: u32,
    pub denied_rules: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    policy: String,
    list: &'static str,
    rule: String,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    policy: String,
    verdict: &'static str,
    reason: &'static str,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyResultLabels {
    pub policy: String,
    pub result: &'static str,
}

/// Blocked attempts the agent decides itself (the DNS proxy's refusals of names), counted in
/// the same `egress_connections_total` family as the kernel's decisions: an attempt by name
/// is as much blocked egress as an attempt by address.
#[derive(Clone, Debug, Default)]
pub struct AgentVerdicts(Arc<std::sync::Mutex<BTreeMap<VerdictKey, u64>>>);

/// (policy, verdict, reason, protocol).
type VerdictKey = (String, &'static str, &'static str, &'static str);

impl AgentVerdicts {
    /// One denial with `reason` over `protocol` under `policy`.
    pub fn deny(&self, policy: &str, reason: &'static str, protocol: &'static str) {
        self.record(policy, "deny", reason, protocol);
    }

    /// One refusal with `reason` that audit mode let through.
    pub fn audit(&self, policy: &str, reason: &'static str, protocol: &'static str) {
        self.record(policy, "audit", reason, protocol);
    }

    fn record(
        &self,
        policy: &str,
        verdict: &'static str,
        reason: &'static str,
        protocol: &'static str,
    ) {
        let mut m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *m.entry((policy.to_owned(), verdict, reason, protocol))
            .or_default() += 1;
    }

    fn snapshot(&self) -> Vec<(VerdictKey, u64)> {
        let m = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Reads the kernel's counters on each scrape.
#[derive(Debug)]
struct KernelCollector {
    counters: Arc<Counters>,
    slots: Arc<RwLock<BTreeMap<u32, SlotInfo>>>,
    agent: AgentVerdicts,
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let slots = match self.slots.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        {
            let mut family = encoder.encode_descriptor(
                "egress_connections",
                "Connection and send attempts judged by the kernel, by verdict and reason (exact; every attempt is counted whether or not its event was delivered)",
                None,
                MetricType::Counter,
            )?;
            for (slot, info) in &slots {
                let Ok(all) = self.counters.all(*slot) else {
                    continue;
                };
                for (reason, proto, n) in all {
                    let labels = DecisionLabels {
                        policy: info.policy.clone(),
                        verdict: if reason.allows() { "allow" } else { "deny" },
                        reason: reason.as_str(),
                        protocol: proto_name(proto),
                    };
                    ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                }
                let Ok(audited) = self.counters.audited(*slot) else {
                    continue;
                };
                for (reason, proto, n) in audited {
                    let labels = DecisionLabels {
                        policy: info.policy.clone(),
                        verdict: "audit",
                        reason: reason.as_str(),
                        protocol: proto_name(proto),
                    };
                    ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                }
            }
            for ((policy, verdict, reason, protocol), n) in self.agent.snapshot() {
                let labels = DecisionLabels {
                    policy,
                    verdict,
                    reason,
                    protocol,
                };
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "egress_rule_decisions",
                "Kernel decisions per policy rule (the first 256 entries of each list), by verdict",
                None,
                MetricType::Counter,
            )?;
            for (slot, info) in &slots {
                let Ok(rules) = self
                    .counters
                    .rules(*slot, info.allowed_rules, info.denied_rules)
                else {
                    continue;
                };
                for r in rules {
                    for (verdict, n) in [("allow", r.allowed), ("deny", r.denied)] {
                        if r.list == "denied_destinations" && verdict == "allow" {
                            continue;
                        }
                        let labels = RuleLabels {
                            policy: info.policy.clone(),
                            list: r.list,
                            rule: r.index.to_string(),
                            verdict,
                        };
                        ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                    }
                }
            }
        }
        {
            let lost = self.counters.events_lost().unwrap_or(0);
            let m = encoder.encode_descriptor(
                "egress_events_lost",
                "Denied attempts whose event did not fit in the kernel ring buffer (their verdict and counter are unaffected)",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(lost).encode(m)?;
        }
        {
            let mut family = encoder.encode_descriptor(
                "egress_allowlist_entries",
                "Prefix entries the policy currently has in the kernel",
                None,
                MetricType::Gauge,
            )?;
            for info in slots.values() {
                let labels = PolicyLabels {
                    policy: info.policy.clone(),
                };
                ConstGauge::new(i64::try_from(info.allowlist_entries).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Metrics the agent updates itself.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub policy_loads: Family<ResultLabels, Counter>,
    pub dns_refreshes: Family<PolicyResultLabels, Counter>,
    pub log_lines: Family<PolicyLabels, Counter>,
    pub events_collapsed: Family<PolicyLabels, Counter>,
    pub events_undecodable: Counter,
    pub dns: DnsMetrics,
    slots: Arc<RwLock<BTreeMap<u32, SlotInfo>>>,
}

/// What the DNS proxy counts.
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    /// The workload's queries, by result.
    pub queries: Family<PolicyResultLabels, Counter>,
    /// Answer addresses not installed because they point into a denied range.
    pub rebinding_blocked: Family<PolicyLabels, Counter>,
    /// Answer addresses left out by the per-name cap.
    pub address_cap: Family<PolicyLabels, Counter>,
    /// Addresses in the learned map now.
    pub learned: Family<PolicyLabels, prometheus_client::metrics::gauge::Gauge>,
    /// Names refused by the policy, as blocked attempts (in `egress_connections_total`).
    pub verdicts: AgentVerdicts,
    /// Answer addresses left out because ip-ranges.json does not place them in an allowed
    /// service and region of a restricted entry.
    pub aws_unproven: Family<PolicyLabels, Counter>,
    /// Seconds since the `createDate` of the `--aws-ip-ranges` file.
    pub aws_ip_ranges_age: prometheus_client::metrics::gauge::Gauge,
}

impl Metrics {
    /// A registry with every egress metric, reading kernel counters from `counters`.
    pub fn new(counters: Arc<Counters>, dns: DnsMetrics) -> (Self, Registry) {
        let mut registry = Registry::default();
        let slots = Arc::new(RwLock::new(BTreeMap::new()));
        registry.register_collector(Box::new(KernelCollector {
            counters,
            slots: Arc::clone(&slots),
            agent: dns.verdicts.clone(),
        }));
        let m = Metrics {
            policy_loads: Family::default(),
            dns_refreshes: Family::default(),
            log_lines: Family::default(),
            events_collapsed: Family::default(),
            events_undecodable: Counter::default(),
            dns,
            slots,
        };
        registry.register(
            "egress_dns_queries",
            "DNS queries of the workload answered by the agent's proxy, by result (only `allowed` ones reach an upstream resolver)",
            m.dns.queries.clone(),
        );
        registry.register(
            "egress_dns_rebinding_blocked",
            "Addresses in answers to allowed names that were not installed because they point into a denied or special-purpose range",
            m.dns.rebinding_blocked.clone(),
        );
        registry.register(
            "egress_dns_address_cap",
            "Addresses in answers left out because the name already holds the most addresses allowed per name",
            m.dns.address_cap.clone(),
        );
        registry.register(
            "egress_dns_learned_addresses",
            "Addresses learned from DNS answers that are in the kernel's allow map now",
            m.dns.learned.clone(),
        );
        registry.register(
            "egress_dns_aws_address_unproven",
            "Addresses in answers admitted by an entry with `restrictions` that were not installed because the --aws-ip-ranges file does not place them in an allowed service and region",
            m.dns.aws_unproven.clone(),
        );
        registry.register(
            "egress_aws_ip_ranges_age_seconds",
            "Age of the --aws-ip-ranges file: seconds since its createDate (absent without the option: 0)",
            m.dns.aws_ip_ranges_age.clone(),
        );
        registry.register(
            "egress_policy_loads",
            "Policy loads and reloads, by result",
            m.policy_loads.clone(),
        );
        registry.register(
            "egress_dns_refreshes",
            "Lookups of the policy's host names by the agent, by result (failure keeps the last answer)",
            m.dns_refreshes.clone(),
        );
        registry.register(
            "egress_log_lines",
            "Blocked-attempt log lines written",
            m.log_lines.clone(),
        );
        registry.register(
            "egress_events_collapsed",
            "Blocked-attempt events folded into a 'repeated N times' line instead of a line each",
            m.events_collapsed.clone(),
        );
        registry.register(
            "egress_events_undecodable",
            "Ring-buffer records of an unexpected size (a layout mismatch)",
            m.events_undecodable.clone(),
        );
        registry.register(
            "egress_build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        (m, registry)
    }

    /// Every labelled series of `policy` at zero, so that each metric is in the exposition
    /// from the start (a rate over a series that appears at its first increment misses that
    /// increment, and an absent series cannot be told from a broken exporter).
    pub fn declare(&self, policy: &str) {
        let p = || PolicyLabels {
            policy: policy.to_owned(),
        };
        for result in DNS_QUERY_RESULTS {
            drop(self.dns.queries.get_or_create(&PolicyResultLabels {
                policy: policy.to_owned(),
                result,
            }));
        }
        for result in ["success", "failure"] {
            drop(self.policy_loads.get_or_create(&ResultLabels { result }));
            drop(self.dns_refreshes.get_or_create(&PolicyResultLabels {
                policy: policy.to_owned(),
                result,
            }));
        }
        drop(self.dns.rebinding_blocked.get_or_create(&p()));
        drop(self.dns.address_cap.get_or_create(&p()));
        drop(self.dns.learned.get_or_create(&p()));
        drop(self.dns.aws_unproven.get_or_create(&p()));
        drop(self.log_lines.get_or_create(&p()));
        drop(self.events_collapsed.get_or_create(&p()));
    }

    /// Registers (or updates) what a slot reports.
    pub fn set_slot(&self, slot: u32, info: SlotInfo) {
        match self.slots.write() {
            Ok(mut s) => s.insert(slot, info),
            Err(poisoned) => poisoned.into_inner().insert(slot, info),
        };
    }
}
