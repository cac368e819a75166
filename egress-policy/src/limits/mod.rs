//! Connection rate limits: `rate_limits.per_destination`, `rate_limits.global` and the
//! per-rule `rate_limit` of MCP-NET-02, enforced in the kernel (see docs/rate-limits.md).
//!
//! `compile` turns a policy into the limit entries the kernel reads; `reference` is the
//! decision computed straight from the policy with plain token buckets, for tests.

mod compile;
pub mod reference;

pub use compile::{
    CompiledLimits, budget_id, compile_limits, destination_identity, destination_limit,
    global_identity, has_limits,
};
