//! Harness for egress's privileged integration tests.
//!
//! The tests build small networks out of network namespaces joined by veth pairs
//! ([`netns::Topology`]), start listeners inside them ([`server::Listener`]), run the agent
//! with the `egress-probe` workload as an unprivileged user ([`agent::AgentRun`]) and assert
//! what a user would check: the errno of each operation and the bytes that did or did not
//! arrive. Everything a test creates (namespaces, cgroups, processes, temp files) is owned by
//! a guard that removes it on drop, also when the test panics.
//!
//! Safety rules the harness enforces: traffic only to loopback or to addresses inside
//! namespaces it created; nothing changed in the root network namespace; cgroups only under
//! a test-owned parent; processes stopped by pid.

pub mod agent;
pub mod cgroup;
pub mod dnsmasq;
pub mod netns;
pub mod policy;
pub mod probe;
pub mod process;
pub mod server;
pub mod testbed;

mod env;

pub use env::{
    NOBODY_GID, NOBODY_UID, StagedProbe, copy_probe_for_nobody, find_tool, in_ci,
    require_root_or_skip, unique_name,
};
