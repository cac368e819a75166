//! The record the kernel programs send to the agent for every denied attempt.

/// `BPF_MAP_TYPE_RINGBUF` of [`Event`] records.
pub const MAP_EVENTS: &str = "EGRESS_EVENTS";
/// `PerCpuArray<u64>` with one entry: events that did not fit in the ring buffer. The verdict
/// of such an attempt is unchanged and its counter is still incremented.
pub const MAP_EVENTS_LOST: &str = "EGRESS_EVENTS_LOST";
/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 1 << 22;

/// [`Event::verdict`] of an attempt that was refused.
pub const VERDICT_DENY: u8 = 0;
/// [`Event::verdict`] of an attempt the policy denies that audit mode let through.
pub const VERDICT_AUDIT: u8 = 1;

/// One denied attempt. All integers in host byte order except `addr` (network order; IPv4 in
/// the first four bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_BOOTTIME in nanoseconds.
    pub boot_ns: u64,
    /// cgroup v2 id of the task that made the attempt.
    pub cgroup_id: u64,
    /// Thread group id (the process id) in the upper 32 bits, thread id in the lower.
    pub pid_tgid: u64,
    /// gid in the upper 32 bits, uid in the lower.
    pub uid_gid: u64,
    pub comm: [u8; 16],
    pub addr: [u8; 16],
    pub port: u16,
    /// 4 or 6 after canonicalisation; 0 for socket creation.
    pub family: u8,
    /// [`crate::Proto`] as u8.
    pub proto: u8,
    /// [`crate::Hook`] as u8.
    pub hook: u8,
    /// [`VERDICT_DENY`]: the attempt was refused; [`VERDICT_AUDIT`]: audit mode let it through.
    pub verdict: u8,
    pub _pad: [u8; 2],
    /// [`crate::Reason`] as u32.
    pub reason: u32,
    pub rule_id: u32,
    pub slot: u32,
    /// For socket creation: the socket's type and protocol as the workload asked.
    pub sock_type: u32,
    pub sock_protocol: u32,
    /// [`crate::Reason`] as u32: the policy's own reason when `reason` classifies the attempt
    /// ([`crate::Reason::UdpConnectRefused`]); otherwise equal to `reason`.
    pub cause: u32,
}

const _: () = {
    assert!(core::mem::size_of::<Event>() == 96);
    assert!(core::mem::align_of::<Event>() == 8);
};
