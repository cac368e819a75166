//! Which names the proxy answers: the policy's allowed and denied hosts, exact and wildcard.
//!
//! Semantics (the seed's reference implementations, made precise):
//! - `*.example.com` matches every name strictly below `example.com`, at any depth
//!   (`a.example.com`, `a.b.example.com`), never `example.com` itself and never a name that
//!   merely contains it (`example.com.evil.com`, `badexample.com`).
//! - Matching ignores ASCII case and one trailing dot.
//! - A denied host (exact or wildcard) wins over every allowed one.
//!
//! A lookup costs one hash probe for the whole name plus one per proper suffix: O(labels)
//! probes, whatever the number of rules.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::{HostPattern, Policy, Target};

/// What the policy says about a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameVerdict {
    /// Allowed by these `allowed_destinations` entries (indices, ascending). Every one of them
    /// counts: each brings its own ports and protocols for the name's addresses.
    Allowed { rules: Vec<usize> },
    /// Refused by `denied_destinations[rule]`, the most specific denial that matches (an exact
    /// host, else the wildcard with the longest suffix).
    Denied { rule: usize },
    /// Neither allowed nor denied: refused, as everything not allowed is.
    NotListed,
}

/// Exact names and wildcard suffixes, each mapped to the rules that list it.
#[derive(Clone, Debug, Default)]
pub struct PatternTable {
    exact: HashMap<String, Vec<usize>>,
    /// Key `example.com` for the pattern `*.example.com`.
    below: HashMap<String, Vec<usize>>,
}

impl PatternTable {
    pub fn insert(&mut self, pattern: &HostPattern, rule: usize) {
        let (map, key) = match pattern {
            HostPattern::Exact(name) => (&mut self.exact, name),
            HostPattern::Wildcard(suffix) => (&mut self.below, suffix),
        };
        let rules = map.entry(normalize_owned(key)).or_default();
        if !rules.contains(&rule) {
            rules.push(rule);
        }
    }

    /// Rules matching `name` (already normalised), most specific first: the exact entry, then
    /// wildcards from the longest suffix to the shortest.
    fn matches<'a>(&'a self, name: &'a str) -> impl Iterator<Item = usize> + 'a {
        let exact = self.exact.get(name).into_iter().flatten().copied();
        let below = proper_suffixes(name)
            .filter_map(|suffix| self.below.get(suffix))
            .flatten()
            .copied();
        exact.chain(below)
    }

    /// The most specific rule matching `name`, if any; `name` in any case, with or without a
    /// trailing dot.
    pub fn lookup(&self, name: &str) -> Option<usize> {
        let name = normalize(name)?;
        self.matches(&name).next()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.below.is_empty()
    }
}

/// The policy's host rules, ready for per-query lookups.
#[derive(Clone, Debug, Default)]
pub struct NameMatcher {
    allowed: PatternTable,
    denied: PatternTable,
}

impl NameMatcher {
    /// From `allowed_destinations[].host` and `denied_destinations[].host`; rule indices are
    /// the entries' positions in those lists. CIDR entries (and IP-literal hosts, which the
    /// policy parser turns into CIDRs) are not names and are skipped.
    pub fn from_policy(policy: &Policy) -> Self {
        let host = |t: &Target| match t {
            Target::Host(h) => Some(h.clone()),
            Target::Cidr(_) => None,
        };
        NameMatcher::new(
            policy
                .allowed
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Some((i, host(&r.target)?))),
            policy
                .denied
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Some((i, host(&r.target)?))),
        )
    }

    pub fn new(
        allowed: impl IntoIterator<Item = (usize, HostPattern)>,
        denied: impl IntoIterator<Item = (usize, HostPattern)>,
    ) -> Self {
        let mut m = NameMatcher::default();
        for (rule, pattern) in allowed {
            m.allowed.insert(&pattern, rule);
        }
        for (rule, pattern) in denied {
            m.denied.insert(&pattern, rule);
        }
        m
    }

    /// The verdict for a queried name, in any case, with or without a trailing dot. A string
    /// that is not a DNS name (empty labels, longer than 253 characters) is `NotListed`.
    pub fn lookup(&self, name: &str) -> NameVerdict {
        let Some(name) = normalize(name) else {
            return NameVerdict::NotListed;
        };
        if let Some(rule) = self.denied.matches(&name).next() {
            return NameVerdict::Denied { rule };
        }
        let mut rules: Vec<usize> = self.allowed.matches(&name).collect();
        if rules.is_empty() {
            return NameVerdict::NotListed;
        }
        rules.sort_unstable();
        rules.dedup();
        NameVerdict::Allowed { rules }
    }
}

/// `name` lowercased without one trailing dot; `None` when it is not a name: empty, an empty
/// label, or longer than 253 characters.
pub fn normalize(name: &str) -> Option<Cow<'_, str>> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() || trimmed.len() > 253 || trimmed.split('.').any(str::is_empty) {
        return None;
    }
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(trimmed.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(trimmed))
    }
}

fn normalize_owned(name: &str) -> String {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    trimmed.to_ascii_lowercase()
}

/// `b.example.com`, `example.com`, `com` for `a.b.example.com`, longest first.
fn proper_suffixes(name: &str) -> impl Iterator<Item = &str> {
    name.match_indices('.').map(move |(i, _)| &name[i + 1..])
}

/// What kind of public suffix a wildcard would cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublicSuffixKind {
    /// A top-level domain or a registry's suffix (`com`, `co.uk`): the ICANN section of the
    /// Public Suffix List, or a single label.
    Icann,
    /// A suffix under which a company lets anyone create names (`github.io`,
    /// `s3.amazonaws.com`): the private section of the list. A wildcard over it allows names
    /// that any of its customers, an attacker included, can create.
    Private,
}

/// Whether `pattern` is a wildcard over a public suffix (`*.com`, `*.co.uk`, `*.github.io`):
/// one that allows names anyone can register. Exact hosts never are.
pub fn wildcard_over_public_suffix(pattern: &HostPattern) -> bool {
    wildcard_public_suffix(pattern).is_some()
}

/// The kind of public suffix a wildcard covers, for the message that refuses it.
///
/// `*.S` is refused when `S` is a single label (a top-level domain, listed or not), when `S`
/// is on the Public Suffix List, and when the list has a wildcard rule `*.S` (as `*.kawasaki.jp`),
/// which makes every child of `S` a public suffix. The list is the one compiled into the `psl`
/// crate: updating that crate updates the list.
pub fn wildcard_public_suffix(pattern: &HostPattern) -> Option<PublicSuffixKind> {
    let HostPattern::Wildcard(suffix) = pattern else {
        return None;
    };
    let suffix = normalize(suffix)?;
    if !suffix.contains('.') {
        return Some(PublicSuffixKind::Icann);
    }
    if let Some(kind) = exact_public_suffix(&suffix) {
        return Some(kind);
    }
    // A child label no rule names: it is a public suffix only through a `*.S` rule.
    let probe = format!("egress-psl-probe.{suffix}");
    exact_public_suffix(&probe)
}

/// The kind of `name` when it is itself a public suffix of the list (not merely below one).
fn exact_public_suffix(name: &str) -> Option<PublicSuffixKind> {
    let found = psl::suffix(name.as_bytes())?;
    if !found.is_known() || found.as_bytes() != name.as_bytes() {
        return None;
    }
    Some(match found.typ() {
        Some(psl::Type::Private) => PublicSuffixKind::Private,
        _ => PublicSuffixKind::Icann,
    })
}

/// The registrable domain of `name` under the Public Suffix List (`api.example.co.uk` ->
/// `example.co.uk`); `None` for a suffix itself or an unknown one.
pub fn registrable_domain(name: &str) -> Option<&str> {
    psl::domain_str(name)
}

#[cfg(test)]
#[path = "names_tests.rs"]
mod tests;
