//! Addresses learned from the proxy's answers, per protected cgroup: the pure bookkeeping that
//! turns "name N, allowed by rules R, answered A until deadline D" into the exact contents of
//! the learned-address map and its port sets.
//!
//! One address can be the answer of several names (a CDN): its entry carries the union of the
//! rules of every name it currently answers for, and the latest of their deadlines. A name
//! keeps at most `max_per_name` addresses; the newest answer wins, and what had to be left out
//! is reported so the caller can log and count it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use egress_common::{
    Family, PortKey, RuleKey, RuleValue,
    maps::{ACTION_ALLOW, address_bits, name_tag},
};

use crate::Policy;
use crate::ports::{SetIds, inline_ports, port_entries, port_pairs};

/// What the kernel maps must change to match the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Writes {
    /// Port entries to write before any entry that points at them.
    pub ports: Vec<(PortKey, u32)>,
    pub entries: Vec<(RuleKey, RuleValue)>,
    pub removed: Vec<RuleKey>,
    /// Addresses of an answer that the per-name cap kept out.
    pub capped: usize,
}

#[derive(Clone, Debug, Default)]
struct NameEntry {
    rules: Vec<u32>,
    /// Address -> CLOCK_BOOTTIME second its answer lapses.
    addrs: BTreeMap<IpAddr, u32>,
}

/// The learned addresses of one cgroup under one policy id.
#[derive(Clone, Debug)]
pub struct LearnedTable {
    policy_id: u32,
    max_per_name: usize,
    names: HashMap<String, NameEntry>,
    by_addr: HashMap<IpAddr, BTreeSet<String>>,
    /// Rule set -> port-set id, for this policy id; each set's port entries are written once.
    sets: SetIds,
    /// What is in the kernel map now.
    installed: BTreeMap<RuleKey, RuleValue>,
}

impl LearnedTable {
    pub fn new(policy_id: u32, max_per_name: usize) -> Self {
        LearnedTable {
            policy_id,
            max_per_name: max_per_name.max(1),
            names: HashMap::new(),
            by_addr: HashMap::new(),
            sets: SetIds::learned(),
            installed: BTreeMap::new(),
        }
    }

    pub fn policy_id(&self) -> u32 {
        self.policy_id
    }

    /// Changes the per-name cap for answers from now on.
    pub fn set_max_per_name(&mut self, max_per_name: usize) {
        self.max_per_name = max_per_name.max(1);
    }

    /// Addresses currently in the map.
    pub fn len(&self) -> usize {
        self.installed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
    }

    /// The map contents (for checks against the kernel and the reference).
    pub fn entries(&self) -> &BTreeMap<RuleKey, RuleValue> {
        &self.installed
    }

    /// Records that `name` (allowed by `rules`, ascending) answers `addrs` until `deadline_s`.
    /// Addresses the name had before and does not answer now stay until their own deadline.
    pub fn learn(
        &mut self,
        policy: &Policy,
        name: &str,
        rules: &[u32],
        addrs: &[IpAddr],
        deadline_s: u32,
    ) -> Writes {
        let mut writes = Writes::default();
        let entry = self.names.entry(name.to_owned()).or_default();
        entry.rules = rules.to_vec();
        let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
        for addr in addrs {
            let addr = addr.to_canonical();
            let d = entry.addrs.entry(addr).or_insert(deadline_s);
            *d = (*d).max(deadline_s);
            touched.insert(addr);
        }
        // The cap: the addresses of this answer first, then the latest deadlines.
        if entry.addrs.len() > self.max_per_name {
            let mut order: Vec<(bool, u32, IpAddr)> = entry
                .addrs
                .iter()
                .map(|(a, d)| (touched.contains(a), *d, *a))
                .collect();
            order.sort_by_key(|x| std::cmp::Reverse((x.0, x.1)));
            for (fresh, _, addr) in order.into_iter().skip(self.max_per_name) {
                entry.addrs.remove(&addr);
                if fresh {
                    writes.capped += 1;
                    touched.remove(&addr);
                }
                if let Some(names) = self.by_addr.get_mut(&addr) {
                    names.remove(name);
                }
                touched.insert(addr);
            }
        }
        for addr in entry.addrs.keys() {
            self.by_addr
                .entry(*addr)
                .or_default()
                .insert(name.to_owned());
        }
        for addr in touched {
            self.refresh(policy, addr, &mut writes);
        }
        writes
    }

    /// After `w` failed to reach the kernel (in part): forgets that its entries and port sets
    /// are there, so the next answer writes them again instead of taking them for installed.
    pub fn unwrite(&mut self, w: &Writes) {
        for (key, _) in &w.entries {
            self.installed.remove(key);
        }
        let sets: BTreeSet<u32> = w.ports.iter().map(|(k, _)| k.set_id).collect();
        self.sets.forget(&sets);
    }

    /// Drops every (name, address) whose deadline is before `now_s`, and the entries no name
    /// holds any more. The kernel already ignores them; this bounds the map.
    pub fn expire(&mut self, policy: &Policy, now_s: u32) -> Writes {
        let mut writes = Writes::default();
        let mut touched = BTreeSet::new();
        self.names.retain(|name, entry| {
            entry.addrs.retain(|addr, d| {
                let keep = *d >= now_s;
                if !keep {
                    touched.insert(*addr);
                    if let Some(names) = self.by_addr.get_mut(addr) {
                        names.remove(name);
                    }
                }
                keep
            });
            !entry.addrs.is_empty()
        });
        for addr in touched {
            self.refresh(policy, addr, &mut writes);
        }
        writes
    }

    /// The same names under a new policy and policy id: each name's rules, and which of its
    /// addresses stay, are asked again (`admit(name, addresses)`; no rules when the new policy
    /// no longer allows the name), and every entry is written anew under `policy_id`. The old
    /// id's entries are left for the caller to sweep once the slot has switched.
    pub fn rebase(
        &mut self,
        policy: &Policy,
        policy_id: u32,
        mut admit: impl FnMut(&str, &[IpAddr]) -> (Vec<u32>, Vec<IpAddr>),
    ) -> Writes {
        let names = std::mem::take(&mut self.names);
        let mut fresh = LearnedTable::new(policy_id, self.max_per_name);
        let mut writes = Writes::default();
        for (name, entry) in names {
            let addrs: Vec<IpAddr> = entry.addrs.keys().copied().collect();
            let (rules, kept) = admit(&name, &addrs);
            if rules.is_empty() {
                continue;
            }
            for (addr, deadline) in entry.addrs {
                if !kept.contains(&addr) {
                    continue;
                }
                let w = fresh.learn(policy, &name, &rules, &[addr], deadline);
                writes.ports.extend(w.ports);
                writes.entries.extend(w.entries);
            }
        }
        *self = fresh;
        writes
    }

    /// Recomputes the entry of `addr` from the names holding it.
    fn refresh(&mut self, policy: &Policy, addr: IpAddr, writes: &mut Writes) {
        let key = rule_key(self.policy_id, addr);
        let mut rules: BTreeSet<u32> = BTreeSet::new();
        let mut deadline = 0u32;
        // The budget a wildcard's per-name limit charges: that of the first name (in byte
        // order) answering the address, so several names on one address share one budget.
        let mut budget_name: Option<&str> = None;
        for name in self.by_addr.get(&addr).into_iter().flatten() {
            if let Some(entry) = self.names.get(name)
                && let Some(d) = entry.addrs.get(&addr)
            {
                rules.extend(entry.rules.iter().copied());
                deadline = deadline.max(*d);
                budget_name = budget_name.or(Some(name.as_str()));
            }
        }
        let name_tag = budget_name.map_or(0, |n| name_tag(n.as_bytes()));
        if rules.is_empty() {
            self.by_addr.remove(&addr);
            if self.installed.remove(&key).is_some() {
                writes.removed.push(key);
            }
            return;
        }
        let rules: Vec<u32> = rules.into_iter().collect();
        let pairs = port_pairs(policy, &rules);
        let (set_id, new) = self.sets.id_for(&rules);
        if new {
            writes
                .ports
                .extend(port_entries(self.policy_id, set_id, &pairs));
        }
        let (inline, n_inline) = inline_ports(&pairs);
        let family = family_of(addr);
        let value = RuleValue {
            action: ACTION_ALLOW,
            prefix: u8::try_from(address_bits(family)).unwrap_or(128),
            n_inline,
            _pad: 0,
            rule_id: rules.first().copied().unwrap_or(0),
            set_id,
            // A deadline of 0 would mean "never expires": never write one.
            expires_s: deadline.max(1),
            inline,
            name_tag,
        };
        if self.installed.get(&key) != Some(&value) {
            self.installed.insert(key, value);
            writes.entries.push((key, value));
        }
    }
}

fn family_of(addr: IpAddr) -> Family {
    match addr {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// The map key of a (canonical) address.
pub fn rule_key(policy_id: u32, addr: IpAddr) -> RuleKey {
    let mut bytes = [0u8; 16];
    match addr.to_canonical() {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            RuleKey::new(policy_id, Family::V4, bytes)
        }
        IpAddr::V6(v6) => RuleKey::new(policy_id, Family::V6, v6.octets()),
    }
}

#[cfg(test)]
#[path = "learned_tests.rs"]
mod tests;
