//! Entry points only. Every hook reads what it is given, asks the one policy core
//! (`egress_common::verdict`, `egress_common::packet`, `egress_common::inbound`) and ends in
//! [`finish::finish`], which counts, reports and returns the verdict (connect and sendmsg do
//! so in `sockaddr`, once per kind of outcome).
//!
//! # Failure table
//!
//! Every path on which a program cannot decide as usual, what it returns, what it counts
//! (the reason's counter of the slot, or of the out-of-range block) and where a test holds it.
//!
//! | Path | Verdict | Counter | Test |
//! |------|---------|---------|------|
//! | connect/sendmsg/sock_create: the program's slot is outside `EGRESS_SLOTS` | deny | `internal_error` | `kernel_errors::out_of_range_slot_denies_everything_and_counts_internal_error` |
//! | connect/sendmsg/sock_create: the slot has no policy (policy id 0) | deny | `no_policy` | `kernel_errors::unconfigured_slot_denies_everything_and_counts_no_policy` |
//! | sendmsg without an address (connected socket, ancillary data), IPv6 peer on loopback | deny | `loopback_ancillary_refused` | `agreement::kernel_agrees_with_reference_on_connected_sends_and_link_local_dns`, `dns_hardening::an_interface_named_per_message_cannot_take_loopback_traffic_onto_the_wire` |
//! | sendmsg without an address, IPv4 peer on loopback | allow, source 127.0.0.1 | `connected_send` | the same two |
//! | sendmsg6 DNS query to a link-local resolver (its scope id leaves the host) | deny | `dns_link_local_refused` | the same two |
//! | DNS query, or a send to the proxy, while the proxy is not known alive | deny | `dns_proxy_down` | `dns_hardening::dns_is_denied_once_the_proxys_agent_is_gone_and_a_squatter_is_never_believed` |
//! | loopback at another workload's proxy port | deny | `dns_proxy_of_another_workload` | `dns_hardening::a_workload_cannot_use_another_workloads_dns_proxy` |
//! | the redirected query's origin cannot be recorded (`EGRESS_DNS_ORIGIN` insert fails) | allow (redirected); the answer shows the proxy's address and the resolver drops it | `dns_redirected` | none: the map is an LRU, an insert only fails without memory |
//! | more than `MAX_EXPIRED_SKIPS` expired entries cover the address | deny | `no_matching_rule` | `verdict::tests::a_lookup_looks_past_at_most_max_expired_skips_expired_entries_then_denies` (egress-common) |
//! | a rate-limit bucket cannot be created (table full, no memory) | deny | `rate_limit_table_full` | `ratelimit::a_full_bucket_table_refuses_new_destinations_and_resets_no_budget` |
//! | a rate-limit entry the agent never writes (no budget, no interval) | deny | `rate_limited_destination` | `ratelimit::a_limit_entry_the_agent_never_writes_denies` |
//! | the UDP flow record cannot be written | allow; the flow's next datagram is charged again | the rule's allow counter | none: an LRU map |
//! | audit mode: the start-up probe, a slot without a policy, an internal error, a guard of the DNS proxy or the send rules | deny (never audited) | as above | `verdict::tests::settling_a_decision_sets_loopback_sources_and_audits_only_the_policys_denials` (egress-common); `audit::audit_mode_lets_denied_connections_through_and_logs_them_with_verdict_audit` (the probe still refused) |
//! | recvmsg/getpeername: no slot, no proxy, or the proxy not alive | allow (the kernel requires 1), address left as it is | none: nothing is decided | `dns_hardening::a_socket_connected_to_the_proxy_is_not_answered_by_a_squatter_after_its_agent_stops` |
//! | skb egress: an IPv4 or IPv6 header shorter than its destination, an IPv6 extension header cut off, or neither IPv4 nor IPv6 | drop | `packet_unreadable` (protocol other) | `packet::tests` (egress-common); `kernel_errors::a_truncated_raw_packet_is_dropped_and_counted_as_unreadable` (a raw socket's cut-off header chain) |
//! | skb egress: more than four extension headers before the payload | drop | `routing_header_dropped` | `packet::tests::ipv6_header_chains_are_read_to_the_routing_header_or_dropped` (egress-common) |
//! | skb ingress: the packet names no socket (cannot happen: the socket's cgroup runs the program) | drop | `packet_unreadable` | none: unreachable by construction |
//! | skb ingress to a listener: source address unreadable, or neither IPv4 nor IPv6 | drop | `packet_unreadable` (tcp) | `packet::tests::a_listeners_peer_is_its_source_or_the_packet_is_unreadable` (egress-common); the TCP stack parsed the header before, so no peer can send one |
//! | skb ingress to a listener: no slot, or no policy | drop | `internal_error` / `no_policy` (tcp) | `inbound::tests::no_rules_refuse_every_peer_but_loopback` (egress-agent, `decide_inbound` without a policy) |
//! | the event ring buffer is full | the verdict stands; the event is lost | `EGRESS_EVENTS_LOST` | `events::a_million_denied_connects_are_all_denied_and_counted_exactly_with_a_small_log` |
//!
//! Packets to sockets other than listeners (skb ingress), and readable packets the egress
//! check finds nothing wrong with, pass uncounted: they are the hot path.
#![no_std]
#![no_main]
// BPF atomic instructions for the rate-limit buckets (see ratelimit.rs): the bpf target has no
// compare-and-exchange in core::sync::atomic.
#![feature(asm_experimental_arch)]

mod backstop;
mod context;
mod counters;
mod dns;
mod events;
mod finish;
mod inbound;
mod maps;
mod ratelimit;
mod sockaddr;
mod sockopt;
mod tables;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockoptContext},
};
use egress_common::{Hook, Proto, Reason};

use crate::events::{Attempt, Owner};
use crate::finish::{ALLOW, Verdict, finish};

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    let hook = Hook::Connect4;
    sockaddr::judge(&ctx, hook, context::dest4(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    let hook = Hook::Connect6;
    sockaddr::judge(&ctx, hook, context::dest6(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    let hook = Hook::Sendmsg4;
    sockaddr::judge(&ctx, hook, context::dest4(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6(ctx: SockAddrContext) -> i32 {
    let hook = Hook::Sendmsg6;
    sockaddr::judge(&ctx, hook, context::dest6(&ctx))
}

/// Answers from the DNS proxy appear to come from the address the query was sent to, while the
/// proxy is alive (after its agent stopped, whatever answers from its port shows as itself,
/// and resolvers drop it). These hooks cannot refuse anything (the kernel requires 1).
#[cgroup_sock_addr(recvmsg4)]
pub fn egress_recvmsg4(ctx: SockAddrContext) -> i32 {
    dns::restore(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn egress_recvmsg6(ctx: SockAddrContext) -> i32 {
    dns::restore(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    dns::restore(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    dns::restore(&ctx, true);
    ALLOW
}

#[cgroup_sock(sock_create)]
pub fn egress_sock_create(ctx: SockContext) -> i32 {
    let s = tables::judge_socket(&ctx);
    let verdict = if s.reason.allows() {
        Verdict::Allow {
            reason: s.reason,
            proto: s.proto,
        }
    } else {
        Verdict::Deny(Attempt {
            family: s.family,
            sock_type: s.sock_type,
            sock_protocol: s.sock_protocol,
            ..Attempt::nowhere(s.reason, s.proto)
        })
    };
    finish(Hook::SockCreate, verdict)
}

/// Socket options that would route packets past the address the hooks judge are refused.
#[cgroup_sockopt(setsockopt)]
pub fn egress_setsockopt(ctx: SockoptContext) -> i32 {
    let (level, optname) = sockopt::read(&ctx);
    if !sockopt::reroutes(level, optname) {
        return ALLOW;
    }
    let verdict = Verdict::Deny(Attempt {
        sock_type: level as u32,
        sock_protocol: optname as u32,
        ..Attempt::nowhere(Reason::DenySockopt, Proto::Other)
    });
    finish(Hook::Setsockopt, verdict)
}

/// Per packet, on the way out: a loopback destination leaving through another device, IPv6
/// routing headers and unreadable headers are dropped (see backstop.rs).
#[cgroup_skb(egress)]
pub fn egress_skb(ctx: SkBuffContext) -> i32 {
    let Some(dropped) = backstop::check(&ctx) else {
        return ALLOW;
    };
    let attempt = Attempt::to(
        &dropped.dst,
        dropped.reason,
        egress_common::verdict::NO_RULE,
    );
    finish(Hook::SkbEgress, Verdict::Deny(attempt))
}

/// Per packet, on the way in: a connection attempt from a peer no `inbound` rule allows is
/// dropped at the listening socket (see inbound.rs). Every other packet passes.
#[cgroup_skb(ingress)]
pub fn egress_skb_ingress(ctx: SkBuffContext) -> i32 {
    let Some(judged) = inbound::check(&ctx) else {
        return ALLOW;
    };
    let decision = judged.decision;
    let verdict = if decision.allowed() {
        Verdict::Allow {
            reason: decision.reason,
            proto: Proto::Tcp,
        }
    } else {
        let (uid, cgroup_id) = inbound::owner(&ctx);
        Verdict::Deny(Attempt {
            owner: Owner::Socket { uid, cgroup_id },
            ..Attempt::to(&judged.peer, decision.reason, decision.rule_id)
        })
    };
    finish(Hook::SkbIngress, verdict)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
