//! Port sets: which (protocol, port) pairs a set of allow rules opens, how a set is written to
//! the port map, and the one allocator of port-set ids.
//!
//! The port map holds the sets of two writers under one policy id: the compiled allowlist and
//! the addresses learned from DNS answers. Each takes its ids from its own [`SetIds`], and the
//! two ranges are disjoint ([`STATIC_SET_IDS`], [`LEARNED_SET_IDS`]), so neither can ever
//! overwrite a set the other wrote.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::RangeInclusive;

use egress_common::{
    PortKey, Proto,
    maps::{InlinePort, MAX_INLINE_PORTS},
};

use crate::Policy;
use crate::compile::proto;

/// Ids of the compiled allowlist's sets.
pub const STATIC_SET_IDS: RangeInclusive<u32> = 1..=(1 << 31) - 1;
/// Ids of the learned addresses' sets.
pub const LEARNED_SET_IDS: RangeInclusive<u32> = 1 << 31..=u32::MAX;

/// Hands out port-set ids from one range and keeps them stable for the life of one policy
/// id, so that a recompile (for example after a DNS refresh) never changes what an existing
/// set id means while the kernel may be reading it. An id is not handed out again while a set
/// holds it.
#[derive(Clone, Debug)]
pub struct SetIds {
    range: RangeInclusive<u32>,
    ids: HashMap<Vec<u32>, u32>,
    /// The values of `ids`, kept alongside so that handing out an id costs no scan.
    in_use: HashSet<u32>,
    /// The last id handed out (`None` before the first).
    last: Option<u32>,
}

impl Default for SetIds {
    /// The compiled allowlist's allocator.
    fn default() -> Self {
        SetIds::new(STATIC_SET_IDS)
    }
}

impl SetIds {
    fn new(range: RangeInclusive<u32>) -> Self {
        SetIds {
            range,
            ids: HashMap::new(),
            in_use: HashSet::new(),
            last: None,
        }
    }

    /// The learned addresses' allocator.
    pub fn learned() -> Self {
        SetIds::new(LEARNED_SET_IDS)
    }

    /// The id of the set of `rules`, and whether it is new (its port entries must be written).
    pub fn id_for(&mut self, rules: &[u32]) -> (u32, bool) {
        if let Some(&id) = self.ids.get(rules) {
            return (id, false);
        }
        let id = self.next_free();
        self.ids.insert(rules.to_vec(), id);
        self.in_use.insert(id);
        (id, true)
    }

    /// The id after the last one, wrapping within the range and skipping ids in use.
    fn next_free(&mut self) -> u32 {
        let (first, end) = (*self.range.start(), *self.range.end());
        let mut id = self
            .last
            .map_or(first, |l| l.checked_add(1).unwrap_or(first));
        // At most one id per set in use is skipped: the loop ends.
        for _ in 0..=self.in_use.len() {
            if id > end || id < first {
                id = first;
            }
            if !self.in_use.contains(&id) {
                break;
            }
            id = id.checked_add(1).unwrap_or(first);
        }
        self.last = Some(id);
        id
    }

    /// Forgets sets no entry uses any more.
    pub fn retain_used(&mut self, used: &BTreeSet<u32>) {
        self.ids.retain(|_, id| used.contains(id));
        self.in_use.retain(|id| used.contains(id));
    }

    /// Forgets the sets `gone` (their port entries were removed).
    pub fn forget(&mut self, gone: &BTreeSet<u32>) {
        self.ids.retain(|_, id| !gone.contains(id));
        self.in_use.retain(|id| !gone.contains(id));
    }
}

/// Every (protocol, port) that the allow rules `allow` open, with the lowest-numbered rule
/// opening it.
pub fn port_pairs(policy: &Policy, allow: &[u32]) -> BTreeMap<(u16, u8), u32> {
    let mut pairs: BTreeMap<(u16, u8), u32> = BTreeMap::new();
    for &rule_id in allow {
        let Some(rule) = policy.allowed.get(rule_id as usize) else {
            continue;
        };
        for (transport, port) in rule.transport_ports() {
            pairs
                .entry((port, proto(transport) as u8))
                .or_insert(rule_id);
        }
    }
    pairs
}

/// The port-map entries of set `set_id` holding `pairs`.
pub fn port_entries(
    policy_id: u32,
    set_id: u32,
    pairs: &BTreeMap<(u16, u8), u32>,
) -> impl Iterator<Item = (PortKey, u32)> + '_ {
    pairs.iter().map(move |(&(port, p), &rule_id)| {
        let p = if p == Proto::Udp as u8 {
            Proto::Udp
        } else {
            Proto::Tcp
        };
        (PortKey::new(policy_id, set_id, port, p), rule_id)
    })
}

/// The pairs as a value's inline ports when they fit (count 1 or 2), else none (count 0: the
/// port map holds the set).
pub fn inline_ports(
    pairs: &BTreeMap<(u16, u8), u32>,
) -> ([InlinePort; MAX_INLINE_PORTS as usize], u8) {
    let mut inline = [InlinePort::default(); MAX_INLINE_PORTS as usize];
    if pairs.is_empty() || pairs.len() > inline.len() {
        return (inline, 0);
    }
    for (slot, (&(port, proto), &rule_id)) in inline.iter_mut().zip(pairs) {
        *slot = InlinePort {
            port,
            proto,
            _pad: 0,
            rule_id,
        };
    }
    (inline, u8::try_from(pairs.len()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_writers_ranges_are_disjoint_and_ids_stay_in_their_range() {
        assert!(STATIC_SET_IDS.end() < LEARNED_SET_IDS.start());
        let mut s = SetIds::default();
        let mut l = SetIds::learned();
        for k in 0..100u32 {
            let (a, new_a) = s.id_for(&[k]);
            let (b, new_b) = l.id_for(&[k]);
            assert!(new_a && new_b);
            assert!(STATIC_SET_IDS.contains(&a), "{a}");
            assert!(LEARNED_SET_IDS.contains(&b), "{b}");
        }
        assert_eq!(s.id_for(&[7]), (8, false));
    }

    #[test]
    fn wrapping_skips_ids_still_in_use() {
        let mut l = SetIds::learned();
        let (first, _) = l.id_for(&[1]);
        assert_eq!(first, 1 << 31);
        l.last = Some(u32::MAX);
        // Wraps to the range's start, which [1] still holds: the next id is taken.
        let (id, new) = l.id_for(&[2]);
        assert!(new);
        assert_eq!(id, (1 << 31) + 1);
        l.forget(&BTreeSet::from([first]));
        l.last = Some(u32::MAX);
        assert_eq!(l.id_for(&[3]), (first, true));
    }
}
