//! The kernel agrees with the reference: random policies with budgets, random sequences.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use egress_agent::compile::Resolved;
use egress_agent::{ratelimit, reference};
use egress_common::{Dest, Reason};
use egress_tests::netns::Netns;
use libc::EPERM;
use rand::{Rng, rngs::StdRng};

use super::{agent, parse_policy, policy_yaml, rule};
use crate::{random_op_to, seeded_rng, testbed};

fn random_v4(rng: &mut StdRng) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, rng.random_range(0..2), rng.random_range(0..6))
}

fn random_v6(rng: &mut StdRng) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xe9, 0, 0, 0, 0, 0, rng.random_range(0..6))
}

/// `round` chooses the budgets in force, so that every kind occurs: even rounds have a
/// global budget, odd ones a default per-destination budget, and most rules their own.
fn random_limited_policy(rng: &mut StdRng, round: usize) -> String {
    let protos = ["tcp", "udp", "dns", "tcp, udp"];
    let mut rules = Vec::new();
    for _ in 0..rng.random_range(4..9) {
        let (key, target) = match rng.random_range(0..4) {
            0 => ("host", random_v4(rng).to_string()),
            1 => (
                "cidr",
                ipnet::Ipv4Net::new(random_v4(rng), [23, 24, 30][rng.random_range(0..3)])
                    .unwrap()
                    .trunc()
                    .to_string(),
            ),
            2 => ("host", random_v6(rng).to_string()),
            _ => (
                "cidr",
                ipnet::Ipv6Net::new(random_v6(rng), [64, 125, 126][rng.random_range(0..3)])
                    .unwrap()
                    .trunc()
                    .to_string(),
            ),
        };
        let mut ports: Vec<u16> = (0..rng.random_range(1..3))
            .map(|_| 1000 + rng.random_range(0..2))
            .collect();
        ports.sort();
        ports.dedup();
        let limit = rng.random_bool(0.7).then(|| (rng.random_range(1..6), 3600));
        rules.push(rule(
            key,
            &target,
            &ports,
            protos[rng.random_range(0..protos.len())],
            limit,
        ));
    }
    let per_destination = (!round.is_multiple_of(2)).then(|| (rng.random_range(2..8), 3600));
    let global = (round.is_multiple_of(2)).then(|| (rng.random_range(10..40), 3600));
    policy_yaml(&rules, per_destination, global)
}

/// One probe op and the destination the reference judges.
fn random_op(rng: &mut StdRng) -> (String, Dest) {
    let port = 1000 + rng.random_range(0..2);
    let (addr, v6_socket): (IpAddr, bool) = match rng.random_range(0..10) {
        0 => (Ipv4Addr::new(127, 0, 0, 1).into(), false),
        1..=6 => (random_v4(rng).into(), rng.random_bool(0.3)),
        _ => (random_v6(rng).into(), true),
    };
    random_op_to(rng, addr, v6_socket, port)
}

/// Random policies with per-rule, default and global budgets; random sequences of TCP
/// connects, UDP connects and UDP sends (IPv4, IPv6, mapped, loopback). The kernel refuses
/// exactly the attempts the reference (plain token buckets read off the policy) refuses.
/// Windows are an hour, so nothing refills while the sequence runs and the order alone
/// decides.
#[test]
fn kernel_rate_limits_agree_with_the_reference() {
    let Some(tb) = testbed() else { return };
    let mut rng = seeded_rng(0x5eed_7a7e);
    let isolated = Netns::new("rlagree").expect("namespace");
    let mut tally: BTreeMap<&'static str, usize> = BTreeMap::new();
    for round in 0..4 {
        let yaml = random_limited_policy(&mut rng, round);
        let policy = parse_policy(&tb, &yaml);
        let ops: Vec<(String, Dest)> = (0..500).map(|_| random_op(&mut rng)).collect();
        let args: Vec<&str> = ops.iter().map(|(op, _)| op.as_str()).collect();
        let out = agent(&tb, &yaml)
            .args(&args)
            .run_in(&isolated)
            .expect("agent run");
        assert_eq!(
            out.exit_code(),
            Some(0),
            "round {round}: {}",
            out.describe()
        );
        assert_eq!(
            out.results.len(),
            ops.len(),
            "round {round}: {}",
            out.describe()
        );
        let mut rates = ratelimit::reference::Reference::new();
        let mut disagreements = Vec::new();
        for ((op, dst), result) in ops.iter().zip(&out.results) {
            let base = reference::decide(
                &policy,
                &Resolved::new(),
                egress_agent::dns::doh_list(),
                dst,
            );
            let want = rates.judge(&policy, base, dst, 0);
            *tally.entry(want.reason.as_str()).or_default() += 1;
            if result.failed_with(EPERM) == want.allowed() {
                disagreements.push(format!(
                    "{op}: reference {:?}, kernel {:?}",
                    want.reason, result.error
                ));
            }
        }
        assert!(
            disagreements.is_empty(),
            "round {round}: {} disagreements under\n{yaml}\nfirst: {:#?}",
            disagreements.len(),
            &disagreements[..disagreements.len().min(10)]
        );
    }
    eprintln!("reference verdicts: {tally:?}");
    for reason in [
        Reason::AllowRule,
        Reason::RateLimitedDestination,
        Reason::RateLimitedGlobal,
    ] {
        assert!(
            tally.get(reason.as_str()).copied().unwrap_or(0) >= 10,
            "too few {reason:?} to mean anything: {tally:?}"
        );
    }
}
