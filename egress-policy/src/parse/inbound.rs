//! `inbound:`: the listening ports that accept connections from other hosts, and from whom.

use std::marker::PhantomData;

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::Deserializer;

use super::{CIDR_EXPECTED, Checked, NonEmpty, PortValue, first_occurrences, parse_cidr};
use crate::model::InboundRule;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    port: Option<PortValue>,
    from: Option<NonEmpty<SourceValue>>,
    purpose: Option<String>,
}

pub(super) struct InboundEntry(pub(super) InboundRule);

impl<'de> Deserialize<'de> for InboundEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(Checked {
            expecting: "an inbound rule: a mapping with `port`, `from` and optionally `purpose`, \
                        such as `{port: 8080, from: [10.1.2.0/24]}`",
            check: check_inbound,
            raw: PhantomData,
        })
    }
}

fn check_inbound(raw: RawInbound) -> Result<InboundEntry, String> {
    let port = raw
        .port
        .ok_or(
            "missing `port`; name the local TCP port the workload listens on, e.g. `port: 8080`",
        )?
        .0;
    let from = raw
        .from
        .ok_or(
            "missing `from`; list the client networks that may connect, e.g. `from: \
             [10.1.2.0/24]` (to accept any client, write `from: [0.0.0.0/0, ::/0]`)",
        )?
        .0;
    Ok(InboundEntry(InboundRule {
        port,
        from: first_occurrences(from.into_iter().map(|s| s.0)),
        purpose: raw.purpose.filter(|p| !p.trim().is_empty()),
    }))
}

/// A client network: a CIDR or a bare address, as in `cidr:`.
struct SourceValue(IpNet);

impl super::ListOf for SourceValue {
    const WHAT: &'static str = "client networks (to accept any client, write `[0.0.0.0/0, ::/0]`)";
    const EXAMPLE: &'static str = "[10.1.2.0/24]";
}

impl<'de> Deserialize<'de> for SourceValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SourceValue;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(CIDR_EXPECTED)
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SourceValue, E> {
                let net = parse_cidr(v).map_err(E::custom)?;
                if is_loopback_only(&net) {
                    return Err(E::custom(format_args!(
                        "`{v}` is loopback: connections from loopback are always accepted and \
                         need no rule; list the networks of other hosts"
                    )));
                }
                Ok(SourceValue(net))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// A network inside 127.0.0.0/8 or ::1: loopback peers pass without a rule.
fn is_loopback_only(net: &IpNet) -> bool {
    match net {
        IpNet::V4(n) => n.prefix_len() >= 8 && n.network().is_loopback(),
        IpNet::V6(n) => n.prefix_len() == 128 && n.network().is_loopback(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::{InboundRule, Policy, parse_str};

    fn parse(inbound: &str) -> Result<Policy, String> {
        let text = format!("egress_policy:\n  default_action: DENY\n  inbound:\n{inbound}");
        parse_str(&text, Path::new("p.yaml")).map_err(|e| e.to_string())
    }

    fn net(s: &str) -> ipnet::IpNet {
        match s.parse() {
            Ok(n) => n,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn rules_parse_with_bare_addresses_mapped_ranges_and_repeats() {
        let p = match parse(
            "    - port: 8080\n      from: [10.1.2.0/24, \"2001:db8::/32\", 192.0.2.7, \
             10.1.2.0/24, \"::ffff:198.51.100.0/120\"]\n      purpose: MCP over HTTP\n    - \
             port: 9090\n      from: [0.0.0.0/0, \"::/0\"]\n",
        ) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            p.inbound,
            vec![
                InboundRule {
                    port: 8080,
                    from: vec![
                        net("10.1.2.0/24"),
                        net("2001:db8::/32"),
                        net("192.0.2.7/32"),
                        net("198.51.100.0/24"),
                    ],
                    purpose: Some("MCP over HTTP".to_owned()),
                },
                InboundRule {
                    port: 9090,
                    from: vec![net("0.0.0.0/0"), net("::/0")],
                    purpose: None,
                },
            ]
        );
        let none = parse_str(
            "egress_policy:\n  default_action: DENY\n",
            Path::new("p.yaml"),
        );
        assert!(none.is_ok_and(|p| p.inbound.is_empty()));
    }

    #[test]
    fn errors_name_the_place_and_what_is_valid() {
        let cases: [(&str, &str); 9] = [
            (
                "    - port: 8080\n",
                "p.yaml:4:7: egress_policy.inbound[0]: missing `from`; list the client networks",
            ),
            (
                "    - port: 8080\n      from: []\n",
                "p.yaml:5:13: egress_policy.inbound[0].from: empty list; expected at least one of \
                 the client networks (to accept any client, write `[0.0.0.0/0, ::/0]`)",
            ),
            (
                "    - from: [10.0.0.0/8]\n",
                "p.yaml:4:7: egress_policy.inbound[0]: missing `port`",
            ),
            (
                "    - port: 0\n      from: [10.0.0.0/8]\n",
                "p.yaml:4:13: egress_policy.inbound[0].port: port 0 is out of range; expected an \
                 integer from 1 to 65535",
            ),
            (
                "    - port: 70000\n      from: [10.0.0.0/8]\n",
                "p.yaml:4:13: egress_policy.inbound[0].port: port 70000 is out of range",
            ),
            (
                "    - port: 8080\n      from: [10.0.0.1/8]\n",
                "p.yaml:5:14: egress_policy.inbound[0].from[0]: invalid cidr `10.0.0.1/8`: host \
                 bits are set",
            ),
            (
                "    - port: 8080\n      from: [10.0.0.0/8, example.com]\n",
                "p.yaml:5:26: egress_policy.inbound[0].from[1]: invalid cidr `example.com`",
            ),
            (
                "    - port: 8080\n      from: [127.0.0.1]\n",
                "p.yaml:5:14: egress_policy.inbound[0].from[0]: `127.0.0.1` is loopback",
            ),
            (
                "    - port: 8080\n      from: [10.0.0.0/8]\n      protocols: [tcp]\n",
                "p.yaml:6:7: egress_policy.inbound[0].protocols: unknown field `protocols`, \
                 expected one of `port`, `from`, `purpose`",
            ),
        ];
        for (inbound, expected) in cases {
            match parse(inbound) {
                Ok(p) => panic!("{inbound:?} parsed: {p:?}"),
                Err(e) => assert!(e.starts_with(expected), "{inbound:?}:\n{e}\n{expected}"),
            }
        }
        let dup = parse("    - port: 8080\n      port: 8081\n      from: [10.0.0.0/8]\n");
        assert!(
            dup.as_ref().is_err_and(|e| e.starts_with("p.yaml:5:7: ")),
            "{dup:?}"
        );
        let not_list = parse_str(
            "egress_policy:\n  default_action: DENY\n  inbound: {port: 8080}\n",
            Path::new("p.yaml"),
        );
        assert!(
            not_list.as_ref().is_err_and(|e| e
                .to_string()
                .starts_with("p.yaml:3:12: egress_policy.inbound")),
            "{not_list:?}"
        );
    }

    #[test]
    fn summary_lists_inbound_rules() {
        let p = match parse(
            "    - port: 8080\n      from: [10.1.2.0/24, \"2001:db8::/32\"]\n      purpose: clients\n",
        ) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let s = p.summary();
        assert!(
            s.contains("\n  inbound tcp/8080 from [10.1.2.0/24, 2001:db8::/32]: clients\n"),
            "{s}"
        );
        let p = parse_str(
            "egress_policy:\n  default_action: DENY\n",
            Path::new("p.yaml"),
        );
        assert!(p.is_ok_and(|p| {
            p.summary()
                .contains("\n  inbound: no connections from other hosts (no `inbound` rules)\n")
        }),);
    }
}
