//! The life of a protected cgroup's pinned state: creating, finding, taking over, cleaning up
//! after a dead `exec` agent, and removing it on `detach`.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use egress_common::LAYOUT_VERSION;

use crate::kernel::bpffs::{self, BpffsError, Instance, Kind};
use crate::kernel::loader::{self, LoadError};

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("reading the cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cgroup {cgroup} is enforced by egress state of another layout version at {pins} (this agent uses v{LAYOUT_VERSION}); refusing to run beside it. Detach it with the agent version that created it, or remove that directory to drop its enforcement"
    )]
    ForeignLayout { cgroup: PathBuf, pins: PathBuf },
    #[error(
        "cgroup {cgroup} is already served by egress-agent pid {pid}; stop it first (SIGTERM leaves enforcement pinned)"
    )]
    Served { cgroup: PathBuf, pid: u32 },
    #[error(
        "{pins} holds pinned egress state but {record} is missing; refusing to guess its slot. `egress-agent detach --cgroup {cgroup}` removes it"
    )]
    Orphan {
        pins: PathBuf,
        record: PathBuf,
        cgroup: PathBuf,
    },
}

/// The cgroup v2 id of a cgroup directory (its inode number).
pub fn cgroup_id(path: &Path) -> Result<u64, InstanceError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| InstanceError::Cgroup {
            path: path.into(),
            source,
        })
}

/// Whether `pid` is a live egress agent (not a recycled pid).
pub fn agent_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None).is_err() {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "egress-agent")
}

/// Where one cgroup's state lives.
#[derive(Clone, Debug)]
pub struct Location {
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub pins: PathBuf,
    pub record: PathBuf,
}

impl Location {
    /// Mounts bpffs if needed and names the pin directory and record for `cgroup`. Refuses
    /// when state of another layout version is pinned for it.
    pub fn of(cgroup: &Path) -> Result<Self, InstanceError> {
        let bpffs = bpffs::ensure_mounted()?;
        let base = bpffs::base_dir(&bpffs)?;
        let id = cgroup_id(cgroup)?;
        for other in bpffs::foreign_layouts(&bpffs) {
            let pins = bpffs::instance_dir(&other, id);
            if pins.exists() {
                return Err(InstanceError::ForeignLayout {
                    cgroup: cgroup.into(),
                    pins,
                });
            }
        }
        Ok(Location {
            cgroup: cgroup.into(),
            cgroup_id: id,
            pins: bpffs::instance_dir(&base, id),
            record: bpffs::instance_file(&bpffs::state_dir()?, id),
        })
    }

    /// The record of an instance already pinned here, checked: `None` when nothing is pinned.
    pub fn existing(&self) -> Result<Option<Instance>, InstanceError> {
        let record = bpffs::read_instance(&self.record)?;
        match (record, self.pins.exists()) {
            (Some(inst), true) => {
                if inst.agent_pid != std::process::id() && agent_alive(inst.agent_pid) {
                    return Err(InstanceError::Served {
                        cgroup: self.cgroup.clone(),
                        pid: inst.agent_pid,
                    });
                }
                Ok(Some(inst))
            }
            (Some(_), false) => {
                // The pins are gone (detached by hand, or a reboot kept /run): forget it.
                let _ = std::fs::remove_file(&self.record);
                Ok(None)
            }
            (None, true) => Err(InstanceError::Orphan {
                pins: self.pins.clone(),
                record: self.record.clone(),
                cgroup: self.cgroup.clone(),
            }),
            (None, false) => Ok(None),
        }
    }

    pub fn write(
        &self,
        kind: Kind,
        slot: u32,
        policy_id: u32,
        mode: egress_policy::Mode,
    ) -> Result<(), InstanceError> {
        let inst = Instance {
            layout: LAYOUT_VERSION,
            kind,
            cgroup_id: self.cgroup_id,
            cgroup_path: self.cgroup.clone(),
            slot,
            policy_id,
            agent_pid: std::process::id(),
            mode: Some(mode.as_str().to_owned()),
        };
        Ok(bpffs::write_instance(&self.record, &inst)?)
    }

    /// Detaches every pinned link, removes the pins and the record.
    pub fn remove(&self) -> Result<(), InstanceError> {
        if self.pins.exists() {
            loader::remove_instance(&self.pins)?;
        }
        // The recent denials go with the record (nothing depends on them).
        let _ = std::fs::remove_file(crate::observe::recent::file_for(&self.record));
        match std::fs::remove_file(&self.record) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BpffsError::Io {
                op: "removing",
                path: self.record.clone(),
                source: e,
            }
            .into()),
        }
    }
}

/// `exec` instances whose agent died (killed, crashed): their workload's survivors are still
/// enforced by the pins. Kill them with their cgroup, then remove the pins and the record.
pub fn collect_dead_exec() {
    let (Ok(bpffs), Ok(state)) = (bpffs::ensure_mounted(), bpffs::state_dir()) else {
        return;
    };
    let Ok(base) = bpffs::base_dir(&bpffs) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&state) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let Ok(Some(inst)) = bpffs::read_instance(&path) else {
            continue;
        };
        if inst.kind != Kind::Exec || agent_alive(inst.agent_pid) {
            continue;
        }
        let cg = &inst.cgroup_path;
        if cg.exists()
            && let Err(error) = crate::kernel::cgroup::remove_path(cg, Duration::from_secs(5))
        {
            tracing::error!(cgroup = %cg.display(), %error, "cleaning up after a dead exec agent: the workload cgroup stays (still enforced)");
            continue;
        }
        let pins = bpffs::instance_dir(&base, inst.cgroup_id);
        if pins.exists()
            && let Err(error) = loader::remove_instance(&pins)
        {
            tracing::error!(pins = %pins.display(), %error, "cleaning up after a dead exec agent");
            continue;
        }
        let _ = std::fs::remove_file(&path);
        tracing::warn!(cgroup = %cg.display(), agent_pid = inst.agent_pid,
            "cleaned up after an exec agent that died: its workload's remaining processes were killed while still enforced");
    }
}
