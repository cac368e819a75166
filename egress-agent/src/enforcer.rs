//! One protected cgroup: its policy, the compiled tables, the kernel maps, the programs, and
//! the host names whose addresses it keeps current.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use egress_common::{Proto, SlotConfig};
use tokio::time::Instant;

use crate::compile::{Compiled, Resolved, SetIds, compile};
use crate::loader::{LoadError, Programs};
use crate::maps::{ApplyStats, MapSet, MapsError};
use crate::policy::Policy;
use crate::resolve::{Resolver, policy_hosts};

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// The id the first policy of a slot gets. Ids are per slot for now (one policy each).
const FIRST_POLICY_ID: u32 = 1;

pub struct Enforcer {
    programs: Programs,
    maps: MapSet,
    policy: Policy,
    sets: SetIds,
    resolved: Resolved,
    current: Compiled,
    /// When each host name is due for another lookup.
    due: BTreeMap<String, Instant>,
}

impl Enforcer {
    /// Loads the programs for `slot`, writes the compiled policy and puts it in force for the
    /// slot. Nothing is attached yet.
    pub fn start(policy: Policy, resolved: Resolved, slot: u32) -> Result<Self, EnforcerError> {
        let mut programs = Programs::load(slot)?;
        let mut maps = MapSet::take(&mut programs)?;
        let mut sets = SetIds::default();
        let compiled = compile(&policy, FIRST_POLICY_ID, &resolved, &mut sets);
        maps.apply(&Compiled::default(), &compiled)?;
        maps.set_slot(
            slot,
            SlotConfig {
                policy_id: compiled.policy_id,
                flags: compiled.slot_flags,
            },
        )?;
        let now = Instant::now();
        let due = policy_hosts(&policy)
            .into_iter()
            .map(|h| (h, now))
            .collect();
        Ok(Enforcer {
            programs,
            maps,
            policy,
            sets,
            resolved,
            current: compiled,
            due,
        })
    }

    pub fn attach(&mut self, cgroup: &Path) -> Result<(), EnforcerError> {
        Ok(self.programs.attach(cgroup)?)
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn compiled(&self) -> &Compiled {
        &self.current
    }

    pub fn maps(&self) -> &MapSet {
        &self.maps
    }

    pub fn slot(&self) -> u32 {
        self.programs.slot()
    }

    /// The earliest time a host name is due for a lookup.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }

    /// Sets a host's addresses (after a lookup) and brings the maps up to date.
    pub fn set_host(
        &mut self,
        host: &str,
        addrs: Vec<IpAddr>,
        next: Instant,
    ) -> Result<ApplyStats, EnforcerError> {
        self.due.insert(host.to_owned(), next);
        if self.resolved.get(host) == Some(&addrs) {
            return Ok(ApplyStats::default());
        }
        self.resolved.insert(host.to_owned(), addrs);
        let compiled = compile(
            &self.policy,
            self.current.policy_id,
            &self.resolved,
            &mut self.sets,
        );
        let stats = self.maps.apply(&self.current, &compiled)?;
        self.current = compiled;
        Ok(stats)
    }

    /// A failed lookup keeps the last addresses and tries again at `next`.
    pub fn postpone(&mut self, host: &str, next: Instant) {
        self.due.insert(host.to_owned(), next);
    }

    /// Looks up every host that is due and applies the answers.
    pub async fn refresh_due(&mut self, resolver: &Arc<Resolver>) {
        let now = Instant::now();
        let due: Vec<String> = self
            .due
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(h, _)| h.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let mut set = tokio::task::JoinSet::new();
        for host in due {
            let r = Arc::clone(resolver);
            set.spawn(async move {
                let answer = r.lookup(&host).await;
                (host, answer)
            });
        }
        while let Some(joined) = set.join_next().await {
            let Ok((host, answer)) = joined else { continue };
            let now = Instant::now();
            match answer {
                Ok(answer) => {
                    let n = answer.addrs.len();
                    match self.set_host(&host, answer.addrs, now + answer.ttl) {
                        Ok(stats) => tracing::info!(
                            host = %host, addresses = n, ttl_secs = answer.ttl.as_secs(),
                            rules_written = stats.rules_written, rules_removed = stats.rules_removed,
                            "host resolved"
                        ),
                        Err(error) => {
                            tracing::error!(host = %host, %error, "applying resolved addresses failed; previous entries stay");
                            self.postpone(&host, now + resolver.bounds().floor);
                        }
                    }
                }
                Err(error) => {
                    let retry = resolver.bounds().floor;
                    tracing::warn!(host = %host, %error, retry_secs = retry.as_secs(),
                        "lookup failed; the host keeps its last known addresses (none if never resolved: denied)");
                    self.postpone(&host, now + retry);
                }
            }
        }
    }

    /// Sleeps until the next host is due (forever when the policy names no host).
    pub async fn until_due(&self) {
        match self.next_due() {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending::<()>().await,
        }
    }

    /// Logs every non-zero verdict counter of this slot.
    pub fn log_counters(&self) {
        match self.maps.counters(self.slot()) {
            Ok(counts) => {
                for (reason, proto, count) in counts {
                    tracing::info!(
                        policy = %self.policy.name, slot = self.slot(), reason = reason.as_str(),
                        protocol = proto_name(proto), verdict = if reason.allows() { "allow" } else { "deny" },
                        count, "verdict count"
                    );
                }
            }
            Err(error) => tracing::error!(%error, "reading verdict counters failed"),
        }
    }

    /// Clamps a TTL-derived instant for tests and callers.
    pub fn due_in(&self, host: &str) -> Option<Duration> {
        self.due
            .get(host)
            .map(|t| t.saturating_duration_since(Instant::now()))
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
