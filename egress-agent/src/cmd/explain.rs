//! `egress-agent check POLICY --explain DEST`: would a destination be allowed, by which rule
//! (file:line), and why.
//!
//! The verdict is never computed here: an address is judged by [`egress_policy::reference::decide`],
//! the decision the tests hold the kernel to, and a name by the DNS proxy's
//! [`NamePolicy::decide`] plus the ports of the rules it returns (the ports the proxy installs
//! with the name's addresses). This module only adds the words: which rule, where it is
//! written, and which part of the policy made the difference.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use egress_common::{Dest, Proto, Reason, verdict::NO_RULE};

use crate::dns::install::{NameDecision, NamePolicy, restriction_detail};
use crate::supervisor::session::{self, SessionError};
use egress_policy::compile::{Resolved, canonical_net};
use egress_policy::names::normalize;
use egress_policy::{EntryLines, HostPattern, Policy, Target, Transport, entry_lines};

/// A destination to explain: `HOST[:PORT][/PROTO]`, `ADDR[:PORT][/PROTO]`, `[V6][:PORT][/PROTO]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub subject: Subject,
    pub port: Option<u16>,
    /// TCP unless the query names `udp` (or `dns`).
    pub transport: Transport,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A DNS name, normalised (lowercase, no trailing dot).
    Name(String),
    /// An address, canonical (an IPv4-mapped IPv6 address as IPv4).
    Addr(IpAddr),
}

/// Why a `--explain` argument is not a destination.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryProblem {
    #[error("`{0}` is not a protocol (tcp, udp, http, https or dns)")]
    Protocol(String),
    #[error("`{0}` is not a port (1-65535)")]
    Port(String),
    #[error("`{0}` is neither an IP address nor a DNS name")]
    Host(String),
    #[error("an IPv6 address with a port is written in brackets, as `[2001:db8::1]:443`")]
    Brackets,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(
        "--explain {given}: {problem}; expected HOST[:PORT][/PROTO], e.g. `api.example.com:443/tcp`, \
         `198.51.100.7:53/udp` or `[2001:db8::1]:443`"
    )]
    Query {
        given: String,
        #[source]
        problem: QueryProblem,
    },
    #[error(transparent)]
    Policy(#[from] SessionError),
    #[error("{}: cannot read the policy file", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ExplainError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ExplainError::Query { .. } => crate::exit::USAGE,
            ExplainError::Policy(e) => e.exit_code(),
            ExplainError::Io { .. } => crate::exit::CONFIG,
        }
    }
}

impl Query {
    pub fn parse(given: &str) -> Result<Query, ExplainError> {
        parse_query(given).map_err(|problem| ExplainError::Query {
            given: given.to_owned(),
            problem,
        })
    }
}

fn parse_query(given: &str) -> Result<Query, QueryProblem> {
    let (rest, transport) = match given.rsplit_once('/') {
        Some((rest, proto)) => (rest, transport_of(proto)?),
        None => (given, Transport::Tcp),
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (addr, tail) = inner.split_once(']').ok_or(QueryProblem::Brackets)?;
        let port = match tail {
            "" => None,
            t => Some(port_of(t.strip_prefix(':').ok_or(QueryProblem::Brackets)?)?),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| QueryProblem::Host(addr.to_owned()))?;
        return Ok(Query {
            subject: Subject::Addr(ip.to_canonical()),
            port,
            transport,
        });
    } else if let Ok(ip) = rest.parse::<IpAddr>() {
        return Ok(Query {
            subject: Subject::Addr(ip.to_canonical()),
            port: None,
            transport,
        });
    } else {
        match rest.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => return Err(QueryProblem::Brackets),
            Some((h, p)) => (h, Some(port_of(p)?)),
            None => (rest, None),
        }
    };
    let subject = if let Ok(ip) = host.parse::<IpAddr>() {
        Subject::Addr(ip.to_canonical())
    } else {
        let valid = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        match normalize(host) {
            Some(name) if valid => Subject::Name(name.into_owned()),
            _ => return Err(QueryProblem::Host(host.to_owned())),
        }
    };
    Ok(Query {
        subject,
        port,
        transport,
    })
}

fn transport_of(proto: &str) -> Result<Transport, QueryProblem> {
    match proto.to_ascii_lowercase().as_str() {
        "tcp" | "http" | "https" => Ok(Transport::Tcp),
        "udp" | "dns" => Ok(Transport::Udp),
        _ => Err(QueryProblem::Protocol(proto.to_owned())),
    }
}

fn port_of(text: &str) -> Result<u16, QueryProblem> {
    match text.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(QueryProblem::Port(text.to_owned())),
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.subject, self.port) {
            (Subject::Addr(IpAddr::V6(a)), Some(p)) => write!(f, "[{a}]:{p}")?,
            (Subject::Addr(a), Some(p)) => write!(f, "{a}:{p}")?,
            (Subject::Addr(a), None) => write!(f, "{a}")?,
            (Subject::Name(n), Some(p)) => write!(f, "{n}:{p}")?,
            (Subject::Name(n), None) => f.write_str(n)?,
        }
        write!(f, "/{}", self.transport)
    }
}

/// The outcome for one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// No port was given: allowed on these (transport, port) pairs only.
    AllowOn(Vec<(Transport, u16)>),
}

/// Which list a deciding rule is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum List {
    Allowed,
    Denied,
    /// The built-in list of DNS-over-HTTPS resolvers (`block_doh`).
    DohProviders,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub list: List,
    pub index: usize,
    /// The rule's target as written (`*.example.com`, `10.0.0.0/8`, a provider's name).
    pub target: String,
    /// `file:line`, or the file alone when the line is unknown.
    pub at: Option<String>,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.list {
            List::Allowed => write!(f, "allowed_destinations[{}]", self.index)?,
            List::Denied => write!(f, "denied_destinations[{}]", self.index)?,
            List::DohProviders => write!(f, "the DoH provider list [{}]", self.index)?,
        }
        write!(f, " ({})", self.target)?;
        if let Some(at) = &self.at {
            write!(f, " at {at}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub query: Query,
    pub verdict: Verdict,
    /// The kernel reason (`allowed_by_rule`, `port_not_allowed`, ...) or, for a name the DNS
    /// proxy refuses, the blocked-attempt reason (`dns_name_denied`, ...).
    pub reason: &'static str,
    pub rule: Option<RuleRef>,
    /// Each a sentence: what made the difference, then what still applies (rate limits,
    /// denied ranges for resolved addresses).
    pub why: Vec<String>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "explain {}: ", self.query)?;
        match &self.verdict {
            Verdict::Allow => f.write_str("ALLOW")?,
            Verdict::Deny => f.write_str("DENY")?,
            Verdict::AllowOn(pairs) => write!(f, "ALLOW on {} only", pairs_text(pairs))?,
        }
        writeln!(f, " ({})", self.reason)?;
        if let Some(rule) = &self.rule {
            writeln!(f, "  rule: {rule}")?;
        }
        for why in &self.why {
            writeln!(f, "  why: {why}")?;
        }
        Ok(())
    }
}

/// Every `--explain` argument parsed, or the first that is not a destination.
pub fn parse_all(queries: &[String]) -> Result<Vec<Query>, ExplainError> {
    queries.iter().map(|q| Query::parse(q)).collect()
}

/// `check FILE --explain ...`: one explanation per query, from the file's policy.
pub fn explain_file(
    path: &Path,
    queries: &[String],
    limits: &egress_policy::capacity::MapLimits,
) -> Result<String, ExplainError> {
    let queries = parse_all(queries)?;
    let policy = session::load_policy(path, limits)?;
    let text = std::fs::read_to_string(path).map_err(|source| ExplainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let ctx = Context::new(policy, entry_lines(&text), path);
    Ok(queries.iter().map(|q| ctx.explain(q).to_string()).collect())
}

/// A policy with what is needed to name its rules.
pub struct Context {
    names: NamePolicy,
    lines: EntryLines,
    file: String,
}

impl Context {
    pub fn new(policy: Policy, lines: EntryLines, file: &Path) -> Self {
        Context {
            names: NamePolicy::new(Arc::new(policy)),
            lines,
            file: file.display().to_string(),
        }
    }

    fn policy(&self) -> &Policy {
        &self.names.policy
    }

    pub fn explain(&self, query: &Query) -> Explanation {
        match &query.subject {
            Subject::Name(name) => self.explain_name(query, name),
            Subject::Addr(addr) => self.explain_addr(query, *addr),
        }
    }

    fn allowed_ref(&self, index: usize) -> Option<RuleRef> {
        let p = self.policy();
        let rule = p.allowed.get(index)?;
        Some(RuleRef {
            list: List::Allowed,
            index,
            target: rule.target.to_string(),
            at: Some(self.at(self.lines.allowed_line(index, p.allowed.len()))),
        })
    }

    fn denied_ref(&self, index: usize) -> Option<RuleRef> {
        let p = self.policy();
        let rule = p.denied.get(index)?;
        Some(RuleRef {
            list: List::Denied,
            index,
            target: rule.target.to_string(),
            at: Some(self.at(self.lines.denied_line(index, p.denied.len()))),
        })
    }

    fn at(&self, line: Option<usize>) -> String {
        match line {
            Some(l) => format!("{}:{l}", self.file),
            None => self.file.clone(),
        }
    }

    fn rule_text(&self, r: Option<RuleRef>) -> String {
        r.map(|r| r.to_string()).unwrap_or_default()
    }

    fn explain_name(&self, query: &Query, name: &str) -> Explanation {
        let mut out = Explanation {
            query: query.clone(),
            verdict: Verdict::Deny,
            reason: "dns_name_not_allowed",
            rule: None,
            why: Vec::new(),
        };
        match self.names.decide(name) {
            NameDecision::Denied(j) => {
                out.reason = "dns_name_denied";
                out.rule = self.denied_ref(j);
                let pattern = self.policy().denied.get(j).map(|d| &d.target);
                out.why.push(format!(
                    "the name is {}; the DNS proxy answers NXDOMAIN, so no address of it is \
                     learned",
                    match pattern {
                        Some(Target::Host(HostPattern::Wildcard(s))) =>
                            format!("below `{s}`, which the denied wildcard `*.{s}` covers"),
                        _ => "a denied host".to_owned(),
                    }
                ));
                for i in self.allowed_matching(name) {
                    out.why.push(format!(
                        "deny wins: {} also names it, but a denied host always wins over an \
                         allowed one",
                        self.rule_text(self.allowed_ref(i))
                    ));
                }
            }
            NameDecision::DohProvider(provider) => {
                out.reason = "dns_name_doh_provider";
                out.why.push(format!(
                    "a DNS-over-HTTPS endpoint of {provider}: refused with `block_doh`, even \
                     where an allowed rule covers it"
                ));
            }
            NameDecision::Restricted { rule, miss } => {
                out.reason = "dns_name_restricted";
                out.rule = self.allowed_ref(rule);
                out.why.push(restriction_detail(rule, &miss));
            }
            NameDecision::NotAllowed => {
                out.why
                    .push("no allowed_destinations entry names it (default DENY)".to_owned());
                for (i, rule) in self.policy().allowed.iter().enumerate() {
                    if let Target::Host(HostPattern::Wildcard(s)) = &rule.target
                        && s == name
                    {
                        out.why.push(format!(
                            "{} covers only names strictly below `{s}`, not `{s}` itself: list \
                             it as a host of its own",
                            self.rule_text(self.allowed_ref(i))
                        ));
                    }
                }
            }
            NameDecision::Allowed(rules) => {
                let rules: Vec<usize> = rules
                    .iter()
                    .filter_map(|&r| usize::try_from(r).ok())
                    .collect();
                self.allowed_name(&mut out, &rules);
            }
        }
        out
    }

    /// The allow rules whose host pattern matches `name`, by a linear scan (for the deny-wins
    /// sentence only: the verdict comes from the proxy's matcher).
    fn allowed_matching(&self, name: &str) -> Vec<usize> {
        let p = self.policy();
        p.allowed
            .iter()
            .enumerate()
            .filter(|(_, r)| match &r.target {
                Target::Host(HostPattern::Exact(n)) => n == name,
                Target::Host(HostPattern::Wildcard(s)) => name
                    .strip_suffix(s.as_str())
                    .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
                Target::Cidr(_) => false,
            })
            .map(|(i, _)| i)
            .collect()
    }

    fn allowed_name(&self, out: &mut Explanation, rules: &[usize]) {
        let p = self.policy();
        let Some(&first) = rules.first() else {
            return;
        };
        let matched: Vec<String> = rules
            .iter()
            .filter_map(|&i| {
                let rule = p.allowed.get(i)?;
                let how = match &rule.target {
                    Target::Host(HostPattern::Wildcard(s)) => {
                        format!("the wildcard `*.{s}` (every name strictly below `{s}`)")
                    }
                    _ => "its exact name".to_owned(),
                };
                Some(format!("allowed_destinations[{i}] by {how}"))
            })
            .collect();
        out.why.push(format!(
            "the DNS proxy answers it: matched by {}",
            matched.join(", ")
        ));
        let pairs = union_pairs(p, rules);
        let Some(port) = out.query.port else {
            out.rule = self.allowed_ref(first);
            out.reason = "allowed_by_rule";
            out.verdict = Verdict::AllowOn(pairs);
            self.name_caveats(out, first);
            return;
        };
        let transport = out.query.transport;
        if port == egress_common::maps::DOT_PORT && p.dns.as_ref().is_some_and(|d| d.block_dot) {
            out.reason = Reason::DenyDot.as_str();
            out.why.push(
                "port 853 (DNS over TLS) is denied to every destination (`block_dot`)".into(),
            );
            return;
        }
        let allowing = rules.iter().copied().find(|&i| {
            p.allowed
                .get(i)
                .is_some_and(|r| r.transport_ports().any(|tp| tp == (transport, port)))
        });
        match allowing {
            Some(i) => {
                out.verdict = Verdict::Allow;
                out.rule = self.allowed_ref(i);
                let exact = p
                    .allowed
                    .get(i)
                    .is_some_and(|r| matches!(r.target, Target::Host(HostPattern::Exact(_))));
                out.reason = if exact {
                    Reason::AllowRule.as_str()
                } else {
                    Reason::AllowLearned.as_str()
                };
                out.why.push(format!(
                    "allowed_destinations[{i}] allows {transport}/{port}"
                ));
                self.name_caveats(out, i);
            }
            None => {
                out.reason = Reason::DenyPort.as_str();
                out.rule = self.allowed_ref(first);
                out.why.push(port_sentence(&pairs, transport, port));
            }
        }
    }

    /// What still applies to an allowed name's connections.
    fn name_caveats(&self, out: &mut Explanation, rule: usize) {
        let p = self.policy();
        let denied: Vec<String> = p
            .denied
            .iter()
            .enumerate()
            .filter_map(|(j, d)| match d.target {
                Target::Cidr(net) => Some(format!("denied_destinations[{j}] ({net})")),
                Target::Host(_) => None,
            })
            .collect();
        if !denied.is_empty() {
            out.why.push(format!(
                "an address it resolves to that lies in {} is still refused (denied_by_rule): \
                 deny wins over the addresses of allowed names",
                denied.join(" or ")
            ));
        }
        self.rate_caveats(out, rule);
    }

    fn rate_caveats(&self, out: &mut Explanation, rule: usize) {
        let p = self.policy();
        let own = p.allowed.get(rule).and_then(|r| r.rate_limit);
        let per_dest = p.rate_limits.as_ref().and_then(|r| r.per_destination);
        if let Some(limit) = own {
            out.why.push(format!(
                "rate limit of allowed_destinations[{rule}]: {limit} per destination; over it \
                 rate_limited_destination"
            ));
        } else if let Some(limit) = per_dest {
            out.why.push(format!(
                "rate_limits.per_destination: {limit}; over it rate_limited_destination"
            ));
        }
        if let Some(global) = p.rate_limits.as_ref().and_then(|r| r.global) {
            out.why.push(format!(
                "rate_limits.global: {} new connections per {} s; over it rate_limited_global",
                global.max_connections, global.time_window_secs
            ));
        }
    }

    fn explain_addr(&self, query: &Query, addr: IpAddr) -> Explanation {
        let p = self.policy();
        let port = query.port.unwrap_or(0);
        let proto = match query.transport {
            Transport::Tcp => Proto::Tcp,
            Transport::Udp => Proto::Udp,
        };
        let dst = match addr {
            IpAddr::V4(a) => Dest::v4(a.octets(), port, proto),
            IpAddr::V6(a) => Dest::v6(a.octets(), port, proto),
        };
        let d = egress_policy::reference::decide(p, &Resolved::new(), crate::dns::doh_list(), &dst);
        let index = (d.rule_id != NO_RULE)
            .then(|| usize::try_from(d.rule_id).ok())
            .flatten();
        let mut out = Explanation {
            query: query.clone(),
            verdict: if d.allowed() {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            reason: d.reason.as_str(),
            rule: None,
            why: Vec::new(),
        };
        let covering = self.allowed_covering(addr);
        match d.reason {
            Reason::AllowLoopback if !p.loopback_ports.is_empty() => out.why.push(format!(
                "loopback is allowed at tcp/udp port {port}: `loopback.ports` lists it"
            )),
            Reason::AllowLoopback => out
                .why
                .push("loopback is out of MCP-NET-02's scope and allowed (allow_loopback)".into()),
            Reason::DenyLoopbackPort => {
                let pairs: Vec<(Transport, u16)> = p
                    .loopback_ports
                    .iter()
                    .flat_map(|&lp| [(Transport::Tcp, lp), (Transport::Udp, lp)])
                    .collect();
                if query.port.is_none() {
                    out.verdict = Verdict::AllowOn(pairs);
                    out.reason = Reason::AllowLoopback.as_str();
                    out.why
                        .push("loopback is allowed at the ports `loopback.ports` lists".into());
                } else {
                    out.why.push(format!(
                        "loopback is allowed only at the ports `loopback.ports` lists ({}), not \
                         {}/{port}",
                        pairs_text(&pairs),
                        query.transport
                    ));
                }
            }
            Reason::DenyDot => out.why.push(
                "port 853 (DNS over TLS) is denied to every destination (`block_dot`)".into(),
            ),
            Reason::DenyDoh => {
                let provider = index.and_then(|k| {
                    crate::dns::doh_list()
                        .providers()
                        .get(k)
                        .map(|pr| (k, pr.name.clone()))
                });
                if let Some((k, name)) = provider {
                    out.rule = Some(RuleRef {
                        list: List::DohProviders,
                        index: k,
                        target: name.clone(),
                        at: None,
                    });
                    out.why.push(format!(
                        "an address of the DNS-over-HTTPS resolver {name}: denied with \
                         `block_doh`, even inside an allowed cidr"
                    ));
                }
            }
            Reason::DenyRule => {
                out.rule = index.and_then(|j| self.denied_ref(j));
                out.why.push(
                    "the address lies in a denied range: denied_destinations apply to every \
                     port and protocol"
                        .into(),
                );
                for i in covering {
                    out.why.push(format!(
                        "deny wins: {} also covers it, but a denied range always wins, however \
                         specific the allow",
                        self.rule_text(self.allowed_ref(i))
                    ));
                }
            }
            Reason::AllowRule => {
                if let Some(i) = index {
                    out.rule = self.allowed_ref(i);
                    out.why.push(format!(
                        "allowed_destinations[{i}] covers the address and allows {}/{port}",
                        query.transport
                    ));
                    self.rate_caveats(&mut out, i);
                }
            }
            Reason::DenyPort => {
                out.rule = index.and_then(|i| self.allowed_ref(i));
                let pairs = union_pairs(p, &covering);
                if query.port.is_none() {
                    out.verdict = Verdict::AllowOn(pairs);
                    out.reason = Reason::AllowRule.as_str();
                    out.why.push(format!(
                        "{} covers the address",
                        covering
                            .iter()
                            .map(|&i| format!("allowed_destinations[{i}]"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    if let Some(&i) = covering.first() {
                        self.rate_caveats(&mut out, i);
                    }
                } else {
                    out.why.push(port_sentence(&pairs, query.transport, port));
                }
            }
            _ => {
                out.why.push(
                    "no allowed_destinations cidr covers the address (default DENY)".to_owned(),
                );
                if p.allowed
                    .iter()
                    .any(|r| matches!(r.target, Target::Host(_)))
                {
                    out.why.push(
                        "host entries are judged by name: an address is allowed by one only \
                         once the name resolves to it (explain the name instead)"
                            .into(),
                    );
                }
            }
        }
        out
    }

    /// The allow rules whose cidr covers `addr`, in policy order.
    fn allowed_covering(&self, addr: IpAddr) -> Vec<usize> {
        self.policy()
            .allowed
            .iter()
            .enumerate()
            .filter(|(_, r)| match r.target {
                Target::Cidr(net) => canonical_net(net).contains(&addr),
                Target::Host(_) => false,
            })
            .map(|(i, _)| i)
            .collect()
    }
}

/// Every (transport, port) the rules allow, sorted, without repeats.
fn union_pairs(policy: &Policy, rules: &[usize]) -> Vec<(Transport, u16)> {
    let mut pairs: Vec<(Transport, u16)> = rules
        .iter()
        .filter_map(|&i| policy.allowed.get(i))
        .flat_map(|r| r.transport_ports())
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

fn pairs_text(pairs: &[(Transport, u16)]) -> String {
    pairs
        .iter()
        .map(|(t, p)| format!("{t}/{p}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why (transport, port) is not allowed by rules allowing `pairs`: the protocol (the port is
/// allowed over the other transport) or the port.
fn port_sentence(pairs: &[(Transport, u16)], transport: Transport, port: u16) -> String {
    if pairs.iter().any(|&(_, p)| p == port) {
        format!(
            "protocol: port {port} is allowed only over {}, not {transport}",
            pairs
                .iter()
                .filter(|&&(_, p)| p == port)
                .map(|(t, _)| t.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        format!(
            "port: the rules covering it allow {} only, not {transport}/{port}",
            pairs_text(pairs)
        )
    }
}

#[cfg(test)]
#[path = "explain_tests.rs"]
mod tests;
