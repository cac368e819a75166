//! Entry points only. Every hook reads its destination, then asks the one policy core.
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
mod inbound;
mod ratelimit;
mod sockopt;
mod tables;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockoptContext},
};
use egress_common::Hook;

/// Verdicts the kernel expects from cgroup sock and sock_addr programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    judge_addr(&ctx, Hook::Connect4, context::dest4(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    judge_addr(&ctx, Hook::Connect6, context::dest6(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    judge_addr(&ctx, Hook::Sendmsg4, context::dest4(&ctx))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6(ctx: SockAddrContext) -> i32 {
    judge_addr(&ctx, Hook::Sendmsg6, context::dest6(&ctx))
}

/// Answers from the DNS proxy appear to come from the address the query was sent to, while the
/// proxy is alive (after its agent stopped, whatever answers from its port shows as itself,
/// and resolvers drop it). These hooks cannot refuse anything (the kernel requires 1).
#[cgroup_sock_addr(recvmsg4)]
pub fn egress_recvmsg4(ctx: SockAddrContext) -> i32 {
    if let Ok(cfg) = tables::slot_config()
        && cfg.dns_port != 0
        && dns::alive()
    {
        dns::restore4(&ctx, cfg.dns_port);
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn egress_recvmsg6(ctx: SockAddrContext) -> i32 {
    if let Ok(cfg) = tables::slot_config()
        && cfg.dns_port != 0
        && dns::alive()
    {
        dns::restore6(&ctx, cfg.dns_port);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Ok(cfg) = tables::slot_config()
        && cfg.dns_port != 0
        && dns::alive()
    {
        dns::restore4(&ctx, cfg.dns_port);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Ok(cfg) = tables::slot_config()
        && cfg.dns_port != 0
        && dns::alive()
    {
        dns::restore6(&ctx, cfg.dns_port);
    }
    ALLOW
}

#[cgroup_sock(sock_create)]
pub fn egress_sock_create(ctx: SockContext) -> i32 {
    let s = tables::judge_socket(&ctx);
    counters::count(s.reason, s.proto);
    if s.reason.allows() {
        return ALLOW;
    }
    let attempt = events::Attempt {
        hook: Hook::SockCreate,
        reason: s.reason,
        cause: s.reason,
        rule_id: egress_common::verdict::NO_RULE,
        proto: s.proto,
        family: s.family,
        addr: [0; 16],
        port: 0,
        sock_type: s.sock_type,
        sock_protocol: s.sock_protocol,
        verdict: egress_common::events::VERDICT_DENY,
    };
    events::emit(tables::slot(), &attempt);
    DENY
}

/// Socket options that would route packets past the address the hooks judge are refused.
#[cgroup_sockopt(setsockopt)]
pub fn egress_setsockopt(ctx: SockoptContext) -> i32 {
    let (level, optname) = sockopt::read(&ctx);
    if !sockopt::reroutes(level, optname) {
        return ALLOW;
    }
    let reason = egress_common::Reason::DenySockopt;
    counters::count(reason, egress_common::Proto::Other);
    let dst = egress_common::Dest::v4([0; 4], 0, egress_common::Proto::Other);
    let mut attempt = events::Attempt::to(
        Hook::Setsockopt,
        &dst,
        reason,
        egress_common::verdict::NO_RULE,
    );
    attempt.family = 0;
    attempt.sock_type = level as u32;
    attempt.sock_protocol = optname as u32;
    events::emit(tables::slot(), &attempt);
    DENY
}

/// Per packet, on the way out: a loopback destination leaving through another device, and
/// IPv6 routing headers, are dropped (see backstop.rs).
#[cgroup_skb(egress)]
pub fn egress_skb(ctx: SkBuffContext) -> i32 {
    let Some(drop) = backstop::check(&ctx) else {
        return ALLOW;
    };
    let (reason, dest) = match drop {
        backstop::Drop::LoopbackOffDevice { v6: false, dst } => (
            egress_common::Reason::DenyLoopbackOffDevice,
            egress_common::Dest::v4(
                [dst[0], dst[1], dst[2], dst[3]],
                0,
                egress_common::Proto::Other,
            ),
        ),
        backstop::Drop::LoopbackOffDevice { v6: true, dst } => (
            egress_common::Reason::DenyLoopbackOffDevice,
            egress_common::Dest::v6(dst, 0, egress_common::Proto::Other),
        ),
        backstop::Drop::RoutingHeader { dst } => (
            egress_common::Reason::DenyRoutingHeader,
            egress_common::Dest::v6(dst, 0, egress_common::Proto::Other),
        ),
    };
    counters::count(reason, egress_common::Proto::Other);
    events::emit(
        tables::slot(),
        &events::Attempt::to(
            Hook::SkbEgress,
            &dest,
            reason,
            egress_common::verdict::NO_RULE,
        ),
    );
    DENY
}

/// Per packet, on the way in: a connection attempt from a peer no `inbound` rule allows is
/// dropped at the listening socket (see inbound.rs). Every other packet passes.
#[cgroup_skb(ingress)]
pub fn egress_skb_ingress(ctx: SkBuffContext) -> i32 {
    let Some(judged) = inbound::check(&ctx) else {
        return ALLOW;
    };
    counters::count(judged.decision.reason, egress_common::Proto::Tcp);
    if judged.decision.allowed() {
        return ALLOW;
    }
    let (uid, cgroup_id) = inbound::owner(&ctx);
    events::emit_for_socket(
        tables::slot(),
        &events::Attempt::to(
            Hook::SkbIngress,
            &judged.peer,
            judged.decision.reason,
            judged.decision.rule_id,
        ),
        uid,
        cgroup_id,
    );
    DENY
}

/// A connect or sendmsg: a DNS query goes to the proxy; anything else is decided, counted,
/// and a denial reported. The counter is incremented whatever happens to the event.
#[inline(always)]
fn judge_addr(ctx: &SockAddrContext, hook: Hook, dst: egress_common::Dest) -> i32 {
    use egress_common::{Reason, verdict::DnsRoute};
    let send4 = matches!(hook, Hook::Sendmsg4);
    let send6 = matches!(hook, Hook::Sendmsg6);
    // Set only for the policy's own decision: the DNS proxy's guards stay enforced.
    let mut audit = false;
    let decision = match tables::slot_config() {
        Ok(cfg) => {
            if (send4 || send6) && dns::no_address(ctx) {
                // A send on a connected socket with ancillary data: the connect was judged.
                // A loopback peer (the proxy, say) keeps a loopback source over IPv4, which
                // no interface named in the data can take off the host; IPv6 has no such
                // rule, so there the send is refused.
                if dns::peer_is_loopback(ctx, send6) {
                    if send6 {
                        return deny(
                            hook,
                            &dst,
                            egress_common::Decision {
                                reason: Reason::DenyLoopbackAncillary,
                                rule_id: egress_common::verdict::NO_RULE,
                            },
                        );
                    }
                    dns::loopback_source4(ctx);
                }
                counters::count(Reason::AllowConnected, dst.proto);
                return ALLOW;
            }
            match egress_common::verdict::dns_route(&cfg, &dst, dns::alive, || {
                dns::authorized(&dst)
            }) {
                DnsRoute::Redirect | DnsRoute::RedirectUnauthorized
                    if send6 && dst.is_link_local() =>
                {
                    // A scope id would take even the redirected query out of that interface.
                    egress_common::Decision {
                        reason: Reason::DenyDnsLinkLocal,
                        rule_id: egress_common::verdict::NO_RULE,
                    }
                }
                route @ (DnsRoute::Redirect | DnsRoute::RedirectUnauthorized) => {
                    // A query to a resolver the slot does not authorize goes to the proxy's
                    // second port: answered by the policy all the same, and reported there.
                    let (port, reason) = if matches!(route, DnsRoute::Redirect) {
                        (cfg.dns_port, Reason::RedirectDns)
                    } else {
                        (
                            cfg.dns_port
                                .wrapping_add(egress_common::maps::DNS_UNAUTHORIZED_PORT_OFFSET),
                            Reason::DnsUnauthorizedResolver,
                        )
                    };
                    match hook {
                        Hook::Connect4 | Hook::Sendmsg4 => dns::redirect4(ctx, &dst, port),
                        _ => dns::redirect6(ctx, &dst, port),
                    }
                    loopback_source(ctx, hook, &dst);
                    counters::count(reason, dst.proto);
                    return ALLOW;
                }
                DnsRoute::Proxy => {
                    loopback_source(ctx, hook, &dst);
                    counters::count(Reason::RedirectDns, dst.proto);
                    return ALLOW;
                }
                DnsRoute::ProxyDown => egress_common::Decision {
                    reason: Reason::DnsProxyDown,
                    rule_id: egress_common::verdict::NO_RULE,
                },
                DnsRoute::OtherProxy => egress_common::Decision {
                    reason: Reason::DenyOtherProxy,
                    rule_id: egress_common::verdict::NO_RULE,
                },
                DnsRoute::Judge => {
                    audit = cfg.flags & egress_common::maps::SLOT_AUDIT != 0;
                    let decision = tables::judge_dest(&cfg, &dst);
                    counters::count_rule(&decision);
                    decision
                }
            }
        }
        Err(reason) => egress_common::Decision {
            reason,
            rule_id: egress_common::verdict::NO_RULE,
        },
    };
    if decision.allowed() {
        counters::count(decision.reason, dst.proto);
        if dst.is_loopback() {
            loopback_source(ctx, hook, &dst);
        }
        return ALLOW;
    }
    // The start-up probe proves enforcement is attached: audit mode refuses it too. A slot
    // without a policy fails closed whatever its flags say.
    if audit
        && !matches!(
            decision.reason,
            Reason::StartupProbe | Reason::DenyNoPolicy | Reason::DenyInternal
        )
    {
        audited(hook, &dst, decision);
        if dst.is_loopback() {
            loopback_source(ctx, hook, &dst);
        }
        return ALLOW;
    }
    deny(hook, &dst, decision)
}

/// Counts and reports a denial that audit mode lets through, under the reason it would have
/// been refused for.
#[inline(always)]
fn audited(hook: Hook, dst: &egress_common::Dest, decision: egress_common::Decision) {
    let connect = matches!(hook, Hook::Connect4 | Hook::Connect6);
    let (reason, cause) = egress_common::verdict::classify_denial(connect, dst, decision.reason);
    counters::count_audit(reason, dst.proto);
    let mut attempt = events::Attempt::to(hook, dst, reason, decision.rule_id);
    attempt.cause = cause;
    attempt.verdict = egress_common::events::VERDICT_AUDIT;
    events::emit(tables::slot(), &attempt);
}

/// Counts and reports a denial (a UDP connect, which carries no data, apart).
#[inline(always)]
fn deny(hook: Hook, dst: &egress_common::Dest, decision: egress_common::Decision) -> i32 {
    let connect = matches!(hook, Hook::Connect4 | Hook::Connect6);
    let (reason, cause) = egress_common::verdict::classify_denial(connect, dst, decision.reason);
    counters::count(reason, dst.proto);
    let mut attempt = events::Attempt::to(hook, dst, reason, decision.rule_id);
    attempt.cause = cause;
    events::emit(tables::slot(), &attempt);
    DENY
}

/// A send to loopback (or to the proxy on loopback) gets a loopback source, so no interface
/// named in ancillary data or a scope id can take it onto the wire. Connects need none: the
/// options that bind a socket to a device are refused at setsockopt.
#[inline(always)]
fn loopback_source(ctx: &SockAddrContext, hook: Hook, dst: &egress_common::Dest) {
    match hook {
        Hook::Sendmsg4 => dns::loopback_source4(ctx),
        // sendmsg6 sees IPv6 destinations (mapped ones run sendmsg4); a mapped one here
        // would need an IPv4 source, so it is left alone.
        Hook::Sendmsg6 if dst.family == egress_common::Family::V6 => dns::loopback_source6(ctx),
        _ => {}
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
