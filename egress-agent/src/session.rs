//! What `exec` and `run` share: read and gate the policy, resolve its names, start enforcing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::cli::DnsArgs;
use crate::compile::Resolved;
use crate::enforcer::{Enforcer, EnforcerError};
use crate::exit;
use crate::policy::{self, Policy, PolicyError, Unsupported};
use crate::resolve::{ResolveError, Resolver, TtlBounds, policy_hosts};

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
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Enforcer(#[from] EnforcerError),
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
            SessionError::Policy(_) | SessionError::Unsupported { .. } => exit::CONFIG,
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
pub fn load_policy(path: &Path) -> Result<Policy, SessionError> {
    let policy = policy::load_file(path)?;
    let items = policy::unsupported_features(&policy);
    if !items.is_empty() {
        return Err(SessionError::Unsupported {
            file: path.display().to_string(),
            items,
        });
    }
    Ok(policy)
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
    };
    Ok(Arc::new(Resolver::new(
        &servers,
        &dns.resolv_conf,
        bounds,
        Duration::from_secs(dns.dns_timeout.max(1)),
    )?))
}

/// Loads the programs for `slot` with the policy in force, resolving host names first (a
/// name that does not resolve stays denied and is retried).
pub async fn start(
    policy: Policy,
    dns: &DnsArgs,
    slot: u32,
) -> Result<(Enforcer, Option<Arc<Resolver>>), SessionError> {
    let hosts = policy_hosts(&policy);
    let resolver = if hosts.is_empty() {
        None
    } else {
        Some(resolver(&policy, dns)?)
    };
    let mut enforcer = Enforcer::start(policy, Resolved::new(), slot)?;
    if let Some(r) = &resolver {
        enforcer.refresh_due(r).await;
    }
    tracing::info!(
        policy = %enforcer.policy().name,
        slot = enforcer.slot(),
        rules = enforcer.compiled().rules.len(),
        ports = enforcer.compiled().ports.len(),
        hosts = hosts.len(),
        "policy compiled and loaded"
    );
    Ok((enforcer, resolver))
}
