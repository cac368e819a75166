//! Validated policy types. Every value here has already passed validation: a `Cidr` is a
//! network address with a legal prefix, a `Port` is 1..=65535, a `HostPattern` is a
//! syntactically valid DNS name or wildcard.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

pub use super::aws::AwsService;

/// A whole policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Display name: the `name` extension key, else the file stem.
    pub name: String,
    pub default_action: DefaultAction,
    pub allowed: Vec<AllowedDestination>,
    pub denied: Vec<DeniedDestination>,
    pub dns: Option<DnsPolicy>,
    pub rate_limits: Option<RateLimits>,
    /// Loopback destinations are out of MCP-NET-02's scope and allowed unless this is false.
    pub allow_loopback: bool,
    /// `loopback: {ports: [...]}`: loopback destinations are allowed at these TCP and UDP
    /// ports only (sorted, no repeats); empty when the key is left out. Never set together
    /// with `allow_loopback` (which is then false).
    pub loopback_ports: Vec<u16>,
    /// Inet sockets other than TCP/UDP (raw, ICMP, SCTP, ...) may be created.
    pub allow_other_socket_types: bool,
    /// Listening ports that accept connections from non-loopback peers, and from whom.
    pub inbound: Vec<InboundRule>,
    /// `mode:` as written (`None`: left out, enforce unless `--mode audit` asks otherwise).
    pub mode: Option<Mode>,
}

/// How many ports `loopback.ports` may list (the kernel's slot holds that many).
pub const MAX_LOOPBACK_PORTS: usize = 16;

/// Whether denials are enforced or only reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Denied attempts fail with `EPERM` (the default).
    Enforce,
    /// Denied attempts go through, and are logged and counted with `verdict: audit`.
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `inbound:` entry: peers in `from` may connect to the workload's TCP listener on `port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundRule {
    /// 1..=65535.
    pub port: u16,
    /// Non-empty, canonical (IPv4-mapped ranges as IPv4), without repeats, in the order written.
    pub from: Vec<IpNet>,
    pub purpose: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultAction {
    Deny,
    Allow,
}

/// Where a rule points: a DNS name (or wildcard), or an address range. A `host:` that is an
/// IP literal becomes a single-address `Cidr`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Host(HostPattern),
    Cidr(IpNet),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// A fully qualified name, lowercased, without trailing dot.
    Exact(String),
    /// `*.suffix`: any name strictly below `suffix` (lowercased, no trailing dot).
    Wildcard(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    /// TCP on the listed ports.
    Http,
    /// TCP on the listed ports.
    Https,
    /// UDP and TCP on the listed ports.
    Dns,
}

impl Protocol {
    /// Transport protocols this application protocol runs over.
    pub fn transports(self) -> &'static [Transport] {
        match self {
            Protocol::Tcp | Protocol::Http | Protocol::Https => &[Transport::Tcp],
            Protocol::Udp => &[Transport::Udp],
            Protocol::Dns => &[Transport::Udp, Transport::Tcp],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Dns => "dns",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Tcp,
    Udp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedDestination {
    pub target: Target,
    /// Non-empty, sorted, deduplicated, each 1..=65535.
    pub ports: Vec<u16>,
    /// Non-empty, sorted, deduplicated.
    pub protocols: Vec<Protocol>,
    pub purpose: Option<String>,
    pub rate_limit: Option<RateLimit>,
    pub restrictions: Option<Restrictions>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeniedDestination {
    pub target: Target,
}

/// `restrictions:` of an entry whose host is under an AWS suffix: the names it matches are
/// admitted only when they are endpoints of a listed service in a listed region
/// ([`super::aws`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restrictions {
    /// Valid region codes, lowercase, deduplicated; empty: any region.
    pub regions: Vec<String>,
    /// Deduplicated; empty: every service of the closed list.
    pub services: Vec<AwsService>,
}

/// `dns_policy:`. The workload's DNS always goes to the agent's proxy; this says where the
/// proxy may forward and what else is blocked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsPolicy {
    /// Upstream resolvers (port 53), in the order written, without repeats; empty when the key
    /// is left out: the host's resolvers (`--resolv-conf`).
    pub allowed_resolvers: Vec<IpAddr>,
    /// Refuse the names and deny the addresses of the known DNS-over-HTTPS resolvers.
    pub block_doh: bool,
    /// Deny TCP and UDP port 853 (DNS over TLS and over QUIC) to every destination.
    pub block_dot: bool,
}

/// `max_connections` per `time_window` seconds; both at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub max_connections: u32,
    pub time_window_secs: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimits {
    pub per_destination: Option<RateLimit>,
    /// From `global: {max_new_connections, time_window}`.
    pub global: Option<RateLimit>,
}

impl AllowedDestination {
    /// (transport, port) pairs this rule allows.
    pub fn transport_ports(&self) -> impl Iterator<Item = (Transport, u16)> + '_ {
        let mut transports: Vec<Transport> = self
            .protocols
            .iter()
            .flat_map(|p| p.transports().iter().copied())
            .collect();
        transports.sort();
        transports.dedup();
        transports
            .into_iter()
            .flat_map(move |t| self.ports.iter().map(move |&p| (t, p)))
    }
}

impl fmt::Display for DefaultAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DefaultAction::Deny => "DENY",
            DefaultAction::Allow => "ALLOW",
        })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// A host pattern as written in a policy, or a network as `address/prefix`.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Host(host) => host.fmt(f),
            Target::Cidr(net) => net.fmt(f),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} connections per {} s",
            self.max_connections, self.time_window_secs
        )
    }
}

impl Policy {
    /// The mode in force: enforce unless audit was asked for.
    pub fn mode(&self) -> Mode {
        self.mode.unwrap_or(Mode::Enforce)
    }

    /// Whether denials are only reported.
    pub fn audit(&self) -> bool {
        self.mode() == Mode::Audit
    }

    /// What the policy allows and refuses, one line per rule, for `egress-agent check`.
    pub fn summary(&self) -> String {
        Summary(self).to_string()
    }
}

struct Summary<'a>(&'a Policy);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.0;
        writeln!(f, "policy {}", p.name)?;
        if p.audit() {
            writeln!(
                f,
                "  mode: audit (denied attempts are let through, logged and counted with verdict \
                 audit)"
            )?;
        }
        match p.default_action {
            DefaultAction::Deny => writeln!(
                f,
                "  default: DENY (every destination not allowed below is refused)"
            )?,
            DefaultAction::Allow => writeln!(
                f,
                "  default: ALLOW (every destination not denied below is allowed)"
            )?,
        }
        if p.allowed.is_empty() {
            writeln!(f, "  allow: nothing (no allowed_destinations)")?;
        }
        for rule in &p.allowed {
            write!(f, "  allow {}", rule.target)?;
            let mut sep = " ";
            for (transport, port) in rule.transport_ports() {
                write!(f, "{sep}{transport}/{port}")?;
                sep = ", ";
            }
            f.write_str(" (")?;
            let mut sep = "";
            for protocol in &rule.protocols {
                write!(f, "{sep}{protocol}")?;
                sep = ", ";
            }
            f.write_str(")")?;
            if let Some(purpose) = &rule.purpose {
                write!(f, ": {purpose}")?;
            }
            writeln!(f)?;
            if let Some(limit) = &rule.rate_limit {
                writeln!(f, "    rate limit: {limit}")?;
            }
            if let Some(r) = &rule.restrictions {
                writeln!(
                    f,
                    "    restrictions: regions [{}], services [{}] (names must be endpoints of a \
                     listed service in a listed region)",
                    if r.regions.is_empty() {
                        "any".to_owned()
                    } else {
                        r.regions.join(", ")
                    },
                    if r.services.is_empty() {
                        "any known".to_owned()
                    } else {
                        r.services
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                )?;
            }
        }
        for rule in &p.denied {
            writeln!(f, "  deny  {} (every port and protocol)", rule.target)?;
        }
        if let Some(dns) = &p.dns {
            let resolvers: Vec<String> = dns
                .allowed_resolvers
                .iter()
                .map(ToString::to_string)
                .collect();
            let resolvers = if resolvers.is_empty() {
                "from --resolv-conf".to_owned()
            } else {
                format!("[{}]", resolvers.join(", "))
            };
            writeln!(
                f,
                "  dns_policy: resolvers {resolvers}, block DoH: {}, block DoT: {}",
                yes_no(dns.block_doh),
                yes_no(dns.block_dot)
            )?;
        }
        if let Some(limits) = &p.rate_limits {
            if let Some(limit) = &limits.per_destination {
                writeln!(f, "  rate limit per destination: {limit}")?;
            }
            if let Some(limit) = &limits.global {
                writeln!(
                    f,
                    "  rate limit global: {} new connections per {} s",
                    limit.max_connections, limit.time_window_secs
                )?;
            }
        }
        if p.inbound.is_empty() {
            writeln!(
                f,
                "  inbound: no connections from other hosts (no `inbound` rules)"
            )?;
        }
        for rule in &p.inbound {
            let from: Vec<String> = rule.from.iter().map(ToString::to_string).collect();
            write!(f, "  inbound tcp/{} from [{}]", rule.port, from.join(", "))?;
            if let Some(purpose) = &rule.purpose {
                write!(f, ": {purpose}")?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "  loopback (127.0.0.0/8, ::1): {}",
            if p.allow_loopback {
                "allowed".to_owned()
            } else if !p.loopback_ports.is_empty() {
                let ports: Vec<String> = p.loopback_ports.iter().map(u16::to_string).collect();
                format!("allowed at tcp/udp ports {} only", ports.join(", "))
            } else {
                "refused".to_owned()
            }
        )?;
        write!(
            f,
            "  other socket types (raw, ICMP, SCTP, ...): {}",
            if p.allow_other_socket_types {
                "allowed"
            } else {
                "refused"
            }
        )
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
