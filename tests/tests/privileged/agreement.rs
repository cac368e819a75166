//! The kernel and the userspace reference decide alike.
//!
//! A random policy over nested prefixes, and a few thousand random destinations (IPv4, IPv6,
//! IPv4-mapped, loopback and unspecified spellings; TCP connect, UDP connect and unconnected
//! UDP sends) go through the real programs and through `egress_agent::reference`. The
//! workload runs in a namespace with nothing but loopback: an allowed destination fails with
//! ENETUNREACH after the hook let it pass, a denied one with EPERM, and no packet leaves.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use egress_agent::{compile::Resolved, policy, reference};
use egress_common::Dest;
use egress_tests::netns::Netns;
use egress_tests::policy::PolicyYaml;
use rand::{Rng, rngs::StdRng};

use crate::{random_op_to, seeded_rng, testbed};

const DESTINATIONS: usize = 3000;

fn random_v4(rng: &mut StdRng) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, rng.random_range(0..4), rng.random_range(0..8))
}

fn random_v6(rng: &mut StdRng) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0xe9,
        rng.random_range(0..3),
        0,
        0,
        0,
        0,
        rng.random_range(0..8),
    )
}

fn random_policy(rng: &mut StdRng) -> PolicyYaml {
    let protos: [&[&str]; 5] = [&["tcp"], &["udp"], &["https"], &["dns"], &["tcp", "udp"]];
    let mut p = PolicyYaml::new().allow_loopback(rng.random_bool(0.5));
    for _ in 0..rng.random_range(4..14) {
        let cidr = if rng.random_bool(0.65) {
            let len = [16, 22, 24, 30, 32][rng.random_range(0..5)];
            let net = ipnet::Ipv4Net::new(random_v4(rng), len).unwrap().trunc();
            net.to_string()
        } else {
            let len = [32, 48, 64, 126, 128][rng.random_range(0..5)];
            ipnet::Ipv6Net::new(random_v6(rng), len)
                .unwrap()
                .trunc()
                .to_string()
        };
        let mut ports: Vec<u16> = (0..rng.random_range(1..4))
            .map(|_| 1000 + rng.random_range(0..4))
            .collect();
        ports.sort();
        ports.dedup();
        p = p.allow_cidr(&cidr, &ports, protos[rng.random_range(0..protos.len())]);
    }
    for _ in 0..rng.random_range(1..4) {
        let cidr = if rng.random_bool(0.7) {
            ipnet::Ipv4Net::new(random_v4(rng), [24, 30, 32][rng.random_range(0..3)])
                .unwrap()
                .trunc()
                .to_string()
        } else {
            ipnet::Ipv6Net::new(random_v6(rng), [64, 126, 128][rng.random_range(0..3)])
                .unwrap()
                .trunc()
                .to_string()
        };
        p = p.deny_cidr(&cidr);
    }
    p
}

/// One probe op and the destination the reference should judge.
fn random_op(rng: &mut StdRng) -> (String, Dest) {
    let port = 1000 + rng.random_range(0..5);
    let (addr, v6_socket): (IpAddr, bool) = match rng.random_range(0..12) {
        0 => (
            Ipv4Addr::new(127, 0, 0, rng.random_range(1..4)).into(),
            rng.random_bool(0.5),
        ),
        1 => (Ipv4Addr::UNSPECIFIED.into(), rng.random_bool(0.5)),
        2 => (Ipv6Addr::LOCALHOST.into(), true),
        3 => (Ipv6Addr::UNSPECIFIED.into(), true),
        4..=7 => (random_v4(rng).into(), rng.random_bool(0.4)),
        _ => (random_v6(rng).into(), true),
    };
    random_op_to(rng, addr, v6_socket, port)
}

#[test]
fn kernel_agrees_with_reference_on_random_destinations() {
    let Some(tb) = testbed() else { return };
    let mut rng = seeded_rng(0x005e_ede9);
    // A namespace with only loopback: nothing the hook lets through can leave it.
    let isolated = Netns::new("agree").expect("creating the isolated namespace");

    let mut tally: BTreeMap<(&'static str, bool), usize> = BTreeMap::new();
    let mut disagreements = Vec::new();
    let rounds = 3;
    for round in 0..rounds {
        let yaml = random_policy(&mut rng);
        let path = tb.write_policy(&yaml.render()).expect("writing the policy");
        let policy = policy::load_file(&path).expect("the generated policy parses");
        let ops: Vec<(String, Dest)> = (0..DESTINATIONS / rounds)
            .map(|_| random_op(&mut rng))
            .collect();
        let args: Vec<&str> = ops.iter().map(|(op, _)| op.as_str()).collect();
        let out = tb
            .agent(&yaml)
            .expect("agent command")
            .args(&args)
            .run_in(&isolated)
            .expect("running the agent");
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
        for ((op, dst), result) in ops.iter().zip(&out.results) {
            assert_eq!(&result.op, op);
            let want = reference::decide(
                &policy,
                &Resolved::new(),
                egress_agent::dns::doh_list(),
                dst,
            );
            let kernel_denied = result.errno == Some(libc::EPERM);
            let kind: &'static str = if op.starts_with("connect") {
                "connect"
            } else {
                "sendto"
            };
            *tally.entry((kind, want.allowed())).or_default() += 1;
            if kernel_denied == want.allowed() {
                disagreements.push(format!(
                    "round {round}: {op}: reference {:?} (rule {}), kernel {:?}",
                    want.reason, want.rule_id, result.error
                ));
            }
        }
        if !disagreements.is_empty() {
            panic!(
                "{} disagreements under policy\n{}\nfirst ones:\n{}",
                disagreements.len(),
                yaml.render(),
                disagreements
                    .iter()
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    eprintln!("verdicts (op, allowed) -> count: {tally:?}");
    // The comparison means something only if both verdicts occur for every kind of op.
    for kind in ["connect", "sendto"] {
        for allowed in [true, false] {
            let n = tally.get(&(kind, allowed)).copied().unwrap_or(0);
            assert!(
                n >= 50,
                "only {n} {kind} ops were {}",
                if allowed { "allowed" } else { "denied" }
            );
        }
    }
}
