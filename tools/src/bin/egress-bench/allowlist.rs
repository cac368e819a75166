//! The allowlist every filter of one size enforces, and how each filter spells it.
//!
//! An allowlist of N entries holds the two benchmark destinations (one IPv4, one IPv6
//! address, allowed last) and N - 2 generated entries: about 40% IPv4 addresses, 40% IPv6
//! addresses, 10% IPv4 CIDRs and 10% IPv6 CIDRs. The addresses are drawn around the
//! destinations (198.18.0.0/15, fd00:e9::/96), so that every lookup of a destination has to
//! tell it apart from many near neighbours: the longest walk an LPM trie does. The CIDRs are
//! disjoint (one per slot of 10.0.0.0/8 and fd00:e9:1::/48), so nftables can hold them in an
//! interval set as they are. Generation is seeded: every run enforces the same lists.
//!
//! No traffic ever goes to a generated entry; only the destinations are contacted.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use crate::world::{DEST_PORT, DEST4, DEST6, FLOOD_TARGET};

/// Ports and protocols of a generated entry in the egress policy (never the benchmark's).
const ENTRY_PORT: u16 = 443;

pub struct Allowlist {
    pub size: usize,
    /// Generated entries, then the two destinations.
    pub entries: Vec<IpNet>,
}

impl Allowlist {
    pub fn generate(size: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ size as u64);
        let rest = size.saturating_sub(2);
        let nets4 = (rest / 10).max(1).min(rest);
        let nets6 = (rest / 10).max(1).min(rest - nets4);
        let hosts4 = (rest - nets4 - nets6) / 2;
        let hosts6 = rest - nets4 - nets6 - hosts4;

        let reserved: HashSet<IpAddr> = [DEST4.into(), DEST6.into(), FLOOD_TARGET.into()].into();
        let mut seen = HashSet::new();
        let mut entries = Vec::with_capacity(size);
        while entries.len() < hosts4 {
            // 198.18.0.0/15: 17 random bits.
            let ip = Ipv4Addr::from(0xc612_0000 | rng.random_range(0..1u32 << 17));
            if !reserved.contains(&ip.into()) && seen.insert(ip) {
                entries.push(IpNet::from(IpAddr::V4(ip)));
            }
        }
        let mut seen = HashSet::new();
        while entries.len() < hosts4 + hosts6 {
            // fd00:e9::/96: 32 random bits.
            let low = u128::from(rng.random::<u32>());
            let ip =
                Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0xe9, 0, 0, 0, 0, 0, 0)) | low);
            if !reserved.contains(&ip.into()) && seen.insert(ip) {
                entries.push(IpNet::from(IpAddr::V6(ip)));
            }
        }
        for slot in 0..nets4 {
            // Slot i is 10.x.y.0/24 (65,536 slots); inside it an aligned /24../30.
            let len: u8 = rng.random_range(24..=30);
            let slot = u32::try_from(slot).unwrap_or(0) & 0xffff;
            let offset = rng.random_range(0..1u32 << (len - 24)) << (32 - u32::from(len));
            let base = Ipv4Addr::from(0x0a00_0000 | (slot << 8) | offset);
            if let Ok(net) = Ipv4Net::new(base, len) {
                entries.push(IpNet::V4(net));
            }
        }
        for slot in 0..nets6 {
            // Slot i is fd00:e9:1:i::/64; inside it an aligned /64../120.
            let len: u8 = rng.random_range(64..=120);
            let slot = u128::from(u16::try_from(slot % 65536).unwrap_or(0));
            let host_bits = 128 - u32::from(len);
            let offset = match rng.random::<u64>().checked_shr(host_bits) {
                Some(high) if host_bits < 64 => u128::from(high << host_bits),
                _ => 0,
            };
            let base = u128::from(Ipv6Addr::new(0xfd00, 0xe9, 1, 0, 0, 0, 0, 0)) | (slot << 64);
            if let Ok(net) = Ipv6Net::new(Ipv6Addr::from(base | offset), len) {
                entries.push(IpNet::V6(net));
            }
        }
        entries.push(IpNet::from(IpAddr::V4(DEST4)));
        entries.push(IpNet::from(IpAddr::V6(DEST6)));
        Allowlist { size, entries }
    }

    fn generated(&self) -> &[IpNet] {
        &self.entries[..self.entries.len() - 2]
    }

    /// MCP-NET-02 YAML: exact addresses as `host:` IP literals, CIDRs as `cidr:`, each on
    /// TCP 443; the destinations on TCP and UDP [`DEST_PORT`]. `extra` is appended under
    /// `egress_policy:` (rate limits).
    pub fn egress_yaml(&self, name: &str, extra: &str) -> String {
        let mut y = String::with_capacity(64 * self.entries.len() + 256);
        let _ = writeln!(y, "egress_policy:\n  name: {name}\n  default_action: DENY");
        y.push_str("  allowed_destinations:\n");
        for net in self.generated() {
            let _ = match net {
                IpNet::V4(n) if n.prefix_len() == 32 => writeln!(
                    y,
                    "    - {{host: \"{}\", ports: [{ENTRY_PORT}], protocols: [tcp]}}",
                    n.addr()
                ),
                IpNet::V6(n) if n.prefix_len() == 128 => writeln!(
                    y,
                    "    - {{host: \"{}\", ports: [{ENTRY_PORT}], protocols: [tcp]}}",
                    n.addr()
                ),
                _ => writeln!(
                    y,
                    "    - {{cidr: \"{net}\", ports: [{ENTRY_PORT}], protocols: [tcp]}}"
                ),
            };
        }
        for dest in [IpAddr::V4(DEST4), IpAddr::V6(DEST6)] {
            let _ = writeln!(
                y,
                "    - {{host: \"{dest}\", ports: [{DEST_PORT}], protocols: [tcp, udp], purpose: \"benchmark destination\"}}"
            );
        }
        y.push_str(extra);
        y
    }

    /// `iptables-restore` (or, with `v6`, `ip6tables-restore`) input: one ACCEPT rule per
    /// entry of that family in chain EGRESS_BENCH, the destination's rule last, then DROP for
    /// TCP and UDP. Stateless, as an allowlist chain without a conntrack shortcut is: every
    /// outgoing packet walks the chain.
    pub fn iptables_restore(&self, v6: bool) -> String {
        let mut r = String::with_capacity(40 * self.entries.len() + 256);
        r.push_str(
            "*filter\n:OUTPUT ACCEPT [0:0]\n:EGRESS_BENCH - [0:0]\n-A OUTPUT -j EGRESS_BENCH\n",
        );
        for net in self
            .entries
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)) == v6)
        {
            let _ = writeln!(r, "-A EGRESS_BENCH -d {net} -j ACCEPT");
        }
        r.push_str("-A EGRESS_BENCH -p tcp -j DROP\n-A EGRESS_BENCH -p udp -j DROP\nCOMMIT\n");
        r
    }

    /// An `nft -f` script: exact addresses in hash sets, CIDRs in interval sets, one rule per
    /// set, then drop TCP and UDP. The destinations are exact addresses: one hash lookup.
    pub fn nft_script(&self) -> String {
        let mut hosts4 = Vec::new();
        let mut nets4 = Vec::new();
        let mut hosts6 = Vec::new();
        let mut nets6 = Vec::new();
        for net in &self.entries {
            match net {
                IpNet::V4(n) if n.prefix_len() == 32 => hosts4.push(n.addr().to_string()),
                IpNet::V4(n) => nets4.push(n.to_string()),
                IpNet::V6(n) if n.prefix_len() == 128 => hosts6.push(n.addr().to_string()),
                IpNet::V6(n) => nets6.push(n.to_string()),
            }
        }
        let set = |name: &str, ty: &str, interval: bool, elements: &[String]| {
            let flags = if interval { " flags interval;" } else { "" };
            let elements = if elements.is_empty() {
                String::new()
            } else {
                format!(" elements = {{ {} }}", elements.join(", "))
            };
            format!("  set {name} {{ type {ty};{flags}{elements} }}\n")
        };
        let mut s = String::with_capacity(48 * self.entries.len() + 512);
        s.push_str("table inet egress_bench {\n");
        s.push_str(&set("hosts4", "ipv4_addr", false, &hosts4));
        s.push_str(&set("nets4", "ipv4_addr", true, &nets4));
        s.push_str(&set("hosts6", "ipv6_addr", false, &hosts6));
        s.push_str(&set("nets6", "ipv6_addr", true, &nets6));
        s.push_str(
            "  chain output {\n    type filter hook output priority filter; policy accept;\n    \
             ip daddr @hosts4 accept\n    ip daddr @nets4 accept\n    \
             ip6 daddr @hosts6 accept\n    ip6 daddr @nets6 accept\n    \
             meta l4proto { tcp, udp } drop\n  }\n}\n",
        );
        s
    }

    /// The exact addresses, for the proxy's own allowlist.
    pub fn exact_addresses(&self) -> HashSet<IpAddr> {
        self.entries
            .iter()
            .filter(|n| n.prefix_len() == n.max_prefix_len())
            .map(IpNet::addr)
            .collect()
    }

    pub fn count_v4(&self) -> usize {
        self.entries
            .iter()
            .filter(|n| matches!(n, IpNet::V4(_)))
            .count()
    }

    pub fn count_v6(&self) -> usize {
        self.entries.len() - self.count_v4()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_mixes_and_destinations() {
        for size in [10, 1000] {
            let a = Allowlist::generate(size, 7);
            assert_eq!(a.entries.len(), size);
            assert_eq!(a.entries[size - 2], IpNet::from(IpAddr::V4(DEST4)));
            let cidrs = a
                .entries
                .iter()
                .filter(|n| n.prefix_len() != n.max_prefix_len())
                .count();
            assert!(cidrs >= 2 && cidrs <= size / 5 + 2, "{cidrs}");
            // No generated CIDR covers a destination: the destination's rule is reached last.
            assert!(
                !a.generated()
                    .iter()
                    .any(|n| n.contains(&IpAddr::V4(DEST4)) || n.contains(&IpAddr::V6(DEST6)))
            );
        }
        let a = Allowlist::generate(10, 7);
        let b = Allowlist::generate(10, 7);
        assert_eq!(a.entries, b.entries, "generation is seeded");
    }

    #[test]
    fn renders_each_filter() {
        let a = Allowlist::generate(10, 1);
        let y = a.egress_yaml("bench-10", "");
        assert_eq!(y.matches("    - {").count(), 10);
        let ipt = a.iptables_restore(false);
        assert!(ipt.ends_with(&format!(
            "-A EGRESS_BENCH -d {DEST4}/32 -j ACCEPT\n-A EGRESS_BENCH -p tcp -j DROP\n-A EGRESS_BENCH -p udp -j DROP\nCOMMIT\n"
        )));
        let nft = a.nft_script();
        assert!(nft.contains(&DEST6.to_string()));
    }
}
