//! DNS control (issue #3) on the real kernel: the workload's DNS goes to the agent's proxy,
//! which answers only names the policy allows, installs their addresses before the workload
//! sees the answer, and forwards only to the policy's resolver.
//!
//! Every test starts its own dnsmasq in the remote namespace (the upstream resolver, named in
//! the policy's `dns_policy.allowed_resolvers`), runs `egress-agent exec` around the probe as
//! uid nobody in the client namespace, and asserts what a user would check: the rcode and
//! addresses the workload got and from where, the errno of its connects, the bytes that did or
//! did not arrive, what the upstream server's query log shows, and the agent's JSON log and
//! metrics. Traffic only ever goes to addresses inside the test's namespaces: the addresses of
//! real providers used below (DoH, metadata) have no route from the client namespace, which
//! each such test checks first.

mod lifetimes;
mod names;
mod observed;
mod resolvers;
mod workloads;

use std::time::{Duration, Instant};

use egress_tests::agent::AgentRun;
use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::netns::Netns;
use egress_tests::policy::PolicyYaml;
use egress_tests::process::RunOutput;
use egress_tests::scenario::{UPSTREAM, World};
use egress_tests::server::{Listener, WAIT};

use crate::ip;

/// A policy whose DNS goes to the test's dnsmasq.
fn policy() -> PolicyYaml {
    PolicyYaml::new().allowed_resolvers(&[UPSTREAM])
}

/// Runs the agent in the client namespace and checks it exited 0.
fn finished(tb: &World, run: AgentRun) -> RunOutput {
    tb.finished(&run)
}

/// An `exec` run of the probe under `policy`, logging JSON.
fn agent(tb: &World, policy: &PolicyYaml) -> AgentRun {
    tb.json_agent(policy)
}

/// Panics if the upstream server was asked about `domain` or any name below it.
#[track_caller]
fn assert_not_forwarded(dns: &Dnsmasq, domain: &str, out: &RunOutput) {
    let asked = dns.queries_at_or_below(domain);
    assert!(
        asked.is_empty(),
        "the upstream resolver was asked about {domain}: {asked:?}\n{}",
        out.describe()
    );
}

/// Panics unless the upstream server was asked about `name` itself.
#[track_caller]
fn assert_forwarded(dns: &Dnsmasq, name: &str, out: &RunOutput) {
    assert!(
        !dns.queries_for(name).is_empty(),
        "the upstream resolver was never asked about {name}: {:?}\n{}",
        dns.queried(),
        out.describe()
    );
}

/// Panics unless the client namespace has no way out: no default route and no route to
/// any of `outside`. Tests that point connects at real-world addresses check this first, so
/// that a failure of enforcement ends in ENETUNREACH, never in a packet on a real network.
#[track_caller]
fn assert_no_way_out(ns: &Netns, outside: &[&str]) {
    assert!(
        !ns.has_default_route().expect("reading routes"),
        "the client namespace must have no default route"
    );
    for a in outside {
        assert!(
            !ns.has_route_to(ip(a)),
            "the client namespace has a route to {a}"
        );
    }
}

/// Waits (bounded) until `listener` has accepted `n` connections; returns how many it has.
fn wait_connections(listener: &Listener, n: usize) -> usize {
    let deadline = Instant::now() + WAIT;
    while listener.connections() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    listener.connections()
}

/// How many of `listener`'s connections carried exactly `payload`.
fn connections_with(listener: &Listener, payload: &[u8]) -> usize {
    listener
        .messages()
        .iter()
        .filter(|m| m.as_slice() == payload)
        .count()
}
