//! The egress agent: turns an MCP-NET-02 egress policy into kernel enforcement on a cgroup.
//!
//! The policy itself (model, parser, the pure compile step, the reference decision) is the
//! `egress-policy` crate, the DNS wire format the `egress-dns-wire` crate. The agent is
//! grouped by phase, each using only the ones below it:
//!
//! - `cmd`: the commands (`exec`, `run`, `check`, `explain`, `learn`, `status`, `detach`).
//! - `supervisor`: keeping one protected cgroup enforced (session, enforcer, lookups, reload,
//!   instance records).
//! - `dns`: the DNS proxy in front of the workload.
//! - `workload`: the protected process.
//! - `observe`: events, metrics, logs.
//! - `kernel`: programs, pins, cgroups and every map reader and writer.
//!
//! `cli` is the command line, `exit` the exit codes.

pub mod cli;
pub mod cmd;
pub mod dns;
pub mod exit;
pub mod kernel;
pub mod observe;
pub mod supervisor;
pub mod workload;

// The paths the integration tests and tools use.
pub use egress_policy::{compile, reference};
pub use kernel::{loader, maps};
pub use supervisor::{enforcer, instance};
pub mod policy {
    pub use egress_policy::*;
}
pub mod ratelimit {
    pub use crate::kernel::ratelimit::*;
    pub use egress_policy::limits::{CompiledLimits, compile_limits, reference};
}
