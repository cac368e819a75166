//! A validated policy written back as MCP-NET-02 YAML, with comments: what `learn` writes.
//! The text is parsed again before it is written, so whatever this emits is a policy `check`
//! accepts.

use std::fmt::Write as _;

use egress_policy::{AllowedDestination, DefaultAction, Policy, RateLimit, Target};

/// One allowed entry with the comment lines to put above it.
#[derive(Clone, Debug)]
pub struct Commented {
    pub comments: Vec<String>,
    pub entry: AllowedDestination,
}

/// The YAML of `policy` (its own allowed entries first, then `extra`), with `header` comment
/// lines at the top and `trailer` comment lines at the end. `mode` is left out: the policy
/// is written to be enforced.
pub fn render(
    policy: &Policy,
    extra: &[Commented],
    header: &[String],
    trailer: &[String],
) -> String {
    let mut y = String::new();
    for line in header {
        comment(&mut y, "", line);
    }
    y.push_str("egress_policy:\n");
    let _ = writeln!(y, "  name: {}", quote(&policy.name));
    let _ = writeln!(
        y,
        "  default_action: {}",
        match policy.default_action {
            DefaultAction::Deny => "DENY",
            DefaultAction::Allow => "ALLOW",
        }
    );
    if !policy.loopback_ports.is_empty() {
        let ports: Vec<String> = policy.loopback_ports.iter().map(u16::to_string).collect();
        let _ = writeln!(y, "  loopback: {{ports: [{}]}}", ports.join(", "));
    } else if !policy.allow_loopback {
        y.push_str("  allow_loopback: false\n");
    }
    if policy.allow_other_socket_types {
        y.push_str("  allow_other_socket_types: true\n");
    }
    if policy.allowed.is_empty() && extra.is_empty() {
        y.push_str("  allowed_destinations: []\n");
    } else {
        y.push_str("  allowed_destinations:\n");
        for rule in &policy.allowed {
            allowed(&mut y, rule);
        }
        for c in extra {
            for line in &c.comments {
                comment(&mut y, "    ", line);
            }
            allowed(&mut y, &c.entry);
        }
    }
    if !policy.denied.is_empty() {
        y.push_str("  denied_destinations:\n");
        for rule in &policy.denied {
            let _ = writeln!(y, "    - {}", target(&rule.target));
        }
    }
    if let Some(dns) = &policy.dns {
        y.push_str("  dns_policy:\n");
        if !dns.allowed_resolvers.is_empty() {
            let list: Vec<String> = dns
                .allowed_resolvers
                .iter()
                .map(|r| quote(&r.to_string()))
                .collect();
            let _ = writeln!(y, "    allowed_resolvers: [{}]", list.join(", "));
        }
        let _ = writeln!(y, "    block_doh: {}", dns.block_doh);
        let _ = writeln!(y, "    block_dot: {}", dns.block_dot);
    }
    if let Some(limits) = &policy.rate_limits {
        y.push_str("  rate_limits:\n");
        if let Some(l) = &limits.per_destination {
            let _ = writeln!(y, "    per_destination: {}", limit(l, "max_connections"));
        }
        if let Some(l) = &limits.global {
            let _ = writeln!(y, "    global: {}", limit(l, "max_new_connections"));
        }
    }
    if !policy.inbound.is_empty() {
        y.push_str("  inbound:\n");
        for rule in &policy.inbound {
            let from: Vec<String> = rule.from.iter().map(|n| quote(&n.to_string())).collect();
            let _ = write!(
                y,
                "    - {{port: {}, from: [{}]",
                rule.port,
                from.join(", ")
            );
            if let Some(p) = &rule.purpose {
                let _ = write!(y, ", purpose: {}", quote(p));
            }
            y.push_str("}\n");
        }
    }
    for line in trailer {
        comment(&mut y, "", line);
    }
    y
}

fn allowed(y: &mut String, rule: &AllowedDestination) {
    let _ = writeln!(y, "    - {}", target(&rule.target));
    let ports: Vec<String> = rule.ports.iter().map(ToString::to_string).collect();
    let _ = writeln!(y, "      ports: [{}]", ports.join(", "));
    let protocols: Vec<&str> = rule.protocols.iter().map(|p| p.as_str()).collect();
    let _ = writeln!(y, "      protocols: [{}]", protocols.join(", "));
    if let Some(p) = &rule.purpose {
        let _ = writeln!(y, "      purpose: {}", quote(p));
    }
    if let Some(l) = &rule.rate_limit {
        let _ = writeln!(y, "      rate_limit: {}", limit(l, "max_connections"));
    }
    if let Some(r) = &rule.restrictions {
        y.push_str("      restrictions:\n");
        if !r.regions.is_empty() {
            let _ = writeln!(y, "        regions: [{}]", r.regions.join(", "));
        }
        if !r.services.is_empty() {
            let s: Vec<String> = r.services.iter().map(ToString::to_string).collect();
            let _ = writeln!(y, "        services: [{}]", s.join(", "));
        }
    }
}

fn target(t: &Target) -> String {
    match t {
        Target::Host(h) => format!("host: {}", quote(&h.to_string())),
        Target::Cidr(n) => format!("cidr: {}", quote(&n.to_string())),
    }
}

fn limit(l: &RateLimit, count_key: &str) -> String {
    format!(
        "{{{count_key}: {}, time_window: {}}}",
        l.max_connections, l.time_window_secs
    )
}

/// A double-quoted YAML scalar (JSON's escaping is valid YAML).
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

fn comment(y: &mut String, indent: &str, line: &str) {
    // One comment line per line of text: a newline in it must not end the comment.
    for part in line.lines() {
        let _ = writeln!(y, "{indent}# {part}");
    }
    if line.is_empty() {
        let _ = writeln!(y, "{indent}#");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_seed_policy_renders_to_an_equal_policy() {
        let text = include_str!("../../../../policies/mcp-net-02-example.yaml");
        let parse =
            |t: &str| match egress_policy::parse_str(t, Path::new("mcp-net-02-example.yaml")) {
                Ok(p) => p,
                Err(e) => panic!("{e}\n{t}"),
            };
        let policy = parse(text);
        let out = render(&policy, &[], &["header".into()], &["a\nb".into()]);
        assert!(out.starts_with("# header\negress_policy:\n"), "{out}");
        assert!(out.ends_with("# a\n# b\n"), "{out}");
        assert_eq!(parse(&out), policy);
    }
}
