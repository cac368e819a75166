//! Known DNS-over-HTTPS resolvers, for `dns_policy.block_doh`: their names, which the proxy
//! refuses even where an allowed wildcard covers them, and their addresses, which are denied.
//!
//! The list is `egress-policy/data/doh-providers.yaml`, embedded at build time; its header says what
//! belongs in it, where it comes from and how to update it. DNS-over-TLS (`block_dot`) needs no
//! list: it has its own port, [`DOT_PORT`], blocked towards every destination.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::Deserialize;

use super::names::PatternTable;
use crate::HostPattern;

/// The embedded provider list.
pub const BUILTIN_LIST: &str = include_str!("../data/doh-providers.yaml");
/// DNS over TLS (RFC 7858) and DNS over QUIC (RFC 9250): TCP and UDP 853.
pub const DOT_PORT: u16 = 853;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DohProvider {
    pub name: String,
    /// The pages the names and addresses were checked against (https URLs).
    pub sources: Vec<String>,
    /// When they were last checked, `YYYY-MM-DD`.
    pub verified: String,
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
    #[error(
        "DoH provider list: providers[{provider}]: no `sources`; list the https URLs of the \
         pages the entry was checked against"
    )]
    NoSources { provider: usize },
    #[error("DoH provider list: providers[{provider}]: source `{source_url}` is not an https URL")]
    Source { provider: usize, source_url: String },
    #[error(
        "DoH provider list: providers[{provider}]: verified `{verified}` is not a date; \
         expected the day the entry was checked, as YYYY-MM-DD"
    )]
    Verified { provider: usize, verified: String },
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
    sources: Vec<String>,
    verified: String,
    hosts: Vec<String>,
    addresses: Vec<String>,
}

impl DohList {
    /// The embedded list. Parsed once at startup; an error is a build defect that the unit
    /// tests catch first.
    /// A list with no providers: a policy with `block_doh` is then refused as unenforceable
    /// (see [`crate::unsupported_features`]).
    pub fn empty() -> DohList {
        DohList {
            providers: Vec::new(),
            names: PatternTable::default(),
            addresses: HashMap::new(),
        }
    }

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
            if p.sources.is_empty() {
                return Err(DohListError::NoSources { provider: i });
            }
            if let Some(bad) = p.sources.iter().find(|u| !is_https_url(u)) {
                return Err(DohListError::Source {
                    provider: i,
                    source_url: bad.clone(),
                });
            }
            if !is_iso_date(&p.verified) {
                return Err(DohListError::Verified {
                    provider: i,
                    verified: p.verified,
                });
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
                sources: p.sources,
                verified: p.verified,
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

/// `https://` followed by at least a host.
fn is_https_url(url: &str) -> bool {
    url.strip_prefix("https://")
        .is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace))
}

/// `YYYY-MM-DD` with a month of 1..=12 and a day of 1..=31.
fn is_iso_date(date: &str) -> bool {
    let parts: Vec<&str> = date.split('-').collect();
    let [year, month, day] = parts.as_slice() else {
        return false;
    };
    let number = |s: &str, len: usize| {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    number(year, 4).is_some()
        && number(month, 2).is_some_and(|m| (1..=12).contains(&m))
        && number(day, 2).is_some_and(|d| (1..=31).contains(&d))
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn builtin() -> DohList {
        DohList::builtin().unwrap_or_else(|e| panic!("{e}"))
    }

    fn provider_of(list: &DohList, name: &str) -> Option<String> {
        list.provider_for_name(name).map(|p| p.name.clone())
    }

    #[test]
    fn builtin_list_parses_and_covers_the_big_providers() {
        let list = builtin();
        let n = list.providers().len();
        assert!((20..=60).contains(&n), "{n} providers");
        for (name, provider) in [
            ("dns.google", "Google Public DNS"),
            ("dns64.dns.google", "Google Public DNS"),
            ("cloudflare-dns.com", "Cloudflare 1.1.1.1"),
            ("one.one.one.one", "Cloudflare 1.1.1.1"),
            ("mozilla.cloudflare-dns.com", "Cloudflare 1.1.1.1"),
            ("dns.quad9.net", "Quad9"),
            ("doh.opendns.com", "Cisco OpenDNS"),
            ("dns.adguard-dns.com", "AdGuard DNS"),
            ("dns.nextdns.io", "NextDNS"),
            ("doh.cleanbrowsing.org", "CleanBrowsing"),
            ("doh.xfinity.com", "Comcast Xfinity"),
        ] {
            assert_eq!(
                provider_of(&list, name).as_deref(),
                Some(provider),
                "{name}"
            );
        }
        for (addr, provider) in [
            ("8.8.8.8", "Google Public DNS"),
            ("8.8.4.4", "Google Public DNS"),
            ("2001:4860:4860::8888", "Google Public DNS"),
            ("2001:4860:4860::8844", "Google Public DNS"),
            ("1.1.1.1", "Cloudflare 1.1.1.1"),
            ("1.0.0.1", "Cloudflare 1.1.1.1"),
            ("2606:4700:4700::1111", "Cloudflare 1.1.1.1"),
            ("2606:4700:4700::1001", "Cloudflare 1.1.1.1"),
            ("9.9.9.9", "Quad9"),
            ("149.112.112.112", "Quad9"),
            ("2620:fe::fe", "Quad9"),
            ("2620:fe::9", "Quad9"),
            ("208.67.222.222", "Cisco OpenDNS"),
            ("94.140.14.14", "AdGuard DNS"),
            ("185.228.168.168", "CleanBrowsing"),
        ] {
            assert_eq!(
                list.provider_for_address(ip(addr)).map(|p| p.name.as_str()),
                Some(provider),
                "{addr}"
            );
        }
        assert!(list.addresses().count() > 100);
    }

    #[test]
    fn every_entry_names_its_sources_and_when_it_was_checked() {
        for p in builtin().providers() {
            assert!(!p.sources.is_empty(), "{}: sources", p.name);
            for source in &p.sources {
                assert!(source.starts_with("https://"), "{}: {source}", p.name);
            }
            assert!(is_iso_date(&p.verified), "{}: {}", p.name, p.verified);
        }
    }

    #[test]
    fn shut_down_services_are_not_listed() {
        // Mullvad ended its public encrypted DNS on 2026-11-02; its addresses may be reused.
        let list = builtin();
        assert_eq!(provider_of(&list, "dns.mullvad.net"), None);
        assert!(list.provider_for_address(ip("194.242.2.2")).is_none());
    }

    #[test]
    fn names_match_exactly_or_strictly_below_a_listed_wildcard() {
        let list = builtin();
        assert!(list.provider_for_name("DNS.Google.").is_some());
        assert!(list.provider_for_name("abc123.dns.nextdns.io").is_some());
        assert!(list.provider_for_name("firefox.dns.nextdns.io").is_some());
        assert!(
            list.provider_for_name("x1y2.cloudflare-gateway.com")
                .is_some()
        );
        assert!(list.provider_for_name("p2.freedns.controld.com").is_some());
        // A wildcard never covers its own suffix, and exact names cover nothing below them.
        assert!(list.provider_for_name("cloudflare-gateway.com").is_none());
        assert!(list.provider_for_name("nextdns.io").is_none());
        assert!(list.provider_for_name("www.dns.google").is_none());
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
        let entry = |sources: &str, verified: &str, hosts: &str, addresses: &str| {
            format!(
                "providers:\n  - name: X\n    sources: {sources}\n    verified: {verified}\n    \
                 hosts: {hosts}\n    addresses: {addresses}\n"
            )
        };
        let provider = |hosts: &str, addresses: &str| {
            entry("[\"https://x.example\"]", "2026-11-21", hosts, addresses)
        };
        assert!(DohList::parse(&provider("[a.b, \"*.c.d\"]", "[1.2.3.4]")).is_ok());
        assert!(bad(&provider("[Dns.X.com]", "[]")).contains("`Dns.X.com`"));
        assert!(bad(&provider("[x]", "[]")).contains("single label"));
        assert!(bad(&provider("[a..b]", "[]")).contains("empty"));
        assert!(bad(&provider("[\"a.*.b\"]", "[]")).contains("only lowercase"));
        assert!(bad(&provider("[]", "[]")).contains("no hosts"));
        assert!(bad(&provider("[a.b]", "[8.8.8.300]")).contains("`8.8.8.300`"));
        assert!(bad(&provider("[a.b, a.b]", "[]")).contains("listed twice"));
        assert!(bad(&provider("[a.b]", "[1.2.3.4, \"::ffff:1.2.3.4\"]")).contains("twice"));
        assert!(bad(&entry("[]", "2026-11-21", "[a.b]", "[]")).contains("no `sources`"));
        assert!(
            bad(&entry(
                "[\"http://x.example\"]",
                "2026-11-21",
                "[a.b]",
                "[]"
            ))
            .contains("`http://x.example` is not an https URL")
        );
        for date in ["2026-13-01", "2026-1-21", "21.11.2026", "soon"] {
            assert!(
                bad(&entry("[\"https://x.example\"]", date, "[a.b]", "[]")).contains("YYYY-MM-DD"),
                "{date}"
            );
        }
        assert!(bad("providers:\n  - name: X\n    hosts: [a.b]\n").contains("sources"));
        assert!(bad("providers: []\nextra: 1\n").contains("extra"));
    }
}

/// The built-in list for tests, parsed once.
#[cfg(test)]
pub(crate) mod testing {
    use super::DohList;

    pub fn builtin() -> &'static DohList {
        static LIST: std::sync::OnceLock<DohList> = std::sync::OnceLock::new();
        LIST.get_or_init(|| DohList::builtin().unwrap_or_else(|e| panic!("{e}")))
    }
}
