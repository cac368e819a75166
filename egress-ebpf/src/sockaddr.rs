//! connect and sendmsg: the hook reads what the call names, asks the shared core
//! (`egress_common::verdict`: the send rules, the DNS redirect and its guards, then the policy
//! over the maps) and carries out what it says: a rewrite to the DNS proxy, a loopback source.

use aya_ebpf::programs::SockAddrContext;
use egress_common::{
    Decision, Dest, Hook,
    verdict::{NO_RULE, Outcome, Source, Step, conclude, connected_send, refusal, route, settle},
};

use crate::events::Attempt;
use crate::finish::{Verdict, finish};
use crate::{counters, dns, tables};

#[inline(always)]
pub fn judge(ctx: &SockAddrContext, hook: Hook, dst: Dest) -> i32 {
    let cfg = match tables::slot_config() {
        Ok(cfg) => cfg,
        Err(reason) => {
            let decision = Decision {
                reason,
                rule_id: NO_RULE,
            };
            return carry_out(ctx, hook, &dst, refusal(hook, &dst, decision));
        }
    };
    let step = match hook {
        Hook::Sendmsg4 | Hook::Sendmsg6 if dns::no_address(ctx) => connected_send(
            hook,
            dns::peer_is_loopback(ctx, matches!(hook, Hook::Sendmsg6)),
        ),
        _ => route(hook, &cfg, &dst, dns::alive, || dns::authorized(&dst)),
    };
    if let Step::Redirect { port, .. } = step {
        match hook {
            Hook::Connect4 | Hook::Sendmsg4 => dns::redirect4(ctx, &dst, port),
            _ => dns::redirect6(ctx, &dst, port),
        }
    }
    let outcome = match conclude(hook, &dst, step) {
        Some(outcome) => outcome,
        None => {
            let decision = tables::judge_dest(&cfg, &dst);
            counters::count_rule(&decision);
            settle(hook, &cfg, &dst, decision)
        }
    };
    carry_out(ctx, hook, &dst, outcome)
}

/// Sets the source the outcome asks for and ends the hook. `finish` is called in each arm,
/// with the kind of verdict known there: one merged call would have the verifier walk the
/// counting and the event for every path that reaches it.
#[inline(always)]
fn carry_out(ctx: &SockAddrContext, hook: Hook, dst: &Dest, outcome: Outcome) -> i32 {
    match outcome {
        Outcome::Allow { reason, source } => {
            set_source(ctx, hook, source);
            finish(
                hook,
                Verdict::Allow {
                    reason,
                    proto: dst.proto,
                },
            )
        }
        Outcome::Audit {
            reason,
            cause,
            rule_id,
            source,
        } => {
            set_source(ctx, hook, source);
            let mut attempt = Attempt::to(dst, reason, rule_id);
            attempt.cause = cause;
            finish(hook, Verdict::Audit(attempt))
        }
        Outcome::Deny {
            reason,
            cause,
            rule_id,
        } => {
            let mut attempt = Attempt::to(dst, reason, rule_id);
            attempt.cause = cause;
            finish(hook, Verdict::Deny(attempt))
        }
    }
}

/// Matched with the hook (a constant of each program once inlined), so that each program
/// holds only the write its own context allows: sendmsg4 the IPv4 source, sendmsg6 the IPv6
/// one, connects none. The verifier refuses a write whose offset depends on a branch.
#[inline(always)]
fn set_source(ctx: &SockAddrContext, hook: Hook, source: Source) {
    match (hook, source) {
        (Hook::Sendmsg4, Source::Loopback4) => dns::loopback_source4(ctx),
        (Hook::Sendmsg6, Source::Loopback6) => dns::loopback_source6(ctx),
        _ => {}
    }
}
