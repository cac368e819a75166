//! The learned-address map of one protected cgroup, and what decides what goes in it: the
//! policy's names, the rebinding filter and the per-name cap. Shared by the proxy's tasks
//! (behind a mutex) and the enforcer (which moves it to a new policy id on reload).

use std::net::IpAddr;
use std::sync::Arc;

use aya::maps::{Array, HashMap, MapData, MapError};
use egress_common::{
    PortKey, RuleKey, RuleValue,
    maps::{MAP_DNS_ALIVE, MAP_DNS_RESOLVERS, MAP_LEARNED, MAP_PORTS, ResolverKey},
};

use super::rebind::{RebindFilter, Rejection, Source, report_rejection};
use crate::kernel::loader::Programs;
use crate::kernel::maps::MapsError;
use crate::supervisor::session::RebindCounter;
use egress_dns_wire::answer::AddressRecord;
use egress_policy::aws::{self, Admission, RestrictionMiss};
use egress_policy::ip_ranges::AwsIpRanges;
use egress_policy::learned::{LearnedTable, Writes};
use egress_policy::names::{NameMatcher, NameVerdict};
use egress_policy::{AwsService, Policy, Restrictions};

fn op_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |e| MapsError::Op {
        map,
        op,
        source: Box::new(e),
    }
}

/// Handles on the learned map and (a second handle on) the port map.
pub struct LearnedMaps {
    learned: HashMap<MapData, RuleKey, RuleValue>,
    ports: HashMap<MapData, PortKey, u32>,
}

impl LearnedMaps {
    /// Takes the learned map and duplicates the port map; call before the port map is taken.
    pub fn take(programs: &mut Programs) -> Result<Self, MapsError> {
        let ports = programs.dup_map(MAP_PORTS)?;
        let learned = programs.take_map(MAP_LEARNED)?;
        Ok(LearnedMaps {
            learned: HashMap::try_from(learned).map_err(op_err(MAP_LEARNED, "open"))?,
            ports: HashMap::try_from(ports).map_err(op_err(MAP_PORTS, "open"))?,
        })
    }

    /// Port entries first, then the entries that point at them, then removals.
    pub fn apply(&mut self, w: &Writes) -> Result<(), MapsError> {
        for (k, v) in &w.ports {
            self.ports
                .insert(k, v, 0)
                .map_err(op_err(MAP_PORTS, "insert"))?;
        }
        for (k, v) in &w.entries {
            self.learned
                .insert(k, v, 0)
                .map_err(op_err(MAP_LEARNED, "insert"))?;
        }
        for k in &w.removed {
            match self.learned.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(op_err(MAP_LEARNED, "remove")(e)),
            }
        }
        Ok(())
    }

    /// Removes every learned entry whose policy id is not `keep` (port entries of other ids
    /// are swept with the policy's own).
    pub fn retain_policy(&mut self, keep: u32) -> Result<usize, MapsError> {
        let stale: Vec<RuleKey> = self
            .learned
            .keys()
            .filter_map(Result::ok)
            .filter(|k| u32::from_be_bytes(k.policy_id) != keep)
            .collect();
        for k in &stale {
            match self.learned.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(op_err(MAP_LEARNED, "remove")(e)),
            }
        }
        Ok(stale.len())
    }
}

/// The slot's proxy liveness deadline: while it is in the future the kernel redirects DNS to
/// the proxy; past it (the agent stopped) DNS is denied, so nothing else that takes the
/// proxy's port can answer the workload.
pub struct Liveness {
    alive: Array<MapData, u32>,
    slot: u32,
}

/// How far ahead each renewal puts the deadline, in seconds; renewals come every second.
pub const LIVENESS_SECS: u32 = 3;

impl Liveness {
    pub fn take(programs: &mut Programs, slot: u32) -> Result<Self, MapsError> {
        let map = programs.take_map(MAP_DNS_ALIVE)?;
        Ok(Liveness {
            alive: Array::try_from(map).map_err(op_err(MAP_DNS_ALIVE, "open"))?,
            slot,
        })
    }

    /// Proxy alive until `LIVENESS_SECS` from now.
    pub fn renew(&mut self) -> Result<(), MapsError> {
        let until = crate::supervisor::resolve::boot_time_s().saturating_add(LIVENESS_SECS);
        self.alive
            .set(self.slot, until, 0)
            .map_err(op_err(MAP_DNS_ALIVE, "set"))
    }

    /// Proxy gone: DNS is denied from now on.
    pub fn clear(&mut self) -> Result<(), MapsError> {
        self.alive
            .set(self.slot, 0, 0)
            .map_err(op_err(MAP_DNS_ALIVE, "set"))
    }
}

/// The resolvers the slot's workload may address its queries to. Queries to any other are
/// still answered by the proxy, on its second port, which reports them as blocked attempts.
pub struct ResolverMap {
    map: HashMap<MapData, ResolverKey, u32>,
    slot: u32,
}

impl ResolverMap {
    pub fn take(programs: &mut Programs, slot: u32) -> Result<Self, MapsError> {
        let map = programs.take_map(MAP_DNS_RESOLVERS)?;
        Ok(ResolverMap {
            map: HashMap::try_from(map).map_err(op_err(MAP_DNS_RESOLVERS, "open"))?,
            slot,
        })
    }

    /// Makes `servers` the slot's authorized resolvers: new ones first, then the others go.
    pub fn set(&mut self, servers: &[IpAddr]) -> Result<(), MapsError> {
        let want: std::collections::BTreeSet<ResolverKey> = servers
            .iter()
            .map(|ip| resolver_key(self.slot, *ip))
            .collect();
        for k in &want {
            self.map
                .insert(k, 1, 0)
                .map_err(op_err(MAP_DNS_RESOLVERS, "insert"))?;
        }
        let stale: Vec<ResolverKey> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.slot == self.slot && !want.contains(k))
            .collect();
        for k in &stale {
            match self.map.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(op_err(MAP_DNS_RESOLVERS, "remove")(e)),
            }
        }
        Ok(())
    }
}

/// The key the kernel looks a query's destination up by (IPv4-mapped addresses as IPv4).
pub fn resolver_key(slot: u32, ip: IpAddr) -> ResolverKey {
    let (family, addr) = match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            (4, a)
        }
        IpAddr::V6(v6) => (6, v6.octets()),
    };
    ResolverKey {
        slot,
        family,
        _pad: [0; 3],
        addr,
    }
}

/// What the policy says about a queried name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameDecision {
    /// Allowed by these `allowed_destinations` entries.
    Allowed(Vec<u32>),
    /// Neither allowed nor denied.
    NotAllowed,
    /// Denied by `denied_destinations[rule]`.
    Denied(usize),
    /// A known DNS-over-HTTPS endpoint, with `block_doh`.
    DohProvider(String),
    /// Matched only by entries with `restrictions`, none of which admits it; `rule` is the
    /// first of them and `miss` why it does not.
    Restricted { rule: usize, miss: RestrictionMiss },
}

impl NameDecision {
    /// The `result` label of refused queries.
    pub fn result(&self) -> &'static str {
        match self {
            NameDecision::Allowed(_) => "allowed",
            NameDecision::NotAllowed => "not_allowed",
            NameDecision::Denied(_) => "denied",
            NameDecision::DohProvider(_) => "doh_provider",
            NameDecision::Restricted { miss, .. } => miss.result(),
        }
    }
}

/// The log detail of a name refused by `restrictions`.
pub fn restriction_detail(rule: usize, miss: &RestrictionMiss) -> String {
    let at = format!("allowed_destinations[{rule}].restrictions");
    match miss {
        RestrictionMiss::Region(region) => {
            format!("{at}: an endpoint in region {region}, which is not listed")
        }
        RestrictionMiss::Service(service) => {
            format!("{at}: an endpoint of {service}, which is not listed")
        }
        RestrictionMiss::Unclassified => format!(
            "{at}: not an endpoint name of a known service and region (regionless names need --aws-ip-ranges)"
        ),
    }
}

/// The policy as the proxy reads it.
#[derive(Clone, Debug)]
pub struct NamePolicy {
    pub policy: Arc<Policy>,
    names: NameMatcher,
    rebind: RebindFilter,
    block_doh: bool,
    /// AWS's published ranges (`--aws-ip-ranges`): addresses admitted by a restricted entry
    /// must lie in them.
    aws_ranges: Option<Arc<AwsIpRanges>>,
}

/// Why an address of an admitted answer was left out by the address check of `restrictions`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unproven {
    pub rule: usize,
    pub service: AwsService,
    pub region: Option<String>,
}

impl std::fmt::Display for Unproven {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "not in a prefix AWS publishes for {} in {} (allowed_destinations[{}].restrictions, \
             --aws-ip-ranges)",
            self.service.ip_ranges_name(),
            self.region
                .as_deref()
                .unwrap_or("a region the entry allows"),
            self.rule
        )
    }
}

/// The rules and addresses of an answer that the address check keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admitted {
    pub rules: Vec<u32>,
    pub addrs: Vec<AddressRecord>,
    pub unproven: Vec<(AddressRecord, Unproven)>,
}

impl NamePolicy {
    pub fn new(policy: Arc<Policy>) -> Self {
        let block_doh = policy.dns.as_ref().is_some_and(|d| d.block_doh);
        NamePolicy {
            names: NameMatcher::from_policy(&policy),
            rebind: RebindFilter::for_policy(&policy),
            block_doh,
            policy,
            aws_ranges: None,
        }
    }

    /// With AWS's published ranges: restricted entries then admit only addresses in them (and
    /// regionless bucket names whose addresses prove an allowed region).
    #[must_use]
    pub fn with_aws_ranges(mut self, ranges: Option<Arc<AwsIpRanges>>) -> Self {
        self.aws_ranges = ranges;
        self
    }

    pub fn aws_ranges(&self) -> Option<&Arc<AwsIpRanges>> {
        self.aws_ranges.as_ref()
    }

    /// Deny wins, then a DoH endpoint (with `block_doh`) is refused even where a wildcard
    /// allows it, then the allow rules. An entry with `restrictions` counts only if it admits
    /// the name; other entries matching the name allow it regardless (the union of rules).
    pub fn decide(&self, name: &str) -> NameDecision {
        match self.names.lookup(name) {
            NameVerdict::Denied { rule } => NameDecision::Denied(rule),
            verdict => {
                if self.block_doh
                    && let Some(p) = super::doh_list().provider_for_name(name)
                {
                    return NameDecision::DohProvider(p.name.clone());
                }
                match verdict {
                    NameVerdict::Allowed { rules } => self.restricted(name, rules),
                    _ => NameDecision::NotAllowed,
                }
            }
        }
    }

    /// Drops the restricted entries that do not admit `name` from `rules`.
    fn restricted(&self, name: &str, rules: Vec<usize>) -> NameDecision {
        let mut endpoint = None;
        let mut kept = Vec::new();
        let mut first_miss = None;
        for rule in rules {
            let Some(r) = self.restrictions(rule) else {
                kept.push(rule);
                continue;
            };
            let ep = endpoint.get_or_insert_with(|| aws::classify(name));
            match r.admits(ep.as_ref()) {
                Ok(Admission::Admitted) => kept.push(rule),
                Ok(Admission::NeedsRegionProof) if self.aws_ranges.is_some() => kept.push(rule),
                Ok(Admission::NeedsRegionProof) => {
                    first_miss.get_or_insert((rule, RestrictionMiss::Unclassified));
                }
                Err(miss) => {
                    first_miss.get_or_insert((rule, miss));
                }
            }
        }
        match (kept.is_empty(), first_miss) {
            (true, Some((rule, miss))) => NameDecision::Restricted { rule, miss },
            (true, None) => NameDecision::NotAllowed,
            (false, _) => NameDecision::Allowed(
                kept.into_iter()
                    .map(|r| u32::try_from(r).unwrap_or(u32::MAX))
                    .collect(),
            ),
        }
    }

    fn restrictions(&self, rule: usize) -> Option<&Restrictions> {
        self.policy.allowed.get(rule)?.restrictions.as_ref()
    }

    /// The address check of `restrictions`, for an answer to `name` allowed by `rules`. Without
    /// ip-ranges, or without a restricted rule among `rules`, every address is kept with every
    /// rule. With them, a restricted rule holds only for addresses AWS publishes for the name's
    /// service in its region (for a regionless name: in a region the rule allows):
    /// - an address no rule holds for is left out (and reported);
    /// - the answer keeps the rules that hold for every address kept, so an address never
    ///   carries the ports of a restricted rule it did not prove. When unrestricted rules
    ///   keep an unproven address, the restricted ones that do not hold for it drop out.
    pub fn admit(&self, name: &str, rules: &[u32], addrs: Vec<AddressRecord>) -> Admitted {
        let restricted: Vec<(u32, &Restrictions)> = rules
            .iter()
            .filter_map(|&r| Some((r, self.restrictions(usize::try_from(r).ok()?)?)))
            .collect();
        let (Some(ranges), false) = (&self.aws_ranges, restricted.is_empty()) else {
            return Admitted {
                rules: rules.to_vec(),
                addrs,
                unproven: Vec::new(),
            };
        };
        let endpoint = aws::classify(name);
        let open: Vec<u32> = rules
            .iter()
            .copied()
            .filter(|r| !restricted.iter().any(|(x, _)| x == r))
            .collect();
        // Which restricted rules hold for each address.
        let holds = |addr: IpAddr| -> Vec<u32> {
            let Some(ep) = &endpoint else {
                return Vec::new();
            };
            restricted
                .iter()
                .filter(|(_, r)| {
                    ranges.proves(addr, ep.service, |region| match &ep.region {
                        Some(own) => own == region,
                        None => r.allows_region(region),
                    })
                })
                .map(|(rule, _)| *rule)
                .collect()
        };
        let judged: Vec<(AddressRecord, Vec<u32>)> =
            addrs.into_iter().map(|a| (a, holds(a.addr))).collect();
        let mut out = Admitted::default();
        let keep_unproven = !open.is_empty();
        // When only restricted rules allow the name, keep the addresses the first rule that
        // proves any proves, so one rule set holds for all of them.
        let anchor = if keep_unproven {
            None
        } else {
            judged.iter().find_map(|(_, h)| h.first().copied())
        };
        for (record, h) in judged {
            let kept = if keep_unproven {
                true
            } else {
                anchor.is_some_and(|a| h.contains(&a))
            };
            if kept {
                out.addrs.push(record);
            } else {
                let rule = restricted.first().map_or(0, |(rule, _)| *rule);
                out.unproven.push((
                    record,
                    Unproven {
                        rule: usize::try_from(rule).unwrap_or(usize::MAX),
                        service: endpoint.as_ref().map_or(AwsService::S3, |e| e.service),
                        region: endpoint.as_ref().and_then(|e| e.region.clone()),
                    },
                ));
            }
        }
        let kept_holds: Vec<Vec<u32>> = out.addrs.iter().map(|a| holds(a.addr)).collect();
        out.rules = rules
            .iter()
            .copied()
            .filter(|r| open.contains(r) || kept_holds.iter().all(|h| h.contains(r)))
            .collect();
        out
    }
}

/// What one answer put in the map.
#[derive(Clone, Debug, Default)]
pub struct Installed {
    /// Addresses in the map now (the ones the workload may be told).
    pub kept: Vec<AddressRecord>,
    pub rejected: Vec<(AddressRecord, Rejection)>,
    /// Left out by the address check of `restrictions` (`--aws-ip-ranges`).
    pub unproven: Vec<(AddressRecord, Unproven)>,
    /// Left out by the per-name cap.
    pub capped: usize,
}

/// The learned addresses of one cgroup: table, kernel map and the policy they follow.
pub struct Learner {
    table: LearnedTable,
    maps: LearnedMaps,
    view: NamePolicy,
    /// During a reload, between writing the new policy's entries and the slot switch: the
    /// table and view of the policy about to come into force. Answers are installed under both
    /// ids then, so none is missing whichever id the kernel reads.
    next: Option<(LearnedTable, NamePolicy)>,
    /// Where addresses the rebinding filter keeps out of a reload are counted (the proxy's
    /// counter; set with the proxy).
    rebinding: Option<RebindCounter>,
}

impl Learner {
    pub fn new(
        maps: LearnedMaps,
        policy: Arc<Policy>,
        policy_id: u32,
        max_per_name: usize,
    ) -> Self {
        Learner {
            table: LearnedTable::new(policy_id, max_per_name),
            maps,
            view: NamePolicy::new(policy),
            next: None,
            rebinding: None,
        }
    }

    /// Counts addresses a reload's rebinding filter keeps out in `counter`.
    pub fn set_rebinding_counter(&mut self, counter: RebindCounter) {
        self.rebinding = Some(counter);
    }

    /// Uses AWS's published ranges for the address check of `restrictions` from now on.
    pub fn set_aws_ranges(&mut self, ranges: Option<Arc<AwsIpRanges>>) {
        self.view = self.view.clone().with_aws_ranges(ranges.clone());
        if let Some((_, v)) = &mut self.next {
            *v = v.clone().with_aws_ranges(ranges);
        }
    }

    /// Changes the per-name address cap.
    pub fn set_max_per_name(&mut self, max_per_name: usize) {
        self.table.set_max_per_name(max_per_name);
        if let Some((t, _)) = &mut self.next {
            t.set_max_per_name(max_per_name);
        }
    }

    /// The policy in force (during a reload, still the old one: the kernel reads it).
    pub fn view(&self) -> &NamePolicy {
        &self.view
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Writes the addresses of an answer to `name` that the policy lets in, before the caller
    /// releases the answer. The name is judged again here, under the policy in force now (and,
    /// during a reload, also under the one about to come into force). On a map error nothing
    /// of this answer may be released: the caller answers SERVFAIL.
    pub fn install(
        &mut self,
        name: &str,
        addresses: &[AddressRecord],
        deadline_s: u32,
    ) -> Result<Installed, MapsError> {
        if let Some((table, view)) = &mut self.next {
            install_into(table, &mut self.maps, view, name, addresses, deadline_s)?;
        }
        install_into(
            &mut self.table,
            &mut self.maps,
            &self.view,
            name,
            addresses,
            deadline_s,
        )
    }

    /// Removes what has expired (the kernel already ignores it).
    pub fn expire(&mut self, now_s: u32) -> Result<usize, MapsError> {
        let writes = self.table.expire(&self.view.policy, now_s);
        self.maps.apply(&writes)?;
        Ok(writes.removed.len())
    }

    /// First half of a reload: writes the learned addresses again under `policy_id`, judged by
    /// `policy`, next to the ones in force (the slot still names the old id). Until
    /// [`Learner::commit`] or [`Learner::abort`], answers go under both ids.
    pub fn prepare(&mut self, policy: Arc<Policy>, policy_id: u32) -> Result<(), MapsError> {
        let view = NamePolicy::new(policy).with_aws_ranges(self.view.aws_ranges.clone());
        let mut table = self.table.clone();
        let rebinding = self.rebinding.clone().unwrap_or_default();
        let writes = table.rebase(&view.policy, policy_id, |name, addrs| {
            match view.decide(name) {
                NameDecision::Allowed(rules) => {
                    let records: Vec<AddressRecord> = addrs
                        .iter()
                        .map(|&addr| AddressRecord { addr, ttl: 0 })
                        .collect();
                    // The new policy's filter, as for any address the agent installs: its
                    // denied ranges (and DoH list) may cover what the old one let in.
                    let (records, rejected) = view.rebind.partition(&records);
                    for (r, why) in &rejected {
                        report_rejection(
                            &rebinding,
                            &view.policy.name,
                            name,
                            r.addr,
                            why,
                            Source::Reload,
                            true,
                        );
                    }
                    let admitted = view.admit(name, &rules, records);
                    (
                        admitted.rules,
                        admitted.addrs.into_iter().map(|a| a.addr).collect(),
                    )
                }
                _ => (Vec::new(), Vec::new()),
            }
        });
        self.next = Some((table, view));
        self.maps.apply(&writes)
    }

    /// The slot now names the prepared id: it is the one in force.
    pub fn commit(&mut self) {
        if let Some((table, view)) = self.next.take() {
            self.table = table;
            self.view = view;
        }
    }

    /// The reload did not happen: learning stays with the policy in force. Entries written for
    /// the abandoned id are inert and are swept with it.
    pub fn abort(&mut self) {
        self.next = None;
    }

    /// Removes learned entries of every policy id but `keep`.
    pub fn retain_policy(&mut self, keep: u32) -> Result<usize, MapsError> {
        self.maps.retain_policy(keep)
    }
}

fn install_into(
    table: &mut LearnedTable,
    maps: &mut LearnedMaps,
    view: &NamePolicy,
    name: &str,
    addresses: &[AddressRecord],
    deadline_s: u32,
) -> Result<Installed, MapsError> {
    let NameDecision::Allowed(rules) = view.decide(name) else {
        return Ok(Installed::default());
    };
    let (installable, rejected) = view.rebind.partition(addresses);
    let Admitted {
        rules,
        addrs: installable,
        unproven,
    } = view.admit(name, &rules, installable);
    if installable.is_empty() && !unproven.is_empty() {
        return Ok(Installed {
            rejected,
            unproven,
            ..Installed::default()
        });
    }
    let addrs: Vec<IpAddr> = installable.iter().map(|a| a.addr).collect();
    let writes = table.learn(&view.policy, name, &rules, &addrs, deadline_s);
    let capped = writes.capped;
    if let Err(e) = maps.apply(&writes) {
        table.unwrite(&writes);
        return Err(e);
    }
    let policy_id = table.policy_id();
    let kept = installable
        .into_iter()
        .filter(|a| {
            table
                .entries()
                .contains_key(&egress_policy::learned::rule_key(policy_id, a.addr))
        })
        .collect();
    Ok(Installed {
        kept,
        rejected,
        unproven,
        capped,
    })
}

#[cfg(test)]
#[path = "install_tests.rs"]
mod tests;
