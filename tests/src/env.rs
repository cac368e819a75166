//! The test process's environment: privileges, tools, unique names, the staged probe.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

/// The unprivileged user the workload runs as (`nobody`).
pub const NOBODY_UID: u32 = 65534;
pub const NOBODY_GID: u32 = 65534;

/// Tools the privileged tests call.
const REQUIRED_TOOLS: &[&str] = &["ip"];

/// True when `CI=true`: privileged tests that cannot run must fail, not skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Whether a privileged test can run here. Returns false (after printing a skip notice) when
/// it cannot; under `CI=true` it panics instead, so a privileged test never skips in CI.
pub fn require_root_or_skip() -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push(
            "root (run the tests as root, e.g. `sudo -E cargo test -p egress-tests`)".to_owned(),
        );
    }
    for tool in REQUIRED_TOOLS {
        if find_tool(tool).is_none() {
            missing.push(format!("the `{tool}` tool (Debian package iproute2)"));
        }
    }
    if let Err(e) = crate::cgroup::cgroup2_mount() {
        missing.push(format!("a cgroup v2 mount ({e:#})"));
    }
    if missing.is_empty() {
        return true;
    }
    let what = missing.join(", ");
    if in_ci() {
        panic!("privileged test cannot run under CI=true: missing {what}");
    }
    eprintln!("SKIPPED privileged test: missing {what}");
    false
}

/// Finds an executable on PATH or in the usual sbin directories (root's tools).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `<prefix>-<pid>-<n>`: unique per process and call, so tests can run in parallel threads
/// and in parallel test processes.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// A copy of a workload binary in a fresh world-readable directory, so that uid nobody can
/// execute it wherever the checkout lives. Removed on drop.
#[derive(Debug)]
pub struct StagedBinary {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl StagedBinary {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Copies `probe` (in integration tests: `env!("CARGO_BIN_EXE_egress-probe")`) into a fresh
/// 0755 temp directory.
pub fn copy_probe_for_nobody(probe: &Path) -> Result<StagedBinary> {
    copy_for_nobody(probe, "egress-probe")
}

/// Copies `binary` into a fresh 0755 temp directory as `name` (the process name the agent's
/// events will show).
pub fn copy_for_nobody(binary: &Path, name: &str) -> Result<StagedBinary> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir()
        .with_context(|| format!("creating a temp dir for {name}"))?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 0755 {}", dir.path().display()))?;
    let path = dir.path().join(name);
    // Copied by a child process, not with std::fs::copy: a writable descriptor to the copy
    // in this (multi-threaded) process would leak into children that other test threads
    // fork at the same moment, and exec of the copy would then fail with ETXTBSY.
    let cp = find_tool("cp").context("the `cp` tool (coreutils) is not installed")?;
    let out = std::process::Command::new(cp)
        .arg("--")
        .arg(binary)
        .arg(&path)
        .output()
        .context("running cp")?;
    anyhow::ensure!(
        out.status.success(),
        "copying {} to {}: {}",
        binary.display(),
        path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 0755 {}", path.display()))?;
    Ok(StagedBinary { path, _dir: dir })
}
