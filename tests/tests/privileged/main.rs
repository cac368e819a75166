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
mod limits;
mod loopback;
mod ratelimit;
mod reroute;
mod restrictions;
mod robustness;
mod rule_counts;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use egress_common::{Dest, Proto};
use egress_tests::policy::PolicyYaml;
use egress_tests::scenario::Scenario;
use egress_tests::testbed::Testbed;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

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

/// The random source of a test comparing the kernel with the reference: `default` unless
/// `EGRESS_TEST_SEED` names another seed.
fn seeded_rng(default: u64) -> StdRng {
    let seed: u64 = std::env::var("EGRESS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("seed {seed} (set EGRESS_TEST_SEED to replay)");
    StdRng::seed_from_u64(seed)
}

/// A random probe op to `addr` port `port` (a TCP connect, a UDP connect or a UDP send; from
/// an IPv6 socket when `v6_socket`) and the destination the reference judges for it.
fn random_op_to(rng: &mut StdRng, addr: IpAddr, v6_socket: bool, port: u16) -> (String, Dest) {
    let family = if v6_socket { "6" } else { "4" };
    let (kind, proto) = match rng.random_range(0..3) {
        0 => ("connect tcp", Proto::Tcp),
        1 => ("connect udp", Proto::Udp),
        _ => ("sendto udp", Proto::Udp),
    };
    let data = if kind.starts_with("sendto") { " x" } else { "" };
    // The probe sends an IPv4 literal on an IPv6 socket in its mapped form; Dest::v6
    // canonicalises that back to IPv4, as the kernel side must.
    let dst = match (addr, v6_socket) {
        (IpAddr::V4(a), false) => Dest::v4(a.octets(), port, proto),
        (IpAddr::V4(a), true) => Dest::v6(a.to_ipv6_mapped().octets(), port, proto),
        (IpAddr::V6(a), _) => Dest::v6(a.octets(), port, proto),
    };
    (format!("{kind}{family} {addr} {port}{data}"), dst)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP literal")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}
