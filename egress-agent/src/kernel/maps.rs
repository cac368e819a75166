//! Bringing the kernel maps to a compiled state.
//!
//! Changes are applied so that no decision is ever looser or stricter than both the old and
//! the new state allow: new port entries before the rule entries that point at them, new and
//! changed rule entries before removing old ones, and port entries last. Port-set ids are
//! stable for a policy id (see `compile::SetIds`), so an id never changes meaning in place.

use std::sync::Arc;

use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf, lpm_trie::Key};
use egress_common::counters::MAP_RULE_COUNTERS;
use egress_common::{
    PortKey, Proto, Reason, RuleKey, RuleValue, SlotConfig,
    events::{MAP_EVENTS, MAP_EVENTS_LOST},
    inbound::{InboundKey, InboundValue, MAP_INBOUND},
    maps::{MAP_COUNTERS, MAP_EXACT, MAP_PORTS, MAP_RULES, MAP_SLOTS},
};

use crate::kernel::counters::Counters;

use crate::kernel::loader::{LoadError, Programs};
use egress_policy::compile::{Compiled, LpmKey};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("map {map}: {op}: {source}")]
    Op {
        map: &'static str,
        op: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

fn op_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |e| MapsError::Op {
        map,
        op,
        source: Box::new(e),
    }
}

/// What one apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub rules_written: usize,
    pub rules_removed: usize,
    pub ports_written: usize,
    pub ports_removed: usize,
}

pub struct MapSet {
    slots: Array<MapData, SlotConfig>,
    rules: LpmTrie<MapData, RuleKey, RuleValue>,
    exact: HashMap<MapData, RuleKey, RuleValue>,
    ports: HashMap<MapData, PortKey, u32>,
    inbound: LpmTrie<MapData, InboundKey, InboundValue>,
    counters: Arc<Counters>,
    events: Option<RingBuf<MapData>>,
}

impl MapSet {
    pub fn take(programs: &mut Programs) -> Result<Self, MapsError> {
        let conv = |name: &'static str| op_err(name, "open");
        Ok(MapSet {
            slots: Array::try_from(programs.take_map(MAP_SLOTS)?).map_err(conv(MAP_SLOTS))?,
            rules: LpmTrie::try_from(programs.take_map(MAP_RULES)?).map_err(conv(MAP_RULES))?,
            exact: HashMap::try_from(programs.take_map(MAP_EXACT)?).map_err(conv(MAP_EXACT))?,
            ports: HashMap::try_from(programs.take_map(MAP_PORTS)?).map_err(conv(MAP_PORTS))?,
            inbound: LpmTrie::try_from(programs.take_map(MAP_INBOUND)?)
                .map_err(conv(MAP_INBOUND))?,
            counters: Arc::new(
                Counters::new(
                    PerCpuArray::try_from(programs.take_map(MAP_COUNTERS)?)
                        .map_err(conv(MAP_COUNTERS))?,
                    PerCpuArray::try_from(programs.take_map(MAP_EVENTS_LOST)?)
                        .map_err(conv(MAP_EVENTS_LOST))?,
                )
                .with_rules(
                    PerCpuArray::try_from(programs.take_map(MAP_RULE_COUNTERS)?)
                        .map_err(conv(MAP_RULE_COUNTERS))?,
                ),
            ),
            events: Some(
                RingBuf::try_from(programs.take_map(MAP_EVENTS)?).map_err(conv(MAP_EVENTS))?,
            ),
        })
    }

    /// Moves the rule and port maps from `old` to `new` (same policy id, or `old` empty).
    pub fn apply(&mut self, old: &Compiled, new: &Compiled) -> Result<ApplyStats, MapsError> {
        let mut stats = ApplyStats::default();
        for (k, v) in &new.ports {
            if old.ports.get(k) != Some(v) {
                self.ports
                    .insert(k, v, 0)
                    .map_err(op_err(MAP_PORTS, "insert"))?;
                stats.ports_written += 1;
            }
        }
        for (k, v) in &new.rules {
            if old.rules.get(k) != Some(v) {
                self.rules
                    .insert(&lpm(k), v, 0)
                    .map_err(op_err(MAP_RULES, "insert"))?;
                stats.rules_written += 1;
            }
        }
        for (k, v) in &new.exact {
            if old.exact.get(k) != Some(v) {
                self.exact
                    .insert(k, v, 0)
                    .map_err(op_err(MAP_EXACT, "insert"))?;
                stats.rules_written += 1;
            }
        }
        for k in old.exact.keys() {
            if !new.exact.contains_key(k) {
                remove_missing_ok(self.exact.remove(k), MAP_EXACT)?;
                stats.rules_removed += 1;
            }
        }
        for k in old.rules.keys() {
            if !new.rules.contains_key(k) {
                remove_missing_ok(self.rules.remove(&lpm(k)), MAP_RULES)?;
                stats.rules_removed += 1;
            }
        }
        for k in old.ports.keys() {
            if !new.ports.contains_key(k) {
                remove_missing_ok(self.ports.remove(k), MAP_PORTS)?;
                stats.ports_removed += 1;
            }
        }
        let (written, removed) =
            crate::kernel::inbound::apply(&mut self.inbound, &old.inbound, &new.inbound)
                .map_err(op_err(MAP_INBOUND, "update"))?;
        stats.rules_written += written;
        stats.rules_removed += removed;
        Ok(stats)
    }

    /// What `slot` holds now.
    pub fn slot_config(&self, slot: u32) -> Result<SlotConfig, MapsError> {
        self.slots.get(&slot, 0).map_err(op_err(MAP_SLOTS, "get"))
    }

    /// Removes every rule and port entry whose policy id is not `keep` (state an earlier
    /// agent left; the maps of one instance hold one policy at a time).
    pub fn retain_policy(&mut self, keep: u32) -> Result<ApplyStats, MapsError> {
        let mut stats = ApplyStats::default();
        let stale_rules: Vec<Key<RuleKey>> = self
            .rules
            .keys()
            .filter_map(Result::ok)
            .filter(|k| u32::from_be_bytes(k.data().policy_id) != keep)
            .collect();
        for k in &stale_rules {
            remove_missing_ok(self.rules.remove(k), MAP_RULES)?;
            stats.rules_removed += 1;
        }
        let stale_exact: Vec<RuleKey> = self
            .exact
            .keys()
            .filter_map(Result::ok)
            .filter(|k| u32::from_be_bytes(k.policy_id) != keep)
            .collect();
        for k in &stale_exact {
            remove_missing_ok(self.exact.remove(k), MAP_EXACT)?;
            stats.rules_removed += 1;
        }
        let stale_ports: Vec<PortKey> = self
            .ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.policy_id != keep)
            .collect();
        for k in &stale_ports {
            remove_missing_ok(self.ports.remove(k), MAP_PORTS)?;
            stats.ports_removed += 1;
        }
        stats.rules_removed += crate::kernel::inbound::retain_policy(&mut self.inbound, keep)
            .map_err(op_err(MAP_INBOUND, "remove"))?;
        Ok(stats)
    }

    /// Puts `config` in force for `slot`. With `policy_id` 0 the slot denies everything.
    pub fn set_slot(&mut self, slot: u32, config: SlotConfig) -> Result<(), MapsError> {
        self.slots
            .set(slot, config, 0)
            .map_err(op_err(MAP_SLOTS, "set"))
    }

    /// Every non-zero counter of `slot`, summed over CPUs.
    pub fn counters(&self, slot: u32) -> Result<Vec<(Reason, Proto, u64)>, MapsError> {
        let all = self
            .counters
            .all(slot)
            .map_err(op_err(MAP_COUNTERS, "get"))?;
        Ok(all.into_iter().filter(|(_, _, n)| *n > 0).collect())
    }

    /// The sum over CPUs of one counter.
    pub fn counter(&self, slot: u32, reason: Reason, proto: Proto) -> Result<u64, MapsError> {
        self.counters
            .get(slot, reason, proto)
            .map_err(op_err(MAP_COUNTERS, "get"))
    }

    /// The counters, for readers that outlive a borrow (metrics).
    pub fn shared_counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// The event ring buffer; there is one reader, so the first call takes it.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }
}

fn lpm(k: &LpmKey) -> Key<RuleKey> {
    Key::new(k.prefix_len, k.data)
}

/// Removing an entry that is already gone is what we wanted.
fn remove_missing_ok(r: Result<(), MapError>, map: &'static str) -> Result<(), MapsError> {
    match r {
        Ok(()) => Ok(()),
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(op_err(map, "remove")(e)),
    }
}
