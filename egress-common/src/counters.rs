//! Verdict counters: one `u64` per (slot, reason, protocol), per CPU.

use crate::dest::Proto;
use crate::maps::MAX_SLOTS;

/// Why a decision came out as it did. Values are stable: they index counters and will appear
/// in events.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// An allow rule covers the destination, protocol and port.
    AllowRule = 0,
    /// Loopback destination, out of scope and allowed by the policy.
    AllowLoopback = 1,
    /// A TCP or UDP socket was created.
    AllowSocket = 2,
    /// No rule covers the destination address.
    DenyNoRule = 3,
    /// A rule covers the address but not this protocol and port.
    DenyPort = 4,
    /// The destination lies in `denied_destinations`.
    DenyRule = 5,
    /// A protocol no rule can allow (neither TCP nor UDP).
    DenyProtocol = 6,
    /// Socket type or protocol that the policy does not let the workload create.
    DenySocketType = 7,
    /// The program's slot has no policy (not yet configured, or being torn down).
    DenyNoPolicy = 8,
    /// An internal error in the program (a map that should answer did not).
    DenyInternal = 9,
    /// A socket of another type was created because the policy allows it.
    AllowOtherSocket = 10,
    /// Allowed by a rule, but the destination's connection budget is used up
    /// (`rate_limits.per_destination` or the rule's `rate_limit`).
    RateLimitedDestination = 11,
    /// Allowed by a rule, but the workload's global budget of new connections is used up
    /// (`rate_limits.global`).
    RateLimitedGlobal = 12,
    /// Allowed by a rule, but the connection needs a new rate-limit bucket and the bucket
    /// table is full (or the kernel had no memory for it).
    RateLimitTableFull = 13,
    /// A socket option that would send packets somewhere other than the address the
    /// connect/sendmsg hooks judge: an IPv6 routing header (IPV6_RTHDR, settable without
    /// privileges: the packet goes to its first segment) or IPv4 options (IP_OPTIONS).
    DenySockopt = 14,
    /// The agent's start-up probe (a UDP connect from inside the cgroup to the destination the
    /// slot names as its probe) was denied by the policy, as it must be. Counted apart so that
    /// proving enforcement never reads as blocked egress.
    StartupProbe = 15,
    /// A DNS query (TCP or UDP to port 53, any address) was sent to the agent's DNS proxy
    /// instead of its destination.
    RedirectDns = 16,
    /// An address the agent's DNS proxy learned from an answer to an allowed name, with a
    /// (protocol, port) of a rule that allows the name.
    AllowLearned = 17,
    /// TCP or UDP to port 853 (DNS over TLS) while the policy blocks it (`block_dot`).
    DenyDot = 18,
    /// A known DNS-over-HTTPS provider's address while the policy blocks DoH (`block_doh`).
    DenyDoh = 19,
    /// A send on a connected socket that names no address (the hooks see one when control
    /// messages come with it): its destination was judged at connect.
    AllowConnected = 20,
    /// A DNS query or a send to the proxy while the slot's DNS proxy is not known to be alive
    /// (its agent stopped): denied rather than sent to whatever now holds the proxy's port.
    DnsProxyDown = 21,
    /// Loopback, to a port of the range DNS proxies use that is not this workload's own
    /// proxy: another workload's proxy, which must not answer for it.
    DenyOtherProxy = 22,
    /// An IPv6 packet with a routing header, dropped on its way out: the header would send it
    /// to its first segment, not the address the hooks judged. Kernels with Mobile IPv6 accept
    /// a type 2 header in ancillary data, which no socket option guard sees.
    DenyRoutingHeader = 23,
    /// A packet to a loopback address on its way out of a device other than loopback (an
    /// interface named in ancillary data or by a scope id can send it there): dropped.
    DenyLoopbackOffDevice = 24,
    /// A DNS query over IPv6 sent to a link-local resolver without connecting: its scope id
    /// would send even the redirected query out of that interface. Denied.
    DenyDnsLinkLocal = 25,
    /// A send with ancillary data on an IPv6 UDP socket connected to loopback: the data can
    /// name an interface that takes the packet onto the wire. Denied.
    DenyLoopbackAncillary = 26,
    /// A UDP `connect()` to a destination the policy does not allow. A UDP connect sends
    /// nothing (it only names the peer: glibc's getaddrinfo connects to every answer address
    /// to sort them, RFC 6724), so it is counted apart from attempts that would have carried
    /// data; any datagram to that destination is judged, and refused, on its own. The event
    /// keeps the policy's reason as its cause.
    UdpConnectRefused = 27,
    /// A DNS query to a resolver that is neither in `dns_policy.allowed_resolvers` (else the
    /// proxy's upstream servers) nor on loopback (a local stub resolver is the host's own): it
    /// went to the agent's proxy (which answers by the policy), never to that resolver. A
    /// blocked attempt, logged by the proxy with the resolver, the query name and the process.
    DnsUnauthorizedResolver = 28,
    /// A packet from a non-loopback peer to a listening TCP socket of the workload, with no
    /// `inbound` rule allowing that peer on that port: dropped, so the connection never
    /// exists. Counted per packet (a peer's SYN retransmissions count again).
    DenyInbound = 29,
    /// A packet from a non-loopback peer to a listening TCP socket, allowed by an `inbound`
    /// rule (the SYN and the handshake's last ACK both reach the listener).
    AllowInbound = 30,
    /// A packet the per-packet checks cannot read: shorter than its IP header (or its IPv6
    /// header chain), or neither IPv4 nor IPv6. Dropped on the way out (hook `skb_egress`) or
    /// in to a listening socket (`skb_ingress`): where it would go, or who sent it, cannot
    /// be judged. Only a raw socket can send one (see `egress_common::packet`).
    DenyPacketUnreadable = 31,
    /// A loopback destination at a TCP or UDP port the policy's `loopback.ports` does not
    /// list.
    DenyLoopbackPort = 32,
}

/// Room for more reasons without a layout change of the counter map: the lower half counts
/// decisions as made, the upper half ([`AUDIT_REASON_OFFSET`] and above) the denials that audit
/// mode let through, by the reason they would have been refused for.
pub const NUM_REASONS: u32 = 96;
/// Where the audited counters of a reason start within a slot's block.
pub const AUDIT_REASON_OFFSET: u32 = 48;
pub const NUM_PROTOS: u32 = 3;
/// One block of counters per slot, plus a last block for programs whose slot is out of range
/// (a load error that the kernel side still has to count).
pub const NUM_COUNTERS: u32 = (MAX_SLOTS + 1) * NUM_REASONS * NUM_PROTOS;
/// The block that counts decisions of programs with an out-of-range slot.
pub const INVALID_SLOT_BLOCK: u32 = MAX_SLOTS;

impl Reason {
    pub const ALL: [Reason; 33] = [
        Reason::AllowRule,
        Reason::AllowLoopback,
        Reason::AllowSocket,
        Reason::DenyNoRule,
        Reason::DenyPort,
        Reason::DenyRule,
        Reason::DenyProtocol,
        Reason::DenySocketType,
        Reason::DenyNoPolicy,
        Reason::DenyInternal,
        Reason::AllowOtherSocket,
        Reason::RateLimitedDestination,
        Reason::RateLimitedGlobal,
        Reason::RateLimitTableFull,
        Reason::DenySockopt,
        Reason::StartupProbe,
        Reason::RedirectDns,
        Reason::AllowLearned,
        Reason::DenyDot,
        Reason::DenyDoh,
        Reason::AllowConnected,
        Reason::DnsProxyDown,
        Reason::DenyOtherProxy,
        Reason::DenyRoutingHeader,
        Reason::DenyLoopbackOffDevice,
        Reason::DenyDnsLinkLocal,
        Reason::DenyLoopbackAncillary,
        Reason::UdpConnectRefused,
        Reason::DnsUnauthorizedResolver,
        Reason::DenyInbound,
        Reason::AllowInbound,
        Reason::DenyPacketUnreadable,
        Reason::DenyLoopbackPort,
    ];

    #[inline(always)]
    pub const fn allows(self) -> bool {
        matches!(
            self,
            Reason::AllowRule
                | Reason::AllowLoopback
                | Reason::AllowSocket
                | Reason::AllowOtherSocket
                | Reason::RedirectDns
                | Reason::AllowLearned
                | Reason::AllowConnected
                | Reason::AllowInbound
        )
    }

    /// Stable lowercase name, used in logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::AllowRule => "allowed_by_rule",
            Reason::AllowLoopback => "loopback",
            Reason::AllowSocket => "socket_created",
            Reason::DenyNoRule => "no_matching_rule",
            Reason::DenyPort => "port_not_allowed",
            Reason::DenyRule => "denied_by_rule",
            Reason::DenyProtocol => "protocol_not_allowed",
            Reason::DenySocketType => "socket_type_refused",
            Reason::DenyNoPolicy => "no_policy",
            Reason::DenyInternal => "internal_error",
            Reason::AllowOtherSocket => "other_socket_created",
            Reason::RateLimitedDestination => "rate_limited_destination",
            Reason::RateLimitedGlobal => "rate_limited_global",
            Reason::RateLimitTableFull => "rate_limit_table_full",
            Reason::DenySockopt => "socket_option_refused",
            Reason::StartupProbe => "startup_probe",
            Reason::RedirectDns => "dns_redirected",
            Reason::AllowLearned => "allowed_by_dns_answer",
            Reason::DenyDot => "dns_over_tls_blocked",
            Reason::DenyDoh => "doh_provider_blocked",
            Reason::AllowConnected => "connected_send",
            Reason::DnsProxyDown => "dns_proxy_down",
            Reason::DenyOtherProxy => "dns_proxy_of_another_workload",
            Reason::DenyRoutingHeader => "routing_header_dropped",
            Reason::DenyLoopbackOffDevice => "loopback_off_device_dropped",
            Reason::DenyDnsLinkLocal => "dns_link_local_refused",
            Reason::DenyLoopbackAncillary => "loopback_ancillary_refused",
            Reason::UdpConnectRefused => "udp_connect_refused",
            Reason::DnsUnauthorizedResolver => "dns_unauthorized_resolver",
            Reason::DenyInbound => "inbound_refused",
            Reason::AllowInbound => "inbound_allowed",
            Reason::DenyPacketUnreadable => "packet_unreadable",
            Reason::DenyLoopbackPort => "loopback_port_not_allowed",
        }
    }
}

/// Index of the counter for (slot, reason, protocol). Slots out of range share the
/// [`INVALID_SLOT_BLOCK`].
#[inline(always)]
pub const fn counter_index(slot: u32, reason: Reason, proto: Proto) -> u32 {
    let block = if slot < MAX_SLOTS {
        slot
    } else {
        INVALID_SLOT_BLOCK
    };
    (block * NUM_REASONS + reason as u32) * NUM_PROTOS + proto.counter_index()
}

/// Index of the counter of a denial with `reason` that audit mode let through.
#[inline(always)]
pub const fn counter_index_audit(slot: u32, reason: Reason, proto: Proto) -> u32 {
    let block = if slot < MAX_SLOTS {
        slot
    } else {
        INVALID_SLOT_BLOCK
    };
    (block * NUM_REASONS + AUDIT_REASON_OFFSET + reason as u32) * NUM_PROTOS + proto.counter_index()
}

/// `PerCpuArray<u64>`: the policy's decisions per rule, see [`rule_counter_index`].
pub const MAP_RULE_COUNTERS: &str = "EGRESS_RULE_COUNTERS";
/// Rules counted per list; rules past these are not counted per rule (the verdict counters
/// still count them), which keeps the map and the metric's `rule` label bounded.
pub const RULE_COUNTER_RULES: u32 = 256;
/// Blocks of [`RULE_COUNTER_RULES`] per slot, one per [`RuleCount`].
pub const RULE_COUNTER_KINDS: u32 = 3;
/// One block per slot plus the block of out-of-range slots.
pub const NUM_RULE_COUNTERS: u32 = (MAX_SLOTS + 1) * RULE_COUNTER_KINDS * RULE_COUNTER_RULES;

/// What a per-rule counter counts.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleCount {
    /// `allowed_destinations[i]` allowed the attempt (by its cidr or resolved addresses, or
    /// the addresses learned for its names).
    Allowed = 0,
    /// `allowed_destinations[i]` covered the address but denied the attempt: not its port
    /// or protocol (`port_not_allowed`), or over its rate limit.
    AllowedRuleDenied = 1,
    /// `denied_destinations[j]` denied the attempt.
    Denied = 2,
}

impl RuleCount {
    pub const ALL: [RuleCount; 3] = [
        RuleCount::Allowed,
        RuleCount::AllowedRuleDenied,
        RuleCount::Denied,
    ];

    /// Which per-rule counter a decision with `reason` counts under, if any: only decisions
    /// whose rule id indexes `allowed_destinations` or `denied_destinations`.
    #[inline(always)]
    pub const fn of(reason: Reason) -> Option<RuleCount> {
        match reason {
            Reason::AllowRule | Reason::AllowLearned => Some(RuleCount::Allowed),
            Reason::DenyPort
            | Reason::RateLimitedDestination
            | Reason::RateLimitedGlobal
            | Reason::RateLimitTableFull => Some(RuleCount::AllowedRuleDenied),
            Reason::DenyRule => Some(RuleCount::Denied),
            _ => None,
        }
    }
}

/// Index of the per-rule counter of (slot, kind, rule), or `None` for a rule past
/// [`RULE_COUNTER_RULES`].
#[inline(always)]
pub const fn rule_counter_index(slot: u32, kind: RuleCount, rule_id: u32) -> Option<u32> {
    if rule_id >= RULE_COUNTER_RULES {
        return None;
    }
    let block = if slot < MAX_SLOTS {
        slot
    } else {
        INVALID_SLOT_BLOCK
    };
    Some((block * RULE_COUNTER_KINDS + kind as u32) * RULE_COUNTER_RULES + rule_id)
}

// Every reason has its audited counter inside the slot's block.
const _: () = {
    assert!(Reason::ALL.len() as u32 <= AUDIT_REASON_OFFSET);
    assert!(AUDIT_REASON_OFFSET * 2 <= NUM_REASONS);
};

/// Which hook made a decision.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Connect4 = 1,
    Connect6 = 2,
    Sendmsg4 = 3,
    Sendmsg6 = 4,
    SockCreate = 5,
    /// setsockopt.
    Setsockopt = 6,
    /// A packet on its way out (the routing-header check, attached only where needed).
    SkbEgress = 7,
    /// A packet on its way in to a listening socket (the inbound check, always attached).
    SkbIngress = 8,
}

#[cfg(test)]
mod audit_tests {
    use super::*;

    #[test]
    fn rule_counters_are_distinct_and_bounded() {
        let mut seen = [0u32; 36];
        let mut n = 0;
        for slot in [0, 1, MAX_SLOTS - 1, MAX_SLOTS] {
            for kind in RuleCount::ALL {
                for rule in [0, 1, RULE_COUNTER_RULES - 1] {
                    let i = rule_counter_index(slot, kind, rule);
                    assert!(i.is_some_and(|i| i < NUM_RULE_COUNTERS));
                    let i = i.unwrap_or(u32::MAX);
                    assert!(!seen[..n].contains(&i));
                    seen[n] = i;
                    n += 1;
                }
                assert_eq!(rule_counter_index(slot, kind, RULE_COUNTER_RULES), None);
                assert_eq!(
                    rule_counter_index(slot, kind, crate::verdict::NO_RULE),
                    None
                );
            }
        }
        assert_eq!(RuleCount::of(Reason::DenyNoRule), None);
        assert_eq!(RuleCount::of(Reason::DenyDoh), None);
        assert_eq!(
            RuleCount::of(Reason::AllowLearned),
            Some(RuleCount::Allowed)
        );
    }

    #[test]
    fn audited_counters_are_apart_from_every_decision_counter_and_in_range() {
        let protos = [Proto::Tcp, Proto::Udp, Proto::Other];
        for slot in [0, MAX_SLOTS - 1, MAX_SLOTS + 5] {
            for reason in Reason::ALL {
                for proto in protos {
                    let audited = counter_index_audit(slot, reason, proto);
                    assert!(audited < NUM_COUNTERS);
                    for other in Reason::ALL {
                        for p in protos {
                            assert_ne!(audited, counter_index(slot, other, p));
                        }
                    }
                }
            }
        }
    }
}
