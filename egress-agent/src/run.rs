//! `egress-agent run`: protect an existing cgroup until SIGINT or SIGTERM.

use tokio::signal::unix::{SignalKind, signal};

use crate::cgroup::{self, CgroupError};
use crate::cli::RunArgs;
use crate::exit;
use crate::session::{self, SessionError, Supervisor};

/// `run` serves a single cgroup in slot 0.
const RUN_SLOT: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

impl RunError {
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Session(e) => e.exit_code(),
            RunError::Cgroup(CgroupError::Outside { .. } | CgroupError::NotCgroup { .. }) => {
                exit::USAGE
            }
            _ => exit::FAILURE,
        }
    }
}

pub async fn run(args: RunArgs) -> Result<u8, RunError> {
    let policy = session::load_policy(&args.policy)?;
    let mount = cgroup::cgroup2_mount()?;
    let path = cgroup::validate(&args.cgroup, &mount)?;
    let mut sup = Supervisor::start(policy, &args.dns, &args.telemetry, RUN_SLOT).await?;
    sup.enforcer.attach(&path).map_err(SessionError::from)?;
    tracing::info!(cgroup = %path.display(), policy = %sup.enforcer.policy().name, "enforcing");

    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(RunError::Signals)?;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                tracing::warn!("SIGHUP: policy reload is not supported by this version; the loaded policy stays in force");
            }
            _ = sup.tick() => {}
        }
    }
    sup.finish();
    tracing::warn!(cgroup = %path.display(), "stopping: enforcement on the cgroup ends with this process");
    Ok(exit::OK)
}
