//! egress's privileged integration tests, in one binary: a module per area, sharing the
//! harness in `egress_tests` (`tests/src`). They need root, cgroup v2 and the `ip` tool; each
//! builds its own network namespaces and cgroups and removes them, also when it fails.
//! `cargo xtask test` runs them with the release agent; without root (and without `CI=true`)
//! each one prints a skip notice and passes.
//!
//! Modules: `agreement` (kernel and userspace reference decide alike), `audit`, `dns` (the DNS
//! proxy), `dns_hardening` (escapes around it), `enforce` (the allowlist), `events`
//! (reporting), `harness` (the harness itself), `hosts` (policy host names), `inbound`,
//! `kernel_errors` (the programs' fail-closed paths), `learn`, `lifecycle` (enforcement that
//! outlives the agent), `ratelimit`, `reroute`, `restrictions` (AWS regions and services),
//! `robustness` (operator mistakes), `rule_counts`.

// Integration tests are compiled with cfg(test) anyway; saying so makes clippy treat the
// helpers here as test code too (`allow-unwrap-in-tests` in clippy.toml).
#![cfg(test)]

mod agreement;
mod audit;
mod dns;
mod dns_hardening;
mod enforce;
mod events;
mod harness;
mod hosts;
mod inbound;
mod kernel_errors;
mod learn;
mod lifecycle;
mod ratelimit;
mod reroute;
mod restrictions;
mod robustness;
mod rule_counts;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use egress_tests::policy::PolicyYaml;
use egress_tests::scenario::Scenario;
use egress_tests::testbed::Testbed;

/// The workload the tests run, built by cargo for this test binary.
const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");

/// The testbed of a privileged test; `None` when it cannot run here (see
/// [`Testbed::for_test`]).
fn testbed() -> Option<Testbed> {
    Testbed::for_test(Path::new(PROBE))
}

/// A world to declare (listeners, an upstream DNS server) and build.
fn scenario() -> Scenario {
    Scenario::new(Path::new(PROBE))
}

/// The smallest policy that allows something: TCP to the remote end of the veth pair on
/// port 8443.
fn allow_8443() -> PolicyYaml {
    PolicyYaml::new().allow_cidr("198.18.0.2/32", &[8443], &["tcp"])
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP literal")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}
