//! The last blocked attempts of a workload, for `egress-agent status` and `explain-last`.
//!
//! A denial shows up in the workload as an ordinary network fault (a DNS failure,
//! "connection refused", "Operation not permitted", or a generic "all connection attempts
//! failed" from a client library). The agent keeps the last [`KEEP`] blocked attempts of each
//! protected cgroup and writes them, at most once a second, next to the instance record
//! (`/run/egress/v<LAYOUT>/cg-<id>.recent.json`, root-only), so an operator can ask what was
//! blocked and why without reading the log.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Blocked attempts kept per workload.
pub const KEEP: usize = 32;

/// One blocked attempt, as `explain-last` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    /// Seconds since the Unix epoch when the agent saw it.
    pub at_unix_s: u64,
    /// The blocked-attempt reason (`no_matching_rule`, `dns_name_not_allowed`, ...).
    pub reason: String,
    /// The policy's own reason behind a classified one (`udp_connect_refused`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    pub hook: String,
    pub protocol: String,
    /// The destination address and port, for attempts by address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    /// The DNS name: the one looked up, or the policy host the address belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The rule that decided, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
}

impl Denial {
    /// What the denial means and what would change it, in one sentence.
    pub fn explain(&self) -> String {
        let what = match (&self.name, &self.dst) {
            (Some(n), Some(d)) => format!("{n} ({d})"),
            (Some(n), None) => n.clone(),
            (None, Some(d)) => d.clone(),
            (None, None) => "the destination".to_owned(),
        };
        let port = self
            .dst
            .as_deref()
            .and_then(|d| d.rsplit_once(':'))
            .map_or("PORT", |(_, p)| p)
            .to_owned();
        let proto = &self.protocol;
        match self.reason.as_str() {
            "no_matching_rule" => format!(
                "no allowed_destinations entry covers {what}: allow it with an entry for its \
                 host name (or cidr) with ports [{port}] and protocols [{proto}]"
            ),
            "port_not_allowed" => format!(
                "{} covers {what} but not {port}/{proto}: add the port (and protocol) to that entry",
                self.rule
                    .as_deref()
                    .unwrap_or("an allowed_destinations entry")
            ),
            "denied_by_rule" => format!(
                "{what} is in {}; a deny wins over every allow",
                self.rule.as_deref().unwrap_or("denied_destinations")
            ),
            "rate_limited_destination" | "rate_limited_global" => format!(
                "{what} is allowed, but the connection budget ({}) is used up; it refills over its time_window",
                if self.reason == "rate_limited_global" {
                    "rate_limits.global"
                } else {
                    "per destination"
                }
            ),
            "udp_connect_refused" => format!(
                "a UDP connect to {what} was refused ({}); it sent nothing (resolvers connect to each answer address to sort them), so it is harmless unless a send follows",
                self.cause.as_deref().unwrap_or("not allowed")
            ),
            "dns_name_not_allowed" => format!(
                "the name {what} is in no allowed_destinations entry: the workload got NXDOMAIN; add a host entry for it (or a *.suffix wildcard)"
            ),
            "dns_name_denied" => {
                format!("the name {what} is denied by denied_destinations: NXDOMAIN")
            }
            "dns_name_doh_provider" => format!(
                "{what} is a DNS-over-HTTPS resolver and dns_policy.block_doh is set: NXDOMAIN"
            ),
            "dns_name_restricted" => format!(
                "{what} is under an entry whose restrictions (regions, services) do not admit it: NXDOMAIN"
            ),
            "dns_unauthorized_resolver" => format!(
                "a query for {} was addressed to {}, which is not an allowed resolver; the agent's proxy answered it under the policy instead, and nothing reached that resolver",
                self.name.as_deref().unwrap_or("a name"),
                self.dst.as_deref().unwrap_or("another resolver")
            ),
            "dns_over_tls_blocked" => format!("DNS over TLS to {what}: dns_policy.block_dot"),
            "doh_provider_blocked" => {
                format!("{what} is a DNS-over-HTTPS resolver: dns_policy.block_doh")
            }
            other => format!("{other}: see docs/events.md"),
        }
    }
}

/// The last blocked attempts of one workload, shared by the event reader and the DNS proxy.
#[derive(Clone, Debug, Default)]
pub struct Recent(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    denials: VecDeque<Denial>,
    /// Bumped on every push, so the writer knows when to write.
    generation: u64,
}

pub fn now_unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn push(&self, d: Denial) {
        let mut s = self.lock();
        if s.denials.len() == KEEP {
            s.denials.pop_front();
        }
        s.denials.push_back(d);
        s.generation += 1;
    }

    /// Oldest first.
    pub fn snapshot(&self) -> (u64, Vec<Denial>) {
        let s = self.lock();
        (s.generation, s.denials.iter().cloned().collect())
    }

    /// Writes the file at `path` every second while there is something new, until aborted.
    pub async fn publish(self, path: PathBuf) {
        let mut written = 0;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let (generation, denials) = self.snapshot();
            if generation == written {
                continue;
            }
            match write_file(&path, &denials) {
                Ok(()) => written = generation,
                Err(error) => {
                    tracing::debug!(%error, path = %path.display(), "writing the recent denials failed")
                }
            }
        }
    }
}

/// The recent-denials file next to an instance record.
pub fn file_for(record: &Path) -> PathBuf {
    record.with_extension("recent.json")
}

/// Writes `denials` atomically.
pub fn write_file(path: &Path, denials: &[Denial]) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(denials).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The denials in a file; none when it does not exist.
pub fn read_file(path: &Path) -> std::io::Result<Vec<Denial>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(reason: &str) -> Denial {
        Denial {
            at_unix_s: 1,
            reason: reason.into(),
            cause: None,
            hook: "connect4".into(),
            protocol: "tcp".into(),
            dst: Some("198.18.0.66:8080".into()),
            name: None,
            rule: None,
            pid: Some(7),
            comm: Some("curl".into()),
        }
    }

    #[test]
    fn keeps_the_last_ones_and_roundtrips_through_the_file() {
        let r = Recent::default();
        for i in 0..(KEEP + 5) {
            let mut d = denial("no_matching_rule");
            d.at_unix_s = i as u64;
            r.push(d);
        }
        let (generation, all) = r.snapshot();
        assert_eq!(generation, (KEEP + 5) as u64);
        assert_eq!(all.len(), KEEP);
        assert_eq!(all[0].at_unix_s, 5);
        let dir = tempfile::tempdir().unwrap();
        let path = file_for(&dir.path().join("cg-1.json"));
        assert!(path.ends_with("cg-1.recent.json"));
        write_file(&path, &all).unwrap();
        assert_eq!(read_file(&path).unwrap(), all);
        assert!(read_file(&dir.path().join("none.json")).unwrap().is_empty());
    }

    #[test]
    fn explanations_say_what_to_change() {
        let d = denial("no_matching_rule");
        let e = d.explain();
        assert!(
            e.contains("198.18.0.66:8080") && e.contains("ports [8080]"),
            "{e}"
        );
        let mut d = denial("port_not_allowed");
        d.rule = Some("allowed_destinations[0] 198.18.0.66/32".into());
        assert!(d.explain().contains("allowed_destinations[0]"));
        let mut d = denial("dns_name_not_allowed");
        d.dst = None;
        d.name = Some("evil.example.test".into());
        let e = d.explain();
        assert!(
            e.contains("evil.example.test") && e.contains("NXDOMAIN"),
            "{e}"
        );
        let mut d = denial("udp_connect_refused");
        d.cause = Some("port_not_allowed".into());
        assert!(d.explain().contains("sent nothing"));
    }
}
