//! Writing MCP-NET-02 policy YAML for tests.

use std::fmt::Write as _;

/// A policy under construction. `render` produces the YAML the agent reads:
///
/// ```yaml
/// egress_policy:
///   name: "dns-a"                    # only when set
///   default_action: DENY
///   allow_loopback: false            # only when set
///   loopback: {ports: [5432]}        # only when set
///   allowed_destinations:
///     - {cidr: "198.18.0.2/32", ports: [8080], protocols: [tcp]}
///     - {host: "*.example.test", ports: [443], protocols: [https]}
///   denied_destinations:
///     - {cidr: "198.18.1.0/24"}
///     - {host: "secret.example.test"}
///   dns_policy:                      # only when a dns_policy setting was made
///     allowed_resolvers: ["198.18.0.2"]
///     block_doh: true
///     block_dot: true
///   inbound:                         # only when set
///     - {port: 8080, from: ["198.18.0.2/32"]}
/// ```
#[derive(Clone, Debug, Default)]
pub struct PolicyYaml {
    name: Option<String>,
    allowed: Vec<String>,
    denied: Vec<String>,
    allow_loopback: Option<bool>,
    loopback_ports: Option<Vec<u16>>,
    allow_other_socket_types: Option<bool>,
    dns: Option<DnsPolicyYaml>,
    inbound: Vec<String>,
}

/// The `dns_policy` section; unset fields are left out.
#[derive(Clone, Debug, Default)]
struct DnsPolicyYaml {
    allowed_resolvers: Option<Vec<String>>,
    block_doh: Option<bool>,
    block_dot: Option<bool>,
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

    /// `- {host: "<name, *.wildcard or ip literal>", ports: [...], protocols: [...]}`
    #[must_use]
    pub fn allow_host(mut self, host: &str, ports: &[u16], protocols: &[&str]) -> Self {
        self.allowed.push(rule("host", host, ports, protocols));
        self
    }

    /// `- {host: "*.<suffix>", ...}`: every name below `suffix`.
    #[must_use]
    pub fn allow_wildcard(self, suffix: &str, ports: &[u16], protocols: &[&str]) -> Self {
        self.allow_host(&format!("*.{suffix}"), ports, protocols)
    }

    /// `- {host: "<name or *.wildcard>"}` under denied_destinations.
    #[must_use]
    pub fn deny_host(mut self, host: &str) -> Self {
        self.denied.push(format!("{{host: \"{host}\"}}"));
        self
    }

    /// The `name` extension key (the policy's label in logs and metrics).
    #[must_use]
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    /// `dns_policy.allowed_resolvers`.
    #[must_use]
    pub fn allowed_resolvers(mut self, resolvers: &[&str]) -> Self {
        self.dns
            .get_or_insert_with(DnsPolicyYaml::default)
            .allowed_resolvers = Some(resolvers.iter().map(|r| (*r).to_owned()).collect());
        self
    }

    /// `dns_policy.block_doh`.
    #[must_use]
    pub fn block_doh(mut self, block: bool) -> Self {
        self.dns
            .get_or_insert_with(DnsPolicyYaml::default)
            .block_doh = Some(block);
        self
    }

    /// `dns_policy.block_dot`.
    #[must_use]
    pub fn block_dot(mut self, block: bool) -> Self {
        self.dns
            .get_or_insert_with(DnsPolicyYaml::default)
            .block_dot = Some(block);
        self
    }

    /// `- {cidr: "<cidr>"}` under denied_destinations.
    #[must_use]
    pub fn deny_cidr(mut self, cidr: &str) -> Self {
        self.denied.push(format!("{{cidr: \"{cidr}\"}}"));
        self
    }

    /// `inbound: - {port: <port>, from: [...]}`
    #[must_use]
    pub fn inbound(mut self, port: u16, from: &[&str]) -> Self {
        let quoted: Vec<String> = from.iter().map(|f| format!("\"{f}\"")).collect();
        self.inbound
            .push(format!("{{port: {port}, from: [{}]}}", quoted.join(", ")));
        self
    }

    #[must_use]
    pub fn allow_loopback(mut self, allow: bool) -> Self {
        self.allow_loopback = Some(allow);
        self
    }

    /// `loopback: {ports: [...]}`: loopback at these ports only.
    #[must_use]
    pub fn loopback_ports(mut self, ports: &[u16]) -> Self {
        self.loopback_ports = Some(ports.to_vec());
        self
    }

    #[must_use]
    pub fn allow_other_socket_types(mut self, allow: bool) -> Self {
        self.allow_other_socket_types = Some(allow);
        self
    }

    pub fn render(&self) -> String {
        let mut y = String::with_capacity(64 * (self.allowed.len() + self.denied.len()) + 256);
        y.push_str("egress_policy:\n");
        if let Some(name) = &self.name {
            let _ = writeln!(y, "  name: \"{name}\"");
        }
        y.push_str("  default_action: DENY\n");
        if let Some(b) = self.allow_loopback {
            let _ = writeln!(y, "  allow_loopback: {b}");
        }
        if let Some(ports) = &self.loopback_ports {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            let _ = writeln!(y, "  loopback: {{ports: [{}]}}", ports.join(", "));
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
        if !self.inbound.is_empty() {
            y.push_str("  inbound:\n");
            for r in &self.inbound {
                let _ = writeln!(y, "    - {r}");
            }
        }
        if let Some(dns) = &self.dns {
            y.push_str("  dns_policy:\n");
            if let Some(resolvers) = &dns.allowed_resolvers {
                let quoted: Vec<String> = resolvers.iter().map(|r| format!("\"{r}\"")).collect();
                let _ = writeln!(y, "    allowed_resolvers: [{}]", quoted.join(", "));
            }
            if let Some(b) = dns.block_doh {
                let _ = writeln!(y, "    block_doh: {b}");
            }
            if let Some(b) = dns.block_dot {
                let _ = writeln!(y, "    block_dot: {b}");
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

    #[test]
    fn renders_names_wildcards_denied_hosts_and_dns_policy() {
        let y = PolicyYaml::new()
            .name("dns-a")
            .allow_wildcard("example.test", &[443], &["tcp"])
            .deny_host("secret.example.test")
            .allowed_resolvers(&["198.18.0.2", "fd00:e9::2"])
            .block_doh(true)
            .block_dot(false)
            .render();
        assert_eq!(
            y,
            "egress_policy:\n  name: \"dns-a\"\n  default_action: DENY\n  allowed_destinations:\n    - {host: \"*.example.test\", ports: [443], protocols: [tcp], purpose: \"egress test\"}\n  denied_destinations:\n    - {host: \"secret.example.test\"}\n  dns_policy:\n    allowed_resolvers: [\"198.18.0.2\", \"fd00:e9::2\"]\n    block_doh: true\n    block_dot: false\n"
        );
        let parsed = egress_agent::policy::parse_str(&y, std::path::Path::new("t.yaml"));
        assert!(parsed.is_ok(), "{parsed:?}");
    }
}
