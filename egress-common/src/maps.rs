//! Map names, keys and values.
//!
//! One agent serves many protected cgroups. Each loaded copy of the programs is bound to a
//! *slot* (a load-time constant, [`GLOBAL_SLOT`]); the slot's [`SlotConfig`] names the policy id
//! in force. Rule and port keys carry the policy id, so policies share maps without seeing each
//! other's entries, and a reload switches atomically by writing a new id into the slot.

use crate::dest::{Dest, Family, Proto};

/// Name of the `u32` global that binds a loaded program to its slot.
pub const GLOBAL_SLOT: &str = "EGRESS_SLOT";

/// `Array<SlotConfig>` indexed by slot.
pub const MAP_SLOTS: &str = "EGRESS_SLOTS";
/// `LpmTrie<RuleKey, RuleValue>`: addresses and prefixes of every policy.
pub const MAP_RULES: &str = "EGRESS_RULES";
/// `HashMap<RuleKey, RuleValue>`: single addresses (/32, /128), looked up before the trie. Their
/// values are compiled exactly like trie entries (deny wins, union of covering allows), so a
/// hit is the longest match; the trie holds only shorter prefixes.
pub const MAP_EXACT: &str = "EGRESS_EXACT";
/// `HashMap<PortKey, u32>`: which (protocol, port) pairs a port set allows, and by which rule.
pub const MAP_PORTS: &str = "EGRESS_PORTS";
/// `PerCpuArray<u64>`: verdict counters, see [`crate::counters`].
pub const MAP_COUNTERS: &str = "EGRESS_COUNTERS";
/// `HashMap<RuleKey, RuleValue>`: addresses the agent's DNS proxy learned from answers to
/// allowed names, each with the port set of the rules allowing the name and a deadline. Asked
/// only when the policy tables deny for want of a rule or a port, so a deny entry always wins.
pub const MAP_LEARNED: &str = "EGRESS_LEARNED";
/// `Array<u32>` indexed by slot: CLOCK_BOOTTIME second until which the slot's DNS proxy is
/// known to be alive (the agent renews it every second). Past it, DNS is denied instead of
/// redirected, so that nothing else that takes the proxy's port can answer the workload.
pub const MAP_DNS_ALIVE: &str = "EGRESS_DNS_ALIVE";
/// `LruHashMap<u64, DnsOrigin>`: per socket cookie, where its last DNS query was addressed
/// before the redirect to the proxy, so that answers appear to come from there.
pub const MAP_DNS_ORIGIN: &str = "EGRESS_DNS_ORIGIN";

pub const MAX_SLOTS: u32 = 64;
pub const MAX_RULES: u32 = 1 << 20;
pub const MAX_EXACT: u32 = 1 << 20;
pub const MAX_PORTS: u32 = 1 << 18;
pub const MAX_LEARNED: u32 = 1 << 17;
pub const MAX_DNS_ORIGINS: u32 = 1 << 14;

/// The DNS port: every TCP and UDP destination with this port goes to the slot's proxy.
pub const DNS_PORT: u16 = 53;
/// The ports DNS proxies listen on (loopback). A workload may reach only its own proxy there:
/// every other port of the range on loopback is refused, so that no workload can use another
/// workload's proxy (and its policy and budget). Privileged ports: once an agent is gone, no
/// unprivileged process can take its proxy's port (where `ip_unprivileged_port_start` is
/// left at its default).
pub const DNS_PROXY_PORT_FIRST: u16 = 700;
pub const DNS_PROXY_PORT_LAST: u16 = 799;
/// A query to a resolver the slot does not authorize goes to the proxy at its port plus this
/// offset (so `DNS_PROXY_PORT_FIRST + offset ..= DNS_PROXY_PORT_LAST + offset` is the proxies'
/// second range): the proxy answers it by the policy like any other and reports the attempt.
pub const DNS_UNAUTHORIZED_PORT_OFFSET: u16 = 100;
/// The last port of both proxy ranges: loopback ports of `DNS_PROXY_PORT_FIRST..=` this that
/// are not the slot's own two are refused.
pub const DNS_PROXY_RANGE_LAST: u16 = DNS_PROXY_PORT_LAST + DNS_UNAUTHORIZED_PORT_OFFSET;
/// `HashMap<ResolverKey, u32>`: the resolvers each slot's workload may address its queries
/// to (`dns_policy.allowed_resolvers`, else the proxy's upstream servers). Only observability
/// depends on it: every query goes to the proxy either way.
pub const MAP_DNS_RESOLVERS: &str = "EGRESS_DNS_RESOLVERS";
pub const MAX_DNS_RESOLVERS: u32 = 1 << 10;

/// DNS over TLS (RFC 7858), refused everywhere when the slot has [`SLOT_BLOCK_DOT`].
pub const DOT_PORT: u16 = 853;

/// Marks a deny entry's `rule_id` as a known DNS-over-HTTPS provider address (the rest of the
/// id is the provider's index in the agent's list) rather than a `denied_destinations` entry.
pub const RULE_DOH_BIT: u32 = 1 << 30;

/// Per-slot configuration. `policy_id == 0` means "no policy": every decision denies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotConfig {
    pub policy_id: u32,
    pub flags: u32,
    /// The start-up probe's destinations (UDP): a *denied* attempt to exactly one of these
    /// is counted as [`crate::Reason::StartupProbe`]. Port 0: no probe.
    pub probe_v4: [u8; 4],
    pub probe_v6: [u8; 16],
    pub probe_port_v4: u16,
    pub probe_port_v6: u16,
    /// Port of the agent's DNS proxy on 127.0.0.1 and ::1 in the workload's network
    /// namespace, host order; 0: no proxy, port 53 is judged like any other port.
    pub dns_port: u16,
    pub _pad: u16,
    /// With [`SLOT_LOOPBACK_PORTS`]: the only TCP and UDP ports loopback destinations may
    /// have (`loopback.ports`), host order; 0 marks an unused entry.
    pub loopback_ports: [u16; MAX_LOOPBACK_PORTS],
}

/// How many ports `loopback.ports` may list.
pub const MAX_LOOPBACK_PORTS: usize = 16;

impl SlotConfig {
    /// Whether `port` is one of the slot's loopback ports.
    #[inline(always)]
    pub const fn loopback_port(&self, port: u16) -> bool {
        let mut i = 0;
        while i < MAX_LOOPBACK_PORTS {
            if self.loopback_ports[i] != 0 && self.loopback_ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Whether `dst` is this slot's start-up probe.
    #[inline(always)]
    pub fn is_probe(&self, dst: &Dest) -> bool {
        if dst.proto as u8 != Proto::Udp as u8 {
            return false;
        }
        match dst.family {
            Family::V4 => {
                self.probe_port_v4 != 0
                    && dst.port == self.probe_port_v4
                    && dst.addr[0] == self.probe_v4[0]
                    && dst.addr[1] == self.probe_v4[1]
                    && dst.addr[2] == self.probe_v4[2]
                    && dst.addr[3] == self.probe_v4[3]
            }
            Family::V6 => {
                self.probe_port_v6 != 0
                    && dst.port == self.probe_port_v6
                    && dst.addr == self.probe_v6
            }
        }
    }
}

/// Loopback destinations (127.0.0.0/8, ::1, 0.0.0.0, ::) are allowed without a rule.
pub const SLOT_ALLOW_LOOPBACK: u32 = 1 << 0;
/// Inet sockets other than TCP, MPTCP and UDP may be created. UDP-Lite sends are still
/// judged; raw sockets (which need CAP_NET_RAW) run no address hook at all.
pub const SLOT_ALLOW_OTHER_SOCKETS: u32 = 1 << 1;
/// The policy has connection rate limits: allowed connections go through the rate-limit
/// step (see [`crate::ratelimit`]).
pub const SLOT_RATE_LIMITED: u32 = 1 << 2;

/// DNS over TLS (port 853) is refused to every destination but loopback.
pub const SLOT_BLOCK_DOT: u32 = 1 << 3;

/// Queries to resolvers not in [`MAP_DNS_RESOLVERS`] are told apart (sent to the proxy's
/// second port and counted as [`crate::Reason::DnsUnauthorizedResolver`]).
pub const SLOT_DNS_RESOLVERS: u32 = 1 << 4;

/// Audit mode (`mode: audit`): a connect or send that the policy denies is let through, and
/// counted and reported as audited ([`crate::counters::counter_index_audit`],
/// [`crate::events::VERDICT_AUDIT`]) instead of refused. The start-up probe, socket creation,
/// socket options, the packet checks, the inbound check and the DNS proxy's own guards stay
/// enforced: what they refuse would be invisible to the hooks, or would let the workload
/// reach past its own DNS proxy.
pub const SLOT_AUDIT: u32 = 1 << 5;

/// `loopback: {ports: [...]}`: loopback destinations are allowed only to the TCP and UDP
/// ports in [`SlotConfig::loopback_ports`], and denied with
/// [`crate::Reason::DenyLoopbackPort`] at any other.
pub const SLOT_LOOPBACK_PORTS: u32 = 1 << 6;

/// Where a redirected DNS query was addressed, and who sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsOrigin {
    /// As the hook saw it: IPv4 in the first four bytes for [`DnsOrigin::FAMILY_V4`], an
    /// IPv6 address (possibly IPv4-mapped) for [`DnsOrigin::FAMILY_V6`].
    pub addr: [u8; 16],
    /// Network byte order, as in `bpf_sock_addr.user_port`.
    pub port_be: u16,
    pub family: u8,
    pub _pad: u8,
    /// The process (thread group id) and user of the task that addressed the query.
    pub pid: u32,
    pub uid: u32,
    pub comm: [u8; 16],
}

/// Key of [`MAP_DNS_RESOLVERS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResolverKey {
    pub slot: u32,
    /// 4 or 6; IPv4 (also when IPv4-mapped) in the first four bytes of `addr`.
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

impl ResolverKey {
    #[inline(always)]
    pub const fn for_dest(slot: u32, dst: &Dest) -> Self {
        ResolverKey {
            slot,
            family: match dst.family {
                Family::V4 => 4,
                Family::V6 => 6,
            },
            _pad: [0; 3],
            addr: dst.addr,
        }
    }
}

impl DnsOrigin {
    pub const FAMILY_V4: u8 = 4;
    pub const FAMILY_V6: u8 = 6;
}

/// Data part of the LPM key. The prefix covers the policy id, the family and the padding
/// ([`RULE_KEY_FIXED_BITS`]) and then the address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    /// Policy id, big-endian, so that the trie's bitwise match treats it as a whole.
    pub policy_id: [u8; 4],
    pub family: u8,
    pub _pad: [u8; 3],
    /// IPv4 in the first four bytes, network order.
    pub addr: [u8; 16],
}

/// Bits of the key before the address starts.
pub const RULE_KEY_FIXED_BITS: u32 = 64;

impl RuleKey {
    #[inline(always)]
    pub const fn new(policy_id: u32, family: Family, addr: [u8; 16]) -> Self {
        RuleKey {
            policy_id: policy_id.to_be_bytes(),
            family: family as u8,
            _pad: [0; 3],
            addr,
        }
    }

    /// Full-length prefix for looking up a destination.
    #[inline(always)]
    pub const fn full_prefix_len(family: Family) -> u32 {
        RULE_KEY_FIXED_BITS + address_bits(family)
    }

    #[inline(always)]
    pub const fn for_dest(policy_id: u32, dst: &Dest) -> Self {
        RuleKey::new(policy_id, dst.family, dst.addr)
    }
}

#[inline(always)]
pub const fn address_bits(family: Family) -> u32 {
    match family {
        Family::V4 => 32,
        Family::V6 => 128,
    }
}

pub const ACTION_ALLOW: u8 = 1;
pub const ACTION_DENY: u8 = 2;

/// One (protocol, port) pair a rule value carries itself, and the rule that allows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InlinePort {
    /// Host byte order.
    pub port: u16,
    /// [`Proto`] as `u8`.
    pub proto: u8,
    pub _pad: u8,
    pub rule_id: u32,
}

/// How many (protocol, port) pairs a value can carry; a larger set is looked up in the port
/// map instead.
pub const MAX_INLINE_PORTS: u8 = 2;

/// What the longest matching prefix says.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleValue {
    /// [`ACTION_ALLOW`] or [`ACTION_DENY`]; anything else is treated as deny.
    pub action: u8,
    /// Address bits of this entry's own prefix (0..=128): an expired entry is looked past by
    /// asking the trie again with a shorter prefix.
    pub prefix: u8,
    /// For allow: how many entries of `inline` hold the whole port set (1 or 2), so the port
    /// map need not be asked; 0 when the set is in the port map only.
    pub n_inline: u8,
    pub _pad: u8,
    /// For deny: index of the denying entry in `denied_destinations`. For allow: the first
    /// allow rule covering the prefix (reported when the port is not allowed).
    pub rule_id: u32,
    /// For allow: the port set that holds every (protocol, port) the covering rules allow.
    pub set_id: u32,
    /// CLOCK_BOOTTIME second after which the entry no longer applies (an address learned from
    /// DNS whose lifetime ran out); 0: it never expires.
    pub expires_s: u32,
    pub inline: [InlinePort; MAX_INLINE_PORTS as usize],
    /// For an address learned from DNS: which name's budget a connection to it is charged to
    /// under a wildcard rule's per-name limit ([`name_tag`]); 0 otherwise.
    pub name_tag: u32,
}

/// The budget identity of a DNS name under a wildcard rule: FNV-1a of the lowercase name,
/// never 0 (0 means "no name").
pub fn name_tag(name: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < name.len() {
        h ^= name[i].to_ascii_lowercase() as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    if h == 0 { 1 } else { h }
}

impl RuleValue {
    #[inline(always)]
    pub const fn expired(&self, now_s: u32) -> bool {
        self.expires_s != 0 && now_s > self.expires_s
    }
}

/// How many expired entries one lookup looks past before it gives up and denies.
pub const MAX_EXPIRED_SKIPS: u32 = 4;

/// Key of the port map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub policy_id: u32,
    pub set_id: u32,
    /// Host byte order.
    pub port: u16,
    /// [`Proto`] as `u8` (6 or 17).
    pub proto: u8,
    pub _pad: u8,
}

impl PortKey {
    #[inline(always)]
    pub const fn new(policy_id: u32, set_id: u32, port: u16, proto: Proto) -> Self {
        PortKey {
            policy_id,
            set_id,
            port,
            proto: proto as u8,
            _pad: 0,
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<SlotConfig>() == 68);
    assert!(core::mem::size_of::<DnsOrigin>() == 44);
    assert!(core::mem::size_of::<ResolverKey>() == 24);
    assert!(core::mem::size_of::<RuleKey>() == 24);
    assert!(core::mem::align_of::<RuleKey>() == 1);
    assert!(core::mem::size_of::<RuleValue>() == 36);
    assert!(core::mem::size_of::<PortKey>() == 12);
    assert!(core::mem::align_of::<PortKey>() == 4);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], contain only integers and byte arrays, and have no
    // padding the compiler could leave uninitialised (checked by the size assertions above).
    unsafe impl aya::Pod for super::SlotConfig {}
    unsafe impl aya::Pod for super::RuleKey {}
    unsafe impl aya::Pod for super::RuleValue {}
    unsafe impl aya::Pod for super::InlinePort {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::DnsOrigin {}
    unsafe impl aya::Pod for super::ResolverKey {}
}
