//! Known DNS-over-HTTPS resolvers, for `dns_policy.block_doh`: their names, which the proxy
//! refuses even where an allowed wildcard covers them, and their addresses, which are denied.
//!
//! The list is `egress-agent/data/doh-providers.yaml`, embedded at build time; its header says what
//! belongs in it, where it comes from and how to update it. DNS-over-TLS (`block_dot`) needs no
//! list: it has its own port, [`DOT_PORT`], blocked towards every destination.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::names::PatternTable;
use crate::policy::HostPattern;

/// The embedded provider list.
pub const BUILTIN_LIST: &str = include_str!("../../data/doh-providers.yaml");
/// DNS over TLS (RFC 7858) and DNS over QUIC (RFC 9250): TCP and UDP 853.
pub const DOT_PORT: u16 = 853;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DohProvider {
    pub name: String,
    /// Where the names and addresses are documented.
    pub source: String,
    pub hosts: Vec<HostPattern>,
    pub addresses: Vec<IpAddr>,
}

/// The parsed list, indexed by name and by address.
#[derive(Clone, Debug)]
pub struct DohList {
    providers: Vec<DohProvider>,
    names: PatternTable,
    addresses: HashMap<IpAddr, usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum DohListError {
    #[error("DoH provider list: {0}")]
    Yaml(#[source] serde_norway::Error),
    #[error("DoH provider list: providers[{provider}]: invalid host `{host}`: {why}")]
    Host {
        provider: usize,
        host: String,
        why: &'static str,
    },
    #[error(
        "DoH provider list: providers[{provider}]: invalid address `{address}`; expected an IPv4 \
         or IPv6 address such as `8.8.8.8` or `2001:4860:4860::8888`"
    )]
    Address { provider: usize, address: String },
    #[error("DoH provider list: providers[{provider}] lists no hosts")]
    NoHosts { provider: usize },
    #[error("DoH provider list: `{entry}` is listed twice (providers[{first}] and [{second}])")]
    Duplicate {
        entry: String,
        first: usize,
        second: usize,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawList {
    providers: Vec<RawProvider>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    source: String,
    hosts: Vec<String>,
    addresses: Vec<String>,
}

impl DohList {
    /// The embedded list. Parsed once at startup; an error is a build defect that the unit
    /// tests catch first.
    pub fn builtin() -> Result<DohList, DohListError> {
        DohList::parse(BUILTIN_LIST)
    }

    pub fn parse(text: &str) -> Result<DohList, DohListError> {
        let raw: RawList = serde_norway::from_str(text).map_err(DohListError::Yaml)?;
        let mut list = DohList {
            providers: Vec::with_capacity(raw.providers.len()),
            names: PatternTable::default(),
            addresses: HashMap::new(),
        };
        let mut seen_hosts: HashMap<HostPattern, usize> = HashMap::new();
        for (i, p) in raw.providers.into_iter().enumerate() {
            if p.hosts.is_empty() {
                return Err(DohListError::NoHosts { provider: i });
            }
            let mut hosts = Vec::with_capacity(p.hosts.len());
            for host in p.hosts {
                let pattern = parse_host(&host).map_err(|why| DohListError::Host {
                    provider: i,
                    host: host.clone(),
                    why,
                })?;
                if let Some(first) = seen_hosts.insert(pattern.clone(), i) {
                    return Err(DohListError::Duplicate {
                        entry: host,
                        first,
                        second: i,
                    });
                }
                list.names.insert(&pattern, i);
                hosts.push(pattern);
            }
            let mut addresses = Vec::with_capacity(p.addresses.len());
            for address in p.addresses {
                let addr = address
                    .parse::<IpAddr>()
                    .map_err(|_| DohListError::Address {
                        provider: i,
                        address: address.clone(),
                    })?
                    .to_canonical();
                if let Some(first) = list.addresses.insert(addr, i) {
                    return Err(DohListError::Duplicate {
                        entry: address,
                        first,
                        second: i,
                    });
                }
                addresses.push(addr);
            }
            list.providers.push(DohProvider {
                name: p.name,
                source: p.source,
                hosts,
                addresses,
            });
        }
        Ok(list)
    }

    pub fn providers(&self) -> &[DohProvider] {
        &self.providers
    }

    /// The provider whose DoH endpoint `name` is (exact or below a listed `*.suffix`); `name`
    /// in any case, with or without a trailing dot.
    pub fn provider_for_name(&self, name: &str) -> Option<&DohProvider> {
        self.names.lookup(name).and_then(|i| self.providers.get(i))
    }

    /// The provider `addr` (or its IPv4-mapped form) belongs to.
    pub fn provider_for_address(&self, addr: IpAddr) -> Option<&DohProvider> {
        self.addresses
            .get(&addr.to_canonical())
            .and_then(|&i| self.providers.get(i))
    }

    /// Every listed address with its provider.
    pub fn addresses(&self) -> impl Iterator<Item = (IpAddr, &DohProvider)> {
        self.providers
            .iter()
            .flat_map(|p| p.addresses.iter().map(move |&a| (a, p)))
    }
}

/// A lowercase LDH name of at least two labels, optionally as `*.suffix`.
fn parse_host(raw: &str) -> Result<HostPattern, &'static str> {
    let (wildcard, name) = match raw.strip_prefix("*.") {
        Some(suffix) => (true, suffix),
        None => (false, raw),
    };
    if name.len() > 253 {
        return Err("longer than 253 characters");
    }
    if !name.contains('.') {
        return Err("a single label; write the provider's full name");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("a label is empty or longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("only lowercase letters, digits, `-` and `.` (and a leading `*.`)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with `-`");
        }
    }
    Ok(if wildcard {
        HostPattern::Wildcard(name.to_owned())
    } else {
        HostPattern::Exact(name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::testutil::ip;

    fn builtin() -> DohList {
        DohList::builtin().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn builtin_list_parses_and_covers_the_big_providers() {
        let list = builtin();
        let n = list.providers().len();
        assert!((15..=40).contains(&n), "{n} providers");
        for (name, provider) in [
            ("dns.google", "Google Public DNS"),
            ("cloudflare-dns.com", "Cloudflare 1.1.1.1"),
            ("dns.quad9.net", "Quad9"),
            ("doh.opendns.com", "Cisco OpenDNS"),
            ("dns.adguard-dns.com", "AdGuard DNS"),
            ("dns.nextdns.io", "NextDNS"),
        ] {
            assert_eq!(
                list.provider_for_name(name).map(|p| p.name.as_str()),
                Some(provider),
                "{name}"
            );
        }
        for (addr, provider) in [
            ("8.8.8.8", "Google Public DNS"),
            ("2001:4860:4860::8888", "Google Public DNS"),
            ("1.1.1.1", "Cloudflare 1.1.1.1"),
            ("2606:4700:4700::1111", "Cloudflare 1.1.1.1"),
            ("9.9.9.9", "Quad9"),
            ("208.67.222.222", "Cisco OpenDNS"),
        ] {
            assert_eq!(
                list.provider_for_address(ip(addr)).map(|p| p.name.as_str()),
                Some(provider),
                "{addr}"
            );
        }
        assert!(list.addresses().count() > 50);
        for p in list.providers() {
            assert!(p.source.starts_with("https://"), "{}: source", p.name);
        }
    }

    #[test]
    fn names_match_in_any_case_with_a_trailing_dot_and_below_wildcards() {
        let list = builtin();
        assert!(list.provider_for_name("DNS.Google.").is_some());
        assert!(list.provider_for_name("abc123.dns.nextdns.io").is_some());
        assert!(list.provider_for_name("google").is_none());
        assert!(list.provider_for_name("notdns.google").is_none());
        assert!(list.provider_for_name("dns.google.evil.com").is_none());
        assert!(list.provider_for_address(ip("::ffff:8.8.4.4")).is_some());
        assert!(list.provider_for_address(ip("8.8.8.9")).is_none());
    }

    #[test]
    fn malformed_lists_are_refused_with_the_entry() {
        let bad = |text: &str| match DohList::parse(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        };
        let provider = |hosts: &str, addresses: &str| {
            format!(
                "providers:\n  - name: X\n    source: https://x\n    hosts: {hosts}\n    \
                 addresses: {addresses}\n"
            )
        };
        assert!(bad(&provider("[Dns.X.com]", "[]")).contains("`Dns.X.com`"));
        assert!(bad(&provider("[x]", "[]")).contains("single label"));
        assert!(bad(&provider("[a..b]", "[]")).contains("empty"));
        assert!(bad(&provider("[\"a.*.b\"]", "[]")).contains("only lowercase"));
        assert!(bad(&provider("[]", "[]")).contains("no hosts"));
        assert!(bad(&provider("[a.b]", "[8.8.8.300]")).contains("`8.8.8.300`"));
        assert!(bad(&provider("[a.b, a.b]", "[]")).contains("listed twice"));
        assert!(bad(&provider("[a.b]", "[1.2.3.4, \"::ffff:1.2.3.4\"]")).contains("twice"));
        assert!(bad("providers:\n  - name: X\n    hosts: [a.b]\n").contains("source"));
        assert!(bad("providers: []\nextra: 1\n").contains("extra"));
    }
}
