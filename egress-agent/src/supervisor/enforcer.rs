//! One protected cgroup: its policy, the compiled tables, the kernel maps, the programs, and
//! the host names whose addresses it keeps current.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use egress_common::SlotConfig;
use tokio::time::Instant;

use crate::dns::install::{LearnedMaps, Learner, Liveness, ResolverMap};
use crate::dns::origin::Origins;
use crate::kernel::loader::{LoadError, Programs};
use crate::kernel::maps::{ApplyStats, MapSet, MapsError};
use crate::kernel::ratelimit::{COLLECT_PERIOD, RateMaps, RateMapsError};
use crate::supervisor::install::{Installed, Tables, install};
use crate::supervisor::lookups::{Lookups, Recorded, look_up, take_answer};
use crate::supervisor::resolve::{Resolver, policy_hosts};
use egress_policy::Policy;
use egress_policy::capacity::MapLimits;
use egress_policy::compile::{Compiled, Resolved, SetIds, compile_with_deadlines};
use egress_policy::limits::CompiledLimits;

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    RateLimits(#[from] RateMapsError),
}

/// The id the first policy of a slot gets; every reload takes the next one.
const FIRST_POLICY_ID: u32 = 1;

/// The id after `id`, skipping 0 (which means "no policy").
fn next_policy_id(id: u32) -> u32 {
    id.wrapping_add(1).max(FIRST_POLICY_ID)
}

pub struct Enforcer {
    programs: Programs,
    maps: MapSet,
    /// Shared with the DNS proxy's view of the policy: one copy, however large.
    policy: Arc<Policy>,
    sets: SetIds,
    /// The policy's host names: addresses, kernel deadlines, and when each is asked again.
    lookups: Lookups,
    current: Compiled,
    /// The highest policy id ever written (including failed reloads).
    last_id: u32,
    /// Rate-limit entries and buckets (the budgets do not depend on resolved addresses).
    rate: RateMaps,
    limits: CompiledLimits,
    /// Addresses the DNS proxy learned, shared with its tasks.
    learner: Arc<Mutex<Learner>>,
    /// The proxy's liveness deadline, taken by whoever runs the proxy.
    liveness: Option<Liveness>,
    /// The resolvers the workload may address (queries to others are reported).
    resolvers: ResolverMap,
    /// Where redirected queries were addressed, taken by whoever runs the proxy.
    origins: Option<Origins>,
    /// Slot flags the enforcer sets itself, kept across reloads (the DNS resolver check).
    own_flags: u32,
}

/// Addresses kept per name until the caller sets its own cap.
pub const DEFAULT_ADDRS_PER_NAME: usize = 32;

fn lock(m: &Mutex<Learner>) -> std::sync::MutexGuard<'_, Learner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The maps of a loaded or adopted instance, before a policy is installed in them.
struct Opened {
    programs: Programs,
    maps: MapSet,
    learned: LearnedMaps,
    liveness: Liveness,
    resolvers: ResolverMap,
    origins: Origins,
    rate: RateMaps,
}

impl Opened {
    fn take(mut programs: Programs, slot: u32) -> Result<Self, EnforcerError> {
        Ok(Opened {
            learned: LearnedMaps::take(&mut programs)?,
            liveness: Liveness::take(&mut programs, slot)?,
            resolvers: ResolverMap::take(&mut programs, slot)?,
            origins: Origins::take(&mut programs)?,
            maps: MapSet::take(&mut programs)?,
            rate: RateMaps::take(&mut programs)?,
            programs,
        })
    }
}

impl Enforcer {
    /// Loads the programs for `slot`, writes the compiled policy and puts it in force for the
    /// slot. Nothing is attached yet, and nothing is pinned.
    pub fn start(
        policy: Policy,
        lookups: impl Into<Lookups>,
        slot: u32,
    ) -> Result<Self, EnforcerError> {
        Self::start_sized(policy, lookups.into(), slot, None, &MapLimits::default())
    }

    /// As [`Enforcer::start`], with every map pinned in `dir`; attaching pins the links there
    /// too, so enforcement outlives this process.
    pub fn start_pinned(
        policy: Policy,
        lookups: Lookups,
        slot: u32,
        dir: &Path,
    ) -> Result<Self, EnforcerError> {
        Self::start_sized(policy, lookups, slot, Some(dir), &MapLimits::default())
    }

    /// As [`Enforcer::start`] (pinned in `pins` when given), with the maps `limits` sizes
    /// created at those sizes.
    pub fn start_sized(
        policy: Policy,
        lookups: Lookups,
        slot: u32,
        pins: Option<&Path>,
        limits: &MapLimits,
    ) -> Result<Self, EnforcerError> {
        let mut programs = Programs::load_sized(slot, limits)?;
        if let Some(dir) = pins {
            programs.pin_maps(dir)?;
        }
        let mut opened = Opened::take(programs, slot)?;
        let installed = install(
            Tables {
                maps: &mut opened.maps,
                rate: &mut opened.rate,
            },
            slot,
            SlotConfig::default(),
            0,
            (&policy, FIRST_POLICY_ID),
            &lookups,
            || Ok(()),
        )?;
        Self::assemble(opened, installed, policy, lookups, slot)
    }

    /// Takes over the instance an earlier agent pinned in `dir` for `slot`, without detaching
    /// anything: its programs keep enforcing the old policy until `policy` (compiled under the
    /// next policy id and written in full) replaces it in one slot update. Entries of any other
    /// policy id are removed afterwards.
    pub fn adopt(
        policy: Policy,
        lookups: Lookups,
        slot: u32,
        dir: &Path,
    ) -> Result<(Self, u32), EnforcerError> {
        let mut o = Opened::take(Programs::adopt(dir, slot)?, slot)?;
        let old = o.maps.slot_config(slot)?;
        // Entries of any id but the one in force are inert leftovers (a reload that failed
        // half-way, say) and could share the id chosen below: remove them first.
        o.maps.retain_policy(old.policy_id)?;
        o.rate.retain_policy(old.policy_id)?;
        o.learned.retain_policy(old.policy_id)?;
        let policy_id = next_policy_id(old.policy_id);
        let installed = install(
            Tables {
                maps: &mut o.maps,
                rate: &mut o.rate,
            },
            slot,
            old,
            0,
            (&policy, policy_id),
            &lookups,
            || Ok(()),
        )?;
        o.maps.retain_policy(policy_id)?;
        o.rate.retain_policy(policy_id)?;
        // Addresses the earlier agent learned went with its policy id: the names behind them
        // are not recorded in the kernel, so workloads learn them again on their next lookup.
        o.learned.retain_policy(policy_id)?;
        Ok((
            Self::assemble(o, installed, policy, lookups, slot)?,
            old.policy_id,
        ))
    }

    /// Starts the bucket collector when the policy limits rates, and schedules every host
    /// name `lookups` has no time for now.
    fn assemble(
        o: Opened,
        installed: Installed,
        policy: Policy,
        mut lookups: Lookups,
        slot: u32,
    ) -> Result<Self, EnforcerError> {
        let Opened {
            programs,
            maps,
            learned,
            liveness,
            resolvers,
            origins,
            mut rate,
        } = o;
        let Installed {
            compiled,
            limits,
            sets,
            ..
        } = installed;
        if !limits.limits.is_empty() {
            rate.start_collector(slot, COLLECT_PERIOD)?;
        }
        lookups.retarget(policy_hosts(&policy), Instant::now());
        let policy = Arc::new(policy);
        let learner = Arc::new(Mutex::new(Learner::new(
            learned,
            Arc::clone(&policy),
            compiled.policy_id,
            DEFAULT_ADDRS_PER_NAME,
        )));
        Ok(Enforcer {
            learner,
            liveness: Some(liveness),
            resolvers,
            origins: Some(origins),
            own_flags: 0,
            programs,
            maps,
            policy,
            sets,
            lookups,
            last_id: compiled.policy_id,
            current: compiled,
            rate,
            limits,
        })
    }

    /// Puts `policy` in force in place of the current one. `lookups` must hold the
    /// addresses of the new policy's host names (looked up by the caller before this call).
    ///
    /// The new policy is compiled under a fresh policy id and written in full next to the
    /// old one; one write of the slot switches every decision from the old to the new; then
    /// the old entries go. So a destination allowed by both is never denied during the
    /// switch, and one denied by both is never allowed.
    pub fn reload(
        &mut self,
        policy: Policy,
        lookups: impl Into<Lookups>,
    ) -> Result<ApplyStats, EnforcerError> {
        let mut lookups = lookups.into();
        let slot = self.slot();
        let old_cfg = self.maps.slot_config(slot)?;
        // A fresh id for every attempt: entries a failed attempt left behind can never share
        // an id with a later policy, so they can never come into force.
        let policy_id = next_policy_id(self.last_id.max(self.current.policy_id));
        self.last_id = policy_id;
        let policy = Arc::new(policy);
        let learner = Arc::clone(&self.learner);
        let installed = install(
            Tables {
                maps: &mut self.maps,
                rate: &mut self.rate,
            },
            slot,
            old_cfg,
            self.own_flags,
            (&policy, policy_id),
            &lookups,
            || Ok(lock(&learner).prepare(Arc::clone(&policy), policy_id)?),
        );
        let installed = match installed {
            Ok(installed) => installed,
            Err(e) => {
                // Not switched: the old policy is in force. Learning stays with it, and what
                // was written for the new id goes.
                lock(&self.learner).abort();
                self.sweep(self.current.policy_id);
                return Err(e);
            }
        };
        // Switched: from here on the new policy is the one in force, whatever else fails.
        lock(&self.learner).commit();
        lookups.retarget(policy_hosts(&policy), Instant::now());
        let mut stats = installed.stats;
        stats.rules_removed = self.current.entries();
        self.policy = policy;
        self.sets = installed.sets;
        self.lookups = lookups;
        self.current = installed.compiled;
        self.limits = installed.limits;
        self.sweep(policy_id);
        if !self.limits.limits.is_empty() {
            self.rate.start_collector(slot, COLLECT_PERIOD)?;
        }
        Ok(stats)
    }

    /// Removes every rule, port and limit entry whose policy id is not `keep`. Entries of
    /// another id are inert (the slot names `keep`), so a failure here is logged, not fatal:
    /// they are swept again after the next policy change.
    fn sweep(&mut self, keep: u32) {
        if let Err(error) = self.maps.retain_policy(keep) {
            tracing::warn!(%error, policy_id = keep, "removing entries of other policy ids failed; they are inert");
        }
        if let Err(error) = self.rate.retain_policy(keep) {
            tracing::warn!(%error, policy_id = keep, "removing rate limits of other policy ids failed; they are inert");
        }
        if let Err(error) = lock(&self.learner).retain_policy(keep) {
            tracing::warn!(%error, policy_id = keep, "removing learned addresses of other policy ids failed; they are inert");
        }
    }

    /// The record of where redirected queries were addressed (once).
    pub fn take_origins(&mut self) -> Option<Origins> {
        self.origins.take()
    }

    /// The proxy's liveness deadline (once).
    pub fn take_liveness(&mut self) -> Option<Liveness> {
        self.liveness.take()
    }

    /// The learned-address state, for the DNS proxy.
    pub fn learner(&self) -> Arc<Mutex<Learner>> {
        Arc::clone(&self.learner)
    }

    /// Redirects the workload's DNS queries to the proxy on `port` (0: no redirect).
    pub fn set_dns_port(&mut self, port: u16) -> Result<(), EnforcerError> {
        let slot = self.slot();
        let cfg = self.maps.slot_config(slot)?;
        self.maps.set_slot(
            slot,
            SlotConfig {
                dns_port: port,
                ..cfg
            },
        )?;
        Ok(())
    }

    /// Names the resolvers the workload may address its queries to (the proxy's upstream
    /// servers); from then on a query to any other is counted and reported as a blocked
    /// attempt. Every query goes to the proxy either way.
    pub fn set_resolvers(&mut self, servers: &[IpAddr]) -> Result<(), EnforcerError> {
        self.resolvers.set(servers)?;
        self.own_flags |= egress_common::maps::SLOT_DNS_RESOLVERS;
        let slot = self.slot();
        let cfg = self.maps.slot_config(slot)?;
        self.maps.set_slot(
            slot,
            SlotConfig {
                flags: cfg.flags | self.own_flags,
                ..cfg
            },
        )?;
        Ok(())
    }

    pub fn attach(&mut self, cgroup: &Path) -> Result<(), EnforcerError> {
        Ok(self.programs.attach(cgroup)?)
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The rate-limit maps (buckets can be listed, and filled by tests).
    pub fn rate_limits(&self) -> &RateMaps {
        &self.rate
    }

    pub fn compiled_limits(&self) -> &CompiledLimits {
        &self.limits
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

    /// The sizes of the maps a policy must fit (half of each), as they are in the kernel.
    pub fn map_sizes(&self) -> &MapLimits {
        self.programs.sizes()
    }

    /// The earliest time a host name is due for a lookup.
    pub fn next_due(&self) -> Option<Instant> {
        self.lookups.next_due()
    }

    /// Sets a host's addresses and their kernel deadline (after a lookup) and brings the maps
    /// up to date. An unchanged answer still moves the deadline on.
    pub fn set_host(
        &mut self,
        host: &str,
        addrs: Vec<IpAddr>,
        next: Instant,
        deadline_s: u32,
    ) -> Result<ApplyStats, EnforcerError> {
        match self.lookups.record(host, addrs, next, deadline_s) {
            Recorded::Unchanged => Ok(ApplyStats::default()),
            Recorded::Changed => self.recompile(),
        }
    }

    /// Compiles the policy in force again with the current addresses and writes the
    /// difference.
    fn recompile(&mut self) -> Result<ApplyStats, EnforcerError> {
        let compiled = compile_with_deadlines(
            &self.policy,
            self.current.policy_id,
            self.lookups.resolved(),
            self.lookups.deadlines(),
            crate::dns::doh_list(),
            &mut self.sets,
        );
        let stats = self.maps.apply(&self.current, &compiled)?;
        self.current = compiled;
        Ok(stats)
    }

    /// A failed lookup keeps the last addresses and tries again at `next`.
    pub fn postpone(&mut self, host: &str, next: Instant) {
        self.lookups.postpone(host, next);
    }

    /// The addresses each host name currently has.
    pub fn resolved(&self) -> &Resolved {
        self.lookups.resolved()
    }

    /// Takes the event ring buffer (once).
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.maps.take_events()
    }

    /// Looks up every host that is due and applies the answers.
    pub async fn refresh_due(
        &mut self,
        resolver: &Arc<Resolver>,
        rebinding: &crate::supervisor::session::RebindCounter,
    ) -> RefreshStats {
        let filter = crate::dns::rebind::RebindFilter::for_policy(&self.policy);
        let mut stats = RefreshStats::default();
        let due = self.lookups.due_at(Instant::now());
        if due.is_empty() {
            return stats;
        }
        let policy = Arc::clone(&self.policy);
        for joined in look_up(resolver, due).await {
            let Some((host, answer)) = joined else {
                stats.failed += 1;
                continue;
            };
            let taken = take_answer(
                &mut self.lookups,
                &host,
                answer,
                (&filter, rebinding, &policy.name),
                resolver,
            );
            match taken {
                Ok((recorded, addresses, ttl)) => {
                    stats.ok += 1;
                    let applied = match recorded {
                        Recorded::Unchanged => Ok(ApplyStats::default()),
                        Recorded::Changed => self.recompile(),
                    };
                    match applied {
                        Ok(stats) => tracing::info!(
                            host = %host, addresses, ttl_secs = ttl.as_secs(),
                            rules_written = stats.rules_written, rules_removed = stats.rules_removed,
                            "host resolved"
                        ),
                        Err(error) => {
                            tracing::error!(host = %host, %error, "applying resolved addresses failed; previous entries stay");
                            self.postpone(&host, Instant::now() + resolver.bounds().floor);
                        }
                    }
                }
                Err(error) => {
                    stats.failed += 1;
                    let retry = resolver.bounds().floor;
                    tracing::warn!(host = %host, %error, retry_secs = retry.as_secs(),
                        "lookup failed; the host keeps its last known addresses (none if never resolved: denied)");
                }
            }
        }
        stats
    }

    /// Whether the policy names any host to resolve.
    pub fn has_hosts(&self) -> bool {
        self.lookups.has_hosts()
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
        match self.maps.shared_counters().audited(self.slot()) {
            Ok(counts) => {
                for (reason, proto, count) in counts.into_iter().filter(|c| c.2 > 0) {
                    tracing::info!(
                        policy = %self.policy.name, slot = self.slot(), reason = reason.as_str(),
                        protocol = proto_name(proto), verdict = "audit", count, "verdict count"
                    );
                }
            }
            Err(error) => tracing::error!(%error, "reading audited verdict counters failed"),
        }
        let (allowed, denied) = (
            u32::try_from(self.policy.allowed.len()).unwrap_or(u32::MAX),
            u32::try_from(self.policy.denied.len()).unwrap_or(u32::MAX),
        );
        match self
            .maps
            .shared_counters()
            .rules(self.slot(), allowed, denied)
        {
            Ok(rules) => {
                for r in rules.into_iter().filter(|r| r.allowed + r.denied > 0) {
                    tracing::info!(
                        policy = %self.policy.name, slot = self.slot(), list = r.list,
                        rule = r.index, allowed = r.allowed, denied = r.denied, "rule count"
                    );
                }
            }
            Err(error) => tracing::error!(%error, "reading per-rule counters failed"),
        }
    }

    /// How long until `host` is asked again.
    pub fn due_in(&self, host: &str) -> Option<Duration> {
        self.lookups.due_in(host)
    }
}

pub use crate::kernel::counters::proto_name;

/// Outcome of one round of lookups.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefreshStats {
    pub ok: usize,
    pub failed: usize,
}

impl Enforcer {
    /// Names exec's start-up probe destinations in the slot, so that the kernel counts their
    /// (required) refusal as `startup_probe` rather than as blocked egress.
    pub fn set_probes(
        &mut self,
        v4: std::net::SocketAddr,
        v6: std::net::SocketAddr,
    ) -> Result<(), EnforcerError> {
        let slot = self.slot();
        let mut cfg = SlotConfig {
            policy_id: self.current.policy_id,
            flags: self.current.slot_flags | self.own_flags,
            ..self.maps.slot_config(slot)?
        };
        if let std::net::IpAddr::V4(ip) = v4.ip() {
            cfg.probe_v4 = ip.octets();
            cfg.probe_port_v4 = v4.port();
        }
        if let std::net::IpAddr::V6(ip) = v6.ip() {
            cfg.probe_v6 = ip.octets();
            cfg.probe_port_v6 = v6.port();
        }
        self.maps.set_slot(slot, cfg)?;
        Ok(())
    }
}
