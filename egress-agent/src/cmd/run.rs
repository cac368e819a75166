//! `egress-agent run`: protect an existing cgroup until SIGINT or SIGTERM.

use tokio::signal::unix::{SignalKind, signal};

use crate::cli::RunArgs;
use crate::exit;
use crate::kernel::cgroup::{self, CgroupError};
use std::time::Duration;

use crate::cmd::exec;
use crate::kernel::bpffs::Kind;
use crate::supervisor::instance::{InstanceError, Location};
use crate::supervisor::reload::Watcher;
use crate::supervisor::session::{self, Placement, SessionError, Supervisor};

/// `run` serves a single cgroup in slot 0.
const RUN_SLOT: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Privilege(#[from] crate::workload::privilege::PrivilegeError),
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
    let mode = args.mode.map(egress_policy::Mode::from);
    let policy = session::with_mode(session::load_policy(&args.policy)?, mode, &args.policy)?;
    crate::workload::privilege::require("run")?;
    if args.kernel.packet_check == crate::cli::PacketCheck::Always {
        crate::kernel::mip6::check_always();
    }
    let mount = cgroup::cgroup2_mount()?;
    let path = cgroup::validate(&args.cgroup, &mount)?;
    let loc = Location::of(&path)?;
    let (placement, slot) = match loc.existing()? {
        Some(inst) => (
            Placement::Adopt {
                dir: loc.pins.clone(),
            },
            inst.slot,
        ),
        None => (
            Placement::Fresh {
                pins: Some(loc.pins.clone()),
            },
            RUN_SLOT,
        ),
    };
    let adopting = matches!(placement, Placement::Adopt { .. });
    let mut sup =
        match Supervisor::start(policy, &args.dns, &args.telemetry, slot, &placement).await {
            Ok(mut sup) => {
                sup.set_mode(mode);
                sup
            }
            Err(e) => {
                if !adopting {
                    let _ = loc.remove();
                }
                return Err(e.into());
            }
        };
    if !adopting && let Err(e) = sup.enforcer.attach(&path) {
        drop(sup);
        let _ = loc.remove();
        return Err(SessionError::from(e).into());
    }
    sup.set_cgroup(&path);
    loc.write(
        Kind::Run,
        slot,
        sup.enforcer.compiled().policy_id,
        sup.enforcer.policy().mode(),
    )?;
    sup.publish_recent(&loc.record);
    tracing::info!(cgroup = %path.display(), policy = %sup.enforcer.policy().name, pins = %loc.pins.display(),
        adopted = adopting, "enforcing");

    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(RunError::Signals)?;
    let mut watcher = Watcher::new(
        &args.policy,
        Duration::from_secs(args.reload.watch_interval.max(1)),
    );
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                watcher.mark_seen();
                exec::reload(&mut sup, &loc, &args.policy, Kind::Run, slot).await;
            }
            changed = watcher.changed() => if changed {
                exec::reload(&mut sup, &loc, &args.policy, Kind::Run, slot).await;
            },
            _ = sup.tick() => {}
        }
    }
    sup.finish();
    tracing::info!(cgroup = %path.display(), pins = %loc.pins.display(),
        "stopping; enforcement stays pinned and in force (`egress-agent detach --cgroup` removes it)");
    Ok(exit::OK)
}
