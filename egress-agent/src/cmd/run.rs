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
    let limits = args.kernel.maps.limits();
    let policy = session::with_mode(
        session::load_policy(&args.policy, &limits)?,
        mode,
        &args.policy,
    )?;
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
    // An adopted instance keeps the map sizes it was created with: the policy must fit those.
    let limits = match &placement {
        Placement::Adopt { dir } => {
            let pinned = crate::loader::pinned_sizes(dir)
                .map_err(|e| SessionError::from(crate::enforcer::EnforcerError::from(e)))?;
            for (kind, entries) in limits.overrides() {
                if pinned.entries(kind) != entries {
                    tracing::warn!(
                        map = kind.name(),
                        asked = entries,
                        size = pinned.entries(kind),
                        "--max-entries does not resize an adopted instance: its pinned maps keep their size until it is detached"
                    );
                }
            }
            egress_policy::capacity::check(&policy, crate::dns::doh_list(), &args.policy, &pinned)
                .map_err(SessionError::from)?;
            pinned
        }
        Placement::Fresh { .. } => limits,
    };
    let mut sup = match Supervisor::start(
        policy,
        &args.dns,
        &args.telemetry,
        slot,
        &placement,
        &limits,
    )
    .await
    {
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
