//! The end of every hook: one place that counts the verdict, reports a denial, and returns
//! what the kernel expects. The counter is incremented whatever happens to the event.

use egress_common::{Hook, Proto, Reason, events::VERDICT_AUDIT};

use crate::counters;
use crate::events::{Attempt, emit};
use crate::maps::slot;

/// Verdicts the kernel expects from cgroup sock, sock_addr, sockopt and skb programs.
pub const ALLOW: i32 = 1;
pub const DENY: i32 = 0;

/// How a hook ends.
pub enum Verdict {
    /// Let through, counted under `reason`.
    Allow { reason: Reason, proto: Proto },
    /// Denied by the policy and let through by audit mode: counted as audited, reported.
    Audit(Attempt),
    /// Refused (or dropped), counted, reported.
    Deny(Attempt),
}

#[inline(always)]
pub fn finish(hook: Hook, verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Allow { reason, proto } => {
            counters::count(reason, proto);
            ALLOW
        }
        Verdict::Audit(mut attempt) => {
            counters::count_audit(attempt.reason, attempt.proto);
            attempt.verdict = VERDICT_AUDIT;
            emit(slot(), hook, &attempt);
            ALLOW
        }
        Verdict::Deny(attempt) => {
            counters::count(attempt.reason, attempt.proto);
            emit(slot(), hook, &attempt);
            DENY
        }
    }
}
