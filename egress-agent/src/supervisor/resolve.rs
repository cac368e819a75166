//! Resolving the policy's exact host names into addresses, and when to ask again.
//!
//! The agent resolves through `dns_policy.allowed_resolvers` when the policy names them, else
//! through the name servers of the resolv.conf it is given (the host's by default; read with
//! hickory-resolver's parser), with the DNS proxy's own upstream client. Names are looked up as fully
//! qualified (no search-domain expansion), so `api.company.com` never turns into
//! `api.company.com.corp.example`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use egress_dns_wire::message::{Question, Rcode};
use egress_dns_wire::wire::{CLASS_IN, rtype};

use crate::dns::upstream::Upstream;

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

/// The agent's own lookups of the policy's host names, through the same upstream client as
/// the DNS proxy (the hardened parser, a random ID and source port per query, TCP after a
/// truncated answer).
pub struct Resolver {
    upstream: Upstream,
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
        let servers = if servers.is_empty() {
            resolv_conf_servers(resolv_conf)?
        } else {
            servers.to_vec()
        };
        Ok(Resolver {
            upstream: Upstream::new(&servers, timeout),
            timeout,
            bounds,
        })
    }

    /// Looks `host` up (A and AAAA) as a fully qualified name. The answer lives as long as
    /// its shortest TTL (clamped to the bounds); no address at all is an error, so that the
    /// host keeps its last known addresses.
    pub async fn lookup(&self, host: &str) -> Result<Answer, ResolveError> {
        let question = |qtype| Question {
            qname: host.trim_end_matches('.').to_ascii_lowercase(),
            qtype,
            qclass: CLASS_IN,
        };
        let (q4, q6) = (question(rtype::A), question(rtype::AAAA));
        // Every server may take `timeout` for each family, UDP then TCP: bound the whole.
        let limit = self.timeout * 3;
        let (a4, a6) = tokio::time::timeout(limit, async {
            tokio::join!(self.upstream.ask(&q4), self.upstream.ask(&q6))
        })
        .await
        .map_err(|_| ResolveError::Timeout {
            host: host.into(),
            timeout: limit,
        })?;
        let mut addrs = Vec::new();
        let mut ttl: Option<u32> = None;
        let mut why = Vec::new();
        for answer in [a4, a6] {
            match answer {
                Ok(answer) if answer.rcode == Rcode::NoError => {
                    if let Some(t) = answer.min_ttl() {
                        ttl = Some(ttl.map_or(t, |m| m.min(t)));
                    }
                    addrs.extend(answer.addresses.iter().map(|a| a.addr.to_canonical()));
                }
                Ok(answer) => why.push(format!("answer {}", answer.rcode)),
                Err(e) => why.push(e.to_string()),
            }
        }
        addrs.sort();
        addrs.dedup();
        let Some(ttl) = ttl.filter(|_| !addrs.is_empty()) else {
            let message = if why.is_empty() {
                "no A or AAAA records".to_owned()
            } else {
                why.join("; ")
            };
            return Err(ResolveError::Lookup {
                host: host.into(),
                message,
            });
        };
        Ok(Answer {
            addrs,
            ttl: self.bounds.clamp(Duration::from_secs(u64::from(ttl))),
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
