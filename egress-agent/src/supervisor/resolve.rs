//! Resolving the policy's exact host names into addresses, and when to ask again.
//!
//! The agent resolves through `dns_policy.allowed_resolvers` when the policy names them, else
//! through the resolv.conf it is given (the host's by default). Names are looked up as fully
//! qualified (no search-domain expansion), so `api.company.com` never turns into
//! `api.company.com.corp.example`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
};

use egress_policy::{HostPattern, Policy, Target};

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("reading resolver configuration {path}: {source}")]
    ReadConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("resolver configuration {path}: {message}")]
    ParseConf { path: PathBuf, message: String },
    #[error("resolver configuration {path} names no name server")]
    NoServers { path: PathBuf },
    #[error("building the resolver: {0}")]
    Build(String),
    #[error("looking up {host}: {message}")]
    Lookup { host: String, message: String },
    #[error("looking up {host}: no answer within {timeout:?}")]
    Timeout { host: String, timeout: Duration },
}

/// Bounds on how long an answer is trusted before it is asked for again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtlBounds {
    pub floor: Duration,
    pub ceiling: Duration,
    /// How long past its (clamped) TTL an answer stays in force in the kernel: time for the
    /// agent's own refresh. Without an agent, the addresses expire at TTL + grace.
    pub grace: Duration,
}

/// CLOCK_BOOTTIME now, in whole seconds (the clock the kernel programs read).
pub fn boot_time_s() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    u32::try_from(ts.tv_sec).unwrap_or(u32::MAX)
}

/// The kernel deadline for an answer with (clamped) `ttl`, received now.
pub fn deadline_s(ttl: Duration, bounds: &TtlBounds) -> u32 {
    let secs = (ttl + bounds.grace).as_secs().max(1);
    boot_time_s().saturating_add(u32::try_from(secs).unwrap_or(u32::MAX))
}

impl TtlBounds {
    pub fn clamp(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.floor, self.ceiling.max(self.floor))
    }
}

impl Default for TtlBounds {
    fn default() -> Self {
        TtlBounds {
            floor: Duration::from_secs(5),
            ceiling: Duration::from_secs(300),
            grace: Duration::from_secs(10),
        }
    }
}

/// The exact host names of a policy, allowed and denied alike.
pub fn policy_hosts(policy: &Policy) -> BTreeSet<String> {
    let allowed = policy.allowed.iter().map(|r| &r.target);
    let denied = policy.denied.iter().map(|r| &r.target);
    allowed
        .chain(denied)
        .filter_map(|t| match t {
            Target::Host(HostPattern::Exact(name)) => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// The name servers of a resolv.conf.
pub fn resolv_conf_servers(resolv_conf: &Path) -> Result<Vec<IpAddr>, ResolveError> {
    let data = std::fs::read(resolv_conf).map_err(|source| ResolveError::ReadConf {
        path: resolv_conf.into(),
        source,
    })?;
    let (config, _opts) = hickory_resolver::system_conf::parse_resolv_conf(data).map_err(|e| {
        ResolveError::ParseConf {
            path: resolv_conf.into(),
            message: e.to_string(),
        }
    })?;
    let servers: BTreeSet<IpAddr> = config.name_servers.iter().map(|s| s.ip).collect();
    if servers.is_empty() {
        return Err(ResolveError::NoServers {
            path: resolv_conf.into(),
        });
    }
    Ok(servers.into_iter().collect())
}

/// One answer: the addresses and how long to keep them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub addrs: Vec<IpAddr>,
    pub ttl: Duration,
}

pub struct Resolver {
    inner: TokioResolver,
    timeout: Duration,
    bounds: TtlBounds,
}

impl Resolver {
    /// A resolver that asks `servers` when given, else the name servers of `resolv_conf`.
    pub fn new(
        servers: &[IpAddr],
        resolv_conf: &Path,
        bounds: TtlBounds,
        timeout: Duration,
    ) -> Result<Self, ResolveError> {
        let config =
            if servers.is_empty() {
                let data = std::fs::read(resolv_conf).map_err(|source| ResolveError::ReadConf {
                    path: resolv_conf.into(),
                    source,
                })?;
                let (config, _opts) = hickory_resolver::system_conf::parse_resolv_conf(data)
                    .map_err(|e| ResolveError::ParseConf {
                        path: resolv_conf.into(),
                        message: e.to_string(),
                    })?;
                if config.name_servers.is_empty() {
                    return Err(ResolveError::NoServers {
                        path: resolv_conf.into(),
                    });
                }
                config
            } else {
                ResolverConfig::from_name_servers(
                    servers
                        .iter()
                        .map(|ip| NameServerConfig::udp_and_tcp(*ip))
                        .collect(),
                )
            };
        let mut builder =
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        let opts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 2;
        opts.ndots = 0;
        let inner = builder
            .build()
            .map_err(|e| ResolveError::Build(e.to_string()))?;
        Ok(Resolver {
            inner,
            timeout,
            bounds,
        })
    }

    /// Looks `host` up (A and AAAA) as a fully qualified name.
    pub async fn lookup(&self, host: &str) -> Result<Answer, ResolveError> {
        let fqdn = format!("{host}.");
        // Two attempts of `timeout` each inside hickory, plus slack.
        let limit = self.timeout * 3;
        let lookup = tokio::time::timeout(limit, self.inner.lookup_ip(fqdn.as_str()))
            .await
            .map_err(|_| ResolveError::Timeout {
                host: host.into(),
                timeout: limit,
            })?
            .map_err(|e| ResolveError::Lookup {
                host: host.into(),
                message: e.to_string(),
            })?;
        let now = std::time::Instant::now();
        let ttl = lookup.valid_until().saturating_duration_since(now);
        let mut addrs: Vec<IpAddr> = lookup.iter().map(|a| a.to_canonical()).collect();
        addrs.sort();
        addrs.dedup();
        Ok(Answer {
            addrs,
            ttl: self.bounds.clamp(ttl),
        })
    }

    pub fn bounds(&self) -> TtlBounds {
        self.bounds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_clamped_to_floor_and_ceiling() {
        let b = TtlBounds {
            floor: Duration::from_secs(5),
            ceiling: Duration::from_secs(60),
            grace: Duration::ZERO,
        };
        assert_eq!(b.clamp(Duration::from_secs(0)), Duration::from_secs(5));
        assert_eq!(b.clamp(Duration::from_secs(30)), Duration::from_secs(30));
        assert_eq!(
            b.clamp(Duration::from_secs(86_400)),
            Duration::from_secs(60)
        );
        // A ceiling below the floor never yields less than the floor.
        let odd = TtlBounds {
            floor: Duration::from_secs(10),
            ceiling: Duration::from_secs(1),
            grace: Duration::ZERO,
        };
        assert_eq!(odd.clamp(Duration::from_secs(0)), Duration::from_secs(10));
    }

    #[test]
    fn missing_resolv_conf_names_the_file() {
        let err = Resolver::new(
            &[],
            Path::new("/nonexistent/resolv.conf"),
            TtlBounds::default(),
            Duration::from_secs(1),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("/nonexistent/resolv.conf"), "{err}");
    }
}
