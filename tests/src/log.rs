//! Queries over the agent's JSON log (`--log-format json`: one object per line, fields at the
//! top level; docs/events.md).

use std::collections::BTreeMap;

use serde_json::Value;

/// The lines of `text` that are JSON.
pub fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// Lines with `event == event` (`egress_blocked`, `egress_audit`, `dns_refused`, ...).
pub fn events(text: &str, event: &str) -> Vec<Value> {
    lines(text)
        .into_iter()
        .filter(|v| v["event"] == event)
        .collect()
}

/// `egress_blocked` lines with `reason`.
pub fn blocked(text: &str, reason: &str) -> Vec<Value> {
    events(text, "egress_blocked")
        .into_iter()
        .filter(|v| v["reason"] == reason)
        .collect()
}

/// The exact count of kernel verdicts with `reason`, over every protocol, from the agent's
/// `verdict count` lines (logged when it stops; unlike the event log, never collapsed).
pub fn verdict_count(text: &str, reason: &str) -> u64 {
    verdict_lines(text)
        .filter(|v| v["reason"] == reason)
        .filter_map(|v| v["count"].as_u64())
        .sum()
}

/// The same for one protocol (`tcp`, `udp`, `other`).
pub fn verdict_count_of(text: &str, reason: &str, protocol: &str) -> u64 {
    verdict_lines(text)
        .filter(|v| v["reason"] == reason && v["protocol"] == protocol)
        .filter_map(|v| v["count"].as_u64())
        .sum()
}

/// Every `verdict count` line: (reason, protocol) -> count.
pub fn verdict_counts(text: &str) -> BTreeMap<(String, String), u64> {
    verdict_lines(text)
        .map(|v| {
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            (
                (field("reason"), field("protocol")),
                v["count"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

fn verdict_lines(text: &str) -> impl Iterator<Item = Value> {
    lines(text)
        .into_iter()
        .filter(|v| v["message"] == "verdict count")
}

/// The DNS proxy's refusal lines for `name` (case-insensitive): a name the policy refuses is
/// an `egress_blocked` line from hook `dns_proxy` (field `dns.name`), other refusals are
/// `dns_refused` lines (field `name`).
pub fn refused(text: &str, name: &str) -> Vec<Value> {
    lines(text)
        .into_iter()
        .filter(|v| {
            let by_policy = v["event"] == "egress_blocked" && v["hook"] == "dns_proxy";
            let field = if by_policy { "dns.name" } else { "name" };
            (by_policy || v["event"] == "dns_refused")
                && v[field]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .collect()
}
