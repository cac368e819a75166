//! The rate-limit decision as the policy author reads it: one token bucket per budget,
//! holding up to `max_connections` and refilling continuously, computed straight from the
//! policy. It shares none of the kernel's arithmetic (no TAT, no atomics, no map keys); tests
//! hold the kernel to it.
//!
//! The refill rate is the one the kernel promises: one connection per
//! `ceil(time_window / max_connections)`, counted in nanoseconds.

use std::collections::HashMap;
use std::net::IpAddr;

use egress_common::{
    Decision, Dest, Family, Proto, Reason,
    ratelimit::{UDP_FLOW_IDLE_NS, UDP_FLOW_REFRESH_NS, interval_ns},
};

use super::compile::{destination_identity, destination_limit, global_identity, has_limits};
use crate::{HostPattern, Policy, RateLimit, Target};

/// Credit in nanoseconds of refill: a connection costs one interval, the bucket holds
/// `max_connections` intervals.
#[derive(Clone, Copy, Debug)]
struct Tokens {
    credit_ns: u128,
    at_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Budget {
    Destination(String, Option<IpAddr>),
    /// A wildcard rule's budget for one name.
    Name(String, String),
    Global(String),
}

/// The state of one workload's budgets over time.
#[derive(Clone, Debug, Default)]
pub struct Reference {
    buckets: HashMap<Budget, Tokens>,
    /// UDP destination -> last refresh.
    flows: HashMap<(IpAddr, u16), u64>,
}

fn ip(dst: &Dest) -> IpAddr {
    match dst.family {
        Family::V4 => [dst.addr[0], dst.addr[1], dst.addr[2], dst.addr[3]].into(),
        Family::V6 => dst.addr.into(),
    }
}

fn capacity(l: RateLimit) -> (u128, u128) {
    let cost = u128::from(interval_ns(l.max_connections, l.time_window_secs));
    (cost * u128::from(l.max_connections), cost)
}

impl Reference {
    pub fn new() -> Self {
        Self::default()
    }

    fn available(&self, budget: &Budget, l: RateLimit, now_ns: u64) -> bool {
        let (cap, cost) = capacity(l);
        let credit = self.buckets.get(budget).map_or(cap, |t| {
            (t.credit_ns + u128::from(now_ns.saturating_sub(t.at_ns))).min(cap)
        });
        credit >= cost
    }

    fn spend(&mut self, budget: Budget, l: RateLimit, now_ns: u64) {
        let (cap, cost) = capacity(l);
        let t = self.buckets.entry(budget).or_insert(Tokens {
            credit_ns: cap,
            at_ns: now_ns,
        });
        let credit = (t.credit_ns + u128::from(now_ns.saturating_sub(t.at_ns))).min(cap);
        *t = Tokens {
            credit_ns: credit.saturating_sub(cost),
            at_ns: now_ns,
        };
    }

    /// What `policy`'s rate limits make of the allowlist's `decision` for a connection to
    /// `dst` at `now_ns`, and the bookkeeping for it. Only connections a rule allowed are
    /// limited (loopback is out of scope). For UDP, a send to a destination address and port
    /// sent to within `UDP_FLOW_IDLE_NS` continues a flow and is not charged.
    pub fn judge(
        &mut self,
        policy: &Policy,
        decision: Decision,
        dst: &Dest,
        now_ns: u64,
    ) -> Decision {
        self.judge_named(policy, decision, dst, None, now_ns)
    }

    /// As [`Reference::judge`], for a connection to an address of the DNS name `name`: under a
    /// wildcard rule every name has its own destination budget.
    pub fn judge_named(
        &mut self,
        policy: &Policy,
        decision: Decision,
        dst: &Dest,
        name: Option<&str>,
        now_ns: u64,
    ) -> Decision {
        if !matches!(decision.reason, Reason::AllowRule | Reason::AllowLearned)
            || !has_limits(policy)
        {
            return decision;
        }
        let flow = (ip(dst), dst.port);
        if dst.proto == Proto::Udp
            && let Some(seen) = self.flows.get_mut(&flow)
            && now_ns.saturating_sub(*seen) < UDP_FLOW_IDLE_NS
        {
            if now_ns.saturating_sub(*seen) >= UDP_FLOW_REFRESH_NS {
                *seen = now_ns;
            }
            return decision;
        }
        let rule = decision.rule_id as usize;
        let destination = match (policy.allowed.get(rule), destination_limit(policy, rule)) {
            (Some(r), Some(l)) => {
                let identity = destination_identity(&r.target, l);
                let budget = match (&r.target, name) {
                    (Target::Cidr(_), _) => Budget::Destination(identity, Some(ip(dst))),
                    (Target::Host(HostPattern::Wildcard(_)), Some(n)) => {
                        Budget::Name(identity, n.to_ascii_lowercase())
                    }
                    _ => Budget::Destination(identity, None),
                };
                Some((budget, l))
            }
            _ => None,
        };
        let global = policy
            .rate_limits
            .as_ref()
            .and_then(|r| r.global)
            .map(|g| (Budget::Global(global_identity(g)), g));
        let denied = |reason| Decision {
            reason,
            rule_id: decision.rule_id,
        };
        if let Some((b, l)) = &destination
            && !self.available(b, *l, now_ns)
        {
            return denied(Reason::RateLimitedDestination);
        }
        if let Some((b, l)) = &global
            && !self.available(b, *l, now_ns)
        {
            return denied(Reason::RateLimitedGlobal);
        }
        for (b, l) in destination.into_iter().chain(global) {
            self.spend(b, l, now_ns);
        }
        if dst.proto == Proto::Udp {
            self.flows.insert(flow, now_ns);
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};

    use egress_common::ratelimit::{Take, TatCell, fresh, take};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::compile::Resolved;
    use crate::limits::compile_limits;
    use crate::parse_str;

    const SEC: u64 = 1_000_000_000;

    fn parse(text: &str) -> Policy {
        match parse_str(text, Path::new("t.yaml")) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    fn judge(r: &mut Reference, p: &Policy, dst: &Dest, now: u64) -> Reason {
        let d = crate::reference::decide(p, &Resolved::new(), crate::doh::testing::builtin(), dst);
        r.judge(p, d, dst, now).reason
    }

    fn tcp(a: [u8; 4], port: u16) -> Dest {
        Dest::v4(a, port, Proto::Tcp)
    }

    fn udp(a: [u8; 4], port: u16) -> Dest {
        Dest::v4(a, port, Proto::Udp)
    }

    const SEED_LIMITS: &str = "egress_policy:
  default_action: DENY
  allowed_destinations:
    - {cidr: 198.18.0.0/24, ports: [443, 53], protocols: [https, dns]}
  rate_limits:
    per_destination: {max_connections: 100, time_window: 60}
";

    /// MCP-NET-02 dynamic test case 4, as a burst: the 101st connection is blocked; then the
    /// budget refills at 100 per 60 s, one connection every 0.6 s. (A token bucket: spread
    /// over the minute, the refill lets more than 100 through.)
    #[test]
    fn the_101st_connection_in_a_minute_is_blocked_then_the_budget_refills() {
        let p = parse(SEED_LIMITS);
        let mut r = Reference::new();
        let dst = tcp([198, 18, 0, 2], 443);
        let t0 = 5 * SEC;
        for i in 0..100 {
            assert_eq!(
                judge(&mut r, &p, &dst, t0 + i * 1000),
                Reason::AllowRule,
                "{i}"
            );
        }
        assert_eq!(
            judge(&mut r, &p, &dst, t0 + 100_000),
            Reason::RateLimitedDestination
        );
        // Just under 0.6 s after the first: nothing yet. At 0.6 s: one, not two.
        assert_eq!(
            judge(&mut r, &p, &dst, t0 + 599_999_999),
            Reason::RateLimitedDestination
        );
        assert_eq!(judge(&mut r, &p, &dst, t0 + 600_000_000), Reason::AllowRule);
        assert_eq!(
            judge(&mut r, &p, &dst, t0 + 600_000_000),
            Reason::RateLimitedDestination
        );
        // After a minute the bucket is full again: 100, not more.
        let later = t0 + 600_000_000 + 3600 * SEC;
        let allowed = (0..150)
            .filter(|_| judge(&mut r, &p, &dst, later) == Reason::AllowRule)
            .count();
        assert_eq!(allowed, 100);
        // Another address of the CIDR rule has its own budget.
        assert_eq!(
            judge(&mut r, &p, &tcp([198, 18, 0, 3], 443), later),
            Reason::AllowRule
        );
    }

    #[test]
    fn udp_flows_are_charged_once_while_they_live() {
        let p = parse(
            SEED_LIMITS
                .replace("100", "3")
                .replace("60}", "3600}")
                .as_str(),
        );
        let mut r = Reference::new();
        let dns = udp([198, 18, 0, 53], 53);
        for i in 0..50 {
            assert_eq!(
                judge(&mut r, &p, &dns, SEC + i * SEC / 2),
                Reason::AllowRule,
                "{i}"
            );
        }
        // TCP to the same address shares the destination budget: the flow used one of three.
        let tcp_dns = tcp([198, 18, 0, 53], 53);
        for want in [
            Reason::AllowRule,
            Reason::AllowRule,
            Reason::RateLimitedDestination,
        ] {
            assert_eq!(judge(&mut r, &p, &tcp_dns, 26 * SEC), want);
        }
        // Still live 29 s after its last datagram; after the idle timeout the next datagram
        // starts a new flow and is charged (and the budget is used up).
        let last = SEC + 49 * SEC / 2;
        assert_eq!(
            judge(
                &mut r,
                &p,
                &dns,
                last + UDP_FLOW_IDLE_NS - UDP_FLOW_REFRESH_NS
            ),
            Reason::AllowRule
        );
        let idle = last + 2 * UDP_FLOW_IDLE_NS;
        assert_eq!(
            judge(&mut r, &p, &dns, idle),
            Reason::RateLimitedDestination
        );
    }

    #[test]
    fn the_global_budget_caps_the_sum_and_a_global_denial_costs_the_destination_nothing() {
        let p = parse(
            "egress_policy:
  default_action: DENY
  allowed_destinations:
    - {host: api.test, ports: [443], protocols: [https]}
    - {cidr: 198.18.1.0/24, ports: [443], protocols: [tcp], rate_limit: {max_connections: 3, time_window: 3600}}
  rate_limits:
    global: {max_new_connections: 5, time_window: 3600}
",
        );
        let mut r = Reference::new();
        let mut allowed = 0;
        for i in 0..4u8 {
            for _ in 0..2 {
                if judge(&mut r, &p, &tcp([198, 18, 1, i], 443), SEC) == Reason::AllowRule {
                    allowed += 1;
                }
            }
        }
        assert_eq!(allowed, 5);
        assert_eq!(
            judge(&mut r, &p, &tcp([198, 18, 1, 9], 443), SEC),
            Reason::RateLimitedGlobal
        );
    }

    #[test]
    fn each_name_under_a_wildcard_has_its_own_budget() {
        let p = parse(
            "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - host: \"*.example.com\"\n      ports: [443]\n      protocols: [tcp]\n  rate_limits:\n    per_destination: {max_connections: 100, time_window: 60}\n",
        );
        let mut r = Reference::new();
        let allowed = Decision {
            reason: Reason::AllowLearned,
            rule_id: 0,
        };
        for i in 0..200u8 {
            let name = format!("n{i}.example.com");
            let d = r.judge_named(&p, allowed, &tcp([198, 18, 1, i], 443), Some(&name), SEC);
            assert_eq!(d.reason, Reason::AllowLearned, "{name}");
        }
        // n0 has used one of its hundred; 99 more fit, the 100th after those does not.
        let n0 = |r: &mut Reference| {
            r.judge_named(
                &p,
                allowed,
                &tcp([198, 18, 1, 0], 443),
                Some("N0.example.com"),
                SEC,
            )
            .reason
        };
        for _ in 0..99 {
            assert_eq!(n0(&mut r), Reason::AllowLearned);
        }
        assert_eq!(n0(&mut r), Reason::RateLimitedDestination);
    }

    #[test]
    fn host_rules_share_one_budget_across_addresses() {
        let p = parse(
            "egress_policy:
  default_action: DENY
  allowed_destinations:
    - {host: api.test, ports: [443], protocols: [https], rate_limit: {max_connections: 3, time_window: 60}}
",
        );
        let mut resolved = Resolved::new();
        resolved.insert(
            "api.test".into(),
            vec![
                IpAddr::from([198, 18, 0, 10]),
                IpAddr::from([198, 18, 0, 11]),
            ],
        );
        let mut r = Reference::new();
        let mut verdicts = Vec::new();
        for a in [10, 11, 10, 11] {
            let dst = tcp([198, 18, 0, a], 443);
            let d = crate::reference::decide(&p, &resolved, crate::doh::testing::builtin(), &dst);
            verdicts.push(r.judge(&p, d, &dst, SEC).reason);
        }
        assert_eq!(
            verdicts,
            vec![
                Reason::AllowRule,
                Reason::AllowRule,
                Reason::AllowRule,
                Reason::RateLimitedDestination
            ]
        );
    }

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

    /// The kernel's GCRA arithmetic (`egress_common::ratelimit::take`) and this token bucket
    /// agree on random arrival sequences and limits, refill included.
    #[test]
    fn kernel_arithmetic_agrees_with_the_token_bucket() {
        let mut rng = StdRng::seed_from_u64(0x7a7e);
        let mut compared = 0;
        for _ in 0..300 {
            let max = rng.random_range(1..20u32);
            let window = rng.random_range(1..5u32);
            let p = parse(&format!(
                "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - {{cidr: \
                 198.18.0.0/24, ports: [1], protocols: [tcp]}}\n  rate_limits:\n    \
                 per_destination: {{max_connections: {max}, time_window: {window}}}\n"
            ));
            let limit = compile_limits(&p, 1)
                .limits
                .values()
                .next()
                .map(|l| l.destination)
                .unwrap_or_default();
            let dst = tcp([198, 18, 0, 1], 1);
            let mut r = Reference::new();
            let mut cell: Option<Cell> = None;
            let mut now = SEC;
            for _ in 0..200 {
                now += match rng.random_range(0..4) {
                    0 => 0,
                    1 => rng.random_range(0..limit.interval_ns),
                    2 => limit.interval_ns,
                    _ => rng.random_range(0..3 * u64::from(window) * SEC),
                };
                let kernel = match &cell {
                    None => {
                        let first = fresh(now, &limit).map_or(0, |b| b.tat_ns);
                        cell = Some(Cell(AtomicU64::new(first)));
                        true
                    }
                    Some(c) => take(c, now, &limit) == Take::Allowed,
                };
                let want = judge(&mut r, &p, &dst, now) == Reason::AllowRule;
                assert_eq!(kernel, want, "max {max} window {window} at {now}");
                compared += 1;
            }
        }
        assert_eq!(compared, 60_000);
    }
}
