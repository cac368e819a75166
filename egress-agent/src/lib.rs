//! The egress agent: turns an MCP-NET-02 egress policy into kernel enforcement on a cgroup.
//!
//! The policy itself (model, parser, the pure compile step, the reference decision) is the
//! `egress-policy` crate. Here: `loader`, `maps`, `ratelimit`, `inbound` and `enforcer` load,
//! fill and keep the kernel side; `dns` is the DNS proxy; `workload`, `cgroup`, `exec` and
//! `run` supervise the protected process.

pub mod bpf_sys;
pub mod bpffs;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod counters;
pub mod detach;
pub mod dns;
pub mod enforcer;
pub mod environment;
pub mod events;
pub mod exec;
pub mod exit;
pub mod explain;
pub mod inbound;
pub mod instance;
pub mod learn;
pub mod loader;
pub mod logging;
pub mod maps;
pub mod metrics;
pub mod mip6;
pub mod mountinfo;
pub mod privilege;
pub mod ratelimit;
pub mod recent;
pub mod reload;
pub mod report;
pub mod resolve;
pub mod run;
pub mod scrape;
pub mod session;
pub mod status;
pub mod walltime;
pub mod workload;

// The policy core under the paths the integration tests and tools use.
pub use egress_policy::{compile, reference};
pub mod policy {
    pub use egress_policy::*;
}
