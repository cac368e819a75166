//! Whether a policy fits the kernel's maps, decided when the policy is read (by `check` as
//! by `exec`, `run` and every reload) rather than discovered as `E2BIG` half-way through
//! writing the maps.
//!
//! A reload writes the new policy's entries next to the old policy's and switches in one
//! step, so each map must hold two policies at once: one policy may use at most half of a
//! map. Addresses learned from DNS answers live in a separate map (`MAX_LEARNED`, least
//! recently used entries go first) and are not counted here; nor are the addresses the
//! policy's exact host names resolve to, at most `--dns-max-addrs-per-name` each.

use std::path::{Path, PathBuf};

use egress_common::inbound::MAX_INBOUND;
use egress_common::maps::{MAX_DNS_RESOLVERS, MAX_EXACT, MAX_PORTS, MAX_RULES};
use egress_common::ratelimit::MAX_RATE_LIMITS;

use crate::Policy;
use crate::compile::{Resolved, SetIds, compile};
use crate::doh::DohList;

/// One map a policy would overfill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overflow {
    /// What the map holds, for the message.
    pub holds: &'static str,
    /// The map's constant in `egress-common`.
    pub constant: &'static str,
    pub needed: usize,
    pub capacity: u32,
}

impl Overflow {
    /// What one policy may use: half the map (see the module comment).
    pub fn allowed(&self) -> usize {
        (self.capacity / 2) as usize
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{}: the policy does not fit the kernel's maps (a policy may use half of each map, so that a reload can write the new policy next to the old one):\n{}",
    file.display(), .overflows.iter().map(|o| format!("  - {} {} needed, at most {} allowed ({} = {})", o.needed, o.holds, o.allowed(), o.constant, o.capacity)).collect::<Vec<_>>().join("\n"))]
pub struct CapacityError {
    pub file: PathBuf,
    pub overflows: Vec<Overflow>,
}

/// How much of each map `policy` needs, before any name is resolved.
pub fn usage(policy: &Policy, doh: &DohList) -> Vec<Overflow> {
    let mut sets = SetIds::default();
    let compiled = compile(policy, 1, &Resolved::new(), doh, &mut sets);
    let limits = crate::limits::compile_limits(policy, 1);
    let resolvers = policy.dns.as_ref().map_or(0, |d| d.allowed_resolvers.len());
    vec![
        Overflow {
            holds: "address entries (single addresses)",
            constant: "MAX_EXACT",
            needed: compiled.exact.len(),
            capacity: MAX_EXACT,
        },
        Overflow {
            holds: "prefix entries (networks)",
            constant: "MAX_RULES",
            needed: compiled.rules.len(),
            capacity: MAX_RULES,
        },
        Overflow {
            holds: "port-set entries",
            constant: "MAX_PORTS",
            needed: compiled.ports.len(),
            capacity: MAX_PORTS,
        },
        Overflow {
            holds: "inbound entries",
            constant: "MAX_INBOUND",
            needed: compiled.inbound.entries.len(),
            capacity: MAX_INBOUND,
        },
        Overflow {
            holds: "rate-limit entries",
            constant: "MAX_RATE_LIMITS",
            needed: limits.limits.len(),
            capacity: MAX_RATE_LIMITS,
        },
        Overflow {
            holds: "allowed resolvers",
            constant: "MAX_DNS_RESOLVERS",
            needed: resolvers,
            capacity: MAX_DNS_RESOLVERS,
        },
    ]
}

/// Refuses a policy that needs more than half of any map.
pub fn check(policy: &Policy, doh: &DohList, file: &Path) -> Result<(), CapacityError> {
    let overflows: Vec<Overflow> = usage(policy, doh)
        .into_iter()
        .filter(|o| o.needed > o.allowed())
        .collect();
    if overflows.is_empty() {
        Ok(())
    } else {
        Err(CapacityError {
            file: file.to_path_buf(),
            overflows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy of `entries` allowed /32s (built directly: parsing half a million entries
    /// would dominate the test).
    fn policy_of(entries: usize) -> Policy {
        let text = "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - \
                    cidr: 10.0.0.0/32\n      ports: [443]\n      protocols: [tcp]\n";
        let mut policy = match crate::parse_str(text, Path::new("big.yaml")) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let first = policy.allowed[0].clone();
        policy.allowed = (0..entries)
            .map(|i| {
                let [_, a, b, c] = u32::try_from(i).unwrap_or(0).to_be_bytes();
                let net = ipnet::IpNet::V4(
                    ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, a, b, c), 32)
                        .unwrap_or_else(|e| panic!("{e}")),
                );
                crate::AllowedDestination {
                    target: crate::Target::Cidr(net),
                    ..first.clone()
                }
            })
            .collect();
        policy
    }

    #[test]
    fn a_policy_over_half_a_map_is_refused_naming_the_map_and_its_size() {
        let fits = policy_of(1000);
        assert!(check(&fits, crate::doh::testing::builtin(), Path::new("big.yaml")).is_ok());
        let used = usage(&fits, crate::doh::testing::builtin());
        assert_eq!((used[0].needed, used[2].needed), (1000, 1000), "{used:?}");
        // Every allowed entry has its own port set: the port map is the first to fill.
        let half = (MAX_PORTS / 2) as usize;
        assert!(
            check(
                &policy_of(half),
                crate::doh::testing::builtin(),
                Path::new("big.yaml")
            )
            .is_ok()
        );
        let e = match check(
            &policy_of(half + 1),
            crate::doh::testing::builtin(),
            Path::new("big.yaml"),
        ) {
            Ok(()) => panic!("accepted"),
            Err(e) => e,
        };
        assert_eq!(
            e.to_string(),
            format!(
                "big.yaml: the policy does not fit the kernel's maps (a policy may use half of \
                 each map, so that a reload can write the new policy next to the old one):\n  - \
                 {} port-set entries needed, at most {half} allowed (MAX_PORTS = {MAX_PORTS})",
                half + 1
            )
        );
    }
}
