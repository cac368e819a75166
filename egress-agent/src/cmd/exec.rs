//! `egress-agent exec`: run one command in a fresh, enforced cgroup.

use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::cli::ExecArgs;
use crate::exit;
use crate::kernel::bpffs::Kind;
use crate::kernel::cgroup::{self, CgroupError, WorkloadCgroup};
use crate::supervisor::instance::{self, InstanceError, Location};
use crate::supervisor::reload::Watcher;
use crate::supervisor::session::{self, Placement, SessionError, Supervisor};
use crate::workload::environment::{Account, EnvOptions, WorkDir, workload_env};
use crate::workload::{self, Credentials, Probes, WorkloadError};

/// The slot `exec` uses: one agent process, one workload.
const EXEC_SLOT: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Privilege(#[from] crate::workload::privilege::PrivilegeError),
    #[error("user {0:?} does not exist")]
    NoSuchUser(String),
    #[error("looking up user {name:?}: {source}")]
    UserLookup {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error(
        "refusing to run the workload as root: root can detach the eBPF programs that confine it; pass --user"
    )]
    RootWorkload,
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("waiting for the workload: {0}")]
    Wait(#[source] std::io::Error),
    #[error("opening the workload's network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ExecError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ExecError::Session(e) => e.exit_code(),
            ExecError::Workload(e) => e.exit_code(),
            ExecError::Privilege(_) => exit::FAILURE,
            ExecError::NoSuchUser(_) | ExecError::RootWorkload | ExecError::Netns { .. } => {
                exit::USAGE
            }
            _ => exit::FAILURE,
        }
    }
}

/// Runs the workload and returns the exit code to leave with: the workload's own, or
/// 128 + signal when a signal ended it.
pub async fn run(args: ExecArgs) -> Result<u8, ExecError> {
    let mut clock = StartupClock::new();
    let mode = args.mode.map(egress_policy::Mode::from);
    let limits = args.kernel.maps.limits();
    let policy = session::with_mode(
        session::load_policy(&args.policy, &limits)?,
        mode,
        &args.policy,
    )?;
    clock.policy = clock.lap();
    run_with(args, policy, None, clock).await
}

/// As [`run`], under `policy` (already read, its mode set); with a `recorder`, what the run
/// shows is also recorded for `learn`. `clock` started before the policy was read.
pub async fn run_with(
    args: ExecArgs,
    policy: egress_policy::Policy,
    recorder: Option<crate::cmd::learn::Recorder>,
    mut clock: StartupClock,
) -> Result<u8, ExecError> {
    let (creds, account) = credentials(args.user.as_deref())?;
    let mode = args.mode.map(egress_policy::Mode::from);
    crate::workload::privilege::require("exec")?;
    if args.kernel.packet_check == crate::cli::PacketCheck::Always {
        crate::kernel::mip6::check_always();
    }
    let mount = cgroup::cgroup2_mount()?;
    let parent = args
        .cgroup_parent
        .clone()
        .unwrap_or_else(|| mount.join("egress"));
    // Survivors of an exec agent that died are still enforced by its pins; end them now.
    instance::collect_dead_exec();

    let name = format!("exec-{}", std::process::id());
    let cg = WorkloadCgroup::create(&parent, &name, &mount)?;
    let loc = match Location::of(cg.path()) {
        Ok(loc) => loc,
        Err(e) => {
            let _ = cg.remove(Duration::from_secs(5));
            return Err(e.into());
        }
    };
    let placement = Placement::Fresh {
        pins: Some(loc.pins.clone()),
    };
    clock.cgroup = clock.lap();

    let limits = args.kernel.maps.limits();
    match Supervisor::start(
        policy,
        &args.dns,
        &args.telemetry,
        EXEC_SLOT,
        &placement,
        &limits,
    )
    .await
    {
        Ok(mut sup) => {
            clock.programs = clock.lap();
            sup.set_mode(mode);
            if let Some(r) = recorder {
                sup.record_for_learning(r);
            }
            let result = supervise(&mut sup, &cg, &loc, &args, creds, &account, clock).await;
            // Anything the workload left behind dies with the cgroup, before enforcement is
            // removed; if it cannot be emptied, enforcement stays pinned.
            let emptied = cg.remove(Duration::from_secs(5));
            sup.finish();
            match emptied {
                Ok(()) => {
                    if let Err(error) = loc.remove() {
                        tracing::error!(%error, "removing the pinned enforcement failed");
                    }
                }
                Err(error) => tracing::error!(%error, pins = %loc.pins.display(),
                    "the workload cgroup could not be emptied; its enforcement stays pinned"),
            }
            result
        }
        Err(e) => {
            let _ = cg.remove(Duration::from_secs(5));
            let _ = loc.remove();
            Err(e.into())
        }
    }
}

async fn supervise(
    sup: &mut Supervisor,
    cg: &WorkloadCgroup,
    loc: &Location,
    args: &ExecArgs,
    creds: Credentials,
    account: &Account,
    mut clock: StartupClock,
) -> Result<u8, ExecError> {
    let probes = Probes::choose(sup.enforcer.compiled())?;
    sup.expect_probes(probes.v4, probes.v6)?;
    // The record first: if this agent dies from here on, the next exec finds its pins.
    loc.write(
        Kind::Exec,
        EXEC_SLOT,
        sup.enforcer.compiled().policy_id,
        sup.enforcer.policy().mode(),
    )?;
    sup.publish_recent(&loc.record);
    sup.enforcer.attach(cg.path()).map_err(SessionError::from)?;
    clock.attach = clock.lap();
    sup.set_cgroup(cg.path());
    let mut watcher = Watcher::new(
        &args.policy,
        Duration::from_secs(args.reload.watch_interval.max(1)),
    );
    let cgroup_path: PathBuf = cg.path().into();
    let netns = match &args.dns.netns {
        Some(path) => Some(
            std::fs::File::open(path).map_err(|source| ExecError::Netns {
                path: path.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let inherited: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os().collect();
    let env = workload_env(
        &inherited,
        account,
        &EnvOptions {
            clear: args.env_clear,
            settings: args.env.clone(),
        },
    );
    let cwd = match &args.cwd {
        Some(dir) => WorkDir::Given(dir.clone()),
        None => WorkDir::Home(account.home.clone()),
    };
    let uid = creds.uid;
    let mut child = workload::spawn(
        &args.command,
        cg.open_procs()?,
        creds,
        probes,
        netns.as_ref(),
        &env,
        &cwd,
    )?;
    let pid = child.id().unwrap_or(0);
    let spawn = clock.lap();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    tracing::info!(
        cgroup = %cgroup_path.display(), pid, uid, user = %account.name,
        probe_v4 = %probes.v4, probe_v6 = %probes.v6,
        startup_ms = ms(clock.started.elapsed()), policy_ms = ms(clock.policy),
        cgroup_ms = ms(clock.cgroup), programs_ms = ms(clock.programs),
        attach_ms = ms(clock.attach), spawn_ms = ms(spawn),
        "workload started; enforcement proven live from inside its cgroup"
    );

    let mut sigint = signal(SignalKind::interrupt()).map_err(ExecError::Signals)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(ExecError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(ExecError::Signals)?;
    let mut sigquit = signal(SignalKind::quit()).map_err(ExecError::Signals)?;
    let forward = |sig: libc::c_int| {
        if pid > 0 {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    };
    let stop_timeout = Duration::from_secs(args.stop_timeout);
    // Set by the first forwarded stop signal: a workload that ignores it must not keep the
    // agent (and its MCP client) waiting for ever.
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut killed = false;
    let status = loop {
        let deadline = async {
            match kill_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = child.wait() => break status.map_err(ExecError::Wait)?,
            _ = sigint.recv() => {
                forward(libc::SIGINT);
                kill_at.get_or_insert_with(|| tokio::time::Instant::now() + stop_timeout);
            }
            _ = sigterm.recv() => {
                forward(libc::SIGTERM);
                kill_at.get_or_insert_with(|| tokio::time::Instant::now() + stop_timeout);
            }
            () = deadline, if !killed => {
                tracing::warn!(pid, cgroup = %cgroup_path.display(), stop_timeout_secs = args.stop_timeout,
                    "the workload did not exit within --stop-timeout of the stop signal; killing every process in its cgroup");
                if let Err(error) = cg.kill() {
                    tracing::error!(%error, "killing the workload's cgroup failed");
                }
                // Once: the wait for the workload goes on, and whatever is left is killed
                // again when the cgroup is removed.
                killed = true;
            }
            _ = sigquit.recv() => forward(libc::SIGQUIT),
            _ = sighup.recv() => {
                watcher.mark_seen();
                reload(sup, loc, &args.policy, Kind::Exec, EXEC_SLOT).await;
            }
            changed = watcher.changed() => if changed {
                reload(sup, loc, &args.policy, Kind::Exec, EXEC_SLOT).await;
            },
            _ = sup.tick() => {}
        }
    };
    let code = exit_code(status);
    tracing::info!(pid, exit_code = code, "workload exited");
    Ok(code)
}

/// Where `exec`'s start-up time goes, logged with "workload started": reading the policy,
/// creating the cgroup and its pin directory, loading the programs with the policy (host
/// names resolved, DNS proxy started), attaching them, and proving enforcement and
/// spawning the workload.
#[derive(Clone, Copy, Debug)]
pub struct StartupClock {
    started: std::time::Instant,
    last: std::time::Instant,
    policy: Duration,
    cgroup: Duration,
    programs: Duration,
    attach: Duration,
}

impl Default for StartupClock {
    fn default() -> Self {
        Self::new()
    }
}

impl StartupClock {
    pub fn new() -> Self {
        let now = std::time::Instant::now();
        StartupClock {
            started: now,
            last: now,
            policy: Duration::ZERO,
            cgroup: Duration::ZERO,
            programs: Duration::ZERO,
            attach: Duration::ZERO,
        }
    }

    /// The time since the last lap.
    fn lap(&mut self) -> Duration {
        let now = std::time::Instant::now();
        let d = now.saturating_duration_since(self.last);
        self.last = now;
        d
    }
}

fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(exit::FAILURE),
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(exit::FAILURE),
        _ => exit::FAILURE,
    }
}

/// `--user`, else SUDO_UID, else nobody. Root is refused. With the user's supplementary
/// groups and passwd entry.
fn credentials(user: Option<&str>) -> Result<(Credentials, Account), ExecError> {
    use nix::unistd::{Uid, User};
    let lookup = |name: &str| -> Result<User, ExecError> {
        let found = match name.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(name),
        };
        found
            .map_err(|source| ExecError::UserLookup {
                name: name.into(),
                source,
            })?
            .ok_or_else(|| ExecError::NoSuchUser(name.into()))
    };
    let user = match user {
        Some(name) => lookup(name)?,
        None => match std::env::var("SUDO_UID") {
            Ok(uid) if !uid.is_empty() => lookup(&uid)?,
            _ => lookup("nobody")?,
        },
    };
    if user.uid.is_root() {
        return Err(ExecError::RootWorkload);
    }
    let groups = std::ffi::CString::new(user.name.as_bytes())
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, user.gid).ok())
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|| vec![user.gid.as_raw()]);
    let uid = user.uid.as_raw();
    let runtime_dir = PathBuf::from(format!("/run/user/{uid}"));
    let owned = std::fs::metadata(&runtime_dir)
        .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == uid && m.is_dir());
    let account = Account {
        name: user.name.clone(),
        uid,
        home: user.dir.clone(),
        shell: user.shell.clone(),
        runtime_dir: owned.then_some(runtime_dir),
    };
    Ok((
        Credentials {
            uid,
            gid: user.gid.as_raw(),
            groups,
        },
        account,
    ))
}

/// Reloads the policy and records the new policy id with the instance.
pub async fn reload(
    sup: &mut Supervisor,
    loc: &Location,
    path: &std::path::Path,
    kind: Kind,
    slot: u32,
) {
    if let Some(id) = sup.reload(path).await
        && let Err(error) = loc.write(kind, slot, id, sup.enforcer.policy().mode())
    {
        tracing::error!(%error, "recording the reloaded policy id failed");
    }
}
