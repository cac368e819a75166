//! Writing MCP-NET-02 policy YAML for tests (only IP-literal and CIDR targets).

use std::fmt::Write as _;

/// A policy under construction. `render` produces the YAML the agent reads:
///
/// ```yaml
/// egress_policy:
///   default_action: DENY
///   allow_loopback: false            # only when set
///   allowed_destinations:
///     - {cidr: "198.18.0.2/32", ports: [8080], protocols: [tcp]}
///   denied_destinations:
///     - {cidr: "198.18.1.0/24"}
/// ```
#[derive(Clone, Debug, Default)]
pub struct PolicyYaml {
    allowed: Vec<String>,
    denied: Vec<String>,
    allow_loopback: Option<bool>,
    allow_other_socket_types: Option<bool>,
}

impl PolicyYaml {
    pub fn new() -> Self {
        Self::default()
    }

    /// `- {cidr: "<cidr>", ports: [...], protocols: [...]}`
    #[must_use]
    pub fn allow_cidr(mut self, cidr: &str, ports: &[u16], protocols: &[&str]) -> Self {
        self.allowed.push(rule("cidr", cidr, ports, protocols));
        self
    }

    /// `- {host: "<ip literal>", ports: [...], protocols: [...]}`
    #[must_use]
    pub fn allow_host(mut self, host: &str, ports: &[u16], protocols: &[&str]) -> Self {
        self.allowed.push(rule("host", host, ports, protocols));
        self
    }

    /// `- {cidr: "<cidr>"}` under denied_destinations.
    #[must_use]
    pub fn deny_cidr(mut self, cidr: &str) -> Self {
        self.denied.push(format!("{{cidr: \"{cidr}\"}}"));
        self
    }

    #[must_use]
    pub fn allow_loopback(mut self, allow: bool) -> Self {
        self.allow_loopback = Some(allow);
        self
    }

    #[must_use]
    pub fn allow_other_socket_types(mut self, allow: bool) -> Self {
        self.allow_other_socket_types = Some(allow);
        self
    }

    pub fn render(&self) -> String {
        let mut y = String::with_capacity(64 * (self.allowed.len() + self.denied.len()) + 256);
        y.push_str("egress_policy:\n  default_action: DENY\n");
        if let Some(b) = self.allow_loopback {
            let _ = writeln!(y, "  allow_loopback: {b}");
        }
        if let Some(b) = self.allow_other_socket_types {
            let _ = writeln!(y, "  allow_other_socket_types: {b}");
        }
        if self.allowed.is_empty() {
            y.push_str("  allowed_destinations: []\n");
        } else {
            y.push_str("  allowed_destinations:\n");
            for r in &self.allowed {
                let _ = writeln!(y, "    - {r}");
            }
        }
        if !self.denied.is_empty() {
            y.push_str("  denied_destinations:\n");
            for r in &self.denied {
                let _ = writeln!(y, "    - {r}");
            }
        }
        y
    }
}

fn rule(key: &str, target: &str, ports: &[u16], protocols: &[&str]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "{{{key}: \"{target}\", ports: [{}], protocols: [{}], purpose: \"egress test\"}}",
        ports.join(", "),
        protocols.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_flow_style_rules() {
        let y = PolicyYaml::new()
            .allow_host("198.18.0.2", &[443], &["https"])
            .deny_cidr("198.18.1.0/24")
            .allow_loopback(false)
            .render();
        assert_eq!(
            y,
            "egress_policy:\n  default_action: DENY\n  allow_loopback: false\n  allowed_destinations:\n    - {host: \"198.18.0.2\", ports: [443], protocols: [https], purpose: \"egress test\"}\n  denied_destinations:\n    - {cidr: \"198.18.1.0/24\"}\n"
        );
    }
}
