//! Reporting denied attempts to the agent. Separate from the decision: a full ring buffer
//! changes nothing but the lost-events count.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use egress_common::{
    Dest, Event, Hook, Proto, Reason,
    events::{EVENTS_RING_BYTES, VERDICT_DENY},
};

#[map(name = "EGRESS_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map(name = "EGRESS_EVENTS_LOST")]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// What the event says beyond who made the attempt.
pub struct Attempt {
    pub hook: Hook,
    pub reason: Reason,
    /// The policy's reason behind a classified `reason` (see `classify_denial`).
    pub cause: Reason,
    pub rule_id: u32,
    pub proto: Proto,
    pub family: u8,
    pub addr: [u8; 16],
    pub port: u16,
    pub sock_type: u32,
    pub sock_protocol: u32,
    /// `VERDICT_DENY`, or `VERDICT_AUDIT` for a denial audit mode let through.
    pub verdict: u8,
}

impl Attempt {
    #[inline(always)]
    pub fn to(hook: Hook, dst: &Dest, reason: Reason, rule_id: u32) -> Self {
        Attempt {
            hook,
            reason,
            cause: reason,
            rule_id,
            proto: dst.proto,
            family: dst.family as u8,
            addr: dst.addr,
            port: dst.port,
            sock_type: 0,
            sock_protocol: 0,
            verdict: VERDICT_DENY,
        }
    }
}

/// Who made an attempt, as the event names it.
struct Who {
    cgroup_id: u64,
    pid_tgid: u64,
    uid_gid: u64,
    comm: [u8; 16],
}

#[inline(always)]
pub fn emit(slot: u32, a: &Attempt) {
    // SAFETY: these helpers are available to cgroup sock and sock_addr programs and only
    // read the current task.
    let cgroup_id = unsafe { aya_ebpf::helpers::generated::bpf_get_current_cgroup_id() };
    write(
        slot,
        a,
        Who {
            cgroup_id,
            pid_tgid: bpf_get_current_pid_tgid(),
            uid_gid: bpf_get_current_uid_gid(),
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
        },
    );
}

/// As [`emit`], for a packet seen outside the context of the workload's tasks: the event
/// names the socket's owner `uid` and `cgroup_id`, and no process (pid, gid and comm zero).
#[inline(always)]
pub fn emit_for_socket(slot: u32, a: &Attempt, uid: u32, cgroup_id: u64) {
    write(
        slot,
        a,
        Who {
            cgroup_id,
            pid_tgid: 0,
            uid_gid: u64::from(uid),
            comm: [0; 16],
        },
    );
}

#[inline(always)]
fn write(slot: u32, a: &Attempt, who: Who) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        lost();
        return;
    };
    // SAFETY: reads the clock; available to every program type.
    let boot_ns = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns() };
    entry.write(Event {
        boot_ns,
        cgroup_id: who.cgroup_id,
        pid_tgid: who.pid_tgid,
        uid_gid: who.uid_gid,
        comm: who.comm,
        addr: a.addr,
        port: a.port,
        family: a.family,
        proto: a.proto as u8,
        hook: a.hook as u8,
        verdict: a.verdict,
        _pad: [0; 2],
        reason: a.reason as u32,
        rule_id: a.rule_id,
        slot,
        sock_type: a.sock_type,
        sock_protocol: a.sock_protocol,
        cause: a.cause as u32,
    });
    entry.submit(0);
}

#[inline(always)]
fn lost() {
    if let Some(p) = LOST.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *p += 1 };
    }
}
