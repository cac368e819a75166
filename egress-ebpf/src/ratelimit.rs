//! The rate-limit step: runs after the allowlist allowed a destination by a rule, in the same
//! hook, and may turn the allow into a denial. The arithmetic is `egress_common::ratelimit`;
//! this file holds the maps and the BPF atomic instructions.
//!
//! What is charged: every TCP connect (including TCP Fast Open), and for UDP the start of a
//! flow: a connect() or an unconnected send to a destination address and port this workload
//! has not sent to for `UDP_FLOW_IDLE_NS`. Later datagrams of a live flow are not charged,
//! so DNS and QUIC clients are not throttled per datagram.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use egress_common::{
    Decision, Dest, Proto, Reason, SlotConfig,
    maps::SLOT_RATE_LIMITED,
    ratelimit::{
        BucketKey, FlowKey, HAS_DESTINATION, HAS_GLOBAL, LIMIT_PER_NAME, Limit, LimitKey, Take,
        TatCell, UDP_FLOW_REFRESH_NS, flow_is_live, fresh, refund, take,
    },
};

use crate::maps::{BUCKETS, RATE_LIMITS as LIMITS, UDP_FLOWS as FLOWS};

const EEXIST: i32 = 17;

/// The TAT of a bucket in the map, updated with BPF atomic instructions (`BPF_ATOMIC`:
/// `BPF_CMPXCHG`, `BPF_ADD | BPF_FETCH`), which the verifier accepts on map values.
struct MapTat(*mut u64);

impl TatCell for MapTat {
    #[inline(always)]
    fn load(&self) -> u64 {
        // SAFETY: the pointer came from a successful map lookup; an aligned 64-bit load is
        // single-copy atomic.
        unsafe { core::ptr::read_volatile(self.0) }
    }

    #[inline(always)]
    fn compare_exchange(&self, current: u64, new: u64) -> u64 {
        let mut r0 = current;
        // SAFETY: an atomic instruction on a valid, 8-byte aligned map value.
        unsafe {
            core::arch::asm!(
                "r0 = cmpxchg_64({p} + 0, r0, {new})",
                p = in(reg) self.0,
                new = in(reg) new,
                inout("r0") r0,
                options(nostack),
            );
        }
        r0
    }

    #[inline(always)]
    fn fetch_add(&self, delta: u64) -> u64 {
        let mut v = delta;
        // SAFETY: as above.
        unsafe {
            core::arch::asm!(
                "{v} = atomic_fetch_add((u64 *)({p} + 0), {v})",
                p = in(reg) self.0,
                v = inout(reg) v,
                options(nostack),
            );
        }
        v
    }
}

/// One connection from the bucket `key` of `limit`, creating the bucket (full, minus this
/// connection) when it does not exist. `Err` is the reason to deny with.
#[inline(always)]
fn charge(key: &BucketKey, limit: &Limit, now: u64, exhausted: Reason) -> Result<(), Reason> {
    let mut ptr = BUCKETS.get_ptr_mut(key);
    if ptr.is_none() {
        // A limit that admits nothing: deny, and create no bucket for it.
        let Some(bucket) = fresh(now, limit) else {
            return Err(exhausted);
        };
        match BUCKETS.insert(key, bucket, BPF_NOEXIST as u64) {
            Ok(()) => return Ok(()),
            // Another CPU created it first: charge the one that exists.
            Err(e) if e == -EEXIST => ptr = BUCKETS.get_ptr_mut(key),
            // Full (E2BIG) or out of memory: there is no bucket to charge, and a fresh budget
            // is exactly what must not be handed out. Deny.
            Err(_) => return Err(Reason::RateLimitTableFull),
        }
    }
    let Some(bucket) = ptr else {
        // Created and deleted again between our two lookups (the collector deletes only full
        // buckets): the connection fits. Nothing left to charge.
        return Ok(());
    };
    match take(&MapTat(bucket.cast::<u64>()), now, limit) {
        Take::Allowed => Ok(()),
        Take::Exhausted => Err(exhausted),
    }
}

/// Gives the connection back to the bucket `key` (a later budget denied it).
#[inline(always)]
fn give_back(key: &BucketKey, limit: &Limit) {
    if let Some(bucket) = BUCKETS.get_ptr_mut(key) {
        refund(&MapTat(bucket.cast::<u64>()), limit);
    }
}

/// Applies the rate limits to a decision the allowlist made for `dst`.
#[inline(always)]
pub fn limit(slot: u32, cfg: &SlotConfig, dst: &Dest, decision: Decision) -> Decision {
    if cfg.flags & SLOT_RATE_LIMITED == 0
        || !matches!(decision.reason, Reason::AllowRule | Reason::AllowLearned)
    {
        return decision;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let flow = FlowKey::new(slot, dst);
    if let Proto::Udp = dst.proto
        && let Some(last) = FLOWS.get_ptr_mut(flow)
    {
        // SAFETY: valid map value pointer; a torn read is impossible for an aligned u64 and a
        // lost refresh only shortens the flow.
        let seen = unsafe { core::ptr::read_volatile(last) };
        if flow_is_live(dst.proto, seen, now) {
            if now.saturating_sub(seen) >= UDP_FLOW_REFRESH_NS {
                // SAFETY: as above.
                unsafe { core::ptr::write_volatile(last, now) };
            }
            return decision;
        }
    }
    let denied = |reason| Decision {
        reason,
        rule_id: decision.rule_id,
    };
    let Some(limits) = LIMITS.get_ptr(LimitKey::rule(cfg.policy_id, decision.rule_id)) else {
        // The rule has no budget (and the policy no global one).
        return decision;
    };
    // SAFETY: a valid map value (an update replaces the element, it never changes one a
    // program may be reading).
    let (present, destination, global) =
        unsafe { ((*limits).present, (*limits).destination, (*limits).global) };
    // A wildcard rule budgets per name: the learned entry says which name's budget this is.
    let name_tag = if destination.flags & LIMIT_PER_NAME != 0
        && matches!(decision.reason, Reason::AllowLearned)
    {
        crate::tables::learned_name_tag(cfg.policy_id, dst)
    } else {
        0
    };
    let dest_key = BucketKey::destination(slot, &destination, dst, name_tag);
    if present & HAS_DESTINATION != 0
        && let Err(reason) = charge(&dest_key, &destination, now, Reason::RateLimitedDestination)
    {
        return denied(reason);
    }
    if present & HAS_GLOBAL != 0
        && let Err(reason) = charge(
            &BucketKey::global(slot, &global),
            &global,
            now,
            Reason::RateLimitedGlobal,
        )
    {
        // The connection does not happen: it must not use the destination's budget.
        if present & HAS_DESTINATION != 0 {
            give_back(&dest_key, &destination);
        }
        return denied(reason);
    }
    if let Proto::Udp = dst.proto {
        // Best effort: without the record the flow's next datagram is charged again.
        let _ = FLOWS.insert(flow, now, 0);
    }
    decision
}
