//! Whether a policy fits the kernel's maps, decided when the policy is read (by `check` as
//! by `exec`, `run` and every reload) rather than discovered as `E2BIG` half-way through
//! writing the maps; and the sizes of those maps, which `--max-entries KIND=N` sets at load
//! time.
//!
//! A reload writes the new policy's entries next to the old policy's and switches in one
//! step, so each map must hold two policies at once: one policy may use at most half of a
//! map. Addresses learned from DNS answers live in a separate map (`learned`, which the agent
//! keeps within its size) and are not counted here; nor are the addresses the policy's exact
//! host names resolve to, at most `--dns-max-addrs-per-name` each.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use egress_common::inbound::{MAP_INBOUND, MAX_INBOUND};
use egress_common::maps::{
    MAP_DNS_RESOLVERS, MAP_EXACT, MAP_LEARNED, MAP_PORTS, MAP_RULES, MAX_DNS_RESOLVERS, MAX_EXACT,
    MAX_LEARNED, MAX_PORTS, MAX_RULES,
};
use egress_common::ratelimit::{MAP_RATE_LIMITS, MAX_RATE_LIMITS};

use crate::Policy;
use crate::compile::{Resolved, SetIds, compile};
use crate::doh::DohList;

/// A map whose size the operator may set (`--max-entries KIND=N`). The others are sized by
/// the layout (one entry per slot, per counter) or are caches the programs keep within
/// bounds themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MapKind {
    Ports,
    Addresses,
    Prefixes,
    Inbound,
    RateLimits,
    Resolvers,
    Learned,
}

impl MapKind {
    pub const ALL: [MapKind; 7] = [
        MapKind::Ports,
        MapKind::Addresses,
        MapKind::Prefixes,
        MapKind::Inbound,
        MapKind::RateLimits,
        MapKind::Resolvers,
        MapKind::Learned,
    ];

    /// The name `--max-entries` takes.
    pub const fn name(self) -> &'static str {
        match self {
            MapKind::Ports => "ports",
            MapKind::Addresses => "addresses",
            MapKind::Prefixes => "prefixes",
            MapKind::Inbound => "inbound",
            MapKind::RateLimits => "rate-limits",
            MapKind::Resolvers => "resolvers",
            MapKind::Learned => "learned",
        }
    }

    /// The map's name in the eBPF object.
    pub const fn map(self) -> &'static str {
        match self {
            MapKind::Ports => MAP_PORTS,
            MapKind::Addresses => MAP_EXACT,
            MapKind::Prefixes => MAP_RULES,
            MapKind::Inbound => MAP_INBOUND,
            MapKind::RateLimits => MAP_RATE_LIMITS,
            MapKind::Resolvers => MAP_DNS_RESOLVERS,
            MapKind::Learned => MAP_LEARNED,
        }
    }

    /// The constant in `egress-common` that sizes the map unless `--max-entries` says
    /// otherwise.
    pub const fn constant(self) -> &'static str {
        match self {
            MapKind::Ports => "MAX_PORTS",
            MapKind::Addresses => "MAX_EXACT",
            MapKind::Prefixes => "MAX_RULES",
            MapKind::Inbound => "MAX_INBOUND",
            MapKind::RateLimits => "MAX_RATE_LIMITS",
            MapKind::Resolvers => "MAX_DNS_RESOLVERS",
            MapKind::Learned => "MAX_LEARNED",
        }
    }

    pub const fn default_entries(self) -> u32 {
        match self {
            MapKind::Ports => MAX_PORTS,
            MapKind::Addresses => MAX_EXACT,
            MapKind::Prefixes => MAX_RULES,
            MapKind::Inbound => MAX_INBOUND,
            MapKind::RateLimits => MAX_RATE_LIMITS,
            MapKind::Resolvers => MAX_DNS_RESOLVERS,
            MapKind::Learned => MAX_LEARNED,
        }
    }

    /// What the map holds, for messages.
    pub const fn holds(self) -> &'static str {
        match self {
            MapKind::Ports => "port-set entries",
            MapKind::Addresses => "address entries (single addresses)",
            MapKind::Prefixes => "prefix entries (networks)",
            MapKind::Inbound => "inbound entries",
            MapKind::RateLimits => "rate-limit entries",
            MapKind::Resolvers => "allowed resolvers",
            MapKind::Learned => "learned addresses",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// The smallest size `--max-entries` accepts: half of it holds one entry.
pub const MIN_ENTRIES: u32 = 2;
/// The largest size `--max-entries` accepts. The maps allocate per entry as it is written
/// (or, for the trie, per node), so a large size costs nothing until it is used; this bounds
/// what one policy can make the kernel allocate.
pub const MAX_ENTRIES: u32 = 1 << 24;

/// One `--max-entries KIND=N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxEntries {
    pub kind: MapKind,
    pub entries: u32,
}

/// Why a `--max-entries` value is not one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaxEntriesError {
    #[error("`{0}` is not KIND=N, e.g. `ports=524288`")]
    Form(String),
    #[error("unknown map `{kind}`; the maps that can be sized are {}", kinds())]
    Kind { kind: String },
    #[error("`{value}` for {kind} is not a number of entries from {MIN_ENTRIES} to {MAX_ENTRIES}")]
    Entries { kind: &'static str, value: String },
}

fn kinds() -> String {
    MapKind::ALL
        .iter()
        .map(|k| format!("`{}`", k.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for MaxEntries {
    type Err = MaxEntriesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s
            .split_once('=')
            .ok_or_else(|| MaxEntriesError::Form(s.to_owned()))?;
        let kind = MapKind::ALL
            .into_iter()
            .find(|k| k.name() == kind.trim())
            .ok_or_else(|| MaxEntriesError::Kind {
                kind: kind.to_owned(),
            })?;
        let entries = value
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (MIN_ENTRIES..=MAX_ENTRIES).contains(n))
            .ok_or_else(|| MaxEntriesError::Entries {
                kind: kind.name(),
                value: value.to_owned(),
            })?;
        Ok(MaxEntries { kind, entries })
    }
}

/// Where a map's size came from, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The constant in `egress-common`.
    Default,
    /// `--max-entries`.
    Flag,
    /// The maps an earlier agent pinned for this cgroup (an adopted instance keeps them).
    Pinned,
}

/// The size of every map [`MapKind`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLimits {
    sizes: [(u32, Origin); MapKind::ALL.len()],
}

impl Default for MapLimits {
    fn default() -> Self {
        let mut sizes = [(0, Origin::Default); MapKind::ALL.len()];
        for kind in MapKind::ALL {
            sizes[kind.index()] = (kind.default_entries(), Origin::Default);
        }
        MapLimits { sizes }
    }
}

impl MapLimits {
    /// The defaults, with each `--max-entries` applied in order (a later one for the same map
    /// wins).
    pub fn from_flags(flags: &[MaxEntries]) -> Self {
        let mut limits = MapLimits::default();
        for f in flags {
            limits.set(f.kind, f.entries, Origin::Flag);
        }
        limits
    }

    pub fn set(&mut self, kind: MapKind, entries: u32, origin: Origin) {
        self.sizes[kind.index()] = (entries, origin);
    }

    pub fn entries(&self, kind: MapKind) -> u32 {
        self.sizes[kind.index()].0
    }

    pub fn origin(&self, kind: MapKind) -> Origin {
        self.sizes[kind.index()].1
    }

    /// The maps whose size differs from the default, for the loader.
    pub fn overrides(&self) -> impl Iterator<Item = (MapKind, u32)> + '_ {
        MapKind::ALL
            .into_iter()
            .map(|k| (k, self.entries(k)))
            .filter(|(k, n)| *n != k.default_entries())
    }
}

/// How much of one map a policy needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overflow {
    pub kind: MapKind,
    pub needed: usize,
    pub capacity: u32,
    pub origin: Origin,
}

impl Overflow {
    /// What one policy may use: half the map (see the module comment).
    pub fn allowed(&self) -> usize {
        (self.capacity / 2) as usize
    }
}

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, constant) = (self.kind.name(), self.kind.constant());
        write!(
            f,
            "{} {} needed, at most {} allowed (",
            self.needed,
            self.kind.holds(),
            self.allowed()
        )?;
        match self.origin {
            Origin::Default => write!(
                f,
                "{constant} = {}; `--max-entries {kind}=N` sets another size",
                self.capacity
            )?,
            Origin::Flag => write!(
                f,
                "--max-entries {kind}={}; the default is {constant} = {}",
                self.capacity,
                self.kind.default_entries()
            )?,
            Origin::Pinned => write!(
                f,
                "{kind} = {} in the maps pinned for this cgroup, which keep their size until \
                 it is detached",
                self.capacity
            )?,
        }
        f.write_str(")")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{}: the policy does not fit the kernel's maps (a policy may use half of each map, so that a reload can write the new policy next to the old one):\n{}",
    file.display(), .overflows.iter().map(|o| format!("  - {o}")).collect::<Vec<_>>().join("\n"))]
pub struct CapacityError {
    pub file: PathBuf,
    pub overflows: Vec<Overflow>,
}

/// How much of each map `policy` needs, before any name is resolved, against `limits`.
pub fn usage(policy: &Policy, doh: &DohList, limits: &MapLimits) -> Vec<Overflow> {
    let mut sets = SetIds::default();
    let compiled = compile(policy, 1, &Resolved::new(), doh, &mut sets);
    let rate = crate::limits::compile_limits(policy, 1);
    let resolvers = policy.dns.as_ref().map_or(0, |d| d.allowed_resolvers.len());
    [
        (MapKind::Addresses, compiled.exact.len()),
        (MapKind::Prefixes, compiled.rules.len()),
        (MapKind::Ports, compiled.ports.len()),
        (MapKind::Inbound, compiled.inbound.entries.len()),
        (MapKind::RateLimits, rate.limits.len()),
        (MapKind::Resolvers, resolvers),
    ]
    .into_iter()
    .map(|(kind, needed)| Overflow {
        kind,
        needed,
        capacity: limits.entries(kind),
        origin: limits.origin(kind),
    })
    .collect()
}

/// Refuses a policy that needs more than half of any map of `limits`.
pub fn check(
    policy: &Policy,
    doh: &DohList,
    file: &Path,
    limits: &MapLimits,
) -> Result<(), CapacityError> {
    let overflows: Vec<Overflow> = usage(policy, doh, limits)
        .into_iter()
        .filter(|o| o.needed > o.allowed())
        .collect();
    if overflows.is_empty() {
        Ok(())
    } else {
        Err(CapacityError {
            file: file.to_path_buf(),
            overflows,
        })
    }
}

#[cfg(test)]
#[path = "capacity_tests.rs"]
mod tests;
