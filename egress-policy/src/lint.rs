//! What `check` warns about: policies that are valid, and enforced as written, but almost
//! certainly not what their author meant. Warnings never refuse a policy (exit 0); `check`
//! prints them on stderr.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::{HostPattern, Policy, Target};

/// One warning per finding, each naming the entry it is about.
pub fn warnings(policy: &Policy) -> Vec<String> {
    let mut found = Vec::new();
    let allowed = |i: usize| format!("egress_policy.allowed_destinations[{i}]");
    for (i, rule) in policy.allowed.iter().enumerate() {
        if let Target::Cidr(net) = &rule.target
            && net.prefix_len() == 0
        {
            let family = if net.addr().is_ipv4() { "IPv4" } else { "IPv6" };
            found.push(format!(
                "{}: `{net}` allows every {family} address on these ports: no allowlist at all for \
                 them; name the destinations instead",
                allowed(i)
            ));
        }
        if let Some(j) = policy
            .denied
            .iter()
            .position(|d| denial_covers(&d.target, &rule.target))
        {
            found.push(format!(
                "{}: `{}` can never be reached: egress_policy.denied_destinations[{j}] (`{}`) \
                 denies all of it, and a denial always wins",
                allowed(i),
                rule.target,
                policy.denied[j].target
            ));
        }
        if !policy.loopback_ports.is_empty()
            && let Target::Cidr(net) = &rule.target
            && within_loopback(net)
        {
            found.push(format!(
                "{}: `{net}` is loopback, which `loopback.ports` decides alone: this entry never \
                 applies; list its ports there",
                allowed(i)
            ));
        }
        if rule.ports.contains(&egress_common::maps::DNS_PORT) {
            found.push(format!(
                "{}: port 53 in this entry never applies: the workload's port-53 traffic always \
                 goes to the agent's DNS proxy, which forwards only to \
                 dns_policy.allowed_resolvers (or the host's resolvers)",
                allowed(i)
            ));
        }
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, rule) in policy.allowed.iter().enumerate() {
        let key = format!("{} {:?} {:?}", rule.target, rule.ports, rule.protocols);
        if let Some(first) = seen.get(&key) {
            found.push(format!(
                "{}: the same destination, ports and protocols as {}",
                allowed(i),
                allowed(*first)
            ));
        } else {
            seen.insert(key, i);
        }
    }
    let mut seen_denied: HashMap<String, usize> = HashMap::new();
    for (i, rule) in policy.denied.iter().enumerate() {
        let key = rule.target.to_string();
        if let Some(first) = seen_denied.get(&key) {
            found.push(format!(
                "egress_policy.denied_destinations[{i}]: the same destination as \
                 egress_policy.denied_destinations[{first}]"
            ));
        } else {
            seen_denied.insert(key, i);
        }
    }
    if policy.allow_loopback {
        let mut w = String::from(
            "egress_policy.allow_loopback: loopback is allowed on every port (the default): a \
             local forwarder (an HTTP proxy, an SSH tunnel, `kubectl port-forward`, a socat \
             relay) listening on 127.0.0.1 can carry the workload's traffic to any destination. \
             Allow only the local services needed with `loopback: {ports: [5432]}` (in place of \
             `allow_loopback`)",
        );
        if !policy.inbound.is_empty() {
            let _ = write!(w, " (inbound rules are unaffected)");
        }
        found.push(w);
    }
    found
}

/// Whether every address of `net` is loopback (127.0.0.0/8, ::1, or their mapped forms).
fn within_loopback(net: &ipnet::IpNet) -> bool {
    match net {
        ipnet::IpNet::V4(n) => n.prefix_len() >= 8 && n.network().octets()[0] == 127,
        ipnet::IpNet::V6(n) => match n.network().to_ipv4_mapped() {
            Some(v4) => n.prefix_len() >= 104 && v4.octets()[0] == 127,
            None => n.prefix_len() == 128 && n.network().is_loopback(),
        },
    }
}

/// Whether denying `deny` leaves nothing of `allow`.
fn denial_covers(deny: &Target, allow: &Target) -> bool {
    match (deny, allow) {
        (Target::Cidr(d), Target::Cidr(a)) => d.contains(a),
        (Target::Host(HostPattern::Exact(d)), Target::Host(HostPattern::Exact(a))) => d == a,
        (Target::Host(HostPattern::Wildcard(suffix)), Target::Host(HostPattern::Exact(a))) => a
            .strip_suffix(suffix.as_str())
            .is_some_and(|head| head.ends_with('.') && head.len() > 1),
        (Target::Host(HostPattern::Wildcard(d)), Target::Host(HostPattern::Wildcard(a))) => {
            a == d
                || a.strip_suffix(d.as_str())
                    .is_some_and(|head| head.ends_with('.') && head.len() > 1)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn lint(text: &str) -> Vec<String> {
        match crate::parse_str(text, Path::new("p.yaml")) {
            Ok(p) => warnings(&p),
            Err(e) => panic!("{e}"),
        }
    }

    const HEAD: &str = "egress_policy:\n  default_action: DENY\n  allow_loopback: false\n  \
                        allowed_destinations:\n";

    #[test]
    fn a_careful_policy_has_no_warnings() {
        let text = format!(
            "{HEAD}    - host: api.example.com\n      ports: [443]\n      protocols: [https]\n    \
             - cidr: 127.0.0.1/32\n      ports: [5432]\n      protocols: [tcp]\n  \
             denied_destinations:\n    - cidr: 10.0.0.0/8\n"
        );
        assert_eq!(lint(&text), Vec::<String>::new());
    }

    #[test]
    fn each_likely_mistake_is_named_with_its_entry() {
        let text = format!(
            "{HEAD}    - cidr: 0.0.0.0/0\n      ports: [443]\n      protocols: [tcp]\n    \
             - host: api.example.com\n      ports: [443]\n      protocols: [tcp]\n    \
             - host: api.example.com\n      ports: [443]\n      protocols: [tcp]\n    \
             - cidr: 10.1.2.0/24\n      ports: [53]\n      protocols: [dns]\n    \
             - cidr: ::/0\n      ports: [443]\n      protocols: [tcp]\n  \
             denied_destinations:\n    - host: \"*.example.com\"\n    - cidr: 10.0.0.0/8\n    \
             - cidr: 10.0.0.0/8\n"
        );
        let w = lint(&text);
        let heads: Vec<&str> = w
            .iter()
            .map(|w| w.split_once(": ").map_or(w.as_str(), |(h, _)| h))
            .collect();
        assert_eq!(
            heads,
            [
                "egress_policy.allowed_destinations[0]",
                "egress_policy.allowed_destinations[1]",
                "egress_policy.allowed_destinations[2]",
                "egress_policy.allowed_destinations[3]",
                "egress_policy.allowed_destinations[3]",
                "egress_policy.allowed_destinations[4]",
                "egress_policy.allowed_destinations[2]",
                "egress_policy.denied_destinations[2]",
            ],
            "{w:#?}"
        );
        assert!(w[0].contains("every IPv4 address"), "{w:#?}");
        assert!(
            w[1].contains("denied_destinations[0] (`*.example.com`)"),
            "{w:#?}"
        );
        assert!(
            w[3].contains("denied_destinations[1] (`10.0.0.0/8`)"),
            "{w:#?}"
        );
        assert!(w[4].contains("port 53"), "{w:#?}");
        assert!(w[5].contains("every IPv6 address"), "{w:#?}");
        assert!(
            w[6].contains(
                "same destination, ports and protocols as egress_policy.allowed_destinations[1]"
            ),
            "{w:#?}"
        );
    }

    #[test]
    fn the_default_loopback_allowance_is_named() {
        let text = "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - \
                    host: api.example.com\n      ports: [443]\n      protocols: [https]\n";
        let w = lint(text);
        assert_eq!(w.len(), 1, "{w:#?}");
        assert!(w[0].starts_with("egress_policy.allow_loopback: "), "{w:#?}");
        assert!(w[0].contains("`loopback: {ports: [5432]}`"), "{w:#?}");
        // Loopback scoped by port leaves no local relay open: nothing to say.
        let scoped = text.replace(
            "  default_action: DENY\n",
            "  default_action: DENY\n  loopback: {ports: [5432]}\n",
        );
        assert_eq!(lint(&scoped), Vec::<String>::new());
        // Under `loopback.ports` an entry for loopback never applies.
        let entry = scoped.replace("host: api.example.com", "cidr: 127.0.0.1/32");
        let w = lint(&entry);
        assert_eq!(w.len(), 1, "{w:#?}");
        assert!(
            w[0].starts_with(
                "egress_policy.allowed_destinations[0]: `127.0.0.1/32` is loopback, which \
                 `loopback.ports` decides alone"
            ),
            "{w:#?}"
        );
        let wide = scoped.replace("host: api.example.com", "cidr: 10.0.0.0/8");
        assert_eq!(lint(&wide), Vec::<String>::new());
        // A wildcard denial does not cover the bare suffix it is under.
        let deny = Target::Host(HostPattern::Wildcard("example.com".into()));
        assert!(!denial_covers(
            &deny,
            &Target::Host(HostPattern::Exact("example.com".into()))
        ));
        assert!(denial_covers(
            &deny,
            &Target::Host(HostPattern::Exact("a.example.com".into()))
        ));
        assert!(!denial_covers(
            &deny,
            &Target::Host(HostPattern::Exact("aexample.com".into()))
        ));
    }
}
