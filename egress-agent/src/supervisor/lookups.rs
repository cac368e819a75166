//! The policy's host names and the one schedule of their lookups: the addresses each name
//! resolved to, when those lapse in the kernel, and when each name is due to be asked again.
//!
//! The enforcer owns the schedule for as long as a policy is in force; a start or a reload
//! hands it a fresh one (made by [`resolve_all`]), so no due time is set in one place and
//! patched in another.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use egress_policy::Policy;
use egress_policy::compile::{Deadlines, Resolved};
use tokio::time::Instant;

use crate::dns::rebind::RebindFilter;
use crate::supervisor::resolve::{Answer, ResolveError, Resolver, deadline_s, policy_hosts};
use crate::supervisor::session::{RebindCounter, screen_lookup};

#[derive(Clone, Debug, Default)]
pub struct Lookups {
    resolved: Resolved,
    deadlines: Deadlines,
    due: BTreeMap<String, Instant>,
}

impl From<Resolved> for Lookups {
    fn from(resolved: Resolved) -> Self {
        Lookups {
            resolved,
            ..Lookups::default()
        }
    }
}

impl From<(Resolved, Deadlines)> for Lookups {
    fn from((resolved, deadlines): (Resolved, Deadlines)) -> Self {
        Lookups {
            resolved,
            deadlines,
            due: BTreeMap::new(),
        }
    }
}

/// What one answer changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Same addresses and deadline: only the next lookup moved.
    Unchanged,
    /// New addresses or a new deadline: the tables must be compiled again.
    Changed,
}

impl Lookups {
    /// Schedules exactly `hosts`: a name already scheduled keeps its time, a new one is due
    /// now, and a name no longer listed is forgotten with its addresses.
    pub fn retarget(&mut self, hosts: impl IntoIterator<Item = String>, now: Instant) {
        let due: BTreeMap<String, Instant> = hosts
            .into_iter()
            .map(|h| {
                let t = self.due.get(&h).copied().unwrap_or(now);
                (h, t)
            })
            .collect();
        self.resolved.retain(|h, _| due.contains_key(h));
        self.deadlines.retain(|h, _| due.contains_key(h));
        self.due = due;
    }

    /// An answer for `host`: its addresses until `deadline_s` (CLOCK_BOOTTIME seconds), and
    /// the next lookup at `next`.
    pub fn record(
        &mut self,
        host: &str,
        addrs: Vec<IpAddr>,
        next: Instant,
        deadline_s: u32,
    ) -> Recorded {
        self.due.insert(host.to_owned(), next);
        if self.resolved.get(host) == Some(&addrs) && self.deadlines.get(host) == Some(&deadline_s)
        {
            return Recorded::Unchanged;
        }
        self.resolved.insert(host.to_owned(), addrs);
        self.deadlines.insert(host.to_owned(), deadline_s);
        Recorded::Changed
    }

    /// A failed lookup (or a failed write of its answer): the last addresses stay, and the
    /// name is asked again at `next`.
    pub fn postpone(&mut self, host: &str, next: Instant) {
        self.due.insert(host.to_owned(), next);
    }

    /// The names due at `now`.
    pub fn due_at(&self, now: Instant) -> Vec<String> {
        self.due
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(h, _)| h.clone())
            .collect()
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }

    pub fn due_in(&self, host: &str) -> Option<Duration> {
        self.due
            .get(host)
            .map(|t| t.saturating_duration_since(Instant::now()))
    }

    pub fn has_hosts(&self) -> bool {
        !self.due.is_empty()
    }

    pub fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    pub fn deadlines(&self) -> &Deadlines {
        &self.deadlines
    }
}

/// Asks `resolver` for every name in `hosts` at once; answers come back in completion order.
/// A lookup task that died is reported as `None`.
pub async fn look_up(
    resolver: &Arc<Resolver>,
    hosts: Vec<String>,
) -> Vec<Option<(String, Result<Answer, ResolveError>)>> {
    let mut set = tokio::task::JoinSet::new();
    for host in hosts {
        let r = Arc::clone(resolver);
        set.spawn(async move {
            let answer = r.lookup(&host).await;
            (host, answer)
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        out.push(joined.ok());
    }
    out
}

/// One answer, screened by the policy's rebinding filter, into `lookups`; a failure keeps the
/// last addresses and retries at the resolver's TTL floor.
pub fn take_answer(
    lookups: &mut Lookups,
    host: &str,
    answer: Result<Answer, ResolveError>,
    screen: (&RebindFilter, &RebindCounter, &str),
    resolver: &Resolver,
) -> Result<(Recorded, usize, Duration), ResolveError> {
    let now = Instant::now();
    match answer {
        Ok(answer) => {
            let (filter, rebinding, policy) = screen;
            let addrs = screen_lookup(filter, rebinding, policy, host, answer.addrs);
            let n = addrs.len();
            let deadline = deadline_s(answer.ttl, &resolver.bounds());
            let recorded = lookups.record(host, addrs, now + answer.ttl, deadline);
            Ok((recorded, n, answer.ttl))
        }
        Err(error) => {
            lookups.postpone(host, now + resolver.bounds().floor);
            Err(error)
        }
    }
}

/// Looks up every host name of `policy` (through `resolver`, if the policy names any) and
/// schedules the next lookup of each: at its TTL, or at the TTL floor after a failure.
pub async fn resolve_all(
    policy: &Policy,
    resolver: Option<&Arc<Resolver>>,
    rebinding: &RebindCounter,
) -> Lookups {
    let mut lookups = Lookups::default();
    lookups.retarget(policy_hosts(policy), Instant::now());
    let Some(resolver) = resolver else {
        return lookups;
    };
    let filter = RebindFilter::for_policy(policy);
    let hosts = lookups.due_at(Instant::now());
    for (host, answer) in look_up(resolver, hosts).await.into_iter().flatten() {
        match take_answer(
            &mut lookups,
            &host,
            answer,
            (&filter, rebinding, &policy.name),
            resolver,
        ) {
            Ok((_, addresses, ttl)) => {
                tracing::info!(host = %host, addresses, ttl_secs = ttl.as_secs(), "host resolved");
            }
            Err(error) => {
                tracing::warn!(host = %host, %error, "lookup failed; the host's rules allow nothing until it resolves");
            }
        }
    }
    lookups
}
