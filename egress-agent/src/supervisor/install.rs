//! Putting a policy in force: the one sequence a start, an adoption and a reload share.
//!
//! The policy is compiled under a policy id no entry in the maps carries yet and written in
//! full next to whatever is in force (allowlist, ports, inbound rules, rate limits); then one
//! write of the slot switches every decision to it. Until that write nothing the workload
//! sees has changed, so a failure on the way leaves the old policy in force; the caller then
//! removes what was written under the new id.

use egress_common::SlotConfig;
use egress_policy::Policy;
use egress_policy::compile::{Compiled, SetIds, compile_with_deadlines};
use egress_policy::limits::{CompiledLimits, compile_limits};

use crate::kernel::maps::{ApplyStats, MapSet};
use crate::kernel::ratelimit::RateMaps;
use crate::supervisor::enforcer::EnforcerError;
use crate::supervisor::lookups::Lookups;

/// The tables of one policy id, as written to the kernel.
pub struct Installed {
    pub compiled: Compiled,
    pub limits: CompiledLimits,
    pub sets: SetIds,
    pub stats: ApplyStats,
}

/// The maps a policy is written to.
pub struct Tables<'a> {
    pub maps: &'a mut MapSet,
    pub rate: &'a mut RateMaps,
}

/// Compiles `policy` under `policy_id` with the addresses in `lookups`, writes it, runs
/// `before_switch` (the learned addresses' own preparation), and switches `slot` to it,
/// keeping the rest of `base` (DNS port, probes) and adding `own_flags`.
pub fn install(
    tables: Tables<'_>,
    slot: u32,
    base: SlotConfig,
    own_flags: u32,
    (policy, policy_id): (&Policy, u32),
    lookups: &Lookups,
    before_switch: impl FnOnce() -> Result<(), EnforcerError>,
) -> Result<Installed, EnforcerError> {
    let mut sets = SetIds::default();
    let compiled = compile_with_deadlines(
        policy,
        policy_id,
        lookups.resolved(),
        lookups.deadlines(),
        crate::dns::doh_list(),
        &mut sets,
    );
    let stats = tables.maps.apply(&Compiled::default(), &compiled)?;
    let limits = compile_limits(policy, policy_id);
    tables.rate.apply(&CompiledLimits::default(), &limits)?;
    before_switch()?;
    tables.maps.set_slot(
        slot,
        SlotConfig {
            policy_id,
            flags: compiled.slot_flags | own_flags,
            loopback_ports: compiled.loopback_ports,
            ..base
        },
    )?;
    Ok(Installed {
        compiled,
        limits,
        sets,
        stats,
    })
}
