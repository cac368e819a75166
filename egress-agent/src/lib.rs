//! The egress agent: turns an MCP-NET-02 egress policy into kernel enforcement on a cgroup.
//!
//! `policy` parses and validates; `compile` turns a policy and resolved addresses into map
//! contents (pure); `reference` is the decision read straight off the policy, for tests;
//! `ratelimit` does the same three jobs for the connection budgets;
//! `loader`, `maps`, `enforcer` load, fill and keep the kernel side; `workload`, `cgroup`,
//! `exec` and `run` supervise the protected process.

pub mod bpf_sys;
pub mod bpffs;
pub mod capacity;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod compile;
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
pub mod lint;
pub mod loader;
pub mod logging;
pub mod maps;
pub mod metrics;
pub mod mip6;
pub mod mountinfo;
pub mod policy;
pub mod privilege;
pub mod ratelimit;
pub mod recent;
pub mod reference;
pub mod reload;
pub mod report;
pub mod resolve;
pub mod run;
pub mod scrape;
pub mod session;
pub mod status;
pub mod walltime;
pub mod workload;
