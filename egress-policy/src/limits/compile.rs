//! The pure step for rate limits: which budget each allow rule charges, and the global one.
//!
//! A budget's kernel identity (`Limit::budget`) is a hash of what the policy says about it —
//! the destination as written and the limit — so that it does not depend on the policy id:
//! a reload that keeps a budget keeps its bucket (and what it has used), a reload that
//! changes the destination or the numbers gets a new, full one.

use std::collections::BTreeMap;

use egress_common::ratelimit::{
    HAS_DESTINATION, HAS_GLOBAL, LIMIT_PER_ADDRESS, LIMIT_PER_NAME, Limit, LimitKey, RuleLimits,
};

use crate::compile::canonical_net;
use crate::{HostPattern, Policy, RateLimit, Target};

/// The limit entries of one policy id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledLimits {
    pub policy_id: u32,
    pub limits: BTreeMap<LimitKey, RuleLimits>,
}

/// Whether the policy limits any connection rate.
pub fn has_limits(policy: &Policy) -> bool {
    policy
        .rate_limits
        .as_ref()
        .is_some_and(|r| r.per_destination.is_some() || r.global.is_some())
        || policy.allowed.iter().any(|r| r.rate_limit.is_some())
}

/// The budget of connections to a destination of allow rule `rule`: its own `rate_limit`,
/// else `rate_limits.per_destination`.
pub fn destination_limit(policy: &Policy, rule: usize) -> Option<RateLimit> {
    let own = policy.allowed.get(rule)?.rate_limit;
    own.or_else(|| policy.rate_limits.as_ref()?.per_destination)
}

/// What a destination budget is, in words. A host name's addresses share one budget; a
/// CIDR (or an IP literal) has one budget per address. Entries naming the same destination
/// with the same limit share their budget.
pub fn destination_identity(target: &Target, limit: RateLimit) -> String {
    let what = match target {
        Target::Host(host @ HostPattern::Wildcard(_)) => format!("host {host} per name"),
        Target::Host(host) => format!("host {host}"),
        Target::Cidr(net) => format!("cidr {} per address", canonical_net(*net)),
    };
    format!(
        "destination {what}: {} per {} s",
        limit.max_connections, limit.time_window_secs
    )
}

pub fn global_identity(limit: RateLimit) -> String {
    format!(
        "global: {} per {} s",
        limit.max_connections, limit.time_window_secs
    )
}

/// FNV-1a, 64 bits: stable across runs and builds (unlike `std`'s hasher). Two different
/// budgets of one workload colliding (odds about n²/2⁶⁵) would share one bucket: stricter,
/// never looser.
pub fn budget_id(identity: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in identity.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn limit(identity: &str, l: RateLimit, flags: u32) -> Limit {
    Limit::new(
        budget_id(identity),
        l.max_connections,
        l.time_window_secs,
        flags,
    )
}

/// The limit entries of `policy` under `policy_id`: one per allow rule that charges any
/// budget (its destination budget, the global one, or both).
pub fn compile_limits(policy: &Policy, policy_id: u32) -> CompiledLimits {
    let global = policy
        .rate_limits
        .as_ref()
        .and_then(|r| r.global)
        .map(|g| limit(&global_identity(g), g, 0));
    let mut limits = BTreeMap::new();
    for (i, rule) in policy.allowed.iter().enumerate() {
        let Ok(rule_id) = u32::try_from(i) else {
            continue;
        };
        let destination = destination_limit(policy, i).map(|l| {
            let flags = match rule.target {
                Target::Cidr(_) => LIMIT_PER_ADDRESS,
                Target::Host(HostPattern::Wildcard(_)) => LIMIT_PER_NAME,
                Target::Host(HostPattern::Exact(_)) => 0,
            };
            limit(&destination_identity(&rule.target, l), l, flags)
        });
        if destination.is_none() && global.is_none() {
            continue;
        }
        let mut present = 0;
        if destination.is_some() {
            present |= HAS_DESTINATION;
        }
        if global.is_some() {
            present |= HAS_GLOBAL;
        }
        limits.insert(
            LimitKey::rule(policy_id, rule_id),
            RuleLimits {
                destination: destination.unwrap_or_default(),
                global: global.unwrap_or_default(),
                present,
                _pad: 0,
            },
        );
    }
    CompiledLimits { policy_id, limits }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::parse_str;

    fn parse(text: &str) -> Policy {
        match parse_str(text, Path::new("t.yaml")) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    const POLICY: &str = "egress_policy:
  default_action: DENY
  allowed_destinations:
    - {host: api.company.test, ports: [443], protocols: [https]}
    - {cidr: 198.18.0.0/24, ports: [80], protocols: [tcp], rate_limit: {max_connections: 5, time_window: 10}}
    - {host: 198.18.9.9, ports: [53], protocols: [dns]}
  rate_limits:
    per_destination: {max_connections: 100, time_window: 60}
    global: {max_new_connections: 1000, time_window: 60}
";

    #[test]
    fn every_rule_gets_its_budget_and_the_default_fills_in() {
        let p = parse(POLICY);
        let c = compile_limits(&p, 9);
        assert_eq!(c.limits.len(), 3);
        for l in c.limits.values() {
            assert_eq!(l.present, HAS_DESTINATION | HAS_GLOBAL);
        }
        let host = c.limits[&LimitKey::rule(9, 0)].destination;
        assert_eq!(
            (host.burst, host.interval_ns, host.flags),
            (100, 600_000_000, 0)
        );
        assert_eq!(
            host.budget,
            budget_id("destination host api.company.test: 100 per 60 s")
        );
        let cidr = c.limits[&LimitKey::rule(9, 1)].destination;
        assert_eq!(
            (cidr.burst, cidr.interval_ns, cidr.flags),
            (5, 2_000_000_000, LIMIT_PER_ADDRESS)
        );
        assert_eq!(cidr.span_ns, 4 * 2_000_000_000);
        // An IP literal is a single-address CIDR: per address.
        assert_eq!(
            c.limits[&LimitKey::rule(9, 2)].destination.flags,
            LIMIT_PER_ADDRESS
        );
        let global = c.limits[&LimitKey::rule(9, 2)].global;
        assert_eq!((global.burst, global.interval_ns), (1000, 60_000_000));
        assert!(has_limits(&p));
    }

    #[test]
    fn budget_ids_do_not_depend_on_the_policy_id_but_on_the_budget() {
        let p = parse(POLICY);
        let a = compile_limits(&p, 1);
        let b = compile_limits(&p, 2);
        let ids = |c: &CompiledLimits| {
            c.limits
                .values()
                .flat_map(|l| [l.destination.budget, l.global.budget])
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), ids(&b));
        // Changing one number changes that budget only.
        let changed = parse(&POLICY.replace("max_connections: 5,", "max_connections: 6,"));
        let c = compile_limits(&changed, 2);
        let (old, new) = (&b.limits, &c.limits);
        let rule = |i| LimitKey::rule(2, i);
        assert_ne!(
            new[&rule(1)].destination.budget,
            old[&rule(1)].destination.budget
        );
        assert_eq!(
            new[&rule(0)].destination.budget,
            old[&rule(0)].destination.budget
        );
        assert_eq!(new[&rule(1)].global.budget, old[&rule(1)].global.budget);
    }

    #[test]
    fn a_global_limit_alone_covers_every_rule() {
        let p = parse(
            "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - {cidr: \
             10.0.0.0/8, ports: [1], protocols: [tcp]}\n    - {host: a.test, ports: [2], \
             protocols: [tcp], rate_limit: {max_connections: 1, time_window: 1}}\n  \
             rate_limits:\n    global: {max_new_connections: 7, time_window: 7}\n",
        );
        let c = compile_limits(&p, 1);
        assert_eq!(c.limits[&LimitKey::rule(1, 0)].present, HAS_GLOBAL);
        assert_eq!(
            c.limits[&LimitKey::rule(1, 1)].present,
            HAS_DESTINATION | HAS_GLOBAL
        );
        assert_eq!(c.limits[&LimitKey::rule(1, 0)].global.burst, 7);
    }

    #[test]
    fn a_policy_without_limits_compiles_to_nothing() {
        let p = parse(
            "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - {cidr: \
             10.0.0.0/8, ports: [1], protocols: [tcp]}\n",
        );
        assert!(!has_limits(&p));
        assert!(compile_limits(&p, 1).limits.is_empty());
    }

    #[test]
    fn fnv1a_matches_the_published_vectors() {
        assert_eq!(budget_id(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(budget_id("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(budget_id("foobar"), 0x8594_4171_f739_67e8);
    }
}
