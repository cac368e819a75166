//! Every map of the programs, and the load-time slot global. Names are the `MAP_*` constants
//! of `egress-common`, which the agent opens them by; sizes are the `MAX_*` constants there.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use egress_common::{
    PortKey, RuleKey, RuleValue, SlotConfig,
    counters::{NUM_COUNTERS, NUM_RULE_COUNTERS},
    events::EVENTS_RING_BYTES,
    inbound::{InboundKey, InboundValue, MAX_INBOUND},
    maps::{
        DnsOrigin, MAX_DNS_ORIGINS, MAX_DNS_RESOLVERS, MAX_EXACT, MAX_LEARNED, MAX_PORTS,
        MAX_RULES, MAX_SLOTS, ResolverKey,
    },
    ratelimit::{
        Bucket, BucketKey, FlowKey, LimitKey, MAX_BUCKETS, MAX_RATE_LIMITS, MAX_UDP_FLOWS,
        RuleLimits,
    },
};

/// The slot this copy of the programs serves; set by the agent at load time.
#[unsafe(no_mangle)]
static EGRESS_SLOT: u32 = u32::MAX;

#[inline(always)]
pub fn slot() -> u32 {
    // SAFETY: a plain read of a load-time constant; volatile so the compiler does not fold
    // the placeholder value.
    unsafe { core::ptr::read_volatile(&EGRESS_SLOT) }
}

// --- The policy tables (see tables.rs) ------------------------------------------------------

#[map(name = "EGRESS_SLOTS")]
pub static SLOTS: Array<SlotConfig> = Array::with_max_entries(MAX_SLOTS, 0);

#[map(name = "EGRESS_RULES")]
pub static RULES: LpmTrie<RuleKey, RuleValue> = LpmTrie::with_max_entries(MAX_RULES, 0);

#[map(name = "EGRESS_EXACT")]
pub static EXACT: HashMap<RuleKey, RuleValue> =
    HashMap::with_max_entries(MAX_EXACT, BPF_F_NO_PREALLOC);

#[map(name = "EGRESS_PORTS")]
pub static PORTS: HashMap<PortKey, u32> = HashMap::with_max_entries(MAX_PORTS, BPF_F_NO_PREALLOC);

#[map(name = "EGRESS_LEARNED")]
pub static LEARNED: HashMap<RuleKey, RuleValue> =
    HashMap::with_max_entries(MAX_LEARNED, BPF_F_NO_PREALLOC);

#[map(name = "EGRESS_INBOUND")]
pub static INBOUND: LpmTrie<InboundKey, InboundValue> = LpmTrie::with_max_entries(MAX_INBOUND, 0);

// --- The DNS redirect (see dns.rs) ----------------------------------------------------------

#[map(name = "EGRESS_DNS_ORIGIN")]
pub static DNS_ORIGINS: LruHashMap<u64, DnsOrigin> =
    LruHashMap::with_max_entries(MAX_DNS_ORIGINS, 0);

#[map(name = "EGRESS_DNS_RESOLVERS")]
pub static DNS_RESOLVERS: HashMap<ResolverKey, u32> =
    HashMap::with_max_entries(MAX_DNS_RESOLVERS, BPF_F_NO_PREALLOC);

#[map(name = "EGRESS_DNS_ALIVE")]
pub static DNS_ALIVE: Array<u32> = Array::with_max_entries(MAX_SLOTS, 0);

// --- Rate limits (see ratelimit.rs) ---------------------------------------------------------

#[map(name = "EGRESS_RATE_LIMITS")]
pub static RATE_LIMITS: HashMap<LimitKey, RuleLimits> =
    HashMap::with_max_entries(MAX_RATE_LIMITS, BPF_F_NO_PREALLOC);

/// Not preallocated: an element deleted by the agent's collector while a program still holds
/// a pointer to it is freed only after an RCU grace period, never reused under that pointer.
#[map(name = "EGRESS_BUCKETS")]
pub static BUCKETS: HashMap<BucketKey, Bucket> =
    HashMap::with_max_entries(MAX_BUCKETS, BPF_F_NO_PREALLOC);

/// LRU is safe here: forgetting a flow only charges its next datagram again.
#[map(name = "EGRESS_UDP_FLOWS")]
pub static UDP_FLOWS: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(MAX_UDP_FLOWS, 0);

// --- What the programs report (see counters.rs, events.rs) ----------------------------------

#[map(name = "EGRESS_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

#[map(name = "EGRESS_RULE_COUNTERS")]
pub static RULE_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_RULE_COUNTERS, 0);

#[map(name = "EGRESS_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

#[map(name = "EGRESS_EVENTS_LOST")]
pub static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
