//! `egress-agent detach`: the only way enforcement on a cgroup ends (besides the end of an
//! `exec` workload).

use crate::cli::DetachArgs;
use crate::exit;
use crate::kernel::bpffs;
use crate::kernel::cgroup::{self, CgroupError};
use crate::supervisor::instance::{self, InstanceError, Location};

#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
}

impl DetachError {
    pub fn exit_code(&self) -> u8 {
        match self {
            DetachError::Cgroup(CgroupError::Outside { .. } | CgroupError::NotCgroup { .. }) => {
                exit::USAGE
            }
            _ => exit::FAILURE,
        }
    }
}

/// Returns the message to print.
pub fn run(args: &DetachArgs) -> Result<String, DetachError> {
    let mount = cgroup::cgroup2_mount()?;
    let path = cgroup::validate(&args.cgroup, &mount)?;
    let loc = Location::of(&path)?;
    if let Some(inst) = bpffs::read_instance(&loc.record)?
        && instance::agent_alive(inst.agent_pid)
    {
        return Err(InstanceError::Served {
            cgroup: path,
            pid: inst.agent_pid,
        }
        .into());
    }
    if !loc.pins.exists() && !loc.record.exists() {
        return Ok(format!(
            "{}: no egress enforcement to remove\n",
            path.display()
        ));
    }
    loc.remove()?;
    tracing::warn!(cgroup = %path.display(), "enforcement detached");
    Ok(format!("{}: egress enforcement removed\n", path.display()))
}
