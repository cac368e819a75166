//! Reporting denied attempts to the agent. Separate from the decision: a full ring buffer
//! changes nothing but the lost-events count.

use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid};
use egress_common::{Dest, Event, Hook, Proto, Reason, events::VERDICT_DENY, verdict::NO_RULE};

use crate::maps::{EVENTS, EVENTS_LOST};

/// Whom the event names.
#[derive(Clone, Copy)]
pub enum Owner {
    /// The current task: the attempt was made in its context.
    Task,
    /// A socket's owner `uid` and `cgroup_id`, for a packet seen outside the context of the
    /// workload's tasks (no process: pid, gid and comm zero).
    Socket { uid: u32, cgroup_id: u64 },
}

/// What the event says beyond the hook.
pub struct Attempt {
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
    pub owner: Owner,
}

impl Attempt {
    /// An attempt to `dst`, denied with `reason` by rule `rule_id`, by the current task.
    #[inline(always)]
    pub fn to(dst: &Dest, reason: Reason, rule_id: u32) -> Self {
        Attempt {
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
            owner: Owner::Task,
        }
    }

    /// An attempt that names no destination (socket creation, socket options).
    #[inline(always)]
    pub fn nowhere(reason: Reason, proto: Proto) -> Self {
        Attempt {
            family: 0,
            ..Attempt::to(&Dest::v4([0; 4], 0, proto), reason, NO_RULE)
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
pub fn emit(slot: u32, hook: Hook, a: &Attempt) {
    let who = match a.owner {
        Owner::Task => Who {
            // SAFETY: these helpers are available to cgroup sock and sock_addr programs and
            // only read the current task.
            cgroup_id: unsafe { aya_ebpf::helpers::generated::bpf_get_current_cgroup_id() },
            pid_tgid: bpf_get_current_pid_tgid(),
            uid_gid: bpf_get_current_uid_gid(),
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
        },
        Owner::Socket { uid, cgroup_id } => Who {
            cgroup_id,
            pid_tgid: 0,
            uid_gid: u64::from(uid),
            comm: [0; 16],
        },
    };
    write(slot, hook, a, who);
}

#[inline(always)]
fn write(slot: u32, hook: Hook, a: &Attempt, who: Who) {
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
        hook: hook as u8,
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
    if let Some(p) = EVENTS_LOST.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe { *p += 1 };
    }
}
