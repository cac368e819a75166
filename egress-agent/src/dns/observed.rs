//! The names the workload resolved through the proxy, with the addresses each answer gave:
//! what `learn` turns into host rules, and how it names the addresses of audited connections.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Names kept; a workload that resolves more is not one to learn a policy from by name.
pub const MAX_NAMES: usize = 4096;
/// Addresses kept per name.
pub const MAX_ADDRS_PER_NAME: usize = 64;

/// Shared by the proxy's tasks and the supervisor. Bounded by [`MAX_NAMES`] and
/// [`MAX_ADDRS_PER_NAME`]; what does not fit is counted in `dropped`.
#[derive(Clone, Debug, Default)]
pub struct Observed(Arc<Mutex<Inner>>);

#[derive(Debug, Default)]
struct Inner {
    names: BTreeMap<String, BTreeSet<IpAddr>>,
    dropped: u64,
}

impl Observed {
    /// One answer: `name` (normalised here: lowercase, no trailing dot) resolved to `addrs`.
    pub fn record(&self, name: &str, addrs: impl IntoIterator<Item = IpAddr>) {
        let Some(name) = egress_policy::names::normalize(name) else {
            return;
        };
        let mut inner = self.lock();
        if !inner.names.contains_key(name.as_ref()) && inner.names.len() >= MAX_NAMES {
            inner.dropped += 1;
            return;
        }
        let mut dropped = 0;
        let set = inner.names.entry(name.into_owned()).or_default();
        for a in addrs {
            if set.len() >= MAX_ADDRS_PER_NAME {
                dropped += 1;
                continue;
            }
            set.insert(a.to_canonical());
        }
        inner.dropped += dropped;
    }

    /// Every name with its addresses, in name order.
    pub fn snapshot(&self) -> BTreeMap<String, BTreeSet<IpAddr>> {
        self.lock().names.clone()
    }

    /// Names or addresses left out by the bounds.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_and_addresses_canonical_and_bounded() {
        let o = Observed::default();
        let mapped: IpAddr = "::ffff:198.18.0.7"
            .parse()
            .unwrap_or(IpAddr::from([0u8; 4]));
        o.record("API.Example.com.", [mapped]);
        o.record("api.example.com", [IpAddr::from([198, 18, 0, 8])]);
        let snap = o.snapshot();
        assert_eq!(snap.len(), 1);
        let addrs: Vec<IpAddr> = snap["api.example.com"].iter().copied().collect();
        assert_eq!(
            addrs,
            vec![IpAddr::from([198, 18, 0, 7]), IpAddr::from([198, 18, 0, 8])]
        );
        o.record(
            "many.example.com",
            (0..100u8).map(|i| IpAddr::from([198, 18, 1, i])),
        );
        assert_eq!(o.snapshot()["many.example.com"].len(), MAX_ADDRS_PER_NAME);
        assert_eq!(o.dropped(), 100 - MAX_ADDRS_PER_NAME as u64);
    }
}
