//! The pure step: a validated policy plus the addresses its host names resolved to become the
//! exact contents of the BPF maps.
//!
//! The kernel does one longest-prefix lookup, then one port lookup. For that single lookup to
//! give the same answer as "any deny covering the address wins; otherwise any allow rule
//! covering it with this protocol and port allows", every prefix entry carries what all the
//! entries covering it say: a deny anywhere above makes it a deny, and its port set is the
//! union of the port sets of every allow rule above it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use egress_common::{
    Family, PortKey, Proto, RuleKey, RuleValue,
    maps::{
        ACTION_ALLOW, ACTION_DENY, MAX_LOOPBACK_PORTS, RULE_DOH_BIT, RULE_KEY_FIXED_BITS,
        SLOT_ALLOW_LOOPBACK, SLOT_ALLOW_OTHER_SOCKETS, SLOT_LOOPBACK_PORTS,
    },
};
use ipnet::IpNet;

use crate::doh::DohList;
pub use crate::ports::{SetIds, inline_ports, port_entries, port_pairs};
use crate::{HostPattern, Policy, Target, Transport};

/// Addresses each exact host name of the policy resolved to.
pub type Resolved = BTreeMap<String, Vec<IpAddr>>;

/// An LPM trie key: prefix length in bits (including [`RULE_KEY_FIXED_BITS`]) and data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LpmKey {
    pub prefix_len: u32,
    pub data: RuleKey,
}

/// The desired contents of the maps for one policy id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub policy_id: u32,
    pub slot_flags: u32,
    /// `loopback.ports`, for the slot (0: unused entry).
    pub loopback_ports: [u16; MAX_LOOPBACK_PORTS],
    /// Prefixes shorter than a single address, for the trie.
    pub rules: BTreeMap<LpmKey, RuleValue>,
    /// Single addresses, for the exact map.
    pub exact: BTreeMap<RuleKey, RuleValue>,
    pub ports: BTreeMap<PortKey, u32>,
    /// The `inbound` rules, for the inbound trie.
    pub inbound: crate::inbound::CompiledInbound,
}

impl Compiled {
    /// The slot configuration that puts this policy in force (no DNS proxy, no probe).
    pub fn slot_config(&self) -> egress_common::SlotConfig {
        egress_common::SlotConfig {
            policy_id: self.policy_id,
            flags: self.slot_flags,
            loopback_ports: self.loopback_ports,
            ..egress_common::SlotConfig::default()
        }
    }

    /// Routes an entry to the exact map (a single address) or the trie.
    fn insert(&mut self, key: LpmKey, value: RuleValue) {
        let bits = key.prefix_len - RULE_KEY_FIXED_BITS;
        let family = if key.data.family == Family::V6 as u8 {
            Family::V6
        } else {
            Family::V4
        };
        if bits == egress_common::maps::address_bits(family) {
            self.exact.insert(key.data, value);
        } else {
            self.rules.insert(key, value);
        }
    }

    /// Prefix and address entries together.
    pub fn entries(&self) -> usize {
        self.rules.len() + self.exact.len()
    }
}

/// One prefix and everything the policy says about exactly that prefix.
#[derive(Default)]
struct Node {
    allow: BTreeSet<u32>,
    deny: Option<u32>,
    /// `Some(s)` while every contribution to this prefix is a DNS answer that lapses at
    /// CLOCK_BOOTTIME second `s` (the earliest of them); `None` once any contribution is
    /// static (a CIDR, or an answer with no deadline).
    expires: Option<Option<u32>>,
}

impl Node {
    fn lifetime(&mut self, deadline: Option<u32>) {
        self.expires = Some(match (self.expires, deadline) {
            (None, d) => d,
            (Some(Some(a)), Some(b)) => Some(a.min(b)),
            _ => None,
        });
    }
}

/// When each host name's current answer lapses (CLOCK_BOOTTIME seconds).
pub type Deadlines = BTreeMap<String, u32>;

/// Compiles `policy` under `policy_id`, with entries that never expire. Wildcard hosts are
/// not compiled: their addresses come from the DNS proxy's answers (the learned map). Host
/// names missing from `resolved` contribute nothing, which denies them.
pub fn compile(
    policy: &Policy,
    policy_id: u32,
    resolved: &Resolved,
    doh: &DohList,
    sets: &mut SetIds,
) -> Compiled {
    compile_with_deadlines(policy, policy_id, resolved, &Deadlines::new(), doh, sets)
}

/// As [`compile`]; the addresses of a host name with a deadline expire in the kernel at that
/// deadline, also when no agent is running to remove them.
pub fn compile_with_deadlines(
    policy: &Policy,
    policy_id: u32,
    resolved: &Resolved,
    deadlines: &Deadlines,
    doh: &DohList,
    sets: &mut SetIds,
) -> Compiled {
    let mut nodes: BTreeMap<(Family, [u8; 16], u8), Node> = BTreeMap::new();

    for (i, rule) in policy.allowed.iter().enumerate() {
        for (net, deadline) in timed_targets(&rule.target, resolved, deadlines) {
            let node = nodes.entry(node_key(net)).or_default();
            node.allow.insert(index(i));
            node.lifetime(deadline);
        }
    }
    for (j, rule) in policy.denied.iter().enumerate() {
        // A denied host's addresses never expire in the kernel: letting a deny lapse (DNS
        // down, no agent running) would hand the address to any covering allow. The agent
        // removes an address when a fresh answer no longer has it.
        for (net, _) in timed_targets(&rule.target, resolved, deadlines) {
            let node = nodes.entry(node_key(net)).or_default();
            node.lifetime(None);
            // Several deny entries for one prefix: report the first.
            node.deny = Some(node.deny.map_or(index(j), |d| d.min(index(j))));
        }
    }
    for (net, rule_id) in doh_denials(policy, doh) {
        let node = nodes.entry(node_key(net)).or_default();
        node.lifetime(None);
        node.deny = Some(node.deny.map_or(rule_id, |d| d.min(rule_id)));
    }

    let mut compiled = Compiled {
        policy_id,
        slot_flags: slot_flags(policy),
        loopback_ports: loopback_ports(policy),
        inbound: crate::inbound::compile_inbound(policy, policy_id),
        ..Compiled::default()
    };
    let mut used_sets = BTreeSet::new();

    // Sorted by (family, address, length): every prefix comes after the prefixes that cover
    // it, so a stack of the open ancestors gives each node its nearest covering entry.
    struct Open {
        family: Family,
        addr: [u8; 16],
        len: u8,
        deny: Option<u32>,
        allow: Vec<u32>,
    }
    let mut stack: Vec<Open> = Vec::new();
    for ((family, addr, len), node) in &nodes {
        while let Some(top) = stack.last() {
            if top.family == *family && covers(&top.addr, top.len, addr) {
                break;
            }
            stack.pop();
        }
        let parent = stack.last();
        let deny = node.deny.or_else(|| parent.and_then(|p| p.deny));
        let mut allow: Vec<u32> = parent.map(|p| p.allow.clone()).unwrap_or_default();
        allow.extend(node.allow.iter().copied());
        allow.sort_unstable();
        allow.dedup();

        let key = LpmKey {
            prefix_len: RULE_KEY_FIXED_BITS + u32::from(*len),
            data: RuleKey::new(policy_id, *family, *addr),
        };
        // A prefix under a deny needs no entry of its own unless it is the deny itself: the
        // covering deny is already the longest match for every address below it.
        let shadowed = node.deny.is_none() && parent.is_some_and(|p| p.deny.is_some());
        if let Some(rule_id) = deny {
            if !shadowed {
                compiled.insert(
                    key,
                    RuleValue {
                        action: ACTION_DENY,
                        prefix: *len,
                        expires_s: node.expires.flatten().unwrap_or(0),
                        rule_id,
                        ..RuleValue::default()
                    },
                );
            }
        } else if let Some(&first) = allow.first() {
            let (set_id, _) = sets.id_for(&allow);
            let pairs = port_pairs(policy, &allow);
            if used_sets.insert(set_id) {
                compiled
                    .ports
                    .extend(port_entries(policy_id, set_id, &pairs));
            }
            let (inline, n_inline) = inline_ports(&pairs);
            compiled.insert(
                key,
                RuleValue {
                    action: ACTION_ALLOW,
                    prefix: *len,
                    n_inline,
                    _pad: 0,
                    rule_id: first,
                    set_id,
                    expires_s: node.expires.flatten().unwrap_or(0),
                    inline,
                    name_tag: 0,
                },
            );
        }
        stack.push(Open {
            family: *family,
            addr: *addr,
            len: *len,
            deny,
            allow,
        });
    }
    sets.retain_used(&used_sets);
    compiled
}

/// The known DNS-over-HTTPS provider addresses a policy with `block_doh` denies, each with the
/// deny entry's rule id ([`RULE_DOH_BIT`] | provider index).
pub fn doh_denials(policy: &Policy, doh: &DohList) -> Vec<(IpNet, u32)> {
    if !policy.dns.as_ref().is_some_and(|d| d.block_doh) {
        return Vec::new();
    }
    doh.providers()
        .iter()
        .enumerate()
        .flat_map(|(k, p)| {
            p.addresses
                .iter()
                .map(move |a| (IpNet::from(a.to_canonical()), RULE_DOH_BIT | index(k)))
        })
        .collect()
}

/// Flags of the slot that enforces `policy`.
pub fn slot_flags(policy: &Policy) -> u32 {
    let mut flags = 0;
    if policy.allow_loopback {
        flags |= SLOT_ALLOW_LOOPBACK;
    }
    if policy.allow_other_socket_types {
        flags |= SLOT_ALLOW_OTHER_SOCKETS;
    }
    if !policy.loopback_ports.is_empty() {
        flags |= SLOT_LOOPBACK_PORTS;
    }
    if crate::limits::has_limits(policy) {
        flags |= egress_common::maps::SLOT_RATE_LIMITED;
    }
    if policy.dns.as_ref().is_some_and(|d| d.block_dot) {
        flags |= egress_common::maps::SLOT_BLOCK_DOT;
    }
    if policy.audit() {
        flags |= egress_common::maps::SLOT_AUDIT;
    }
    flags
}

const _: () = assert!(crate::MAX_LOOPBACK_PORTS == MAX_LOOPBACK_PORTS);

/// `loopback.ports` in the slot's array (the parser allows at most `MAX_LOOPBACK_PORTS`).
fn loopback_ports(policy: &Policy) -> [u16; MAX_LOOPBACK_PORTS] {
    let mut ports = [0; MAX_LOOPBACK_PORTS];
    for (slot, port) in ports.iter_mut().zip(&policy.loopback_ports) {
        *slot = *port;
    }
    ports
}

fn index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

pub(crate) fn proto(t: Transport) -> Proto {
    match t {
        Transport::Tcp => Proto::Tcp,
        Transport::Udp => Proto::Udp,
    }
}

/// The networks a target stands for, with the deadline of the answer they came from.
fn timed_targets(
    target: &Target,
    resolved: &Resolved,
    deadlines: &Deadlines,
) -> Vec<(IpNet, Option<u32>)> {
    let deadline = match target {
        Target::Host(HostPattern::Exact(name)) => deadlines.get(name).copied(),
        _ => None,
    };
    targets(target, resolved)
        .into_iter()
        .map(|n| (n, deadline))
        .collect()
}

/// The networks a target stands for, canonical (IPv4-mapped IPv6 as IPv4).
pub fn targets(target: &Target, resolved: &Resolved) -> Vec<IpNet> {
    match target {
        Target::Cidr(net) => vec![canonical_net(*net)],
        Target::Host(HostPattern::Exact(name)) => resolved
            .get(name)
            .map(|addrs| {
                addrs
                    .iter()
                    .map(|a| IpNet::from(a.to_canonical()))
                    .collect()
            })
            .unwrap_or_default(),
        Target::Host(HostPattern::Wildcard(_)) => Vec::new(),
    }
}

/// `::ffff:a.b.c.d/n` (n >= 96) as `a.b.c.d/(n-96)`: the kernel judges mapped addresses as IPv4.
pub fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
        && let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(n.trunc());
    }
    net.trunc()
}

fn node_key(net: IpNet) -> (Family, [u8; 16], u8) {
    let net = net.trunc();
    match net {
        IpNet::V4(n) => {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&n.network().octets());
            (Family::V4, addr, n.prefix_len())
        }
        IpNet::V6(n) => (Family::V6, n.network().octets(), n.prefix_len()),
    }
}

/// Whether the prefix (`net`, `len`) contains `addr`.
pub fn covers(net: &[u8; 16], len: u8, addr: &[u8; 16]) -> bool {
    let full = usize::from(len / 8);
    let rest = len % 8;
    if net[..full] != addr[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (net[full] & mask) == (addr[full] & mask)
}

/// The compiled tables read at a given CLOCK_BOOTTIME second, as the kernel reads the maps.
pub struct CompiledAt<'a> {
    pub compiled: &'a Compiled,
    pub now_s: u32,
}

impl egress_common::Tables for CompiledAt<'_> {
    fn rule(&self, key: &RuleKey, prefix_len: u32) -> Option<RuleValue> {
        self.compiled.rule(key, prefix_len)
    }

    fn exact(&self, key: &RuleKey) -> Option<RuleValue> {
        self.compiled.exact.get(key).copied()
    }

    fn port(&self, key: &PortKey) -> Option<u32> {
        self.compiled.ports.get(key).copied()
    }

    fn learned(&self, _key: &RuleKey) -> Option<RuleValue> {
        None
    }

    fn now_s(&self) -> u32 {
        self.now_s
    }
}

/// Read with no clock (second 0): no entry has expired.
impl egress_common::Tables for Compiled {
    /// The same longest-prefix match the kernel's LPM trie does, over the compiled entries.
    fn rule(&self, key: &RuleKey, prefix_len: u32) -> Option<RuleValue> {
        let bits =
            u8::try_from(prefix_len.saturating_sub(RULE_KEY_FIXED_BITS).min(128)).unwrap_or(128);
        for len in (0..=bits).rev() {
            let mut data = *key;
            mask_addr(&mut data.addr, len);
            let k = LpmKey {
                prefix_len: RULE_KEY_FIXED_BITS + u32::from(len),
                data,
            };
            if let Some(v) = self.rules.get(&k) {
                return Some(*v);
            }
        }
        None
    }

    fn exact(&self, key: &RuleKey) -> Option<RuleValue> {
        self.exact.get(key).copied()
    }

    fn port(&self, key: &PortKey) -> Option<u32> {
        self.ports.get(key).copied()
    }

    fn learned(&self, _key: &RuleKey) -> Option<RuleValue> {
        None
    }

    fn now_s(&self) -> u32 {
        0
    }
}

fn mask_addr(addr: &mut [u8; 16], len: u8) {
    for (i, b) in addr.iter_mut().enumerate() {
        let bit = i * 8;
        let len = usize::from(len);
        if bit >= len {
            *b = 0;
        } else if bit + 8 > len {
            *b &= 0xffu8 << (8 - (len - bit));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use egress_common::{Dest, Reason, SlotConfig, decide};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::reference;
    use crate::{AllowedDestination, DefaultAction, DeniedDestination, Protocol};

    fn allow(target: &str, ports: &[u16], protocols: &[Protocol]) -> AllowedDestination {
        AllowedDestination {
            target: parse_target(target),
            ports: ports.to_vec(),
            protocols: protocols.to_vec(),
            purpose: None,
            rate_limit: None,
            restrictions: None,
        }
    }

    fn parse_target(s: &str) -> Target {
        match s.parse::<IpNet>() {
            Ok(n) => Target::Cidr(n),
            Err(_) => Target::Host(HostPattern::Exact(s.into())),
        }
    }

    fn deny(target: &str) -> DeniedDestination {
        DeniedDestination {
            target: parse_target(target),
        }
    }

    fn policy(allowed: Vec<AllowedDestination>, denied: Vec<DeniedDestination>) -> Policy {
        Policy {
            name: "test".into(),
            default_action: DefaultAction::Deny,
            allowed,
            denied,
            dns: None,
            rate_limits: None,
            allow_loopback: true,
            loopback_ports: Vec::new(),
            allow_other_socket_types: false,
            inbound: Vec::new(),
            mode: None,
        }
    }

    fn judge(p: &Policy, resolved: &Resolved, dst: &Dest) -> (Reason, Reason) {
        let c = compile(
            p,
            7,
            resolved,
            crate::doh::testing::builtin(),
            &mut SetIds::default(),
        );
        let slot = c.slot_config();
        (
            decide(&c, &slot, dst).reason,
            reference::decide(p, resolved, crate::doh::testing::builtin(), dst).reason,
        )
    }

    fn v4(a: [u8; 4], port: u16, proto: Proto) -> Dest {
        Dest::v4(a, port, proto)
    }

    #[test]
    fn deny_cidr_beats_allowed_address_inside_it() {
        let p = policy(
            vec![allow("10.1.2.3/32", &[443], &[Protocol::Https])],
            vec![deny("10.0.0.0/8")],
        );
        let (k, r) = judge(&p, &Resolved::new(), &v4([10, 1, 2, 3], 443, Proto::Tcp));
        assert_eq!((k, r), (Reason::DenyRule, Reason::DenyRule));
    }

    #[test]
    fn https_only_rule_never_opens_port_80() {
        let p = policy(
            vec![allow("198.18.0.10/32", &[443], &[Protocol::Https])],
            vec![],
        );
        let r = Resolved::new();
        assert_eq!(
            judge(&p, &r, &v4([198, 18, 0, 10], 443, Proto::Tcp)).0,
            Reason::AllowRule
        );
        assert_eq!(
            judge(&p, &r, &v4([198, 18, 0, 10], 80, Proto::Tcp)).0,
            Reason::DenyPort
        );
        assert_eq!(
            judge(&p, &r, &v4([198, 18, 0, 10], 443, Proto::Udp)).0,
            Reason::DenyPort
        );
    }

    #[test]
    fn dns_protocol_is_udp_and_tcp() {
        let p = policy(
            vec![allow("198.18.0.53/32", &[53], &[Protocol::Dns])],
            vec![],
        );
        let r = Resolved::new();
        assert_eq!(
            judge(&p, &r, &v4([198, 18, 0, 53], 53, Proto::Udp)).0,
            Reason::AllowRule
        );
        assert_eq!(
            judge(&p, &r, &v4([198, 18, 0, 53], 53, Proto::Tcp)).0,
            Reason::AllowRule
        );
    }

    #[test]
    fn nested_allow_rules_union_their_ports() {
        let p = policy(
            vec![
                allow("10.1.0.0/16", &[443], &[Protocol::Tcp]),
                allow("10.1.2.3/32", &[5432], &[Protocol::Tcp]),
            ],
            vec![],
        );
        let r = Resolved::new();
        assert_eq!(
            judge(&p, &r, &v4([10, 1, 2, 3], 443, Proto::Tcp)).0,
            Reason::AllowRule
        );
        assert_eq!(
            judge(&p, &r, &v4([10, 1, 2, 3], 5432, Proto::Tcp)).0,
            Reason::AllowRule
        );
        assert_eq!(
            judge(&p, &r, &v4([10, 1, 9, 9], 5432, Proto::Tcp)).0,
            Reason::DenyPort
        );
    }

    #[test]
    fn deny_inside_allow_denies_only_its_range() {
        let p = policy(
            vec![allow("10.0.0.0/8", &[443], &[Protocol::Tcp])],
            vec![deny("10.66.0.0/16")],
        );
        let r = Resolved::new();
        assert_eq!(
            judge(&p, &r, &v4([10, 66, 1, 1], 443, Proto::Tcp)).0,
            Reason::DenyRule
        );
        assert_eq!(
            judge(&p, &r, &v4([10, 65, 1, 1], 443, Proto::Tcp)).0,
            Reason::AllowRule
        );
    }

    #[test]
    fn mapped_ipv6_is_judged_as_ipv4() {
        let p = policy(
            vec![allow("198.18.0.10/32", &[443], &[Protocol::Tcp])],
            vec![deny("198.18.1.0/24")],
        );
        let r = Resolved::new();
        let mapped = |a: Ipv4Addr, port| Dest::v6(a.to_ipv6_mapped().octets(), port, Proto::Tcp);
        assert_eq!(
            judge(&p, &r, &mapped(Ipv4Addr::new(198, 18, 0, 10), 443)).0,
            Reason::AllowRule
        );
        assert_eq!(
            judge(&p, &r, &mapped(Ipv4Addr::new(198, 18, 1, 7), 443)).0,
            Reason::DenyRule
        );
        // A mapped CIDR in the policy is an IPv4 rule.
        let p = policy(
            vec![allow("::ffff:198.18.0.0/112", &[80], &[Protocol::Tcp])],
            vec![],
        );
        assert_eq!(
            judge(&p, &r, &v4([198, 18, 3, 4], 80, Proto::Tcp)).0,
            Reason::AllowRule
        );
    }

    #[test]
    fn unspecified_address_is_loopback_not_any() {
        let mut p = policy(
            vec![allow("0.0.0.0/0", &[443], &[Protocol::Tcp])],
            vec![deny("127.0.0.0/8")],
        );
        let r = Resolved::new();
        assert_eq!(
            judge(&p, &r, &v4([0, 0, 0, 0], 443, Proto::Tcp)),
            (Reason::AllowLoopback, Reason::AllowLoopback)
        );
        p.allow_loopback = false;
        // With loopback in scope, 0.0.0.0 is judged as 127.0.0.1: the deny wins.
        assert_eq!(
            judge(&p, &r, &v4([0, 0, 0, 0], 443, Proto::Tcp)),
            (Reason::DenyRule, Reason::DenyRule)
        );
        let any6 = Dest::v6([0; 16], 443, Proto::Tcp);
        assert_eq!(
            judge(&p, &r, &any6),
            (Reason::DenyNoRule, Reason::DenyNoRule)
        );
    }

    #[test]
    fn resolved_hosts_enter_and_leave() {
        let p = policy(
            vec![allow("api.company.test", &[443], &[Protocol::Https])],
            vec![],
        );
        let mut r = Resolved::new();
        let dst = v4([198, 18, 0, 10], 443, Proto::Tcp);
        assert_eq!(judge(&p, &r, &dst).0, Reason::DenyNoRule);
        r.insert(
            "api.company.test".into(),
            vec![Ipv4Addr::new(198, 18, 0, 10).into()],
        );
        assert_eq!(judge(&p, &r, &dst).0, Reason::AllowRule);
        // A resolved address inside a denied range stays denied.
        let p2 = policy(p.allowed.clone(), vec![deny("198.18.0.0/24")]);
        assert_eq!(judge(&p2, &r, &dst).0, Reason::DenyRule);
    }

    #[test]
    fn set_ids_are_stable_across_recompiles() {
        let p = policy(
            vec![
                allow("a.test", &[443], &[Protocol::Tcp]),
                allow("10.0.0.0/8", &[80], &[Protocol::Tcp]),
            ],
            vec![],
        );
        let mut sets = SetIds::default();
        let mut r = Resolved::new();
        r.insert("a.test".into(), vec![Ipv4Addr::new(10, 0, 0, 1).into()]);
        let c1 = compile(&p, 1, &r, crate::doh::testing::builtin(), &mut sets);
        r.insert(
            "a.test".into(),
            vec![
                Ipv4Addr::new(10, 0, 0, 1).into(),
                Ipv4Addr::new(10, 0, 0, 2).into(),
            ],
        );
        let c2 = compile(&p, 1, &r, crate::doh::testing::builtin(), &mut sets);
        for (k, v) in &c1.ports {
            assert_eq!(c2.ports.get(k), Some(v), "port entry {k:?} changed meaning");
        }
    }

    #[test]
    fn small_port_sets_ride_in_the_value_and_large_ones_use_the_port_map() {
        let p = policy(
            vec![
                allow("10.0.0.1/32", &[443], &[Protocol::Https]),
                allow("10.0.0.2/32", &[53], &[Protocol::Dns]),
                allow("10.0.0.3/32", &[80, 443, 8080], &[Protocol::Tcp]),
            ],
            vec![],
        );
        let r = Resolved::new();
        let c = compile(
            &p,
            7,
            &r,
            crate::doh::testing::builtin(),
            &mut SetIds::default(),
        );
        let inline: Vec<u8> = c.exact.values().map(|v| v.n_inline).collect();
        assert_eq!(inline, vec![1, 2, 0], "{c:?}");
        for (addr, port, proto, want) in [
            ([10, 0, 0, 1], 443, Proto::Tcp, Reason::AllowRule),
            ([10, 0, 0, 1], 443, Proto::Udp, Reason::DenyPort),
            ([10, 0, 0, 2], 53, Proto::Udp, Reason::AllowRule),
            ([10, 0, 0, 2], 53, Proto::Tcp, Reason::AllowRule),
            ([10, 0, 0, 2], 54, Proto::Udp, Reason::DenyPort),
            ([10, 0, 0, 3], 8080, Proto::Tcp, Reason::AllowRule),
            ([10, 0, 0, 3], 8081, Proto::Tcp, Reason::DenyPort),
        ] {
            let (k, reference) = judge(&p, &r, &v4(addr, port, proto));
            assert_eq!((k, reference), (want, want), "{addr:?}:{port} {proto:?}");
        }
    }

    #[test]
    fn an_expired_answer_is_looked_past_to_the_covering_rules() {
        let p = policy(
            vec![
                allow("api.test", &[443], &[Protocol::Https]),
                allow("10.1.0.0/16", &[80], &[Protocol::Tcp]),
            ],
            vec![deny("bad.test")],
        );
        let mut r = Resolved::new();
        r.insert("api.test".into(), vec![Ipv4Addr::new(10, 1, 2, 3).into()]);
        r.insert("bad.test".into(), vec![Ipv4Addr::new(10, 1, 9, 9).into()]);
        let deadlines: Deadlines =
            [("api.test".to_owned(), 100), ("bad.test".to_owned(), 200)].into();
        let c = compile_with_deadlines(
            &p,
            7,
            &r,
            &deadlines,
            crate::doh::testing::builtin(),
            &mut SetIds::default(),
        );
        let slot = SlotConfig {
            policy_id: 7,
            flags: c.slot_flags,
            ..SlotConfig::default()
        };
        let at = |now_s| CompiledAt {
            compiled: &c,
            now_s,
        };
        let api443 = v4([10, 1, 2, 3], 443, Proto::Tcp);
        let api80 = v4([10, 1, 2, 3], 80, Proto::Tcp);
        let bad80 = v4([10, 1, 9, 9], 80, Proto::Tcp);
        // Before the deadline the host's port and the covering CIDR's port both work.
        assert_eq!(decide(&at(100), &slot, &api443).reason, Reason::AllowRule);
        assert_eq!(decide(&at(100), &slot, &api80).reason, Reason::AllowRule);
        assert_eq!(decide(&at(150), &slot, &bad80).reason, Reason::DenyRule);
        // After it, the /32 no longer applies: the /16 decides.
        assert_eq!(decide(&at(101), &slot, &api443).reason, Reason::DenyPort);
        assert_eq!(decide(&at(101), &slot, &api80).reason, Reason::AllowRule);
        // A denied host's address never lapses into the covering allow.
        assert_eq!(decide(&at(201), &slot, &bad80).reason, Reason::DenyRule);
        assert_eq!(
            decide(&at(u32::MAX), &slot, &bad80).reason,
            Reason::DenyRule
        );
    }

    #[test]
    fn a_static_contribution_never_expires() {
        let p = policy(
            vec![
                allow("api.test", &[443], &[Protocol::Tcp]),
                allow("10.1.2.3/32", &[22], &[Protocol::Tcp]),
            ],
            vec![],
        );
        let mut r = Resolved::new();
        r.insert("api.test".into(), vec![Ipv4Addr::new(10, 1, 2, 3).into()]);
        let deadlines: Deadlines = [("api.test".to_owned(), 100)].into();
        let c = compile_with_deadlines(
            &p,
            7,
            &r,
            &deadlines,
            crate::doh::testing::builtin(),
            &mut SetIds::default(),
        );
        assert_eq!(
            (c.rules.len(), c.exact.len()),
            (0, 1),
            "a single address goes to the exact map"
        );
        assert!(c.exact.values().all(|v| v.expires_s == 0), "{c:?}");
        // Only host-derived entries carry the deadline.
        let only_host = policy(vec![allow("api.test", &[443], &[Protocol::Tcp])], vec![]);
        let c = compile_with_deadlines(
            &only_host,
            7,
            &r,
            &deadlines,
            crate::doh::testing::builtin(),
            &mut SetIds::default(),
        );
        assert_eq!(c.exact.len(), 1, "{c:?}");
        assert!(
            c.exact
                .values()
                .all(|v| v.expires_s == 100 && v.prefix == 32),
            "{c:?}"
        );
    }

    /// Random policies and destinations: the compiled tables, read the way the kernel reads
    /// them, agree with the reference everywhere.
    #[test]
    fn compiled_tables_agree_with_reference() {
        let mut rng = StdRng::seed_from_u64(0x0e9e55);
        let protos = [
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Http,
            Protocol::Https,
            Protocol::Dns,
        ];
        let mut checked = 0;
        for _ in 0..200 {
            let mut allowed = Vec::new();
            let mut denied = Vec::new();
            for _ in 0..rng.random_range(0..12) {
                let ports: Vec<u16> = (0..rng.random_range(1..4))
                    .map(|_| rng.random_range(1..6) * 100)
                    .collect();
                let mut ports = ports;
                ports.sort();
                ports.dedup();
                let protocols = vec![protos[rng.random_range(0..protos.len())]];
                allowed.push(AllowedDestination {
                    target: Target::Cidr(random_net(&mut rng)),
                    ports,
                    protocols,
                    purpose: None,
                    rate_limit: None,
                    restrictions: None,
                });
            }
            for _ in 0..rng.random_range(0..4) {
                denied.push(DeniedDestination {
                    target: Target::Cidr(random_net(&mut rng)),
                });
            }
            let mut p = policy(allowed, denied);
            p.allow_loopback = rng.random_bool(0.5);
            if !p.allow_loopback && rng.random_bool(0.5) {
                p.loopback_ports = [100, 200, 300]
                    .into_iter()
                    .filter(|_| rng.random_bool(0.5))
                    .chain([400])
                    .collect();
            }
            let r = Resolved::new();
            let c = compile(
                &p,
                3,
                &r,
                crate::doh::testing::builtin(),
                &mut SetIds::default(),
            );
            let slot = c.slot_config();
            for _ in 0..200 {
                let dst = random_dest(&mut rng);
                let k = decide(&c, &slot, &dst);
                let want = reference::decide(&p, &r, crate::doh::testing::builtin(), &dst);
                assert_eq!(k, want, "dst {dst:?} policy {p:#?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 40_000);
    }

    /// With block_doh and block_dot: every known DoH address is denied (also inside an allowed
    /// CIDR, and reported as the policy's own entry when that is as specific), port 853 is
    /// refused everywhere, and the compiled tables agree with the reference.
    #[test]
    fn doh_addresses_and_dot_are_denied_and_agree_with_reference() {
        let list = crate::doh::testing::builtin();
        let addrs: Vec<IpAddr> = list.addresses().map(|(a, _)| a).collect();
        assert!(!addrs.is_empty());
        let mut p = policy(
            vec![
                allow("0.0.0.0/0", &[443, 853], &[Protocol::Tcp]),
                allow("::/0", &[443], &[Protocol::Tcp]),
            ],
            vec![],
        );
        p.denied.push(DeniedDestination {
            target: Target::Cidr(IpNet::from(addrs[0].to_canonical())),
        });
        p.dns = Some(crate::DnsPolicy {
            allowed_resolvers: Vec::new(),
            block_doh: true,
            block_dot: true,
        });
        let r = Resolved::new();
        let c = compile(
            &p,
            3,
            &r,
            crate::doh::testing::builtin(),
            &mut SetIds::default(),
        );
        let slot = SlotConfig {
            policy_id: 3,
            flags: c.slot_flags,
            ..SlotConfig::default()
        };
        let dest = |a: IpAddr, port| match a.to_canonical() {
            IpAddr::V4(v4) => Dest::v4(v4.octets(), port, Proto::Tcp),
            IpAddr::V6(v6) => Dest::v6(v6.octets(), port, Proto::Tcp),
        };
        for (i, a) in addrs.iter().enumerate() {
            let dst = dest(*a, 443);
            let k = decide(&c, &slot, &dst);
            assert_eq!(
                k,
                reference::decide(&p, &r, crate::doh::testing::builtin(), &dst),
                "{a}"
            );
            let want = if i == 0 || a.to_canonical() == addrs[0].to_canonical() {
                Reason::DenyRule
            } else {
                Reason::DenyDoh
            };
            assert_eq!(k.reason, want, "{a}");
        }
        let other = dest("198.51.100.7".parse().unwrap_or(IpAddr::from([0; 4])), 443);
        assert_eq!(decide(&c, &slot, &other).reason, Reason::AllowRule);
        let dot = dest("198.51.100.7".parse().unwrap_or(IpAddr::from([0; 4])), 853);
        assert_eq!(decide(&c, &slot, &dot).reason, Reason::DenyDot);
        assert_eq!(
            reference::decide(&p, &r, crate::doh::testing::builtin(), &dot).reason,
            Reason::DenyDot
        );
        // Without the flags, nothing of the sort.
        p.dns = None;
        let c = compile(
            &p,
            3,
            &r,
            crate::doh::testing::builtin(),
            &mut SetIds::default(),
        );
        let slot = SlotConfig {
            policy_id: 3,
            flags: c.slot_flags,
            ..SlotConfig::default()
        };
        assert_eq!(decide(&c, &slot, &dot).reason, Reason::AllowRule);
        assert_eq!(
            decide(&c, &slot, &dest(addrs[1], 443)).reason,
            Reason::AllowRule
        );
    }

    /// Prefixes drawn from a small space so that they nest and collide often.
    fn random_net(rng: &mut StdRng) -> IpNet {
        if rng.random_bool(0.7) {
            let a = Ipv4Addr::new(
                10,
                rng.random_range(0..4),
                rng.random_range(0..4),
                rng.random_range(0..4),
            );
            IpNet::V4(
                ipnet::Ipv4Net::new(a, [8, 16, 24, 30, 32][rng.random_range(0..5)])
                    .unwrap_or_default()
                    .trunc(),
            )
        } else {
            let a = Ipv6Addr::new(
                0xfd00,
                rng.random_range(0..3),
                0,
                0,
                0,
                0,
                0,
                rng.random_range(0..4),
            );
            IpNet::V6(
                ipnet::Ipv6Net::new(a, [16, 32, 64, 126, 128][rng.random_range(0..5)])
                    .unwrap_or_default()
                    .trunc(),
            )
        }
    }

    fn random_dest(rng: &mut StdRng) -> Dest {
        let port = rng.random_range(0..7) * 100;
        let proto = [Proto::Tcp, Proto::Udp, Proto::Other][rng.random_range(0..3)];
        match rng.random_range(0..10) {
            0 => Dest::v4([127, 0, 0, rng.random_range(0..3)], port, proto),
            1 => Dest::v4([0, 0, 0, 0], port, proto),
            2 => Dest::v6(Ipv6Addr::LOCALHOST.octets(), port, proto),
            3 => Dest::v6(
                Ipv4Addr::new(10, rng.random_range(0..4), 1, 2)
                    .to_ipv6_mapped()
                    .octets(),
                port,
                proto,
            ),
            4..=6 => Dest::v4(
                [
                    10,
                    rng.random_range(0..4),
                    rng.random_range(0..4),
                    rng.random_range(0..4),
                ],
                port,
                proto,
            ),
            _ => Dest::v6(
                Ipv6Addr::new(
                    0xfd00,
                    rng.random_range(0..3),
                    0,
                    0,
                    0,
                    0,
                    0,
                    rng.random_range(0..4),
                )
                .octets(),
                port,
                proto,
            ),
        }
    }
}
