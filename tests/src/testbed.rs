//! Everything one enforcement test needs: a client/remote topology, a test-owned cgroup
//! parent, the probe staged for uid nobody, and a place for policy files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::agent::AgentRun;
use crate::cgroup::TestCgroupParent;
use crate::netns::{Netns, Topology};
use crate::policy::PolicyYaml;
use crate::process::{RunOutput, run_captured};
use crate::server::Listener;
use crate::{NOBODY_GID, NOBODY_UID, StagedBinary, copy_probe_for_nobody, require_root_or_skip};

/// Deadline for a probe run without the agent.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for a probe run inside a cgroup.
pub const WORKLOAD_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Testbed {
    // Fields drop in order: leftover workload processes die with the cgroups before the
    // namespaces they used are deleted.
    pub cgroups: TestCgroupParent,
    pub topo: Topology,
    pub probe: StagedBinary,
    policies: tempfile::TempDir,
    policy_counter: AtomicU32,
}

impl Testbed {
    /// For a privileged test: `None` (after a skip notice) when it cannot run here and CI is
    /// not set; panics when set-up fails.
    pub fn for_test(probe: &Path) -> Option<Self> {
        if !require_root_or_skip() {
            return None;
        }
        match Self::new(probe) {
            Ok(tb) => Some(tb),
            Err(e) => panic!("setting up the testbed: {e:#}"),
        }
    }

    pub fn new(probe: &Path) -> Result<Self> {
        Ok(Self {
            cgroups: TestCgroupParent::new()?,
            topo: Topology::new()?,
            probe: copy_probe_for_nobody(probe)?,
            policies: tempfile::Builder::new()
                .prefix("egress-policy-")
                .tempdir()
                .context("creating a temp dir for policies")?,
            policy_counter: AtomicU32::new(0),
        })
    }

    pub fn client(&self) -> &Netns {
        &self.topo.client
    }

    pub fn remote(&self) -> &Netns {
        &self.topo.remote
    }

    pub fn listen_tcp(&self, addr: SocketAddr) -> Result<Listener> {
        Listener::tcp(&self.topo.remote, addr)
    }

    pub fn listen_udp(&self, addr: SocketAddr) -> Result<Listener> {
        Listener::udp(&self.topo.remote, addr)
    }

    /// Writes `yaml` to a fresh file and returns its path.
    pub fn write_policy(&self, yaml: &str) -> Result<PathBuf> {
        let n = self.policy_counter.fetch_add(1, Ordering::Relaxed);
        let path = self.policies.path().join(format!("policy-{n}.yaml"));
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Writes `policy`'s YAML to a fresh file and returns its path.
    pub fn write_policy_yaml(&self, policy: &PolicyYaml) -> Result<PathBuf> {
        self.write_policy(&policy.render())
    }

    /// An agent run of the probe under `policy` (builder: add ops with `.arg`/`.args`).
    pub fn agent(&self, policy: &PolicyYaml) -> Result<AgentRun> {
        let path = self.write_policy_yaml(policy)?;
        AgentRun::new(&path, &self.cgroups, self.probe.path())
    }

    /// Runs the probe with `ops` under `policy` through the agent, in the client namespace.
    pub fn run_agent(&self, policy: &PolicyYaml, ops: &[&str]) -> Result<RunOutput> {
        self.agent(policy)?.args(ops).run_in(&self.topo.client)
    }

    /// Runs the probe with `ops` as uid nobody in the client namespace, without the agent.
    pub fn run_probe(&self, ops: &[&str]) -> Result<RunOutput> {
        run_probe_as_nobody(&self.topo.client, self.probe.path(), ops)
    }

    /// Runs the probe with `ops` as nobody inside `cgroup` (a `run` agent's, or one the
    /// programs were attached to through the library) in the client namespace; panics when it
    /// cannot run or does not finish within [`WORKLOAD_TIMEOUT`].
    #[track_caller]
    pub fn run_in_cgroup<S: AsRef<str>>(&self, cgroup: &Path, ops: &[S]) -> RunOutput {
        self.run_in_cgroup_ns(&self.topo.client, cgroup, ops)
    }

    /// The same in namespace `ns`.
    #[track_caller]
    pub fn run_in_cgroup_ns<S: AsRef<str>>(
        &self,
        ns: &Netns,
        cgroup: &Path,
        ops: &[S],
    ) -> RunOutput {
        let ops: Vec<&str> = ops.iter().map(AsRef::as_ref).collect();
        let out = run_probe_in_cgroup(ns, cgroup, self.probe.path(), &ops, WORKLOAD_TIMEOUT)
            .unwrap_or_else(|e| panic!("running the workload in {}: {e:#}", cgroup.display()));
        assert!(!out.timed_out, "workload timed out\n{}", out.describe());
        out
    }

    /// As [`Testbed::run_in_cgroup_ns`], as root.
    #[track_caller]
    pub fn run_in_cgroup_ns_as_root(&self, ns: &Netns, cgroup: &Path, ops: &[&str]) -> RunOutput {
        let out = run_probe_in_cgroup_as_root(ns, cgroup, self.probe.path(), ops, WORKLOAD_TIMEOUT)
            .unwrap_or_else(|e| panic!("running the workload in {}: {e:#}", cgroup.display()));
        assert!(!out.timed_out, "workload timed out\n{}", out.describe());
        out
    }

    /// A fresh directory every user may create files in, for the probe's `touch` and
    /// `wait-file` ops (workloads and the test sync through it). Removed on drop.
    pub fn sync_dir(&self) -> Result<tempfile::TempDir> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::Builder::new()
            .prefix("egress-sync-")
            .tempdir()
            .context("creating a sync dir")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .with_context(|| format!("chmod 0777 {}", dir.path().display()))?;
        Ok(dir)
    }
}

/// Runs `probe ops...` as uid/gid nobody inside `ns` (no agent, no cgroup change).
pub fn run_probe_as_nobody(ns: &Netns, probe: &Path, ops: &[&str]) -> Result<RunOutput> {
    let mut cmd = Command::new(probe);
    cmd.args(ops).current_dir("/");
    ns.run_in_as(&mut cmd, NOBODY_UID, NOBODY_GID);
    run_captured(&mut cmd, PROBE_TIMEOUT, || {})
}

/// Runs `probe ops...` as uid/gid nobody inside `ns` and inside `cgroup`, which the child
/// joins before it executes the probe (for tests that load and attach the programs through
/// the agent's library rather than run the agent). Bounded by `timeout`.
pub fn run_probe_in_cgroup(
    ns: &Netns,
    cgroup: &Path,
    probe: &Path,
    ops: &[&str],
    timeout: Duration,
) -> Result<RunOutput> {
    let mut cmd = probe_in_cgroup_command(ns, cgroup, probe, ops)?;
    run_captured(&mut cmd, timeout, || {})
}

/// The command of [`run_probe_in_cgroup`], for a caller that runs it in the background.
pub fn probe_in_cgroup_command<S: AsRef<std::ffi::OsStr>>(
    ns: &Netns,
    cgroup: &Path,
    probe: &Path,
    ops: &[S],
) -> Result<Command> {
    let mut cmd = joining_cgroup(cgroup, probe, ops)?;
    ns.run_in_as(&mut cmd, NOBODY_UID, NOBODY_GID);
    Ok(cmd)
}

/// As [`run_probe_in_cgroup`], as root: for the ops that need CAP_NET_RAW.
pub fn run_probe_in_cgroup_as_root(
    ns: &Netns,
    cgroup: &Path,
    probe: &Path,
    ops: &[&str],
    timeout: Duration,
) -> Result<RunOutput> {
    let mut cmd = joining_cgroup(cgroup, probe, ops)?;
    ns.run_in(&mut cmd);
    run_captured(&mut cmd, timeout, || {})
}

/// `probe ops...`, which joins `cgroup` before it execs.
fn joining_cgroup<S: AsRef<std::ffi::OsStr>>(
    cgroup: &Path,
    probe: &Path,
    ops: &[S],
) -> Result<Command> {
    use std::io::Write as _;
    use std::os::unix::process::CommandExt as _;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
    let mut cmd = Command::new(probe);
    cmd.args(ops).current_dir("/");
    // SAFETY: the closure only calls write(2) on a descriptor opened before fork.
    unsafe {
        cmd.pre_exec(move || {
            let mut f = &procs;
            f.write_all(b"0")
        });
    }
    Ok(cmd)
}
