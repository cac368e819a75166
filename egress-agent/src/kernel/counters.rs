//! Reading the kernel's verdict counters and the lost-events count. Shared (read-only) by
//! the supervisor and the metrics endpoint.

use aya::maps::{MapData, MapError, PerCpuArray};
use egress_common::{
    Proto, Reason,
    counters::{
        RULE_COUNTER_RULES, RuleCount, counter_index, counter_index_audit, rule_counter_index,
    },
};

pub struct Counters {
    verdicts: PerCpuArray<MapData, u64>,
    lost: PerCpuArray<MapData, u64>,
    rules: Option<PerCpuArray<MapData, u64>>,
}

/// The per-rule counts of one rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RuleCounts {
    /// `allowed_destinations` or `denied_destinations`.
    pub list: &'static str,
    pub index: u32,
    pub allowed: u64,
    pub denied: u64,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counters")
    }
}

pub const PROTOS: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Other];

impl Counters {
    pub fn new(verdicts: PerCpuArray<MapData, u64>, lost: PerCpuArray<MapData, u64>) -> Self {
        Counters {
            verdicts,
            lost,
            rules: None,
        }
    }

    /// With the per-rule counters.
    #[must_use]
    pub fn with_rules(mut self, rules: PerCpuArray<MapData, u64>) -> Self {
        self.rules = Some(rules);
        self
    }

    /// The counts of the first `allowed` entries of `allowed_destinations` and `denied` of
    /// `denied_destinations` (at most `RULE_COUNTER_RULES` each).
    pub fn rules(&self, slot: u32, allowed: u32, denied: u32) -> Result<Vec<RuleCounts>, MapError> {
        let Some(map) = &self.rules else {
            return Ok(Vec::new());
        };
        read_rules(map, slot, allowed, denied)
    }

    /// The sum over CPUs of one counter.
    pub fn get(&self, slot: u32, reason: Reason, proto: Proto) -> Result<u64, MapError> {
        let values = self.verdicts.get(&counter_index(slot, reason, proto), 0)?;
        Ok(values.iter().copied().fold(0u64, u64::wrapping_add))
    }

    /// Every counter of `slot`, summed over CPUs, zeros included.
    pub fn all(&self, slot: u32) -> Result<Vec<(Reason, Proto, u64)>, MapError> {
        let mut out = Vec::with_capacity(Reason::ALL.len() * PROTOS.len());
        for reason in Reason::ALL {
            for proto in PROTOS {
                out.push((reason, proto, self.get(slot, reason, proto)?));
            }
        }
        Ok(out)
    }

    /// The denials audit mode let through, by the reason they would have been refused for,
    /// summed over CPUs; only the reasons that deny.
    pub fn audited(&self, slot: u32) -> Result<Vec<(Reason, Proto, u64)>, MapError> {
        let mut out = Vec::new();
        for reason in Reason::ALL.into_iter().filter(|r| !r.allows()) {
            for proto in PROTOS {
                let values = self
                    .verdicts
                    .get(&counter_index_audit(slot, reason, proto), 0)?;
                out.push((
                    reason,
                    proto,
                    values.iter().copied().fold(0u64, u64::wrapping_add),
                ));
            }
        }
        Ok(out)
    }

    /// Events the kernel could not put in the ring buffer.
    pub fn events_lost(&self) -> Result<u64, MapError> {
        let values = self.lost.get(&0, 0)?;
        Ok(values.iter().copied().fold(0u64, u64::wrapping_add))
    }
}

/// Label value for a protocol.
pub fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Other => "other",
    }
}

/// The per-rule counts of `slot` from the map (the agent's, or a pinned one for `status`).
pub fn read_rules(
    map: &PerCpuArray<MapData, u64>,
    slot: u32,
    allowed: u32,
    denied: u32,
) -> Result<Vec<RuleCounts>, MapError> {
    let sum = |kind: RuleCount, rule: u32| -> Result<u64, MapError> {
        match rule_counter_index(slot, kind, rule) {
            Some(i) => Ok(map
                .get(&i, 0)?
                .iter()
                .copied()
                .fold(0u64, u64::wrapping_add)),
            None => Ok(0),
        }
    };
    let mut out = Vec::new();
    for i in 0..allowed.min(RULE_COUNTER_RULES) {
        out.push(RuleCounts {
            list: "allowed_destinations",
            index: i,
            allowed: sum(RuleCount::Allowed, i)?,
            denied: sum(RuleCount::AllowedRuleDenied, i)?,
        });
    }
    for j in 0..denied.min(RULE_COUNTER_RULES) {
        out.push(RuleCounts {
            list: "denied_destinations",
            index: j,
            allowed: 0,
            denied: sum(RuleCount::Denied, j)?,
        });
    }
    Ok(out)
}
