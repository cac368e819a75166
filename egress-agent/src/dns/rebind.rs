//! The rebinding filter: which addresses of an allowed name's answer may enter the allow map.
//!
//! An allowed name, above all one under a wildcard whose zone someone else controls, can be
//! made to resolve to anything: the cloud metadata service, the local host, an internal
//! network. Such an address is never installed (the workload's connection to it is then denied
//! like any other) and is reported with the reason. Rejected are the policy's denied CIDRs,
//! the special-purpose ranges in [`SPECIAL_PURPOSE`], and optionally the known DoH resolvers.
//!
//! Addresses are judged as the kernel judges them: an IPv4-mapped IPv6 address
//! (`::ffff:169.254.169.254`) as its IPv4 address; an address in the NAT64 well-known prefix
//! (`64:ff9b::/96`, RFC 6052) also as the IPv4 address it embeds, which a NAT64 gateway would
//! connect to.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use egress_dns_wire::answer::AddressRecord;
use egress_policy::doh::DohList;
use prometheus_client::metrics::{counter::Counter, family::Family};

use crate::observe::metrics::PolicyLabels;
use egress_policy::{Policy, Target};

/// A range that public names have no business pointing into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialRange {
    pub net: IpNet,
    pub what: &'static str,
}

const fn v4([a, b, c, d]: [u8; 4], len: u8, what: &'static str) -> SpecialRange {
    SpecialRange {
        net: IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)),
        what,
    }
}

const fn v6(segments: [u16; 8], len: u8, what: &'static str) -> SpecialRange {
    let [a, b, c, d, e, f, g, h] = segments;
    SpecialRange {
        net: IpNet::V6(Ipv6Net::new_assert(
            Ipv6Addr::new(a, b, c, d, e, f, g, h),
            len,
        )),
        what,
    }
}

/// Rejected by default, whatever the policy says.
///
/// Private ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7) are not here: internal
/// names legitimately resolve into them. A policy that must keep names out of them denies them
/// (`denied_destinations: [{cidr: 10.0.0.0/8}]`), and the filter honours that.
pub const SPECIAL_PURPOSE: &[SpecialRange] = &[
    v4(
        [0, 0, 0, 0],
        8,
        "\"this network\" (RFC 1122); Linux connects 0.0.0.0 to the local host",
    ),
    v4(
        [127, 0, 0, 0],
        8,
        "loopback: a name pointing at the local host is DNS rebinding",
    ),
    v4(
        [169, 254, 0, 0],
        16,
        "link-local, home of cloud instance metadata (169.254.169.254: AWS, GCP, Azure, OCI; \
         169.254.170.2: ECS task credentials)",
    ),
    v4([100, 100, 100, 200], 32, "Alibaba Cloud instance metadata"),
    v4(
        [168, 63, 129, 16],
        32,
        "Azure platform endpoint (WireServer, host DNS and health probes)",
    ),
    v4(
        [192, 0, 0, 0],
        24,
        "IETF protocol assignments (RFC 6890), not a destination for public names",
    ),
    v4([224, 0, 0, 0], 4, "multicast"),
    v4(
        [240, 0, 0, 0],
        4,
        "reserved, and the limited broadcast address 255.255.255.255",
    ),
    v6(
        [0; 8],
        128,
        "the unspecified address; Linux connects :: to the local host",
    ),
    v6(
        [0, 0, 0, 0, 0, 0, 0, 1],
        128,
        "loopback: a name pointing at the local host is DNS rebinding",
    ),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
    v6(
        [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254],
        128,
        "AWS instance metadata (IPv6)",
    ),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
];

/// NAT64 well-known prefix (RFC 6052 §2.1).
const NAT64_WKP: Ipv6Net = Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96);

/// Why an address is not installed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// Inside `denied_destinations[rule]`.
    DeniedByPolicy { rule: usize, net: IpNet },
    /// Inside a [`SPECIAL_PURPOSE`] range.
    SpecialPurpose(SpecialRange),
    /// A known DNS-over-HTTPS resolver (with `block_doh`).
    DohProvider { provider: String },
}

impl Rejection {
    /// A short, bounded label for metrics and structured logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::DeniedByPolicy { .. } => "denied_by_rule",
            Rejection::SpecialPurpose(_) => "special_purpose_address",
            Rejection::DohProvider { .. } => "doh_provider",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::DeniedByPolicy { rule, net } => {
                write!(f, "inside {net}, denied by denied_destinations[{rule}]")
            }
            Rejection::SpecialPurpose(range) => write!(f, "inside {}: {}", range.net, range.what),
            Rejection::DohProvider { provider } => {
                write!(f, "a DNS-over-HTTPS resolver of {provider} (block_doh)")
            }
        }
    }
}

/// Decides, address by address, what an allowed name's answer may install.
#[derive(Clone, Debug, Default)]
pub struct RebindFilter {
    policy: Vec<(usize, IpNet)>,
    doh: Vec<(IpAddr, String)>,
}

impl RebindFilter {
    /// The policy's denied CIDRs (and IP-literal denied hosts, which parse as CIDRs), plus
    /// [`SPECIAL_PURPOSE`].
    pub fn from_policy(policy: &Policy) -> Self {
        RebindFilter::new(
            policy
                .denied
                .iter()
                .enumerate()
                .filter_map(|(i, d)| match d.target {
                    Target::Cidr(net) => Some((i, net)),
                    Target::Host(_) => None,
                }),
        )
    }

    /// `denied` as (rule index, network) plus [`SPECIAL_PURPOSE`].
    /// The filter every address the agent installs under `policy` passes, whatever its
    /// source (the agent's own lookups of the policy's host names, the proxy's answers to the
    /// workload): the policy's denied CIDRs, the special-purpose ranges and, with `block_doh`,
    /// the known DNS-over-HTTPS resolvers.
    pub fn for_policy(policy: &Policy) -> Self {
        let filter = RebindFilter::from_policy(policy);
        let block_doh = policy.dns.as_ref().is_some_and(|d| d.block_doh);
        if block_doh {
            filter.with_doh(super::doh_list())
        } else {
            filter
        }
    }

    pub fn new(denied: impl IntoIterator<Item = (usize, IpNet)>) -> Self {
        RebindFilter {
            policy: denied.into_iter().collect(),
            doh: Vec::new(),
        }
    }

    /// Also rejects the addresses of the known DoH resolvers (`block_doh`).
    pub fn with_doh(mut self, list: &DohList) -> Self {
        self.doh = list
            .addresses()
            .map(|(addr, provider)| (addr, provider.name.clone()))
            .collect();
        self
    }

    /// `Ok` when `addr` may be installed, else the first reason it may not: a policy denial
    /// before a special-purpose range before a DoH resolver.
    pub fn check(&self, addr: IpAddr) -> Result<(), Rejection> {
        for candidate in judged_as(addr) {
            if let Some((rule, net)) = self.policy.iter().find(|(_, n)| n.contains(&candidate)) {
                return Err(Rejection::DeniedByPolicy {
                    rule: *rule,
                    net: *net,
                });
            }
        }
        for candidate in judged_as(addr) {
            if let Some(range) = SPECIAL_PURPOSE.iter().find(|r| r.net.contains(&candidate)) {
                return Err(Rejection::SpecialPurpose(*range));
            }
        }
        for candidate in judged_as(addr) {
            if let Some((_, provider)) = self.doh.iter().find(|(a, _)| *a == candidate) {
                return Err(Rejection::DohProvider {
                    provider: provider.clone(),
                });
            }
        }
        Ok(())
    }

    /// Splits an answer's addresses into those to install and those rejected, with why.
    pub fn partition(
        &self,
        addresses: &[AddressRecord],
    ) -> (Vec<AddressRecord>, Vec<(AddressRecord, Rejection)>) {
        let mut installable = Vec::new();
        let mut rejected = Vec::new();
        for a in addresses {
            match self.check(a.addr) {
                Ok(()) => installable.push(*a),
                Err(why) => rejected.push((*a, why)),
            }
        }
        (installable, rejected)
    }
}

/// The addresses the kernel may end up connecting to for `addr`: its canonical form (IPv4 for
/// a mapped address), plus the embedded IPv4 address of a NAT64 address.
/// Where an address the agent was about to install came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The agent's own lookup of a host name of the policy (at start, on refresh, on reload).
    PolicyLookup,
    /// An answer the DNS proxy relayed to the workload.
    ProxyAnswer,
    /// An address learned before a reload, judged again under the new policy.
    Reload,
}

impl Source {
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::PolicyLookup => "policy_lookup",
            Source::ProxyAnswer => "proxy_answer",
            Source::Reload => "reload",
        }
    }
}

/// Counts and logs one address the filter kept out: the same event and counter for every
/// source. `log` is false when the caller's log bound is used up (the count stays exact).
pub fn report_rejection(
    counter: &Family<PolicyLabels, Counter>,
    policy: &str,
    name: &str,
    addr: IpAddr,
    why: &Rejection,
    source: Source,
    log: bool,
) {
    counter
        .get_or_create(&PolicyLabels {
            policy: policy.to_owned(),
        })
        .inc();
    if log {
        tracing::warn!(event = "dns_rebinding_blocked", policy = %policy, name = %name,
            address = %addr, reason = why.reason(), detail = %why, source = source.as_str(),
            "address not installed: it points into a denied or special-purpose range");
    }
}

fn judged_as(addr: IpAddr) -> impl Iterator<Item = IpAddr> {
    let canonical = addr.to_canonical();
    let embedded = match canonical {
        IpAddr::V6(v6) if NAT64_WKP.contains(&v6) => {
            let o = v6.octets();
            Some(IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15])))
        }
        _ => None,
    };
    std::iter::once(canonical).chain(embedded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn special(addr: &str) -> Option<&'static str> {
        match RebindFilter::default().check(ip(addr)) {
            Err(Rejection::SpecialPurpose(r)) => Some(r.what),
            Ok(()) => None,
            Err(other) => panic!("{addr}: {other}"),
        }
    }

    #[test]
    fn metadata_link_local_and_loopback_are_rejected_by_default() {
        for addr in [
            "169.254.169.254",
            "169.254.170.2",
            "169.254.0.1",
            "fd00:ec2::254",
            "fe80::1",
            "100.100.100.200",
            "168.63.129.16",
            "127.0.0.1",
            "127.255.255.254",
            "::1",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "224.0.0.251",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "ff02::1",
            "192.0.0.192",
        ] {
            assert!(special(addr).is_some(), "{addr} should be rejected");
        }
    }

    #[test]
    fn ordinary_public_and_private_addresses_pass() {
        for addr in [
            "93.184.216.34",
            "1.2.3.4",
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.0.1",
            "100.100.100.201",
            "169.253.255.255",
            "2606:4700::1111",
            "fd00:ec2::253",
            "fd12::1",
        ] {
            assert_eq!(special(addr), None, "{addr} should pass");
        }
    }

    #[test]
    fn mapped_and_nat64_forms_are_judged_as_their_ipv4_address() {
        assert!(special("::ffff:169.254.169.254").is_some());
        assert!(special("::ffff:127.0.0.1").is_some());
        assert!(special("64:ff9b::a9fe:a9fe").is_some()); // 169.254.169.254
        assert!(special("64:ff9b::7f00:1").is_some()); // 127.0.0.1
        assert_eq!(special("64:ff9b::5db8:d822"), None); // 93.184.216.34
        assert_eq!(special("::ffff:93.184.216.34"), None);
    }

    #[test]
    fn policy_denied_cidrs_win_and_name_their_rule() {
        let f = RebindFilter::new([(0, net("10.0.0.0/8")), (2, net("2001:db8::/32"))]);
        assert_eq!(
            f.check(ip("10.9.8.7")),
            Err(Rejection::DeniedByPolicy {
                rule: 0,
                net: net("10.0.0.0/8")
            })
        );
        assert_eq!(
            f.check(ip("::ffff:10.9.8.7")),
            Err(Rejection::DeniedByPolicy {
                rule: 0,
                net: net("10.0.0.0/8")
            })
        );
        assert!(matches!(
            f.check(ip("2001:db8::1")),
            Err(Rejection::DeniedByPolicy { rule: 2, .. })
        ));
        // A policy range that also covers a special range reports the policy rule.
        let f = RebindFilter::new([(1, net("169.254.0.0/16"))]);
        assert!(matches!(
            f.check(ip("169.254.169.254")),
            Err(Rejection::DeniedByPolicy { rule: 1, .. })
        ));
        assert_eq!(f.check(ip("93.184.216.34")), Ok(()));
    }

    #[test]
    fn from_policy_takes_denied_cidrs_only() {
        let text = "egress_policy:\n  default_action: DENY\n  allowed_destinations: []\n  \
                    denied_destinations:\n    - host: evil.com\n    - cidr: 10.0.0.0/8\n    \
                    - host: 192.0.2.7\n";
        let p = egress_policy::parse_str(text, std::path::Path::new("t.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let f = RebindFilter::from_policy(&p);
        assert!(matches!(
            f.check(ip("10.0.0.1")),
            Err(Rejection::DeniedByPolicy { rule: 1, .. })
        ));
        assert!(matches!(
            f.check(ip("192.0.2.7")),
            Err(Rejection::DeniedByPolicy { rule: 2, .. })
        ));
        assert_eq!(f.check(ip("192.0.2.8")), Ok(()));
    }

    #[test]
    fn doh_resolvers_are_rejected_with_block_doh() {
        let list = DohList::builtin().unwrap_or_else(|e| panic!("{e}"));
        let f = RebindFilter::default().with_doh(&list);
        for addr in [
            "1.1.1.1",
            "8.8.8.8",
            "2001:4860:4860::8888",
            "::ffff:9.9.9.9",
        ] {
            assert!(
                matches!(f.check(ip(addr)), Err(Rejection::DohProvider { .. })),
                "{addr}"
            );
        }
        assert_eq!(RebindFilter::default().check(ip("1.1.1.1")), Ok(()));
    }

    #[test]
    fn partition_keeps_ttls_and_reasons() {
        let f = RebindFilter::default();
        let good = AddressRecord {
            addr: ip("93.184.216.34"),
            ttl: 60,
        };
        let bad = AddressRecord {
            addr: ip("169.254.169.254"),
            ttl: 30,
        };
        let (ok, rejected) = f.partition(&[good, bad]);
        assert_eq!(ok, vec![good]);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].0, bad);
        assert_eq!(rejected[0].1.reason(), "special_purpose_address");
        assert!(rejected[0].1.to_string().contains("169.254.0.0/16"));
    }
}
