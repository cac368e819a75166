//! The DNS proxy of one protected cgroup: every query the workload sends to port 53 arrives
//! here (the kernel redirects it), and only A/AAAA queries for names the policy allows leave
//! for an upstream resolver. The answer's addresses are in the cgroup's learned map before the
//! workload receives it.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use egress_common::maps::{
    DNS_PROXY_PORT_FIRST, DNS_PROXY_PORT_LAST, DNS_UNAUTHORIZED_PORT_OFFSET,
};

use super::install::{Learner, NameDecision, restriction_detail};
use super::origin::{Diag, Origins};
use super::rebind::{Source, report_rejection};
use super::upstream::Upstream;
use crate::observe::metrics::{DnsMetrics, PolicyLabels, PolicyResultLabels};
use crate::observe::recent::{Denial, Recent, now_unix_s};
use crate::supervisor::resolve::{TtlBounds, deadline_s};
use egress_dns_wire::answer::{AddressRecord, CnameLink, address_response};
use egress_dns_wire::message::{QueryError, Rcode, Transport, parse_query};
use egress_dns_wire::wire::rtype;

/// Queries of one workload answered at the same time; more are dropped (and counted).
const MAX_IN_FLIGHT: usize = 256;
/// TCP connections of one workload open at the same time.
const MAX_TCP_CONNECTIONS: usize = 32;
/// A TCP connection is closed after this long without a complete query.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries answered on one TCP connection before it is closed.
const MAX_TCP_QUERIES: usize = 100;
/// Refused-query log lines per window; the rest are summed in one line.
const LOG_LINES_PER_WINDOW: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("opening network namespace {path}: {source}")]
    Netns {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the DNS proxy's sockets: {0}")]
    Bind(#[source] std::io::Error),
    #[error(
        "no port of {DNS_PROXY_PORT_FIRST}..={DNS_PROXY_PORT_LAST} was free on 127.0.0.1 (and ::1) for the DNS proxy"
    )]
    NoPort,
}

/// The proxy's sockets, opened in the workload's network namespace: the port queries to
/// authorized resolvers come to, and the second port (`port + DNS_UNAUTHORIZED_PORT_OFFSET`)
/// for queries the workload addressed to any other resolver.
#[derive(Debug)]
pub struct Listeners {
    pub port: u16,
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
    udp_unauthorized: Vec<std::net::UdpSocket>,
    tcp_unauthorized: Vec<std::net::TcpListener>,
    /// Whether [::1] could be bound (IPv6 queries fail without it, which fails closed).
    pub ipv6: bool,
    /// Socket diagnostics in the same namespace, to find who sent a query to the second port
    /// (`None` if it could not be opened: such queries are then reported without origin).
    diag: Option<Diag>,
}

/// UDP and TCP on one loopback address and port, or nothing.
fn bind_pair(
    ip: std::net::IpAddr,
    port: u16,
) -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let udp = std::net::UdpSocket::bind((ip, port))?;
    let tcp = std::net::TcpListener::bind((ip, port))?;
    Ok((udp, tcp))
}

impl Listeners {
    /// Binds UDP and TCP on 127.0.0.1 and [::1], one port of the proxies' range
    /// (`DNS_PROXY_PORT_FIRST..=DNS_PROXY_PORT_LAST`, the only ports the kernel lets a workload
    /// reach its own proxy on and no other's) for all four, inside the network
    /// namespace at `netns` (the caller's own when `None`). The sockets stay in that namespace
    /// whatever thread uses them later.
    pub fn open(netns: Option<&Path>) -> Result<Self, ProxyError> {
        let netns = netns.map(Path::to_path_buf);
        let opened = std::thread::spawn(move || {
            if let Some(path) = &netns {
                enter_netns(path)?;
            }
            let mut listeners = bind_all()?;
            match Diag::open() {
                Ok(d) => listeners.diag = Some(d),
                Err(error) => tracing::warn!(%error,
                    "opening socket diagnostics failed; queries to unauthorized resolvers are reported without their origin"),
            }
            Ok(listeners)
        })
        .join();
        match opened {
            Ok(r) => r,
            Err(_) => Err(ProxyError::Bind(std::io::Error::other(
                "the thread opening the sockets panicked",
            ))),
        }
    }
}

fn enter_netns(path: &Path) -> Result<(), ProxyError> {
    let err = |source| ProxyError::Netns {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(err)?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| err(std::io::Error::from(e)))
}

fn bind_all() -> Result<Listeners, ProxyError> {
    let first = DNS_PROXY_PORT_FIRST;
    let count = DNS_PROXY_PORT_LAST - DNS_PROXY_PORT_FIRST + 1;
    let start: u16 = rand::random::<u16>() % count;
    for i in 0..count {
        let port = first + (start + i) % count;
        let second = port + DNS_UNAUTHORIZED_PORT_OFFSET;
        let v4 = Ipv4Addr::LOCALHOST.into();
        let (Ok((udp4, tcp4)), Ok((udp4b, tcp4b))) = (bind_pair(v4, port), bind_pair(v4, second))
        else {
            continue;
        };
        let mut l = Listeners {
            port,
            udp: vec![udp4],
            tcp: vec![tcp4],
            udp_unauthorized: vec![udp4b],
            tcp_unauthorized: vec![tcp4b],
            ipv6: false,
            diag: None,
        };
        let v6 = Ipv6Addr::LOCALHOST.into();
        match (bind_pair(v6, port), bind_pair(v6, second)) {
            (Ok((u, t)), Ok((ub, tb))) => {
                l.udp.push(u);
                l.tcp.push(t);
                l.udp_unauthorized.push(ub);
                l.tcp_unauthorized.push(tb);
                l.ipv6 = true;
            }
            (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            // No IPv6 loopback (IPv6 disabled): IPv6 queries go unanswered.
            _ => {}
        }
        for s in l.udp.iter().chain(&l.udp_unauthorized) {
            s.set_nonblocking(true).map_err(ProxyError::Bind)?;
        }
        for s in l.tcp.iter().chain(&l.tcp_unauthorized) {
            s.set_nonblocking(true).map_err(ProxyError::Bind)?;
        }
        return Ok(l);
    }
    Err(ProxyError::NoPort)
}

/// How the proxy answers.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub bounds: TtlBounds,
    /// Queries per second of the workload's budget, and its burst.
    pub rate: f64,
    pub burst: f64,
    /// NXDOMAIN (default) or REFUSED for names the policy does not allow.
    pub refusal: Rcode,
}

/// A token bucket for the workload's queries.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Bounds the proxy's per-query log lines (refusals, failures, rebinding and cap warnings): a line each up to a number
/// per window, then one line with how many more there were.
#[derive(Debug)]
struct LogLimit {
    window_start: Instant,
    lines: u32,
    suppressed: u64,
}

impl LogLimit {
    /// Whether to log this one; logs the summary of the window before when it closed.
    fn admit(&mut self, policy: &str, now: Instant) -> bool {
        if now.saturating_duration_since(self.window_start) >= LOG_WINDOW {
            if self.suppressed > 0 {
                tracing::info!(event = "dns_refused_repeated", policy = %policy, count = self.suppressed,
                    window_secs = LOG_WINDOW.as_secs(), "more dns queries refused or failed than logged (all are counted)");
            }
            self.window_start = now;
            self.lines = 0;
            self.suppressed = 0;
        }
        if self.lines < LOG_LINES_PER_WINDOW {
            self.lines += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// State shared by the proxy's tasks.
pub struct Proxy {
    learner: Arc<Mutex<Learner>>,
    upstream: RwLock<Arc<Upstream>>,
    settings: Settings,
    metrics: DnsMetrics,
    policy: RwLock<String>,
    bucket: Mutex<Bucket>,
    log: Mutex<LogLimit>,
    in_flight: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    origins: Option<Origins>,
    /// The last blocked attempts (names refused, queries to unauthorized resolvers).
    recent: Recent,
    /// Every name the workload resolved through the proxy and the addresses it got (for
    /// `learn`).
    observed: super::observed::Observed,
}

/// A query that came to the proxy's second port: the workload addressed it to a resolver
/// the slot does not authorize.
#[derive(Clone, Copy, Debug)]
pub struct Unauthorized {
    /// The workload's socket as the proxy sees it, and the proxy's own address.
    pub peer: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Proxy {
    pub fn new(
        learner: Arc<Mutex<Learner>>,
        upstream: Upstream,
        settings: Settings,
        metrics: DnsMetrics,
        policy: String,
        origins: Option<Origins>,
        recent: Recent,
    ) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Proxy {
            learner,
            upstream: RwLock::new(Arc::new(upstream)),
            settings,
            metrics,
            policy: RwLock::new(policy),
            bucket: Mutex::new(Bucket {
                tokens: settings.burst,
                last: now,
            }),
            log: Mutex::new(LogLimit {
                window_start: now,
                lines: 0,
                suppressed: 0,
            }),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            connections: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
            origins,
            recent,
            observed: super::observed::Observed::default(),
        })
    }

    /// The names and addresses the workload resolved so far.
    pub fn observed(&self) -> super::observed::Observed {
        self.observed.clone()
    }

    /// After a reload: the new policy's name and resolvers (the learner is moved by the
    /// enforcer).
    pub fn update(&self, policy: String, upstream: Upstream) {
        match self.upstream.write() {
            Ok(mut u) => *u = Arc::new(upstream),
            Err(p) => *p.into_inner() = Arc::new(upstream),
        }
        match self.policy.write() {
            Ok(mut p) => *p = policy,
            Err(p) => *p.into_inner() = policy,
        }
    }

    fn policy_name(&self) -> String {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn upstream(&self) -> Arc<Upstream> {
        match self.upstream.read() {
            Ok(u) => Arc::clone(&u),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    fn count(&self, policy: &str, result: &'static str) {
        self.metrics
            .queries
            .get_or_create(&PolicyResultLabels {
                policy: policy.to_owned(),
                result,
            })
            .inc();
    }

    /// Counts a refused query and logs it (within the log bound).
    /// Counts a refused query and logs it (within the log bound). A name the policy refuses
    /// is a blocked attempt: counted with the kernel's denials in `egress_connections_total`
    /// and logged as `egress_blocked`, like a refused connect. Other refusals (malformed, over
    /// the query budget) are `dns_refused` lines.
    fn refused(
        &self,
        policy: &str,
        name: &str,
        qtype: u16,
        result: &'static str,
        detail: &str,
        transport: Transport,
    ) {
        self.count(policy, result);
        let protocol = match transport {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        };
        let blocked = blocked_reason(result);
        if let Some(reason) = blocked {
            self.metrics.verdicts.deny(policy, reason, protocol);
            self.recent.push(Denial {
                at_unix_s: now_unix_s(),
                reason: reason.to_owned(),
                cause: None,
                hook: "dns_proxy".to_owned(),
                protocol: protocol.to_owned(),
                dst: None,
                name: Some(name.to_owned()),
                rule: Some(detail.to_owned()),
                pid: None,
                comm: None,
            });
        }
        if !lock(&self.log).admit(policy, Instant::now()) {
            return;
        }
        match blocked {
            Some(reason) => {
                tracing::warn!(event = "egress_blocked", policy = %policy, verdict = "deny",
                reason, hook = "dns_proxy", protocol, dns.name = %name, dns.qtype = qtype_name(qtype),
                result, detail = %detail, "egress blocked: a name the policy does not allow (NXDOMAIN, never forwarded)")
            }
            None => {
                tracing::info!(event = "dns_refused", policy = %policy, name = %name, qtype = qtype_name(qtype),
                result, detail = %detail, "dns query refused")
            }
        }
    }

    /// Reports a query the workload addressed to a resolver the slot does not authorize: a
    /// blocked attempt (the kernel counts it as `dns_unauthorized_resolver`), logged with the
    /// resolver, the name and the process. The query itself is answered by the policy.
    fn report_unauthorized(
        &self,
        policy: &str,
        name: &str,
        qtype: u16,
        transport: Transport,
        via: Unauthorized,
    ) {
        let tcp = matches!(transport, Transport::Tcp);
        let protocol = if tcp { "tcp" } else { "udp" };
        // The origin lookup costs a netlink round trip: only for the queries that are logged
        // (the kernel's count stays exact either way).
        let logged = lock(&self.log).admit(policy, Instant::now());
        let origin = match &self.origins {
            Some(o) if logged => o.lookup(tcp, via.peer, via.local),
            Some(_) => Err("not looked up: over the log bound".into()),
            None => Err("no record of query origins".into()),
        };
        self.recent.push(Denial {
            at_unix_s: now_unix_s(),
            reason: "dns_unauthorized_resolver".to_owned(),
            cause: None,
            hook: "dns_proxy".to_owned(),
            protocol: protocol.to_owned(),
            dst: origin.as_ref().ok().map(|o| o.resolver.to_string()),
            name: Some(name.to_owned()),
            rule: None,
            pid: origin.as_ref().ok().map(|o| o.pid),
            comm: origin.as_ref().ok().map(|o| o.comm.clone()),
        });
        if !logged {
            return;
        }
        match origin {
            Ok(o) => tracing::warn!(event = "egress_blocked", policy = %policy, verdict = "deny",
                reason = "dns_unauthorized_resolver", hook = "dns_proxy", protocol,
                family = if o.resolver.is_ipv4() { "ipv4" } else { "ipv6" },
                dst.ip = %o.resolver.ip(), dst.port = o.resolver.port(), dns.name = %name,
                dns.qtype = qtype_name(qtype), pid = o.pid, uid = o.uid, comm = %o.comm,
                "dns query to an unauthorized resolver blocked: answered by the agent's proxy under the policy, never sent there"),
            Err(why) => {
                tracing::warn!(event = "egress_blocked", policy = %policy, verdict = "deny",
                reason = "dns_unauthorized_resolver", hook = "dns_proxy", protocol,
                dns.name = %name, dns.qtype = qtype_name(qtype), origin_error = %why,
                "dns query to an unauthorized resolver blocked (resolver and process unknown)")
            }
        }
    }

    /// The answer to one query from the workload, or `None` to send nothing. `unauthorized`
    /// when it came to the proxy's second port.
    pub async fn answer(
        &self,
        packet: &[u8],
        transport: Transport,
        unauthorized: Option<Unauthorized>,
    ) -> Option<Vec<u8>> {
        let policy = self.policy_name();
        let query = match parse_query(packet, transport) {
            Ok(q) => q,
            Err(e) => {
                if let Some(via) = unauthorized {
                    self.report_unauthorized(&policy, "", 0, transport, via);
                }
                let detail = e.to_string();
                self.refused(&policy, "", 0, "malformed", &detail, transport);
                return match e {
                    QueryError::Drop(_) => None,
                    other => other.response(),
                };
            }
        };
        let q = &query.question;
        if let Some(via) = unauthorized {
            self.report_unauthorized(&policy, &q.qname, q.qtype, transport, via);
        }
        let admitted =
            lock(&self.bucket).take(self.settings.rate, self.settings.burst, Instant::now());
        if !admitted {
            self.refused(
                &policy,
                &q.qname,
                q.qtype,
                "rate_limited",
                "over the workload's query budget",
                transport,
            );
            return Some(query.refused());
        }
        let (decision, audit) = {
            let learner = lock(&self.learner);
            (
                learner.view().decide(&q.qname),
                learner.view().policy.audit(),
            )
        };
        if audit && !matches!(decision, NameDecision::Allowed(_)) {
            self.audit_name(&policy, &q.qname, q.qtype, &decision, transport);
            return Some(self.resolve_unlearned(&policy, &query, transport).await);
        }
        let detail = match &decision {
            NameDecision::Allowed(_) => None,
            NameDecision::Denied(rule) => Some(format!("denied by denied_destinations[{rule}]")),
            NameDecision::DohProvider(provider) => {
                Some(format!("DNS-over-HTTPS endpoint of {provider} (block_doh)"))
            }
            NameDecision::Restricted { rule, miss } => Some(restriction_detail(*rule, miss)),
            NameDecision::NotAllowed => Some("no allowed_destinations entry names it".to_owned()),
        };
        if let Some(detail) = detail {
            let result = decision.result();
            self.refused(&policy, &q.qname, q.qtype, result, &detail, transport);
            return Some(self.refusal(&query));
        }
        if q.qclass != egress_dns_wire::wire::CLASS_IN || !matches!(q.qtype, rtype::A | rtype::AAAA)
        {
            // Only addresses are looked up for the workload.
            self.count(&policy, "allowed");
            return Some(query.nodata());
        }
        let answer = match self.upstream().ask(q).await {
            Ok(a) => a,
            Err(error) => {
                self.count(&policy, "upstream_failure");
                if !lock(&self.log).admit(&policy, Instant::now()) {
                    return Some(query.servfail());
                }
                tracing::warn!(event = "dns_upstream_failure", policy = %policy, name = %q.qname,
                    qtype = qtype_name(q.qtype), %error, "upstream resolver failed; the workload gets SERVFAIL");
                return Some(query.servfail());
            }
        };
        if answer.rcode != Rcode::NoError {
            self.count(&policy, "allowed");
            return Some(query.with_rcode(answer.rcode));
        }
        // An alias into a denied name (or a DoH endpoint) is that name's answer: refused.
        let refused_link = {
            let learner = lock(&self.learner);
            answer
                .chain
                .iter()
                .find_map(|link| match learner.view().decide(&link.target) {
                    d @ (NameDecision::Denied(_) | NameDecision::DohProvider(_)) => {
                        Some((link.target.clone(), d))
                    }
                    _ => None,
                })
        };
        if let Some((target, decision)) = refused_link {
            let detail = format!("the answer is an alias (CNAME) of `{target}`, which is refused");
            self.refused(
                &policy,
                &q.qname,
                q.qtype,
                decision.result(),
                &detail,
                transport,
            );
            return Some(self.refusal(&query));
        }
        let ttl = self.settings.bounds.clamp(Duration::from_secs(u64::from(
            answer.min_ttl().unwrap_or(0),
        )));
        let deadline = deadline_s(ttl, &self.settings.bounds);
        let installed = {
            let mut learner = lock(&self.learner);
            let r = learner.install(&q.qname, &answer.addresses, deadline);
            let n = learner.len();
            self.metrics
                .learned
                .get_or_create(&PolicyLabels {
                    policy: policy.clone(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
            r
        };
        let installed = match installed {
            Ok(i) => i,
            Err(error) => {
                self.count(&policy, "upstream_failure");
                if !lock(&self.log).admit(&policy, Instant::now()) {
                    return Some(query.servfail());
                }
                tracing::error!(event = "dns_install_failed", policy = %policy, name = %q.qname, %error,
                    "writing learned addresses failed; the workload gets SERVFAIL, not an address it could not reach");
                return Some(query.servfail());
            }
        };
        let labels = PolicyLabels {
            policy: policy.clone(),
        };
        for (record, why) in &installed.rejected {
            let log = lock(&self.log).admit(&policy, Instant::now());
            report_rejection(
                &self.metrics.rebinding_blocked,
                &policy,
                &q.qname,
                record.addr,
                why,
                Source::ProxyAnswer,
                log,
            );
        }
        for (record, why) in &installed.unproven {
            self.metrics.aws_unproven.get_or_create(&labels).inc();
            if !lock(&self.log).admit(&policy, Instant::now()) {
                continue;
            }
            tracing::warn!(event = "dns_aws_address_unproven", policy = %policy, name = %q.qname,
                address = %record.addr, reason = "restriction_address", rule = why.rule, detail = %why,
                "answer address not installed and removed from the answer");
        }
        if installed.kept.is_empty()
            && !installed.unproven.is_empty()
            && installed.rejected.is_empty()
        {
            // Nothing of the answer proved an allowed region: refused like a name that does
            // not classify, rather than answered with no addresses.
            self.count(&policy, "restriction_address");
            return Some(self.refusal(&query));
        }
        if installed.capped > 0 {
            self.metrics
                .address_cap
                .get_or_create(&labels)
                .inc_by(installed.capped as u64);
        }
        if installed.capped > 0 && lock(&self.log).admit(&policy, Instant::now()) {
            tracing::warn!(event = "dns_address_cap", policy = %policy, name = %q.qname,
                left_out = installed.capped, "the name holds the most addresses allowed per name; the rest of the answer was left out");
        }
        self.count(&policy, "allowed");
        let secs = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
        let chain: Vec<CnameLink> = answer
            .chain
            .iter()
            .map(|l| CnameLink {
                ttl: secs,
                ..l.clone()
            })
            .collect();
        self.observed
            .record(&q.qname, installed.kept.iter().map(|a| a.addr));
        let records: Vec<AddressRecord> = installed
            .kept
            .iter()
            .map(|a| AddressRecord {
                addr: a.addr,
                ttl: secs.min(a.ttl.max(1)).max(1).min(secs),
            })
            .collect();
        let max_len = match transport {
            Transport::Udp => query.max_udp_response_len(),
            Transport::Tcp => egress_dns_wire::message::MAX_TCP_MESSAGE_LEN,
        };
        Some(address_response(&query, &chain, &records, max_len))
    }

    /// Audit mode: a name the policy refuses, logged and counted as audited (the query is
    /// then answered).
    fn audit_name(
        &self,
        policy: &str,
        name: &str,
        qtype: u16,
        decision: &NameDecision,
        transport: Transport,
    ) {
        let result = decision.result();
        self.count(policy, result);
        let protocol = match transport {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        };
        let detail = match decision {
            NameDecision::Denied(rule) => format!("denied by denied_destinations[{rule}]"),
            NameDecision::DohProvider(p) => format!("DNS-over-HTTPS endpoint of {p} (block_doh)"),
            NameDecision::Restricted { rule, miss } => restriction_detail(*rule, miss),
            NameDecision::NotAllowed | NameDecision::Allowed(_) => {
                "no allowed_destinations entry names it".to_owned()
            }
        };
        let Some(reason) = blocked_reason(result) else {
            return;
        };
        self.metrics.verdicts.audit(policy, reason, protocol);
        if !lock(&self.log).admit(policy, Instant::now()) {
            return;
        }
        tracing::warn!(event = "egress_audit", policy = %policy, verdict = "audit",
            reason, hook = "dns_proxy", protocol, dns.name = %name, dns.qtype = qtype_name(qtype),
            result, detail = %detail, "a name the policy does not allow, resolved anyway (audit mode)");
    }

    /// Audit mode: the upstream answer to a name the policy refuses, passed on as it is. Its
    /// addresses are recorded, not installed: in audit mode the kernel lets the connections
    /// through and reports them, and `learn` names them by these records.
    async fn resolve_unlearned(
        &self,
        policy: &str,
        query: &egress_dns_wire::message::Query,
        transport: Transport,
    ) -> Vec<u8> {
        let q = &query.question;
        if q.qclass != egress_dns_wire::wire::CLASS_IN || !matches!(q.qtype, rtype::A | rtype::AAAA)
        {
            return query.nodata();
        }
        let answer = match self.upstream().ask(q).await {
            Ok(a) => a,
            Err(error) => {
                self.count(policy, "upstream_failure");
                if lock(&self.log).admit(policy, Instant::now()) {
                    tracing::warn!(event = "dns_upstream_failure", policy = %policy, name = %q.qname,
                        qtype = qtype_name(q.qtype), %error, "upstream resolver failed; the workload gets SERVFAIL");
                }
                return query.servfail();
            }
        };
        if answer.rcode != Rcode::NoError {
            return query.with_rcode(answer.rcode);
        }
        self.observed
            .record(&q.qname, answer.addresses.iter().map(|a| a.addr));
        let max_len = match transport {
            Transport::Udp => query.max_udp_response_len(),
            Transport::Tcp => egress_dns_wire::message::MAX_TCP_MESSAGE_LEN,
        };
        address_response(query, &answer.chain, &answer.addresses, max_len)
    }

    fn refusal(&self, query: &egress_dns_wire::message::Query) -> Vec<u8> {
        match self.settings.refusal {
            Rcode::Refused => query.refused(),
            _ => query.nxdomain(),
        }
    }

    /// Serves the listeners until the tasks are aborted.
    pub fn serve(
        self: &Arc<Self>,
        listeners: Listeners,
    ) -> Result<Vec<JoinHandle<()>>, ProxyError> {
        let mut tasks = Vec::new();
        if let (Some(origins), Some(diag)) = (&self.origins, listeners.diag) {
            origins.set_diag(diag);
        }
        let udp = listeners.udp.into_iter().map(|s| (s, false));
        let udp_second = listeners.udp_unauthorized.into_iter().map(|s| (s, true));
        for (s, second) in udp.chain(udp_second) {
            let socket = Arc::new(UdpSocket::from_std(s).map_err(ProxyError::Bind)?);
            let me = Arc::clone(self);
            tasks.push(tokio::spawn(
                async move { me.serve_udp(socket, second).await },
            ));
        }
        let tcp = listeners.tcp.into_iter().map(|s| (s, false));
        let tcp_second = listeners.tcp_unauthorized.into_iter().map(|s| (s, true));
        for (s, second) in tcp.chain(tcp_second) {
            let listener = TcpListener::from_std(s).map_err(ProxyError::Bind)?;
            let me = Arc::clone(self);
            tasks.push(tokio::spawn(
                async move { me.serve_tcp(listener, second).await },
            ));
        }
        Ok(tasks)
    }

    /// `second`: the socket is on the port for queries to unauthorized resolvers.
    async fn serve_udp(self: Arc<Self>, socket: Arc<UdpSocket>, second: bool) {
        let local = socket.local_addr().ok();
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, peer) = match socket.recv_from(&mut buf).await {
                Ok(v) => v,
                Err(error) => {
                    tracing::warn!(%error, "dns proxy: receiving failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.in_flight).try_acquire_owned() else {
                let policy = self.policy_name();
                self.refused(
                    &policy,
                    "",
                    0,
                    "rate_limited",
                    "too many queries in flight",
                    Transport::Udp,
                );
                continue;
            };
            let packet = buf[..n].to_vec();
            let me = Arc::clone(&self);
            let socket = Arc::clone(&socket);
            let via = match local {
                Some(local) if second => Some(Unauthorized { peer, local }),
                _ => None,
            };
            tokio::spawn(async move {
                if let Some(reply) = me.answer(&packet, Transport::Udp, via).await
                    && let Err(error) = socket.send_to(&reply, peer).await
                {
                    tracing::debug!(%error, %peer, "dns proxy: sending the answer failed");
                }
                drop(permit);
            });
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener, second: bool) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(v) => v,
                Err(error) => {
                    tracing::warn!(%error, "dns proxy: accepting failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() else {
                // Too many connections: close this one at once.
                continue;
            };
            let via = match stream.local_addr() {
                Ok(local) if second => Some(Unauthorized { peer, local }),
                _ => None,
            };
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                me.serve_connection(stream, via).await;
                drop(permit);
            });
        }
    }

    async fn serve_connection(&self, mut stream: TcpStream, via: Option<Unauthorized>) {
        for _ in 0..MAX_TCP_QUERIES {
            let mut len = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let len = usize::from(u16::from_be_bytes(len));
            let mut msg = vec![0u8; len];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut msg)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let Some(reply) = self.answer(&msg, Transport::Tcp, via).await else {
                return;
            };
            let Ok(framed) = egress_dns_wire::message::tcp_frame(&reply) else {
                return;
            };
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }
}

/// The blocked-attempt reason of a refusal `result`, for the policy's refusals of names.
pub fn blocked_reason(result: &str) -> Option<&'static str> {
    match result {
        "not_allowed" => Some("dns_name_not_allowed"),
        "denied" => Some("dns_name_denied"),
        "doh_provider" => Some("dns_name_doh_provider"),
        r if r.starts_with("restriction") => Some("dns_name_restricted"),
        _ => None,
    }
}

fn qtype_name(qtype: u16) -> &'static str {
    match qtype {
        rtype::A => "A",
        rtype::AAAA => "AAAA",
        rtype::CNAME => "CNAME",
        rtype::ANY => "ANY",
        0 => "-",
        _ => "other",
    }
}

impl Proxy {
    /// Removes expired learned addresses every `period` (the kernel already ignores them; this
    /// bounds the map) and keeps the learned-addresses gauge current.
    pub async fn sweep(self: Arc<Self>, period: Duration) {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let now = crate::supervisor::resolve::boot_time_s();
            let (expired, left, ranges) = {
                let mut learner = lock(&self.learner);
                let ranges = learner.view().aws_ranges().cloned();
                (learner.expire(now), learner.len(), ranges)
            };
            if let Some(ranges) = ranges {
                self.metrics
                    .aws_ip_ranges_age
                    .set(ranges.age_seconds(std::time::SystemTime::now()));
            }
            if let Err(error) = expired {
                tracing::warn!(%error, "removing expired learned addresses failed; the kernel ignores them anyway");
            }
            self.metrics
                .learned
                .get_or_create(&PolicyLabels {
                    policy: self.policy_name(),
                })
                .set(i64::try_from(left).unwrap_or(i64::MAX));
        }
    }
}

/// Renews the proxy's liveness deadline every second until aborted. A failed renewal is
/// logged: the deadline then lapses and the workload's DNS is denied, never sent elsewhere.
pub async fn heartbeat(liveness: Arc<Mutex<super::install::Liveness>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Err(error) = lock(&liveness).renew() {
            tracing::error!(%error, "renewing the DNS proxy's liveness failed; the workload's DNS is denied until it succeeds");
        }
    }
}
