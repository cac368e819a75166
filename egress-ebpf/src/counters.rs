//! Per-CPU verdict counters: exact, and independent of any event delivery.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use egress_common::{
    Proto, Reason,
    counters::{NUM_COUNTERS, counter_index, counter_index_audit},
};

use crate::tables::slot;

#[map(name = "EGRESS_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

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
