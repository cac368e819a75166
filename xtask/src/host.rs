//! Facts about the machine and the checkout that decide what a plan may do.

use std::{
    env,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};

/// The workspace root: xtask lives one level below it.
pub fn repo_root() -> anyhow::Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("xtask's manifest directory has no parent"))
}

/// Where cargo puts build output, following `CARGO_TARGET_DIR` like cargo does.
pub fn target_dir(root: &Path) -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// `CI=true` (or any value other than empty, `0` or `false`) means a test that cannot run is a
/// failure, never a skip.
pub fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "False"))
}

/// Whether this process runs with effective uid 0, read from /proc so xtask needs no libc.
pub fn is_root() -> anyhow::Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    effective_uid(&status).map(|uid| uid == 0)
}

fn effective_uid(status: &str) -> anyhow::Result<u32> {
    let Some(line) = status.lines().find_map(|l| l.strip_prefix("Uid:")) else {
        bail!("/proc/self/status has no Uid: line");
    };
    // Fields: real, effective, saved set, filesystem.
    line.split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("/proc/self/status Uid: line has no effective uid: {line:?}"))?
        .parse()
        .with_context(|| format!("/proc/self/status Uid: line is not numeric: {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\txtask\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert!(matches!(effective_uid(status), Ok(0)));
        assert!(effective_uid("Name:\tx\n").is_err());
    }
}
