//! Where enforcement state lives when no agent holds it: a bpffs directory per protected
//! cgroup, under a path that carries the map layout version.
//!
//! `<bpffs>/egress/v<LAYOUT>/cg-<cgroup id>/` holds `map_<NAME>` and `link_<PROGRAM>` pins. bpffs
//! holds nothing but pins, so the instance record (which slot the pinned programs are bound
//! to, the policy id in force, who created it) is `/run/egress/v<LAYOUT>/cg-<cgroup id>.json`;
//! both live until reboot. Both `egress` directories are mode 0700: only root reaches them.

use std::fs;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use egress_common::LAYOUT_VERSION;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(#[source] std::io::Error),
    #[error("mounting bpffs at {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Instance { path: PathBuf, message: String },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BpffsError + 'a {
    move |source| BpffsError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Where bpffs is mounted, from mountinfo (the first `bpf` entry).
pub fn find_mount(mountinfo: &str) -> Option<PathBuf> {
    crate::kernel::mountinfo::find(mountinfo, "bpf")
}

/// The bpffs mount, mounting one at /sys/fs/bpf when there is none. Pins are only visible
/// through the mount they were made in, so the first existing mount is always used.
pub fn ensure_mounted() -> Result<PathBuf, BpffsError> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(BpffsError::MountInfo)?;
    if let Some(mount) = find_mount(&info) {
        return Ok(mount);
    }
    let path = PathBuf::from("/sys/fs/bpf");
    fs::create_dir_all(&path).map_err(io("creating", &path))?;
    nix::mount::mount(
        Some("bpf"),
        &path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| BpffsError::Mount {
        path: path.clone(),
        source,
    })?;
    tracing::info!(path = %path.display(), "mounted bpffs");
    Ok(path)
}

/// `<bpffs>/egress/v<LAYOUT>`, created root-only.
pub fn base_dir(bpffs: &Path) -> Result<PathBuf, BpffsError> {
    let top = bpffs.join("egress");
    let base = top.join(format!("v{LAYOUT_VERSION}"));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&base)
        .map_err(io("creating", &base))?;
    fs::set_permissions(&top, fs::Permissions::from_mode(0o700))
        .map_err(io("restricting", &top))?;
    Ok(base)
}

/// Layout versions other than ours that have state pinned: enforcement this agent cannot
/// read or change.
pub fn foreign_layouts(bpffs: &Path) -> Vec<PathBuf> {
    let top = bpffs.join("egress");
    let ours = format!("v{LAYOUT_VERSION}");
    let Ok(entries) = fs::read_dir(&top) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy() != ours)
        .filter(|e| fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_some()))
        .map(|e| e.path())
        .collect()
}

/// How an instance came to be: `exec` instances die with their workload; `run` instances
/// stay until `detach`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Exec,
    Run,
}

/// What `instance.json` records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub layout: u32,
    pub kind: Kind,
    pub cgroup_id: u64,
    pub cgroup_path: PathBuf,
    pub slot: u32,
    /// The policy id in force (the slot's), so a new agent picks the next one.
    pub policy_id: u32,
    /// The agent that last owned the instance.
    pub agent_pid: u32,
    /// `enforce` or `audit`; absent in records of agents before audit mode (enforce).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// The directory of one protected cgroup.
pub fn instance_dir(base: &Path, cgroup_id: u64) -> PathBuf {
    base.join(format!("cg-{cgroup_id}"))
}

pub fn map_pin(dir: &Path, map: &str) -> PathBuf {
    dir.join(format!("map_{map}"))
}

pub fn link_pin(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("link_{program}"))
}

/// `/run/egress/v<LAYOUT>`, created root-only.
pub fn state_dir() -> Result<PathBuf, BpffsError> {
    let top = PathBuf::from("/run/egress");
    let dir = top.join(format!("v{LAYOUT_VERSION}"));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io("creating", &dir))?;
    fs::set_permissions(&top, fs::Permissions::from_mode(0o700))
        .map_err(io("restricting", &top))?;
    Ok(dir)
}

/// The record of the instance protecting `cgroup_id`, in `state`.
pub fn instance_file(state: &Path, cgroup_id: u64) -> PathBuf {
    state.join(format!("cg-{cgroup_id}.json"))
}

pub fn read_instance(path: &Path) -> Result<Option<Instance>, BpffsError> {
    let path = path.to_path_buf();
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("reading", &path)(e)),
    };
    let inst: Instance = serde_json::from_str(&text).map_err(|e| BpffsError::Instance {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if inst.layout != LAYOUT_VERSION {
        return Err(BpffsError::Instance {
            path,
            message: format!(
                "layout {} where this agent uses {LAYOUT_VERSION}",
                inst.layout
            ),
        });
    }
    Ok(Some(inst))
}

/// Writes the instance record atomically.
pub fn write_instance(path: &Path, inst: &Instance) -> Result<(), BpffsError> {
    let text = serde_json::to_string_pretty(inst).map_err(|e| BpffsError::Instance {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, text).map_err(io("writing", &tmp))?;
    fs::rename(&tmp, path).map_err(io("renaming", &tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_bpffs_or_none() {
        let info = "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                    50 25 0:45 / /sys/fs/bpf rw,nosuid - bpf bpf rw,mode=700\n";
        assert_eq!(find_mount(info), Some(PathBuf::from("/sys/fs/bpf")));
        assert_eq!(
            find_mount("41 31 0:38 / /x rw - cgroup2 cgroup2 rw\n"),
            None
        );
    }

    #[test]
    fn instance_record_roundtrips_and_checks_layout() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let inst = Instance {
            layout: LAYOUT_VERSION,
            kind: Kind::Run,
            cgroup_id: 42,
            cgroup_path: "/sys/fs/cgroup/x".into(),
            slot: 0,
            policy_id: 3,
            agent_pid: 1,
            mode: None,
        };
        let path = instance_file(dir.path(), 42);
        write_instance(&path, &inst).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_instance(&path).ok().flatten(), Some(inst.clone()));
        assert_eq!(
            read_instance(&dir.path().join("missing.json"))
                .ok()
                .flatten(),
            None
        );
        let other = Instance {
            layout: LAYOUT_VERSION + 1,
            ..inst
        };
        let text = serde_json::to_string(&other).unwrap_or_default();
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        assert!(read_instance(&path).is_err());
    }
}
