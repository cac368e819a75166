//! Parts of the MCP-NET-02 format that parse but that this version does not enforce. A policy
//! using any of them is refused as a whole: enforcing the rest would silently allow or deny
//! differently from what the file says.

use std::fmt;

use super::model::{DefaultAction, HostPattern, Policy, Target};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unsupported {
    /// `default_action: ALLOW`.
    DefaultAllow,
    /// A `*.suffix` host in an allowed or denied entry.
    WildcardHost {
        /// Which entry, e.g. `allowed_destinations[1]`.
        rule: String,
        /// The pattern as written after normalisation, e.g. `*.amazonaws.com`.
        pattern: String,
    },
    /// `restrictions:` on an allowed entry.
    Restrictions { rule: String },
    /// Any `dns_policy:` section.
    DnsPolicy,
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
            Unsupported::WildcardHost { rule, pattern } => write!(
                f,
                "{rule}: the wildcard host `{pattern}` is not enforced by this version: egress \
                 resolves each exact host name to addresses and enforces those, and a wildcard \
                 names hosts that cannot be resolved in advance; {REFUSED}: list the exact host \
                 names instead"
            ),
            Unsupported::Restrictions { rule } => write!(
                f,
                "{rule}.restrictions: region and service restrictions (`regions`, `services`) are \
                 not enforced by this version; {REFUSED}: remove `restrictions` from the entry, \
                 or list the exact regional host names instead"
            ),
            Unsupported::DnsPolicy => write!(
                f,
                "dns_policy: resolver control (`allowed_resolvers`) and DNS-over-HTTPS/TLS \
                 blocking (`block_doh`, `block_dot`) are not enforced by this version; {REFUSED}: \
                 remove the section, and allow your resolvers as allowed_destinations with \
                 `protocols: [dns]` and `ports: [53]` (with default DENY, other resolvers are \
                 then unreachable)"
            ),
        }
    }
}

/// Every feature of `p` that this version does not enforce, in file order; empty when the
/// policy can be enforced as written.
pub fn unsupported_features(p: &Policy) -> Vec<Unsupported> {
    let mut found = Vec::new();
    if p.default_action == DefaultAction::Allow {
        found.push(Unsupported::DefaultAllow);
    }
    for (i, rule) in p.allowed.iter().enumerate() {
        let name = format!("allowed_destinations[{i}]");
        if let Target::Host(HostPattern::Wildcard(suffix)) = &rule.target {
            found.push(Unsupported::WildcardHost {
                rule: name.clone(),
                pattern: format!("*.{suffix}"),
            });
        }
        if rule.restrictions.is_some() {
            found.push(Unsupported::Restrictions { rule: name });
        }
    }
    for (i, rule) in p.denied.iter().enumerate() {
        if let Target::Host(HostPattern::Wildcard(suffix)) = &rule.target {
            found.push(Unsupported::WildcardHost {
                rule: format!("denied_destinations[{i}]"),
                pattern: format!("*.{suffix}"),
            });
        }
    }
    if p.dns.is_some() {
        found.push(Unsupported::DnsPolicy);
    }
    found
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::parse_str;

    fn parse(text: &str) -> Policy {
        match parse_str(text, Path::new("t.yaml")) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn seed_example_lists_every_unsupported_feature() {
        let p = parse(include_str!("../../../policies/mcp-net-02-example.yaml"));
        let found = unsupported_features(&p);
        assert_eq!(
            found,
            vec![
                Unsupported::WildcardHost {
                    rule: "allowed_destinations[1]".into(),
                    pattern: "*.amazonaws.com".into(),
                },
                Unsupported::Restrictions {
                    rule: "allowed_destinations[1]".into(),
                },
                Unsupported::WildcardHost {
                    rule: "denied_destinations[0]".into(),
                    pattern: "*.crypto-mining.com".into(),
                },
                Unsupported::WildcardHost {
                    rule: "denied_destinations[1]".into(),
                    pattern: "*.torproject.org".into(),
                },
                Unsupported::DnsPolicy,
            ]
        );
    }

    #[test]
    fn plain_allowlist_is_supported() {
        let p = parse(
            "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - host: \
             api.github.com\n      ports: [443]\n      protocols: [https]\n  \
             denied_destinations:\n    - cidr: 10.0.0.0/8\n    - host: evil.example.com\n",
        );
        assert_eq!(unsupported_features(&p), vec![]);
    }

    #[test]
    fn default_allow_is_refused_and_rate_limits_are_not() {
        let p = parse(
            "egress_policy:\n  default_action: allow\n  allowed_destinations:\n    - cidr: \
             192.0.2.0/24\n      ports: [80]\n      protocols: [http]\n      rate_limit: \
             {max_connections: 5, time_window: 10}\n",
        );
        let found = unsupported_features(&p);
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
        assert_eq!(unsupported_features(&p), vec![]);
    }

    #[test]
    fn empty_dns_policy_section_is_still_refused() {
        let p = parse("egress_policy:\n  default_action: DENY\n  dns_policy: {}\n");
        assert_eq!(unsupported_features(&p), vec![Unsupported::DnsPolicy]);
        let text = Unsupported::DnsPolicy.to_string();
        assert!(text.starts_with("dns_policy: "), "{text}");
        assert!(text.contains("block_doh"), "{text}");
        assert!(
            text.contains("refused rather than enforced in part"),
            "{text}"
        );
    }
}
