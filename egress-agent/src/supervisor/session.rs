//! What `exec` and `run` share: read and gate the policy, resolve its names, start enforcing.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cli::{DnsArgs, Refusal, TelemetryArgs};
use crate::dns::proxy::{Listeners, Proxy, Settings};
use crate::dns::rebind::{RebindFilter, Source, report_rejection};
use crate::dns::upstream::Upstream;
use crate::exit;
use crate::observe::events::{Blocked, Context, EventLog, EventStream};
use crate::observe::metrics::{
    DnsMetrics, Metrics, PolicyLabels, PolicyResultLabels, ResultLabels, SlotInfo,
};
use crate::observe::recent::Recent;
use crate::supervisor::enforcer::{Enforcer, EnforcerError};
use crate::supervisor::resolve::{ResolveError, Resolver, TtlBounds, policy_hosts};
use egress_dns_wire::message::Rcode;
use egress_policy::capacity::MapLimits;
use egress_policy::ip_ranges::AwsIpRanges;
use egress_policy::{self as policy, Policy, PolicyError, Unsupported};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{file}: this version cannot enforce everything the policy asks for, so it refuses the policy rather than apply part of it:\n{}", list(.items))]
    Unsupported {
        file: String,
        items: Vec<Unsupported>,
    },
    #[error(transparent)]
    IpRanges(#[from] egress_policy::ip_ranges::IpRangesError),
    #[error(transparent)]
    Capacity(#[from] egress_policy::capacity::CapacityError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Enforcer(#[from] EnforcerError),
    #[error(transparent)]
    Proxy(#[from] crate::dns::proxy::ProxyError),
    #[error(
        "{file}: the policy says `mode: enforce`, so it is never run in audit mode; remove \
         `--mode audit`, or change the policy's `mode:`"
    )]
    ModeConflict { file: String },
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

fn list(items: &[Unsupported]) -> String {
    items
        .iter()
        .map(|u| format!("  - {u}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl SessionError {
    pub fn exit_code(&self) -> u8 {
        match self {
            SessionError::Policy(_)
            | SessionError::Unsupported { .. }
            | SessionError::IpRanges(_)
            | SessionError::ModeConflict { .. }
            | SessionError::Capacity(_) => exit::CONFIG,
            SessionError::Resolve(
                ResolveError::ReadConf { .. }
                | ResolveError::ParseConf { .. }
                | ResolveError::NoServers { .. },
            ) => exit::CONFIG,
            _ => exit::FAILURE,
        }
    }
}

/// Parses and validates the policy file, and refuses what this version cannot enforce.
pub fn load_policy(path: &Path, limits: &MapLimits) -> Result<Policy, SessionError> {
    let policy = policy::load_file(path)?;
    let items = policy::unsupported_features(&policy, crate::dns::doh_list());
    if !items.is_empty() {
        return Err(SessionError::Unsupported {
            file: path.display().to_string(),
            items,
        });
    }
    egress_policy::capacity::check(&policy, crate::dns::doh_list(), path, limits)?;
    Ok(policy)
}

/// The policy with the mode `--mode` asks for. Audit never replaces a `mode: enforce` the
/// policy states; enforce may replace a policy's audit.
pub fn with_mode(
    mut policy: Policy,
    asked: Option<policy::Mode>,
    path: &Path,
) -> Result<Policy, SessionError> {
    match (policy.mode, asked) {
        (Some(policy::Mode::Enforce), Some(policy::Mode::Audit)) => {
            Err(SessionError::ModeConflict {
                file: path.display().to_string(),
            })
        }
        (_, Some(mode)) => {
            policy.mode = Some(mode);
            Ok(policy)
        }
        (_, None) => Ok(policy),
    }
}

/// [`load_policy`] on a blocking thread: the runtime thread serves the workload's DNS and
/// reads its events, and must not wait on a large or slow policy file.
pub async fn load_policy_off_thread(
    path: &Path,
    limits: &MapLimits,
) -> Result<Policy, SessionError> {
    let owned = path.to_path_buf();
    let limits = *limits;
    match tokio::task::spawn_blocking(move || load_policy(&owned, &limits)).await {
        Ok(loaded) => loaded,
        Err(joined) => Err(SessionError::Other(Box::new(joined))),
    }
}

/// A resolver for the policy (its allowed resolvers, else the given resolv.conf).
pub fn resolver(policy: &Policy, dns: &DnsArgs) -> Result<Arc<Resolver>, SessionError> {
    let servers = policy
        .dns
        .as_ref()
        .map(|d| d.allowed_resolvers.clone())
        .unwrap_or_default();
    let bounds = TtlBounds {
        floor: Duration::from_secs(dns.dns_min_ttl.max(1)),
        ceiling: Duration::from_secs(dns.dns_max_ttl.max(1)),
        grace: Duration::from_secs(dns.dns_expiry_grace),
    };
    Ok(Arc::new(Resolver::new(
        &servers,
        &dns.resolv_conf,
        bounds,
        Duration::from_secs(dns.dns_timeout.max(1)),
    )?))
}

/// The resolvers the DNS proxy forwards to: the policy's allowed resolvers, else those of the
/// given resolv.conf. A policy without host names may have none (every allowed query then
/// fails, and nothing else is ever forwarded).
pub fn upstream(policy: &Policy, dns: &DnsArgs) -> Result<Upstream, SessionError> {
    let timeout = Duration::from_secs(dns.dns_timeout.max(1));
    let named = policy
        .dns
        .as_ref()
        .map(|d| d.allowed_resolvers.clone())
        .unwrap_or_default();
    if !named.is_empty() {
        return Ok(Upstream::new(&named, timeout));
    }
    match crate::supervisor::resolve::resolv_conf_servers(&dns.resolv_conf) {
        Ok(servers) => Ok(Upstream::new(&servers, timeout)),
        Err(e) if has_names(policy) => Err(e.into()),
        Err(error) => {
            tracing::warn!(%error, "no upstream resolver: the policy names no host, so the DNS proxy answers every query without forwarding any");
            Ok(Upstream::new(&[], timeout))
        }
    }
}

fn has_names(policy: &Policy) -> bool {
    let allowed = policy.allowed.iter().map(|r| &r.target);
    allowed
        .into_iter()
        .any(|t| matches!(t, egress_policy::Target::Host(_)))
}

/// Opens the workload's DNS proxy (in its network namespace), starts serving it and points the
/// slot's port-53 redirect at it.
async fn start_proxy(
    enforcer: &mut Enforcer,
    dns: &DnsArgs,
    metrics: &Metrics,
    aws_ranges: Option<Arc<AwsIpRanges>>,
    recent: &Recent,
) -> Result<
    (
        Arc<Proxy>,
        Vec<tokio::task::JoinHandle<()>>,
        Arc<Mutex<crate::dns::install::Liveness>>,
    ),
    SessionError,
> {
    let upstream = upstream(enforcer.policy(), dns)?;
    let listeners = Listeners::open(dns.netns.as_deref())?;
    let port = listeners.port;
    let ipv6 = listeners.ipv6;
    let learner = enforcer.learner();
    {
        let mut l = match learner.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        l.set_max_per_name(dns.dns_max_addrs_per_name as usize);
        l.set_aws_ranges(aws_ranges.clone());
        l.set_rebinding_counter(metrics.dns.rebinding_blocked.clone());
    }
    if let Some(ranges) = &aws_ranges {
        metrics
            .dns
            .aws_ip_ranges_age
            .set(ranges.age_seconds(std::time::SystemTime::now()));
    }
    let bounds = TtlBounds {
        floor: Duration::from_secs(dns.dns_min_ttl.max(1)),
        ceiling: Duration::from_secs(dns.dns_max_ttl.max(1)),
        grace: Duration::from_secs(dns.dns_expiry_grace),
    };
    let settings = Settings {
        bounds,
        rate: f64::from(dns.dns_query_rate.max(1)),
        burst: f64::from(dns.dns_query_burst.max(1)),
        refusal: match dns.dns_refusal {
            Refusal::Nxdomain => Rcode::NxDomain,
            Refusal::Refused => Rcode::Refused,
        },
    };
    let servers: Vec<String> = upstream.servers().iter().map(ToString::to_string).collect();
    let resolvers: Vec<IpAddr> = upstream.servers().iter().map(|s| s.ip()).collect();
    let proxy = Proxy::new(
        learner,
        upstream,
        settings,
        metrics.dns.clone(),
        enforcer.policy().name.clone(),
        enforcer.take_origins(),
        recent.clone(),
    );
    let mut tasks = proxy.serve(listeners)?;
    tasks.push(tokio::spawn(
        Arc::clone(&proxy).sweep(Duration::from_secs(5)),
    ));
    let Some(mut liveness) = enforcer.take_liveness() else {
        return Err(SessionError::Other(
            "the DNS proxy's liveness map was already taken".into(),
        ));
    };
    liveness.renew().map_err(EnforcerError::from)?;
    let liveness = Arc::new(Mutex::new(liveness));
    tasks.push(tokio::spawn(crate::dns::proxy::heartbeat(Arc::clone(
        &liveness,
    ))));
    enforcer.set_dns_port(port)?;
    enforcer.set_resolvers(&resolvers)?;
    tracing::info!(
        port, ipv6, netns = %dns.netns.as_deref().map_or_else(|| "the agent's".to_owned(), |p| p.display().to_string()),
        upstream = %servers.join(","),
        "DNS proxy listening on 127.0.0.1 and ::1; the workload's port-53 traffic goes to it"
    );
    Ok((proxy, tasks, liveness))
}

/// The `--aws-ip-ranges` file, when given.
pub fn load_aws_ranges(dns: &DnsArgs) -> Result<Option<Arc<AwsIpRanges>>, SessionError> {
    let Some(path) = &dns.aws_ip_ranges else {
        return Ok(None);
    };
    let ranges = AwsIpRanges::load(path)?;
    let age = ranges.age_seconds(std::time::SystemTime::now());
    tracing::info!(file = %path.display(), prefixes = ranges.len(), age_secs = age,
        "AWS ip-ranges loaded: addresses admitted by `restrictions` must lie in its S3 and DYNAMODB prefixes");
    Ok(Some(Arc::new(ranges)))
}

/// Where the instance's kernel state comes from.
#[derive(Clone, Debug)]
pub enum Placement {
    /// Load the programs now; pin maps (and, on attach, links) in the directory when given.
    Fresh { pins: Option<std::path::PathBuf> },
    /// Take over the instance an earlier agent pinned in `dir`, bound to `slot`.
    Adopt { dir: std::path::PathBuf },
}

pub use crate::supervisor::lookups::resolve_all;

/// Hands the heap the policy's parse and compile freed back to the kernel. glibc keeps freed
/// memory in its arenas; after loading a large policy (a 100k-entry file allocates several
/// times its final size while it is parsed) that would stay in the agent's resident set for
/// its whole life.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it is safe to call at
    // any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The counter of addresses the rebinding filter kept out, shared by every source.
pub type RebindCounter = prometheus_client::metrics::family::Family<
    PolicyLabels,
    prometheus_client::metrics::counter::Counter,
>;

/// The addresses of the agent's own lookup of `host` that may be installed: the same filter,
/// event and counter as the proxy's answers, so that an allowed name answering with the
/// metadata service (say) opens nothing, whoever asked.
pub fn screen_lookup(
    filter: &RebindFilter,
    rebinding: &RebindCounter,
    policy: &str,
    host: &str,
    addrs: Vec<IpAddr>,
) -> Vec<IpAddr> {
    addrs
        .into_iter()
        .filter(|addr| match filter.check(*addr) {
            Ok(()) => true,
            Err(why) => {
                report_rejection(
                    rebinding,
                    policy,
                    host,
                    *addr,
                    &why,
                    Source::PolicyLookup,
                    true,
                );
                false
            }
        })
        .collect()
}

/// Loads (or adopts) the programs for `slot` with the policy in force, its host names
/// resolved first.
pub async fn start(
    policy: Policy,
    dns: &DnsArgs,
    slot: u32,
    placement: &Placement,
    limits: &MapLimits,
    rebinding: &RebindCounter,
) -> Result<(Enforcer, Option<Arc<Resolver>>), SessionError> {
    let hosts = policy_hosts(&policy);
    let resolver = if hosts.is_empty() {
        None
    } else {
        Some(resolver(&policy, dns)?)
    };
    let lookups = resolve_all(&policy, resolver.as_ref(), rebinding).await;
    let enforcer = match placement {
        Placement::Fresh { pins } => {
            Enforcer::start_sized(policy, lookups, slot, pins.as_deref(), limits)?
        }
        Placement::Adopt { dir } => {
            let (e, old_policy_id) = Enforcer::adopt(policy, lookups, slot, dir)?;
            tracing::info!(dir = %dir.display(), old_policy_id, policy_id = e.compiled().policy_id,
                "adopted pinned enforcement; the new policy replaced the old in one step");
            e
        }
    };
    if enforcer.policy().audit() {
        tracing::warn!(policy = %enforcer.policy().name, mode = "audit",
            "audit mode: attempts the policy denies are let through, and logged and counted with verdict audit");
    }
    tracing::info!(
        policy = %enforcer.policy().name,
        mode = %enforcer.policy().mode(),
        slot = enforcer.slot(),
        policy_id = enforcer.compiled().policy_id,
        entries = enforcer.compiled().entries(),
        ports = enforcer.compiled().ports.len(),
        hosts = hosts.len(),
        "policy compiled and loaded"
    );
    Ok((enforcer, resolver))
}

/// The background work of a protected cgroup: DNS refresh, events, logs, metrics.
pub struct Supervisor {
    pub enforcer: Enforcer,
    resolver: Option<Arc<Resolver>>,
    dns: DnsArgs,
    events: Option<EventStream>,
    log: EventLog,
    metrics: Metrics,
    /// The metrics endpoint and textfile, when asked for.
    outputs: Vec<crate::observe::scrape::Output>,
    proxy: Arc<Proxy>,
    proxy_tasks: Vec<tokio::task::JoinHandle<()>>,
    liveness: Arc<Mutex<crate::dns::install::Liveness>>,
    /// The last blocked attempts, for `status` and `explain-last`.
    recent: Recent,
    publisher: Option<tokio::task::JoinHandle<()>>,
    /// `--mode`, applied again to every reloaded policy.
    mode: Option<policy::Mode>,
    /// `learn`: where the audited attempts are recorded.
    recorder: Option<crate::cmd::learn::Recorder>,
}

enum Work {
    Dns,
    Events(Vec<Blocked>, u64),
    Flush,
}

impl Supervisor {
    /// Loads and configures the programs for `slot`, starts the event reader and (when asked)
    /// the metrics endpoint. Nothing is attached yet.
    pub async fn start(
        policy: Policy,
        dns: &DnsArgs,
        telemetry: &TelemetryArgs,
        slot: u32,
        placement: &Placement,
        limits: &MapLimits,
    ) -> Result<Self, SessionError> {
        let name = policy.name.clone();
        // Read before anything is loaded: a bad file is a configuration error.
        let aws_ranges = load_aws_ranges(dns)?;
        let dns_metrics = DnsMetrics::default();
        let (mut enforcer, resolver) = match start(
            policy,
            dns,
            slot,
            placement,
            limits,
            &dns_metrics.rebinding_blocked,
        )
        .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(policy = %name, "policy load failed");
                return Err(e);
            }
        };
        let (metrics, registry) = Metrics::new(enforcer.maps().shared_counters(), dns_metrics);
        metrics
            .policy_loads
            .get_or_create(&ResultLabels { result: "success" })
            .inc();
        let recent = Recent::default();
        let (proxy, proxy_tasks, liveness) =
            start_proxy(&mut enforcer, dns, &metrics, aws_ranges, &recent).await?;
        let events = match enforcer.take_events() {
            Some(ring) => {
                Some(EventStream::new(ring).map_err(|e| SessionError::Other(Box::new(e)))?)
            }
            None => None,
        };
        metrics.declare(&enforcer.policy().name);
        let registry = Arc::new(registry);
        let mut outputs = Vec::new();
        if let Some(addr) = &telemetry.metrics_addr {
            outputs.push(
                crate::observe::scrape::serve(addr, Arc::clone(&registry))
                    .await
                    .map_err(|e| SessionError::Other(Box::new(e)))?,
            );
        }
        if let Some(path) = &telemetry.metrics_textfile {
            let every = Duration::from_secs(telemetry.metrics_textfile_interval.max(1));
            match crate::observe::scrape::textfile(path, Arc::clone(&registry), every) {
                Ok(out) => outputs.push(out),
                Err(e) => {
                    for out in outputs {
                        out.stop();
                    }
                    return Err(SessionError::Other(Box::new(e)));
                }
            }
        }
        let s = Supervisor {
            enforcer,
            resolver,
            dns: dns.clone(),
            events,
            log: EventLog::new(Duration::from_secs(telemetry.log_window.max(1))),
            metrics,
            outputs,
            proxy,
            proxy_tasks,
            liveness,
            recent,
            publisher: None,
            mode: None,
            recorder: None,
        };
        s.publish_slot();
        release_freed_memory();
        Ok(s)
    }

    /// `--mode` of the command line, for reloads (the first policy already has it).
    pub fn set_mode(&mut self, mode: Option<policy::Mode>) {
        self.mode = mode;
    }

    /// `learn`: records every audited attempt, and the names the proxy resolves, in `r`.
    pub fn record_for_learning(&mut self, r: crate::cmd::learn::Recorder) {
        r.set_names(self.proxy.observed());
        self.recorder = Some(r);
    }

    /// Names the protected cgroup in the blocked-attempt log lines.
    pub fn set_cgroup(&mut self, path: &Path) {
        self.log.set_cgroup(path);
    }

    /// Keeps the last blocked attempts in the file next to the instance record at `record`
    /// (for `status` and `explain-last`) while the supervisor runs.
    pub fn publish_recent(&mut self, record: &Path) {
        let path = crate::observe::recent::file_for(record);
        self.publisher = Some(tokio::spawn(self.recent.clone().publish(path)));
    }

    fn publish_slot(&self) {
        self.metrics.set_slot(
            self.enforcer.slot(),
            SlotInfo {
                policy: self.enforcer.policy().name.clone(),
                allowlist_entries: self.enforcer.compiled().entries() as u64,
                allowed_rules: u32::try_from(self.enforcer.policy().allowed.len())
                    .unwrap_or(u32::MAX),
                denied_rules: u32::try_from(self.enforcer.policy().denied.len())
                    .unwrap_or(u32::MAX),
            },
        );
    }

    /// Waits for and does one unit of background work. Cancel-safe: dropping the future
    /// loses no event and leaves the maps consistent.
    pub async fn tick(&mut self) {
        let has_hosts = self.resolver.is_some() && self.enforcer.has_hosts();
        let work = {
            let Supervisor {
                enforcer,
                events,
                log,
                ..
            } = self;
            let window_end = tokio::time::Instant::from_std(log.window_end());
            tokio::select! {
                _ = enforcer.until_due(), if has_hosts => Work::Dns,
                batch = next_batch(events) => match batch {
                    Ok((batch, bad)) => Work::Events(batch, bad),
                    Err(error) => {
                        tracing::error!(%error, "reading events failed");
                        Work::Flush
                    }
                },
                _ = tokio::time::sleep_until(window_end) => Work::Flush,
            }
        };
        match work {
            Work::Dns => {
                if let Some(r) = self.resolver.clone() {
                    let stats = self
                        .enforcer
                        .refresh_due(&r, &self.metrics.dns.rebinding_blocked)
                        .await;
                    let policy = self.enforcer.policy().name.clone();
                    let fam = &self.metrics.dns_refreshes;
                    fam.get_or_create(&PolicyResultLabels {
                        policy: policy.clone(),
                        result: "success",
                    })
                    .inc_by(stats.ok as u64);
                    fam.get_or_create(&PolicyResultLabels {
                        policy,
                        result: "failure",
                    })
                    .inc_by(stats.failed as u64);
                    self.publish_slot();
                }
            }
            Work::Events(batch, bad) => {
                self.metrics.events_undecodable.inc_by(bad);
                self.record(batch);
            }
            Work::Flush => self.flush_log(),
        }
    }

    /// Names the start-up probe destinations to the kernel, so their refusals are counted
    /// and logged as the expected proof of enforcement rather than as blocked egress.
    pub fn expect_probes(
        &mut self,
        v4: std::net::SocketAddr,
        v6: std::net::SocketAddr,
    ) -> Result<(), SessionError> {
        Ok(self.enforcer.set_probes(v4, v6)?)
    }

    fn record(&mut self, batch: Vec<Blocked>) {
        let ctx = Context {
            policy: self.enforcer.policy(),
            resolved: self.enforcer.resolved(),
        };
        let (lines, collapsed) = (self.log.lines, self.log.collapsed);
        for b in batch {
            if b.reason() == Some(egress_common::Reason::StartupProbe) {
                tracing::info!(
                    event = "egress_probe",
                    dst.ip = b.dst().map(|ip| ip.to_string()),
                    dst.port = b.event.port,
                    pid = b.tgid(),
                    "start-up probe refused by the kernel, as required"
                );
                continue;
            }
            if let Some(r) = &self.recorder
                && b.audited()
                && let Some(ip) = b.dst()
                && b.event.port != 0
            {
                match b.proto() {
                    egress_common::Proto::Tcp => {
                        r.connection(ip, b.event.port, policy::Transport::Tcp)
                    }
                    egress_common::Proto::Udp => {
                        r.connection(ip, b.event.port, policy::Transport::Udp)
                    }
                    egress_common::Proto::Other => {}
                }
            }
            // `status` and `explain-last` show blocked attempts: an audited one went through
            // (it is in the log and the metrics).
            if !b.audited() {
                self.recent.push(ctx.denial(&b));
            }
            self.log.record(b, &ctx);
        }
        self.count_lines(lines, collapsed);
    }

    fn flush_log(&mut self) {
        let ctx = Context {
            policy: self.enforcer.policy(),
            resolved: self.enforcer.resolved(),
        };
        let (lines, collapsed) = (self.log.lines, self.log.collapsed);
        self.log.flush(&ctx);
        self.count_lines(lines, collapsed);
    }

    fn count_lines(&self, lines_before: u64, collapsed_before: u64) {
        let labels = PolicyLabels {
            policy: self.enforcer.policy().name.clone(),
        };
        self.metrics
            .log_lines
            .get_or_create(&labels)
            .inc_by(self.log.lines - lines_before);
        self.metrics
            .events_collapsed
            .get_or_create(&labels)
            .inc_by(self.log.collapsed - collapsed_before);
    }

    fn count_failed_load(&self) {
        self.metrics
            .policy_loads
            .get_or_create(&ResultLabels { result: "failure" })
            .inc();
    }

    /// Replaces the policy with the one in `path`, if it parses, validates and compiles. A bad
    /// file is logged and counted, and the policy in force stays. Returns the new policy id.
    pub async fn reload(&mut self, path: &Path) -> Option<u32> {
        let sizes = *self.enforcer.map_sizes();
        let prepared = load_policy_off_thread(path, &sizes)
            .await
            .and_then(|policy| {
                let policy = with_mode(policy, self.mode, path)?;
                let resolver = if policy_hosts(&policy).is_empty() {
                    None
                } else {
                    Some(resolver(&policy, &self.dns)?)
                };
                let upstream = upstream(&policy, &self.dns)?;
                Ok((policy, resolver, upstream))
            });
        let (policy, resolver, upstream) = match prepared {
            Ok(v) => v,
            Err(error) => {
                tracing::error!(file = %path.display(), error = %crate::observe::report::chain(&error), "policy reload refused; the policy in force stays");
                self.count_failed_load();
                return None;
            }
        };
        let lookups = resolve_all(
            &policy,
            resolver.as_ref(),
            &self.metrics.dns.rebinding_blocked,
        )
        .await;
        let name = policy.name.clone();
        match self.enforcer.reload(policy, lookups) {
            Ok(stats) => {
                self.resolver = resolver;
                let resolvers: Vec<IpAddr> = upstream.servers().iter().map(|s| s.ip()).collect();
                if let Err(error) = self.enforcer.set_resolvers(&resolvers) {
                    tracing::warn!(%error, "naming the new policy's resolvers to the kernel failed; queries to them may be reported as unauthorized");
                }
                self.proxy.update(name.clone(), upstream);
                self.metrics.declare(&name);
                self.metrics
                    .policy_loads
                    .get_or_create(&ResultLabels { result: "success" })
                    .inc();
                self.publish_slot();
                let id = self.enforcer.compiled().policy_id;
                tracing::info!(file = %path.display(), policy = %name, policy_id = id,
                    mode = %self.enforcer.policy().mode(),
                    rules_written = stats.rules_written, rules_removed = stats.rules_removed, "policy reloaded");
                release_freed_memory();
                Some(id)
            }
            Err(error) => {
                // Entries of the new id may be partly written; the slot still names the old id,
                // so they are inert. They are removed on the next successful load.
                tracing::error!(file = %path.display(), error = %error, "applying the reloaded policy failed; the policy in force stays");
                self.count_failed_load();
                None
            }
        }
    }

    /// Reads what is left in the ring buffer, closes the log window and logs the counters.
    pub fn finish(&mut self) {
        if let Some(events) = &mut self.events {
            let mut batch = Vec::new();
            let mut bad = 0;
            events.drain_now(|b| batch.push(b), &mut bad);
            self.metrics.events_undecodable.inc_by(bad);
            self.record(batch);
        }
        self.flush_log();
        self.enforcer.log_counters();
        match self.enforcer.maps().shared_counters().events_lost() {
            Ok(0) => {}
            Ok(lost) => tracing::warn!(
                lost,
                "events lost in the kernel ring buffer (verdicts and counters unaffected)"
            ),
            Err(error) => tracing::error!(%error, "reading the lost-events counter failed"),
        }
        for out in self.outputs.drain(..) {
            out.stop();
        }
        if let Some(publisher) = self.publisher.take() {
            publisher.abort();
        }
        for task in self.proxy_tasks.drain(..) {
            task.abort();
        }
        // The proxy is going: from now on the workload's DNS is denied, not sent to whatever
        // takes the proxy's port next.
        let cleared = match self.liveness.lock() {
            Ok(mut l) => l.clear(),
            Err(p) => p.into_inner().clear(),
        };
        if let Err(error) = cleared {
            tracing::warn!(%error, "clearing the DNS proxy's liveness failed; it lapses within seconds");
        }
    }
}

async fn next_batch(events: &mut Option<EventStream>) -> std::io::Result<(Vec<Blocked>, u64)> {
    let Some(events) = events else {
        return std::future::pending().await;
    };
    let mut batch = Vec::new();
    let mut bad = 0;
    events.drain(|b| batch.push(b), &mut bad).await?;
    Ok((batch, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_lookups_pass_the_rebinding_filter() {
        let policy = policy::parse_str(
            "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - host: api.example.com\n      ports: [443]\n      protocols: [https]\n  denied_destinations:\n    - cidr: 198.51.100.0/24\n",
            Path::new("p.yaml"),
        )
        .unwrap();
        let counter = RebindCounter::default();
        let filter = RebindFilter::for_policy(&policy);
        let addrs = ["169.254.169.254", "203.0.113.7", "198.51.100.9", "::1"]
            .map(|a| a.parse::<IpAddr>().unwrap())
            .to_vec();
        let kept = screen_lookup(&filter, &counter, "p", "api.example.com", addrs);
        assert_eq!(kept, vec!["203.0.113.7".parse::<IpAddr>().unwrap()]);
        let labels = PolicyLabels { policy: "p".into() };
        assert_eq!(counter.get_or_create(&labels).get(), 3);
    }

    #[test]
    fn audit_never_replaces_a_stated_enforce() {
        let parse = |mode: &str| {
            policy::parse_str(
                &format!(
                    "egress_policy:\n  default_action: DENY\n{mode}  allowed_destinations: []\n"
                ),
                Path::new("p.yaml"),
            )
            .unwrap()
        };
        let p = Path::new("p.yaml");
        let audit = Some(policy::Mode::Audit);
        let enforce = Some(policy::Mode::Enforce);
        // Left out: enforce, unless --mode audit asks.
        assert!(!with_mode(parse(""), None, p).unwrap().audit());
        assert!(with_mode(parse(""), audit, p).unwrap().audit());
        // Written audit: audit, unless --mode enforce asks.
        assert!(
            with_mode(parse("  mode: audit\n"), None, p)
                .unwrap()
                .audit()
        );
        assert!(
            !with_mode(parse("  mode: audit\n"), enforce, p)
                .unwrap()
                .audit()
        );
        // Written enforce: never audit.
        assert!(
            !with_mode(parse("  mode: enforce\n"), None, p)
                .unwrap()
                .audit()
        );
        let err = with_mode(parse("  mode: enforce\n"), audit, p).unwrap_err();
        assert_eq!(err.exit_code(), exit::CONFIG);
        assert!(err.to_string().contains("never run in audit mode"), "{err}");
        // Audit sets the kernel's slot flag; enforce does not.
        let flags = |pol: &Policy| {
            egress_policy::compile::slot_flags(pol) & egress_common::maps::SLOT_AUDIT
        };
        assert_ne!(flags(&with_mode(parse(""), audit, p).unwrap()), 0);
        assert_eq!(flags(&parse("  mode: enforce\n")), 0);
    }

    #[test]
    fn the_mode_key_is_strict() {
        let err = policy::parse_str(
            "egress_policy:\n  default_action: DENY\n  mode: off\n",
            Path::new("p.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(
                "p.yaml:3:9: egress_policy.mode: unknown mode `off`; expected `enforce`"
            ),
            "{err}"
        );
    }
}
