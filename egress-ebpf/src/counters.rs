//! Per-CPU verdict counters: exact, and independent of any event delivery.

use egress_common::{
    Decision, Proto, Reason,
    counters::{RuleCount, counter_index, counter_index_audit, rule_counter_index},
};

use crate::maps::{COUNTERS, RULE_COUNTERS, slot};

#[inline(always)]
pub fn count(reason: Reason, proto: Proto) {
    let idx = counter_index(slot(), reason, proto);
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot of this CPU; programs on one CPU do not run concurrently with
        // each other for the same hook invocation, and a lost increment under preemption is
        // impossible for cgroup programs (they run with migration disabled).
        unsafe { *p += 1 };
    }
}

/// A denial that audit mode let through, under its own counter.
#[inline(always)]
pub fn count_audit(reason: Reason, proto: Proto) {
    let idx = counter_index_audit(slot(), reason, proto);
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: as in `count`.
        unsafe { *p += 1 };
    }
}

/// The policy's decision, counted under the rule that made it (when it names one of the
/// first `RULE_COUNTER_RULES` entries of its list).
#[inline(always)]
pub fn count_rule(decision: &Decision) {
    let Some(kind) = RuleCount::of(decision.reason) else {
        return;
    };
    let Some(idx) = rule_counter_index(slot(), kind, decision.rule_id) else {
        return;
    };
    if let Some(p) = RULE_COUNTERS.get_ptr_mut(idx) {
        // SAFETY: as in `count`.
        unsafe { *p += 1 };
    }
}
