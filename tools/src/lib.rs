//! What the demo and the benchmarks share: clean-up on interruption, and finding the workload
//! binaries cargo builds next to them.
//!
//! The binaries (`src/bin/`): `egress-demo` (`cargo xtask demo`), `egress-bench` with its
//! workloads `egress-bench-load` and `egress-dns-client` (`cargo xtask bench`), and
//! `egress-ratelimit-bench` (docs/rate-limits.md). They build their worlds with the test
//! harness (`egress_tests`) and run the tests' probe, `egress-probe`, as a workload.

pub mod interrupt;

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

/// The binary `name` next to the running one (cargo builds every binary of the workspace into
/// the same directory), or the path in the environment variable `var` when it is set.
pub fn sibling_bin(name: &str, var: &str) -> Result<PathBuf> {
    let path = match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .context("locating the running binary")?
            .with_file_name(name),
    };
    if !path.is_file() {
        bail!(
            "the workload binary {} does not exist: build it with `cargo build --release -p \
             egress-tests -p egress-tools --bins` (`cargo xtask demo` and `cargo xtask bench` \
             do), or set {var}",
            path.display()
        );
    }
    Ok(path)
}
