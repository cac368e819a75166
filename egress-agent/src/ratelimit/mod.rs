//! Connection rate limits in the kernel (see docs/rate-limits.md): `maps` writes the limit
//! entries `egress_policy::limits` compiles and deletes buckets that have refilled.

mod maps;

pub use maps::{COLLECT_PERIOD, RateMaps, RateMapsError, monotonic_ns};

// The compiled limits and their reference, under the paths the integration tests use.
pub use egress_policy::limits::{CompiledLimits, compile_limits, reference};
