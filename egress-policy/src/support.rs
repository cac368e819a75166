//! Parts of the MCP-NET-02 format that parse but that this version does not enforce. A policy
//! using any of them is refused as a whole: enforcing the rest would silently allow or deny
//! differently from what the file says.
//!
//! Wildcard hosts, `dns_policy` and `restrictions` are enforced (the DNS proxy and the kernel) and are not
//! listed here. A wildcard over a public suffix in `allowed_destinations` is not a missing
//! feature but an invalid policy: the parser refuses it with the file, line and column.

use std::fmt;

use super::model::{DefaultAction, Policy};
use crate::doh::DohList;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unsupported {
    /// `default_action: ALLOW`.
    DefaultAllow,
    /// `dns_policy.block_doh: true`, but the built-in list of DoH resolvers does not parse (a
    /// build defect the unit tests rule out): there is nothing to block by.
    DohListUnavailable,
}

const REFUSED: &str = "the policy is refused rather than enforced in part";

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unsupported::DefaultAllow => write!(
                f,
                "default_action: ALLOW is not supported: egress only enforces allowlists \
                 (everything not allowed is refused); {REFUSED}: set `default_action: DENY` and \
                 list the destinations to allow"
            ),
            Unsupported::DohListUnavailable => write!(
                f,
                "dns_policy.block_doh: the built-in list of DNS-over-HTTPS resolvers \
                 (egress-policy/data/doh-providers.yaml) does not parse in this build, so there \
                 is nothing to block them by; {REFUSED}: use a build whose unit tests pass, or \
                 set `block_doh: false`"
            ),
        }
    }
}

/// Every feature of `p` that this version does not enforce, in file order; empty when the
/// policy can be enforced as written.
pub fn unsupported_features(p: &Policy, doh: &DohList) -> Vec<Unsupported> {
    unsupported_with(p, !doh.providers().is_empty())
}

/// As [`unsupported_features`], with whether the built-in DoH list is available.
fn unsupported_with(p: &Policy, doh_list_available: bool) -> Vec<Unsupported> {
    let mut found = Vec::new();
    if p.default_action == DefaultAction::Allow {
        found.push(Unsupported::DefaultAllow);
    }
    if p.dns.as_ref().is_some_and(|d| d.block_doh) && !doh_list_available {
        found.push(Unsupported::DohListUnavailable);
    }
    found
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::parse_str;

    fn parse(text: &str) -> Policy {
        match parse_str(text, Path::new("t.yaml")) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn seed_example_is_supported_with_its_restrictions() {
        let p = parse(include_str!("../../policies/mcp-net-02-example.yaml"));
        assert_eq!(
            unsupported_features(&p, crate::doh::testing::builtin()),
            vec![]
        );
        let r = p.allowed[1].restrictions.as_ref();
        assert_eq!(
            r.map(|r| (r.regions.clone(), r.services.clone())),
            Some((
                vec!["us-east-1".to_owned(), "eu-west-1".to_owned()],
                vec![crate::AwsService::S3, crate::AwsService::DynamoDb]
            ))
        );
    }

    #[test]
    fn wildcards_and_dns_policy_are_supported() {
        let p = parse(
            "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - host: \
             \"*.example.com\"\n      ports: [443]\n      protocols: [https]\n  \
             denied_destinations:\n    - host: \"*.evil.example.com\"\n    - host: \"*.com\"\n  \
             dns_policy:\n    allowed_resolvers: [10.0.0.53]\n    block_doh: true\n    \
             block_dot: true\n",
        );
        assert_eq!(
            unsupported_features(&p, crate::doh::testing::builtin()),
            vec![]
        );
        let empty = parse("egress_policy:\n  default_action: DENY\n  dns_policy: {}\n");
        assert_eq!(
            unsupported_features(&empty, crate::doh::testing::builtin()),
            vec![]
        );
    }

    #[test]
    fn plain_allowlist_is_supported() {
        let p = parse(
            "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - host: \
             api.github.com\n      ports: [443]\n      protocols: [https]\n  \
             denied_destinations:\n    - cidr: 10.0.0.0/8\n    - host: evil.example.com\n",
        );
        assert_eq!(
            unsupported_features(&p, crate::doh::testing::builtin()),
            vec![]
        );
    }

    #[test]
    fn default_allow_is_refused_and_rate_limits_are_not() {
        let p = parse(
            "egress_policy:\n  default_action: allow\n  allowed_destinations:\n    - cidr: \
             192.0.2.0/24\n      ports: [80]\n      protocols: [http]\n      rate_limit: \
             {max_connections: 5, time_window: 10}\n",
        );
        let found = unsupported_features(&p, crate::doh::testing::builtin());
        assert_eq!(found, vec![Unsupported::DefaultAllow]);
        let text = found[0].to_string();
        assert!(text.contains("only enforces allowlists"), "{text}");
        assert!(text.contains("refused"), "{text}");
    }

    #[test]
    fn the_seeds_rate_limits_section_is_enforced_not_refused() {
        let p = parse(
            "egress_policy:\n  default_action: DENY\n  rate_limits:\n    per_destination:\n      \
             max_connections: 100\n      time_window: 60\n    global:\n      \
             max_new_connections: 1000\n      time_window: 60\n",
        );
        assert_eq!(
            unsupported_features(&p, crate::doh::testing::builtin()),
            vec![]
        );
    }

    #[test]
    fn block_doh_is_refused_only_without_the_builtin_list() {
        let p =
            parse("egress_policy:\n  default_action: DENY\n  dns_policy:\n    block_doh: true\n");
        assert!(!crate::doh::testing::builtin().providers().is_empty());
        assert_eq!(unsupported_with(&p, true), vec![]);
        assert_eq!(
            unsupported_with(&p, false),
            vec![Unsupported::DohListUnavailable]
        );
        let text = Unsupported::DohListUnavailable.to_string();
        assert!(text.starts_with("dns_policy.block_doh: "), "{text}");
        assert!(text.contains("block_doh: false"), "{text}");
        // Without block_doh the list is not needed.
        let p =
            parse("egress_policy:\n  default_action: DENY\n  dns_policy:\n    block_dot: true\n");
        assert_eq!(unsupported_with(&p, false), vec![]);
    }
}
