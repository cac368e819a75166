//! Keeping a protected cgroup enforced: the session (policy, DNS proxy, events and metrics
//! of one workload), the enforcer (the policy's tables in the kernel: install, reload,
//! refresh), the host-name lookups and their schedule, reload triggers, and the pinned
//! instance records that let another agent adopt or clean up.

pub mod enforcer;
pub mod install;
pub mod instance;
pub mod lookups;
pub mod reload;
pub mod resolve;
pub mod session;
