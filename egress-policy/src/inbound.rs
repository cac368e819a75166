//! `inbound` rules: compiled into the contents of the kernel's inbound trie, and decided
//! straight from the policy for tests (the reference).
//!
//! One longest-prefix lookup of (policy id, local port, family, peer) decides: every network of
//! every rule for that port is an allow entry; each listed port also gets a deny entry with no
//! address bits, so that a peer outside every `from` is reported with the rule that lists the
//! port. An entry for a port no rule lists is never found: denied without a rule.

use std::collections::BTreeMap;
use std::net::IpAddr;

use egress_common::{
    Decision, Dest, Family, Proto, Reason,
    inbound::{INBOUND_KEY_FIXED_BITS, InboundKey, InboundTables, InboundValue, peer_is_loopback},
    maps::{ACTION_ALLOW, ACTION_DENY},
    verdict::NO_RULE,
};
use ipnet::IpNet;

use crate::Policy;

/// An LPM trie key of the inbound map: prefix length in bits (including
/// [`INBOUND_KEY_FIXED_BITS`]) and data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboundLpmKey {
    pub prefix_len: u32,
    pub data: InboundKey,
}

/// The desired contents of the inbound map for one policy id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledInbound {
    pub entries: BTreeMap<InboundLpmKey, InboundValue>,
}

/// Compiles the `inbound` rules of `policy` under `policy_id`.
pub fn compile_inbound(policy: &Policy, policy_id: u32) -> CompiledInbound {
    let mut entries = BTreeMap::new();
    let rules = || {
        policy
            .inbound
            .iter()
            .enumerate()
            .map(|(i, r)| (u32::try_from(i).unwrap_or(u32::MAX), r))
    };
    for (rule_id, rule) in rules() {
        for net in &rule.from {
            let (family, addr, len) = net_key(*net);
            let key = InboundLpmKey {
                prefix_len: INBOUND_KEY_FIXED_BITS + u32::from(len),
                data: InboundKey::new(policy_id, rule.port, family, addr),
            };
            // The same network under two rules: report the first.
            entries.entry(key).or_insert(InboundValue {
                action: ACTION_ALLOW,
                _pad: [0; 3],
                rule_id,
            });
        }
    }
    // After every allow: a `0.0.0.0/0` or `::/0` is the marker's own key, and its allow stays.
    for (rule_id, rule) in rules() {
        for family in [Family::V4, Family::V6] {
            let key = InboundLpmKey {
                prefix_len: INBOUND_KEY_FIXED_BITS,
                data: InboundKey::new(policy_id, rule.port, family, [0; 16]),
            };
            entries.entry(key).or_insert(InboundValue {
                action: ACTION_DENY,
                _pad: [0; 3],
                rule_id,
            });
        }
    }
    CompiledInbound { entries }
}

fn net_key(net: IpNet) -> (Family, [u8; 16], u8) {
    match net.trunc() {
        IpNet::V4(n) => {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&n.network().octets());
            (Family::V4, addr, n.prefix_len())
        }
        IpNet::V6(n) => (Family::V6, n.network().octets(), n.prefix_len()),
    }
}

/// The same longest-prefix match the kernel's trie does, over the compiled entries.
impl InboundTables for CompiledInbound {
    fn inbound(&self, key: &InboundKey, prefix_len: u32) -> Option<InboundValue> {
        let bits =
            u8::try_from(prefix_len.saturating_sub(INBOUND_KEY_FIXED_BITS).min(128)).unwrap_or(128);
        for len in (0..=bits).rev() {
            let mut data = *key;
            mask(&mut data.addr, len);
            let k = InboundLpmKey {
                prefix_len: INBOUND_KEY_FIXED_BITS + u32::from(len),
                data,
            };
            if let Some(v) = self.entries.get(&k) {
                return Some(*v);
            }
        }
        None
    }
}

fn mask(addr: &mut [u8; 16], len: u8) {
    let len = usize::from(len);
    for (i, b) in addr.iter_mut().enumerate() {
        let bit = i * 8;
        if bit >= len {
            *b = 0;
        } else if bit + 8 > len {
            *b &= 0xffu8 << (8 - (len - bit));
        }
    }
}

/// The peer and local port as the kernel sees them (IPv4-mapped peers as IPv4).
pub fn peer_dest(peer: IpAddr, local_port: u16) -> Dest {
    match peer {
        IpAddr::V4(a) => Dest::v4(a.octets(), local_port, Proto::Tcp),
        IpAddr::V6(a) => Dest::v6(a.octets(), local_port, Proto::Tcp),
    }
}

/// What `policy` says about a connection from `peer` to the workload's listener on
/// `local_port`, read straight off the rules: loopback passes; a rule for the port whose `from`
/// covers the peer allows (reported: the most specific covering network's first rule); a port
/// that rules list but whose `from` does not cover the peer is refused with the first of them;
/// any other port is refused without a rule.
pub fn reference_decide(policy: &Policy, peer: IpAddr, local_port: u16) -> Decision {
    let dest = peer_dest(peer, local_port);
    if peer_is_loopback(&dest) {
        return Decision {
            reason: Reason::AllowLoopback,
            rule_id: NO_RULE,
        };
    }
    let peer = peer.to_canonical();
    let mut best: Option<(u8, u32)> = None;
    let mut listed: Option<u32> = None;
    for (i, rule) in policy.inbound.iter().enumerate() {
        if rule.port != local_port {
            continue;
        }
        let i = u32::try_from(i).unwrap_or(u32::MAX);
        listed.get_or_insert(i);
        for net in &rule.from {
            if net.contains(&peer) && best.is_none_or(|(len, _)| net.prefix_len() > len) {
                best = Some((net.prefix_len(), i));
            }
        }
    }
    match (best, listed) {
        (Some((_, rule_id)), _) => Decision {
            reason: Reason::AllowInbound,
            rule_id,
        },
        (None, Some(rule_id)) => Decision {
            reason: Reason::DenyInbound,
            rule_id,
        },
        (None, None) => Decision {
            reason: Reason::DenyInbound,
            rule_id: NO_RULE,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use egress_common::inbound::decide_inbound;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::{DefaultAction, InboundRule};

    fn policy(inbound: Vec<InboundRule>) -> Policy {
        Policy {
            name: "t".into(),
            default_action: DefaultAction::Deny,
            allowed: Vec::new(),
            denied: Vec::new(),
            dns: None,
            rate_limits: None,
            allow_loopback: true,
            loopback_ports: Vec::new(),
            allow_other_socket_types: false,
            inbound,
            mode: None,
        }
    }

    fn rule(port: u16, from: &[&str]) -> InboundRule {
        InboundRule {
            port,
            from: from
                .iter()
                .map(|s| match s.parse() {
                    Ok(n) => n,
                    Err(e) => panic!("{s}: {e}"),
                })
                .collect(),
            purpose: None,
        }
    }

    fn kernel(p: &Policy, id: u32, peer: IpAddr, port: u16) -> Decision {
        decide_inbound(&compile_inbound(p, id), id, &peer_dest(peer, port))
    }

    fn ip(s: &str) -> IpAddr {
        match s.parse() {
            Ok(a) => a,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn no_rules_refuse_every_peer_but_loopback() {
        let p = policy(Vec::new());
        assert!(compile_inbound(&p, 1).entries.is_empty());
        for peer in ["198.18.0.2", "fd00:e9::2", "::ffff:10.0.0.1", "0.0.0.0"] {
            let d = kernel(&p, 1, ip(peer), 8080);
            assert_eq!(
                (d.reason, d.rule_id),
                (Reason::DenyInbound, NO_RULE),
                "{peer}"
            );
        }
        for peer in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(kernel(&p, 1, ip(peer), 8080).reason, Reason::AllowLoopback);
        }
        // A slot without a policy refuses, whatever the tables hold.
        let d = decide_inbound(&compile_inbound(&p, 1), 0, &peer_dest(ip("10.0.0.1"), 1));
        assert_eq!(d.reason, Reason::DenyNoPolicy);
    }

    #[test]
    fn a_rule_allows_its_sources_on_its_port_only() {
        let p = policy(vec![
            rule(8080, &["198.18.0.2/32", "fd00:e9::/64"]),
            rule(9090, &["0.0.0.0/0"]),
        ]);
        let c = compile_inbound(&p, 4);
        // Two networks plus a marker per family for each port; 9090's v4 marker is its /0.
        assert_eq!(c.entries.len(), 2 + 2 + 2);
        let cases = [
            ("198.18.0.2", 8080, Reason::AllowInbound, 0),
            ("198.18.0.3", 8080, Reason::DenyInbound, 0),
            ("fd00:e9::77", 8080, Reason::AllowInbound, 0),
            ("fd00:e8::1", 8080, Reason::DenyInbound, 0),
            ("::ffff:198.18.0.2", 8080, Reason::AllowInbound, 0),
            ("198.18.0.2", 8081, Reason::DenyInbound, NO_RULE),
            ("203.0.113.9", 9090, Reason::AllowInbound, 1),
            // 0.0.0.0/0 is every IPv4 peer, not IPv6 ones.
            ("2001:db8::1", 9090, Reason::DenyInbound, 1),
        ];
        for (peer, port, reason, rule_id) in cases {
            let d = kernel(&p, 4, ip(peer), port);
            assert_eq!(
                (d.reason, d.rule_id),
                (reason, rule_id),
                "{peer} port {port}"
            );
            assert_eq!(
                reference_decide(&p, ip(peer), port),
                d,
                "{peer} port {port}"
            );
        }
        // Another policy id sees none of it.
        let d = decide_inbound(&c, 5, &peer_dest(ip("198.18.0.2"), 8080));
        assert_eq!((d.reason, d.rule_id), (Reason::DenyInbound, NO_RULE));
    }

    #[test]
    fn a_later_rule_for_every_peer_wins_over_an_earlier_marker() {
        let p = policy(vec![
            rule(80, &["10.0.0.0/8"]),
            rule(80, &["::/0", "0.0.0.0/0"]),
        ]);
        for peer in ["192.0.2.1", "2001:db8::1", "10.1.1.1"] {
            let d = kernel(&p, 2, ip(peer), 80);
            assert_eq!(d.reason, Reason::AllowInbound, "{peer}");
            assert_eq!(reference_decide(&p, ip(peer), 80), d, "{peer}");
        }
    }

    fn random_net(rng: &mut StdRng) -> IpNet {
        if rng.random_bool(0.6) {
            let a = Ipv4Addr::new(10, rng.random_range(0..3), rng.random_range(0..3), 1);
            IpNet::V4(
                ipnet::Ipv4Net::new(a, [0, 8, 16, 24, 32][rng.random_range(0..5)])
                    .unwrap_or_default()
                    .trunc(),
            )
        } else {
            let a = Ipv6Addr::new(0xfd00, rng.random_range(0..3), 0, 0, 0, 0, 0, 1);
            IpNet::V6(
                ipnet::Ipv6Net::new(a, [0, 16, 32, 64, 128][rng.random_range(0..5)])
                    .unwrap_or_default()
                    .trunc(),
            )
        }
    }

    fn random_peer(rng: &mut StdRng) -> IpAddr {
        match rng.random_range(0..8) {
            0 => IpAddr::V4(Ipv4Addr::new(127, 0, 0, rng.random_range(1..3))),
            1 => IpAddr::V6(Ipv6Addr::LOCALHOST),
            2 => IpAddr::V6(Ipv4Addr::new(10, rng.random_range(0..3), 0, 1).to_ipv6_mapped()),
            3..=5 => IpAddr::V4(Ipv4Addr::new(
                10,
                rng.random_range(0..3),
                rng.random_range(0..3),
                1,
            )),
            _ => IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                rng.random_range(0..3),
                0,
                0,
                0,
                0,
                0,
                1,
            )),
        }
    }

    /// Random rule sets and peers: the compiled trie, read the way the kernel reads it, agrees
    /// with the reference on the reason and the rule.
    #[test]
    fn compiled_trie_agrees_with_reference() {
        let mut rng = StdRng::seed_from_u64(0x1b0d);
        let mut checked = 0;
        for _ in 0..300 {
            let rules = (0..rng.random_range(0..6))
                .map(|_| InboundRule {
                    port: rng.random_range(1..4) * 1000,
                    from: (0..rng.random_range(1..4))
                        .map(|_| random_net(&mut rng))
                        .collect(),
                    purpose: None,
                })
                .collect();
            let p = policy(rules);
            let c = compile_inbound(&p, 9);
            for _ in 0..100 {
                let peer = random_peer(&mut rng);
                let port = rng.random_range(1..5) * 1000;
                let k = decide_inbound(&c, 9, &peer_dest(peer, port));
                assert_eq!(k, reference_decide(&p, peer, port), "{peer} {port} {p:#?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 30_000);
    }
}
