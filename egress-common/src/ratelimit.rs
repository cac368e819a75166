//! Connection rate limits: map layout and the bucket arithmetic the kernel runs.
//!
//! Every budget is one GCRA ("virtual scheduling") bucket: a single `u64`, the *theoretical
//! arrival time* (TAT) in `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`). A budget of
//! `burst` connections per `window` refills one connection every `interval_ns =
//! ceil(window / burst)`. A connection at time `now` is allowed when
//! `max(TAT, now) <= now + (burst - 1) * interval_ns`, and then moves the TAT to
//! `max(TAT, now) + interval_ns`. A bucket whose TAT lies in the past is full, so a new bucket
//! (TAT 0) holds `burst` connections, and a full bucket may be deleted without changing any
//! decision ([`is_full`]).
//!
//! The update is one compare-and-exchange on that `u64` ([`take`]): buckets are shared by all
//! CPUs, never per CPU, so concurrent connections cannot together exceed a budget. Denials
//! write nothing.
//!
//! Keys: a budget is identified by the slot (one protected workload) and a *budget id*, a
//! hash the agent computes from what the policy says about the budget (target text and
//! limit), not from the policy id. A reload that leaves a budget as it was therefore keeps
//! its bucket; a reload that changes it starts a fresh one.

use crate::dest::{Dest, Proto};

/// `HashMap<LimitKey, RuleLimits>`: the budgets a connection allowed by a rule is charged to
/// (its destination budget and the global one: one lookup per decision).
pub const MAP_RATE_LIMITS: &str = "EGRESS_RATE_LIMITS";
/// `HashMap<BucketKey, Bucket>` (plain hash, not LRU): the buckets.
pub const MAP_BUCKETS: &str = "EGRESS_BUCKETS";
/// `LruHashMap<FlowKey, u64>`: when each UDP destination was last sent to (see
/// [`UDP_FLOW_IDLE_NS`]).
pub const MAP_UDP_FLOWS: &str = "EGRESS_UDP_FLOWS";

pub const MAX_RATE_LIMITS: u32 = 1 << 16;
/// Bucket capacity. When full, a connection that would need a new bucket is denied
/// ([`crate::Reason::RateLimitTableFull`]); existing buckets keep working. The agent deletes
/// buckets that have refilled completely, which changes no decision.
pub const MAX_BUCKETS: u32 = 1 << 16;
pub const MAX_UDP_FLOWS: u32 = 1 << 14;

/// A UDP send (connected or not) to a destination address and port that this workload sent
/// to less than this long ago is part of the same "connection" and is not charged again.
pub const UDP_FLOW_IDLE_NS: u64 = 30_000_000_000;
/// The kernel refreshes a flow's last-seen time at most this often (a write per datagram
/// would bounce the cache line between CPUs); a flow therefore expires between
/// `UDP_FLOW_IDLE_NS - UDP_FLOW_REFRESH_NS` and `UDP_FLOW_IDLE_NS` after its last send.
pub const UDP_FLOW_REFRESH_NS: u64 = 1_000_000_000;

/// Compare-and-exchange attempts before [`take`] falls back to a fetch-and-add.
pub const CAS_ATTEMPTS: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LimitKey {
    pub policy_id: u32,
    /// Index into `allowed_destinations`: the rule that allowed the connection.
    pub rule_id: u32,
}

impl LimitKey {
    #[inline(always)]
    pub const fn rule(policy_id: u32, rule_id: u32) -> Self {
        LimitKey { policy_id, rule_id }
    }
}

/// The budgets of one allow rule. A rule without an entry has none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleLimits {
    pub destination: Limit,
    pub global: Limit,
    /// [`HAS_DESTINATION`] and/or [`HAS_GLOBAL`]: which of the two are in force.
    pub present: u32,
    pub _pad: u32,
}

pub const HAS_DESTINATION: u32 = 1 << 0;
pub const HAS_GLOBAL: u32 = 1 << 1;

/// One budget: `burst` connections, one more every `interval_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Stable identity of the budget (see the module documentation).
    pub budget: u64,
    pub interval_ns: u64,
    /// `(burst - 1) * interval_ns`, saturating: how far the TAT may run ahead of now. Written
    /// by the agent because the BPF backend has no 128-bit multiply for an overflow check.
    pub span_ns: u64,
    pub burst: u32,
    /// [`LIMIT_PER_ADDRESS`]: one bucket per destination address (CIDR rules); otherwise one
    /// bucket for every address of the rule (host rules, and the global limit).
    pub flags: u32,
}

pub const LIMIT_PER_ADDRESS: u32 = 1 << 0;
/// One bucket per DNS name (wildcard host rules): a connection to a learned address is
/// charged to the budget of the name whose answer installed it
/// ([`crate::RuleValue::name_tag`]).
pub const LIMIT_PER_NAME: u32 = 1 << 1;

impl Limit {
    /// `max_connections` per `window_secs` seconds (both at least 1; 0 is read as 1).
    pub const fn new(budget: u64, max_connections: u32, window_secs: u32, flags: u32) -> Self {
        let burst = if max_connections == 0 {
            1
        } else {
            max_connections
        };
        let interval = interval_ns(burst, window_secs);
        Limit {
            budget,
            interval_ns: interval,
            span_ns: (burst as u64 - 1).saturating_mul(interval),
            burst,
            flags,
        }
    }
}

pub const BUCKET_GLOBAL: u8 = 1;
pub const BUCKET_DESTINATION: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    pub slot: u32,
    /// [`BUCKET_GLOBAL`] or [`BUCKET_DESTINATION`].
    pub kind: u8,
    /// 4 or 6 for a per-address bucket, 0 otherwise.
    pub family: u8,
    pub _pad: [u8; 2],
    pub budget: u64,
    /// The destination address for a per-address bucket (IPv4 in the first four bytes),
    /// zero otherwise.
    pub addr: [u8; 16],
}

impl BucketKey {
    #[inline(always)]
    pub const fn global(slot: u32, limit: &Limit) -> Self {
        BucketKey {
            slot,
            kind: BUCKET_GLOBAL,
            family: 0,
            _pad: [0; 2],
            budget: limit.budget,
            addr: [0; 16],
        }
    }

    /// The bucket `limit` charges for a connection to `dst`, an address learned for the name
    /// `name_tag` stands for (0: none).
    #[inline(always)]
    pub const fn destination(slot: u32, limit: &Limit, dst: &Dest, name_tag: u32) -> Self {
        let per_address = limit.flags & LIMIT_PER_ADDRESS != 0;
        let mut addr = if per_address { dst.addr } else { [0; 16] };
        if !per_address && limit.flags & LIMIT_PER_NAME != 0 {
            let t = name_tag.to_be_bytes();
            addr[0] = t[0];
            addr[1] = t[1];
            addr[2] = t[2];
            addr[3] = t[3];
        }
        BucketKey {
            slot,
            kind: BUCKET_DESTINATION,
            family: if per_address { dst.family as u8 } else { 0 },
            _pad: [0; 2],
            budget: limit.budget,
            addr,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bucket {
    /// Theoretical arrival time, `CLOCK_MONOTONIC` ns. Updated only atomically.
    pub tat_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub slot: u32,
    pub family: u8,
    /// [`Proto`] as u8 (always UDP today).
    pub proto: u8,
    /// Host byte order.
    pub port: u16,
    pub addr: [u8; 16],
}

impl FlowKey {
    #[inline(always)]
    pub const fn new(slot: u32, dst: &Dest) -> Self {
        FlowKey {
            slot,
            family: dst.family as u8,
            proto: dst.proto as u8,
            port: dst.port,
            addr: dst.addr,
        }
    }
}

/// Whether a send of protocol `proto` to a flow last seen at `last_ns` continues that flow.
#[inline(always)]
pub const fn flow_is_live(proto: Proto, last_ns: u64, now_ns: u64) -> bool {
    matches!(proto, Proto::Udp) && now_ns.saturating_sub(last_ns) < UDP_FLOW_IDLE_NS
}

/// The refill interval of `max_connections` per `window_secs` seconds, rounded up (the
/// budget never refills faster than written). At least 1 ns.
pub const fn interval_ns(max_connections: u32, window_secs: u32) -> u64 {
    let window_ns = window_secs as u64 * 1_000_000_000;
    let max = if max_connections == 0 {
        1
    } else {
        max_connections as u64
    };
    let interval = window_ns.div_ceil(max);
    if interval == 0 { 1 } else { interval }
}

/// A bucket's TAT cell. The kernel implements it with BPF atomic instructions on the map
/// value, tests with `core::sync::atomic`.
pub trait TatCell {
    /// A plain (untorn) 64-bit load.
    fn load(&self) -> u64;
    /// Atomically: if the value is `current`, store `new`. Returns the value found.
    fn compare_exchange(&self, current: u64, new: u64) -> u64;
    /// Atomically adds `delta` (wrapping) and returns the previous value.
    fn fetch_add(&self, delta: u64) -> u64;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    Allowed,
    Exhausted,
}

/// Whether `limit` admits any connection: a limit the agent never writes (`burst` or
/// `interval_ns` zero) admits none.
#[inline(always)]
pub const fn admits(limit: &Limit) -> bool {
    limit.burst != 0 && limit.interval_ns != 0
}

/// The bucket a connection creates when its budget has none yet: full, minus that
/// connection. `None` when the limit admits nothing (the connection is denied).
#[inline(always)]
pub const fn fresh(now_ns: u64, limit: &Limit) -> Option<Bucket> {
    if !admits(limit) {
        return None;
    }
    Some(Bucket {
        tat_ns: now_ns.saturating_add(limit.interval_ns),
    })
}

/// A bucket is full (holds its whole burst) once its TAT is not in the future. Deleting a
/// full bucket changes no decision: a new one starts full.
#[inline(always)]
pub const fn is_full(bucket: &Bucket, now_ns: u64) -> bool {
    bucket.tat_ns <= now_ns
}

/// Takes one connection from the bucket in `cell` at time `now_ns`.
///
/// Compare-and-exchange, retried [`CAS_ATTEMPTS`] times. Each failure means another CPU
/// updated the bucket in between (and, being on the same algorithm, moved the TAT to at least
/// its own `now`), so after the attempts a single fetch-and-add finishes the decision
/// without a loop: it charges first and gives back on denial. That fallback can leave the
/// bucket at most the length of the contention window (nanoseconds) fuller than exact, and
/// can, while its charge is outstanding, deny a concurrent connection that would have been
/// allowed: never more than the budget.
///
/// A limit the agent never writes (`burst` or `interval_ns` zero) denies.
#[inline(always)]
pub fn take<C: TatCell>(cell: &C, now_ns: u64, limit: &Limit) -> Take {
    if !admits(limit) {
        return Take::Exhausted;
    }
    let interval = limit.interval_ns;
    // The latest TAT at which one more connection still fits.
    let horizon = now_ns.saturating_add(limit.span_ns);
    let mut seen = cell.load();
    let mut i = 0;
    while i < CAS_ATTEMPTS {
        let base = if seen > now_ns { seen } else { now_ns };
        if base > horizon {
            return Take::Exhausted;
        }
        let found = cell.compare_exchange(seen, base.saturating_add(interval));
        if found == seen {
            return Take::Allowed;
        }
        seen = found;
        i += 1;
    }
    let before = cell.fetch_add(interval);
    if before > horizon {
        cell.fetch_add(interval.wrapping_neg());
        return Take::Exhausted;
    }
    Take::Allowed
}

/// Gives back a connection [`take`] allowed (when a later budget denied it).
#[inline(always)]
pub fn refund<C: TatCell>(cell: &C, limit: &Limit) {
    cell.fetch_add(limit.interval_ns.wrapping_neg());
}

const _: () = {
    assert!(core::mem::size_of::<LimitKey>() == 8);
    assert!(core::mem::size_of::<RuleLimits>() == 72);
    assert!(core::mem::size_of::<Limit>() == 32);
    assert!(core::mem::align_of::<Limit>() == 8);
    assert!(core::mem::size_of::<BucketKey>() == 32);
    assert!(core::mem::align_of::<BucketKey>() == 8);
    assert!(core::mem::size_of::<Bucket>() == 8);
    assert!(core::mem::size_of::<FlowKey>() == 24);
    assert!(core::mem::align_of::<FlowKey>() == 4);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers and byte arrays only, no padding (sizes asserted above;
    // the explicit `_pad` fields fill every gap).
    unsafe impl aya::Pod for super::LimitKey {}
    unsafe impl aya::Pod for super::RuleLimits {}
    unsafe impl aya::Pod for super::Limit {}
    unsafe impl aya::Pod for super::BucketKey {}
    unsafe impl aya::Pod for super::Bucket {}
    unsafe impl aya::Pod for super::FlowKey {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use core::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::vec::Vec;

    use super::*;

    struct Cell(AtomicU64);

    impl TatCell for Cell {
        fn load(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
        fn compare_exchange(&self, current: u64, new: u64) -> u64 {
            match self
                .0
                .compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(v) | Err(v) => v,
            }
        }
        fn fetch_add(&self, delta: u64) -> u64 {
            self.0.fetch_add(delta, Ordering::SeqCst)
        }
    }

    /// A cell on which, before each of our compare-and-exchanges, "another CPU" takes a
    /// connection by the same rule, for as long as `armed` lasts: every attempt loses while
    /// the other CPU gets anything, which drives `take` into its fetch-and-add fallback.
    struct Racing {
        v: AtomicU64,
        now: u64,
        limit: Limit,
        armed: core::sync::atomic::AtomicU32,
        others: core::sync::atomic::AtomicU32,
    }

    impl TatCell for Racing {
        fn load(&self) -> u64 {
            self.v.load(Ordering::SeqCst)
        }
        fn compare_exchange(&self, current: u64, new: u64) -> u64 {
            if self.armed.load(Ordering::SeqCst) > 0 {
                self.armed.fetch_sub(1, Ordering::SeqCst);
                let seen = self.v.load(Ordering::SeqCst);
                let base = seen.max(self.now);
                if base <= self.now + self.limit.span_ns {
                    self.v
                        .store(base + self.limit.interval_ns, Ordering::SeqCst);
                    self.others.fetch_add(1, Ordering::SeqCst);
                }
            }
            match self
                .v
                .compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(v) | Err(v) => v,
            }
        }
        fn fetch_add(&self, delta: u64) -> u64 {
            self.v.fetch_add(delta, Ordering::SeqCst)
        }
    }

    const SEC: u64 = 1_000_000_000;

    fn limit(burst: u32, window_secs: u32) -> Limit {
        Limit::new(1, burst, window_secs, 0)
    }

    #[test]
    fn interval_rounds_up() {
        assert_eq!(interval_ns(100, 60), 600_000_000);
        assert_eq!(interval_ns(3, 1), 333_333_334);
        assert_eq!(interval_ns(u32::MAX, 1), 1);
        assert_eq!(interval_ns(1, u32::MAX), u32::MAX as u64 * SEC);
    }

    #[test]
    fn a_full_bucket_allows_its_burst_then_refills_at_the_rate() {
        let l = limit(100, 60);
        let now = 1000 * SEC;
        let cell = Cell(AtomicU64::new(fresh(now, &l).map_or(0, |b| b.tat_ns)));
        let allowed = (1..200)
            .filter(|_| take(&cell, now, &l) == Take::Allowed)
            .count();
        assert_eq!(allowed + 1, 100, "the fresh bucket's connection plus 99");
        // One interval later: exactly one more.
        let later = now + l.interval_ns;
        assert_eq!(take(&cell, later, &l), Take::Allowed);
        assert_eq!(take(&cell, later, &l), Take::Exhausted);
        // After a long idle time the bucket holds its burst, not more.
        let much_later = later + 3600 * SEC;
        assert!(is_full(
            &Bucket {
                tat_ns: cell.load()
            },
            much_later
        ));
        let allowed = (0..200)
            .filter(|_| take(&cell, much_later, &l) == Take::Allowed)
            .count();
        assert_eq!(allowed, 100);
    }

    #[test]
    fn invalid_limits_deny() {
        let cell = Cell(AtomicU64::new(0));
        let mut l = limit(5, 1);
        l.burst = 0;
        assert_eq!(take(&cell, SEC, &l), Take::Exhausted);
        assert_eq!(fresh(SEC, &l), None);
        let mut l = limit(5, 1);
        l.interval_ns = 0;
        assert_eq!(take(&cell, SEC, &l), Take::Exhausted);
        assert_eq!(fresh(SEC, &l), None);
        assert!(fresh(SEC, &limit(1, 1)).is_some());
    }

    #[test]
    fn the_fetch_add_fallback_keeps_the_budget() {
        for start in [0, 50 * SEC, 50 * SEC + 3 * interval_ns(10, 10)] {
            let l = limit(10, 10);
            let now = 50 * SEC;
            let cell = Racing {
                v: AtomicU64::new(start),
                now,
                limit: l,
                armed: 0.into(),
                others: 0.into(),
            };
            let ours = (0..50)
                .filter(|_| {
                    cell.armed.store(CAS_ATTEMPTS, Ordering::SeqCst);
                    take(&cell, now, &l) == Take::Allowed
                })
                .count() as u32;
            let others = cell.others.load(Ordering::SeqCst);
            let fit = if start > now { 7 } else { 10 };
            assert_eq!(
                ours + others,
                fit,
                "start {start}: ours {ours} others {others}"
            );
            assert!(ours > 0, "the fallback allowed nothing");
            // Denials gave their charge back.
            assert_eq!(cell.load(), now + 10 * l.interval_ns);
        }
    }

    #[test]
    fn refund_gives_one_connection_back() {
        let l = limit(2, 10);
        let now = 50 * SEC;
        let cell = Cell(AtomicU64::new(0));
        assert_eq!(take(&cell, now, &l), Take::Allowed);
        assert_eq!(take(&cell, now, &l), Take::Allowed);
        assert_eq!(take(&cell, now, &l), Take::Exhausted);
        refund(&cell, &l);
        assert_eq!(take(&cell, now, &l), Take::Allowed);
        assert_eq!(take(&cell, now, &l), Take::Exhausted);
    }

    /// Eight threads on one bucket get exactly its burst between them.
    #[test]
    fn concurrent_takes_never_exceed_the_budget() {
        for _ in 0..20 {
            let l = limit(1000, 3600);
            let now = 7 * SEC;
            let cell = Arc::new(Cell(AtomicU64::new(0)));
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let cell = Arc::clone(&cell);
                    std::thread::spawn(move || {
                        (0..400)
                            .filter(|_| take(&*cell, now, &l) == Take::Allowed)
                            .count()
                    })
                })
                .collect();
            let total: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
            assert_eq!(total, 1000);
        }
    }
}
