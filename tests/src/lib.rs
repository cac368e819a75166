//! Harness for egress's privileged integration tests.
//!
//! The tests build small networks out of network namespaces joined by veth pairs
//! ([`netns::Topology`]), start listeners inside them ([`server::Listener`]) and a DNS server
//! ([`dnsmasq::Dnsmasq`]), run the agent with the `egress-probe` workload as an unprivileged
//! user (`exec`: [`agent::AgentRun`]; `run` in the background: [`run_agent::RunAgent`]) and
//! assert what a user would check: the errno of each operation, the bytes that did or did not
//! arrive ([`capture::Capture`] for frames on the wire), and the agent's log lines
//! ([`log`]) and metrics ([`metrics`]). [`scenario::Scenario`] builds the usual world in one
//! expression. Everything a test creates (namespaces, cgroups, processes, temp files) is owned
//! by a guard that removes it on drop, also when the test panics.
//!
//! The demo and the benchmarks (the `egress-tools` crate) build their worlds with it too.
//!
//! Safety rules the harness enforces: traffic only to loopback or to addresses inside
//! namespaces it created; nothing changed in the root network namespace; cgroups only under
//! a test-owned parent; processes stopped by pid.

pub mod agent;
pub mod capture;
pub mod cgroup;
pub mod dnsmasq;
pub mod log;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod probe;
pub mod process;
pub mod run_agent;
pub mod scenario;
pub mod server;
pub mod sockaddr;
pub mod testbed;
pub mod wait;

mod env;

pub use env::{
    NOBODY_GID, NOBODY_UID, StagedBinary, copy_for_nobody, copy_probe_for_nobody, find_tool, in_ci,
    require_root_or_skip, unique_name,
};
