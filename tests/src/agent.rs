//! Running `egress-agent exec` around a workload, the way a user would.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::cgroup::TestCgroupParent;
use crate::netns::Netns;
use crate::process::{RunOutput, run_captured};

/// Default deadline for one agent run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The workspace root (this crate lives in `<workspace>/tests`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The agent binary: `$EGRESS_AGENT_BIN`, else `target/release/egress-agent`, else
/// `target/debug/egress-agent` (under `$CARGO_TARGET_DIR` when set).
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("EGRESS_AGENT_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("EGRESS_AGENT_BIN={} does not exist", p.display());
        }
        return Ok(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    let candidates = [
        target.join("release/egress-agent"),
        target.join("debug/egress-agent"),
    ];
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    bail!(
        "egress-agent binary not found (looked at {} and {}): run `cargo build --release -p egress-agent` \
         or set EGRESS_AGENT_BIN",
        candidates[0].display(),
        candidates[1].display()
    )
}

/// `egress-agent exec --policy P --user U --cgroup-parent DIR [extra] -- PROGRAM ARGS...`,
/// run inside a namespace with a deadline.
#[derive(Clone, Debug)]
pub struct AgentRun {
    agent: PathBuf,
    policy: PathBuf,
    user: Option<String>,
    cgroup_parent: PathBuf,
    extra_args: Vec<OsString>,
    program: PathBuf,
    args: Vec<OsString>,
    timeout: Duration,
    env: Vec<(OsString, OsString)>,
}

impl AgentRun {
    /// An agent run of `program` under `policy` as user `nobody`, with its cgroup below
    /// `parent`.
    pub fn new(policy: &Path, parent: &TestCgroupParent, program: &Path) -> Result<Self> {
        Ok(Self {
            agent: agent_bin()?,
            policy: policy.to_path_buf(),
            user: Some("nobody".to_owned()),
            cgroup_parent: parent.path().to_path_buf(),
            extra_args: Vec::new(),
            program: program.to_path_buf(),
            args: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            env: Vec::new(),
        })
    }

    /// `--user`; `None` leaves the flag out (the agent's default applies).
    #[must_use]
    pub fn user(mut self, user: Option<&str>) -> Self {
        self.user = user.map(str::to_owned);
        self
    }

    /// An extra agent argument, placed before `--`.
    #[must_use]
    pub fn agent_arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.extra_args.push(arg.as_ref().to_owned());
        self
    }

    /// An argument for the program (for the probe: one op).
    #[must_use]
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// `--log-format json`: one JSON object per log line, fields at the top level.
    #[must_use]
    pub fn json_log(self) -> Self {
        self.agent_arg("--log-format").agent_arg("json")
    }

    /// `--netns PATH`: the workload runs in that network namespace, and the DNS proxy
    /// listens inside it.
    #[must_use]
    pub fn workload_netns(self, ns: &Netns) -> Self {
        self.agent_arg("--netns").agent_arg(ns.path())
    }

    /// A variable in the agent's own environment (as an MCP client or sudo would leave it).
    #[must_use]
    pub fn agent_env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((name.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The full command line (without the namespace switch).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.agent);
        cmd.arg("exec").arg("--policy").arg(&self.policy);
        if let Some(u) = &self.user {
            cmd.arg("--user").arg(u);
        }
        cmd.arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .args(&self.extra_args)
            .arg("--")
            .arg(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(n, v)| (n, v)))
            .current_dir("/");
        cmd
    }

    /// Runs the agent inside `ns` and waits for it (bounded). On timeout the agent is killed
    /// by pid and every process below the cgroup parent through `cgroup.kill`.
    pub fn run_in(&self, ns: &Netns) -> Result<RunOutput> {
        let mut cmd = self.command();
        ns.run_in(&mut cmd);
        let parent = self.cgroup_parent.clone();
        run_captured(&mut cmd, self.timeout, move || {
            if let Err(e) = std::fs::write(parent.join("cgroup.kill"), "1") {
                eprintln!(
                    "egress-tests: killing processes below {}: {e}",
                    parent.display()
                );
            }
        })
    }
}

/// Runs `egress-agent --log-format json learn --out OUT --user nobody --cgroup-parent PARENT
/// EXTRA... -- PROGRAM ARGS...` inside `ns` and waits for it (bounded as [`AgentRun::run_in`]).
pub fn run_learn(
    ns: &Netns,
    out: &Path,
    parent: &TestCgroupParent,
    extra: &[&OsStr],
    program: &Path,
    args: &[&str],
) -> Result<RunOutput> {
    let mut cmd = Command::new(agent_bin()?);
    cmd.args(["--log-format", "json", "learn", "--out"])
        .arg(out)
        .args(["--user", "nobody", "--cgroup-parent"])
        .arg(parent.path())
        .args(extra)
        .arg("--")
        .arg(program)
        .args(args)
        .current_dir("/");
    ns.run_in(&mut cmd);
    let parent = parent.path().to_path_buf();
    run_captured(&mut cmd, DEFAULT_TIMEOUT, move || {
        if let Err(e) = std::fs::write(parent.join("cgroup.kill"), "1") {
            eprintln!(
                "egress-tests: killing processes below {}: {e}",
                parent.display()
            );
        }
    })
}
