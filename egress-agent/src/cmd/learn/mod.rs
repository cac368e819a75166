//! `egress-agent learn --out FILE [--policy START] [--wildcards] -- CMD`: run the workload in
//! audit mode from an allow-nothing (or a given) policy, and write a policy that allows what
//! it did.
//!
//! What the run shows: the audit events of the kernel (each connection or send the starting
//! policy denies: address, port, transport) and the DNS proxy's record of the names the
//! workload resolved and the addresses each answer gave. An address one of those names
//! resolved to becomes a host rule for that name; an address no name gave becomes a /32 or
//! /128 cidr rule. One entry per (target, transport), so that a name used over TCP on 443 and
//! over UDP on 443 does not also get TCP on a UDP-only port. [`build`] is pure; [`run`] is
//! `exec` with the recorder attached.

pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

use crate::dns::install::{NameDecision, NamePolicy};
use crate::dns::observed::Observed;
use egress_policy::names::wildcard_public_suffix;
use egress_policy::{AllowedDestination, HostPattern, Mode, Policy, Protocol, Target, Transport};
use render::Commented;

/// Distinct (address, port, transport) destinations kept; more are counted, not kept.
pub const MAX_DESTINATIONS: usize = 16384;

/// A destination the run used that the starting policy denies.
pub type Destination = (IpAddr, u16, Transport);

/// What the run showed, collected while it runs.
#[derive(Clone, Debug, Default)]
pub struct Recorder(Arc<Mutex<Inner>>);

#[derive(Debug, Default)]
struct Inner {
    seen: BTreeMap<Destination, u64>,
    names: Option<Observed>,
    dropped: u64,
}

impl Recorder {
    /// One audited connection or send.
    pub fn connection(&self, ip: IpAddr, port: u16, transport: Transport) {
        let mut inner = self.lock();
        let key = (ip.to_canonical(), port, transport);
        if !inner.seen.contains_key(&key) && inner.seen.len() >= MAX_DESTINATIONS {
            inner.dropped += 1;
            return;
        }
        *inner.seen.entry(key).or_default() += 1;
    }

    /// The DNS proxy's record of names.
    pub fn set_names(&self, names: Observed) {
        self.lock().names = Some(names);
    }

    /// The destinations and the names resolved so far.
    pub fn snapshot(&self) -> Seen {
        let inner = self.lock();
        Seen {
            destinations: inner.seen.clone(),
            names: inner
                .names
                .as_ref()
                .map(Observed::snapshot)
                .unwrap_or_default(),
            dropped: inner.dropped + inner.names.as_ref().map_or(0, Observed::dropped),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A run's record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// Each destination with the number of audited attempts.
    pub destinations: BTreeMap<Destination, u64>,
    /// Each name resolved through the proxy, with its addresses.
    pub names: BTreeMap<String, BTreeSet<IpAddr>>,
    /// Destinations, names or addresses left out by the bounds.
    pub dropped: u64,
}

/// What a learned policy allows beyond the starting one, before rendering.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Uses {
    /// Per (target, transport): ports and how many attempts, and which addresses (for the
    /// comment).
    entries: BTreeMap<(Target, Transport), Use>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Use {
    ports: BTreeSet<u16>,
    attempts: u64,
    addrs: BTreeSet<IpAddr>,
    /// For a wildcard: the names it stands for.
    names: BTreeSet<String>,
}

/// The policy text for `start` plus what `seen` shows, commented. `command` is named in the
/// header.
pub fn build(start: &Policy, seen: &Seen, wildcards: bool, command: &str) -> String {
    let view = NamePolicy::new(Arc::new(start.clone()));
    let mut uses = Uses::default();
    let mut still_denied: Vec<String> = Vec::new();
    for (&(ip, port, transport), &n) in &seen.destinations {
        let names: Vec<&String> = seen
            .names
            .iter()
            .filter(|(_, addrs)| addrs.contains(&ip))
            .map(|(name, _)| name)
            .collect();
        let named = !names.is_empty();
        let mut targets: Vec<Target> = Vec::new();
        for name in names {
            match view.decide(name) {
                NameDecision::Denied(rule) => still_denied.push(format!(
                    "{name} ({transport}/{port}): denied by denied_destinations[{rule}] of the \
                     starting policy, left denied"
                )),
                NameDecision::DohProvider(p) => still_denied.push(format!(
                    "{name} ({transport}/{port}): DNS-over-HTTPS endpoint of {p} (block_doh), left \
                     denied"
                )),
                _ => targets.push(Target::Host(HostPattern::Exact(name.clone()))),
            }
        }
        // An address of a denied name is not allowed by address instead.
        if !named && start_denies(start, ip) {
            still_denied.push(format!(
                "{ip} ({transport}/{port}): in denied_destinations of the starting policy, left \
                 denied"
            ));
        } else if !named {
            targets.push(Target::Cidr(IpNet::from(ip)));
        }
        for t in targets {
            let u = uses.entries.entry((t, transport)).or_default();
            u.ports.insert(port);
            u.attempts += n;
            u.addrs.insert(ip);
        }
    }
    if wildcards {
        collapse(&mut uses);
    }
    let extra: Vec<Commented> = uses
        .entries
        .into_iter()
        .map(|((target, transport), u)| entry(target, transport, u))
        .collect();
    let mut header = vec![
        format!("Learned by `egress-agent learn` from a run of: {command}"),
        format!(
            "{} destination(s) the starting policy did not allow, {} name(s) resolved.",
            seen.destinations.len(),
            seen.names.len()
        ),
        "Review before enforcing: every entry below the starting policy's was seen, not \
         judged. Host entries also allow the other addresses their names resolve to later."
            .to_owned(),
    ];
    if seen.dropped > 0 {
        header.push(format!(
            "{} destination(s), name(s) or address(es) were left out by the recorder's bounds.",
            seen.dropped
        ));
    }
    let mut trailer = Vec::new();
    let connected: BTreeSet<&String> = extra
        .iter()
        .filter_map(|c| match &c.entry.target {
            Target::Host(HostPattern::Exact(n)) => Some(n),
            _ => None,
        })
        .collect();
    let idle: Vec<&String> = seen
        .names
        .keys()
        .filter(|n| !connected.contains(n) && !matches!(view.decide(n), NameDecision::Allowed(_)))
        .filter(|n| !extra.iter().any(|c| covers(&c.entry.target, n)))
        .collect();
    if !idle.is_empty() {
        trailer.push(format!(
            "Resolved but never connected to (not allowed; add them with their ports if they \
             are needed): {}",
            idle.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for line in still_denied {
        trailer.push(format!("Used but denied: {line}"));
    }
    let mut policy = start.clone();
    policy.mode = None;
    render::render(&policy, &extra, &header, &trailer)
}

fn covers(target: &Target, name: &str) -> bool {
    match target {
        Target::Host(HostPattern::Wildcard(s)) => name
            .strip_suffix(s.as_str())
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        _ => false,
    }
}

fn start_denies(start: &Policy, ip: IpAddr) -> bool {
    start.denied.iter().any(|d| match d.target {
        Target::Cidr(net) => egress_policy::compile::canonical_net(net).contains(&ip),
        Target::Host(_) => false,
    })
}

/// `--wildcards`: two or more names below one registrable domain (`a.example.com`,
/// `b.example.com`) become `*.example.com` per transport, with the union of their ports. Never
/// over a public suffix: the registrable domain is one label below the suffix, and the
/// public-suffix check of the parser is asked again. The domain itself, when used, stays an
/// exact entry (a wildcard does not cover its own suffix).
fn collapse(uses: &mut Uses) {
    let mut groups: BTreeMap<(String, Transport), Vec<String>> = BTreeMap::new();
    for (target, transport) in uses.entries.keys() {
        if let Target::Host(HostPattern::Exact(name)) = target
            && let Some(domain) = egress_policy::names::registrable_domain(name)
            && domain != name
        {
            groups
                .entry((domain.to_ascii_lowercase(), *transport))
                .or_default()
                .push(name.clone());
        }
    }
    for ((domain, transport), names) in groups {
        let pattern = HostPattern::Wildcard(domain);
        if names.len() < 2 || wildcard_public_suffix(&pattern).is_some() {
            continue;
        }
        let mut merged = Use::default();
        for name in names {
            if let Some(u) = uses
                .entries
                .remove(&(Target::Host(HostPattern::Exact(name.clone())), transport))
            {
                merged.ports.extend(u.ports);
                merged.attempts += u.attempts;
                merged.addrs.extend(u.addrs);
                merged.names.insert(name);
            }
        }
        uses.entries
            .insert((Target::Host(pattern), transport), merged);
    }
}

fn entry(target: Target, transport: Transport, u: Use) -> Commented {
    let mut comments = vec![format!(
        "learned: {} attempt(s) over {transport} to {}",
        u.attempts,
        u.addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )];
    if !u.names.is_empty() {
        comments.push(format!(
            "--wildcards: for {}",
            u.names.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    Commented {
        comments,
        entry: AllowedDestination {
            target,
            ports: u.ports.into_iter().collect(),
            protocols: vec![match transport {
                Transport::Tcp => Protocol::Tcp,
                Transport::Udp => Protocol::Udp,
            }],
            purpose: Some("learned".to_owned()),
            rate_limit: None,
            restrictions: None,
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error(transparent)]
    Exec(#[from] crate::cmd::exec::ExecError),
    #[error(transparent)]
    Session(#[from] crate::supervisor::session::SessionError),
    #[error("the learned policy does not parse (a bug in learn): {0}")]
    Invalid(#[source] egress_policy::PolicyError),
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LearnError {
    pub fn exit_code(&self) -> u8 {
        match self {
            LearnError::Exec(e) => e.exit_code(),
            LearnError::Session(e) => e.exit_code(),
            _ => crate::exit::FAILURE,
        }
    }
}

/// The starting policy: the given file's, or one that allows nothing. Run in audit mode in
/// both cases: learn is asked for by name, and writes an enforced policy.
pub fn start_policy(
    path: Option<&std::path::Path>,
    limits: &egress_policy::capacity::MapLimits,
) -> Result<Policy, LearnError> {
    let mut policy = match path {
        Some(p) => crate::supervisor::session::load_policy(p, limits)?,
        None => egress_policy::parse_str(
            "egress_policy:\n  name: learned\n  default_action: DENY\n  allowed_destinations: []\n",
            std::path::Path::new("learned.yaml"),
        )
        .map_err(LearnError::Invalid)?,
    };
    policy.mode = Some(Mode::Audit);
    Ok(policy)
}

/// `learn`: runs the workload like `exec` and writes the learned policy to `out`. Returns the
/// workload's exit code.
pub async fn run(args: crate::cli::LearnArgs) -> Result<u8, LearnError> {
    let start = start_policy(args.policy.as_deref(), &args.kernel.maps.limits())?;
    let command = args
        .command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let recorder = Recorder::default();
    let code = crate::cmd::exec::run_with(
        args.exec_args(),
        start.clone(),
        Some(recorder.clone()),
        crate::cmd::exec::StartupClock::new(),
    )
    .await?;
    let seen = recorder.snapshot();
    let text = build(&start, &seen, args.wildcards, &command);
    let parsed = egress_policy::parse_str(&text, &args.out).map_err(LearnError::Invalid)?;
    std::fs::write(&args.out, &text).map_err(|source| LearnError::Write {
        path: args.out.clone(),
        source,
    })?;
    tracing::info!(out = %args.out.display(), policy = %parsed.name, destinations = seen.destinations.len(),
        names = seen.names.len(), rules = parsed.allowed.len(), workload_exit = code, "learned policy written");
    Ok(code)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
