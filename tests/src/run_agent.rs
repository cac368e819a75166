//! `egress-agent run` in the background, protecting a cgroup the test owns, the way an
//! operator runs it for a service; and `egress-agent detach`, the only way to end that
//! enforcement.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result};
use nix::sys::signal::Signal;

use crate::agent::agent_bin;
use crate::netns::Netns;
use crate::wait;

/// How long the agent may take to log what a test waits for.
const LOG_WAIT: Duration = Duration::from_secs(30);
/// How long it may take to exit after a signal.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// The log message that names the DNS proxy's port.
const PROXY_LISTENING: &str = "DNS proxy listening on 127.0.0.1 and ::1";

/// A running `egress-agent --log-format json run`, its stderr in a log file of its own.
/// Killed (by pid) on drop if it still runs.
pub struct RunAgent {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl RunAgent {
    /// Starts `egress-agent --log-format json run --policy POLICY --cgroup CGROUP EXTRA...`
    /// inside `ns`, without waiting for anything.
    pub fn spawn(ns: &Netns, policy: &Path, cgroup: &Path, extra: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("egress-run-agent-")
            .tempdir()
            .context("creating a directory for the agent's log")?;
        let log = dir.path().join("agent.log");
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(agent_bin()?);
        cmd.args(["--log-format", "json", "run", "--policy"])
            .arg(policy)
            .arg("--cgroup")
            .arg(cgroup)
            .args(extra)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        ns.run_in(&mut cmd);
        let child = cmd.spawn().context("spawning egress-agent run")?;
        Ok(Self {
            child,
            log,
            _dir: dir,
        })
    }

    /// [`spawn`](Self::spawn), then waits until the agent enforces; panics if it does not.
    #[track_caller]
    pub fn start(ns: &Netns, policy: &Path, cgroup: &Path, extra: &[&str]) -> Self {
        let mut agent = Self::spawn(ns, policy, cgroup, extra)
            .unwrap_or_else(|e| panic!("starting the agent: {e:#}"));
        agent.wait_for("\"enforcing\"");
        agent
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Waits (bounded) for a log line containing `needle`; panics if the agent exits first or
    /// never logs it.
    #[track_caller]
    pub fn wait_for(&mut self, needle: &str) {
        self.wait_for_lines(needle, 1);
    }

    /// Waits (bounded) until `needle` appears in at least `n` log lines.
    #[track_caller]
    pub fn wait_for_lines(&mut self, needle: &str, n: usize) {
        let (child, log) = (&mut self.child, &self.log);
        let mut exited = None;
        let logged = wait::until(LOG_WAIT, || {
            if read_log(log).lines().filter(|l| l.contains(needle)).count() >= n {
                return true;
            }
            exited = child.try_wait().ok().flatten();
            exited.is_some()
        });
        if let Some(status) = exited {
            panic!(
                "agent exited ({status}) before logging {needle:?}:\n{}",
                self.log()
            );
        }
        assert!(
            logged,
            "agent did not log {needle:?} {n} time(s):\n{}",
            self.log()
        );
    }

    /// Sends `sig` by pid and returns at once.
    #[track_caller]
    pub fn send(&self, sig: Signal) {
        let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
            .unwrap_or_else(|e| panic!("sending {sig} to the agent: {e}"));
    }

    /// Sends `sig` by pid and waits (bounded) for the agent to exit.
    #[track_caller]
    pub fn signal(&mut self, sig: Signal) -> ExitStatus {
        self.send(sig);
        self.wait_exit(STOP_WAIT)
    }

    /// Waits (at most `within`) for the agent to exit on its own; panics if it does not.
    #[track_caller]
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = &mut self.child;
        let mut status = None;
        wait::until(within, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        status.unwrap_or_else(|| panic!("agent did not stop:\n{}", self.log()))
    }

    /// The port its DNS proxy listens on, from its log; in the proxies' range 700..=799.
    #[track_caller]
    pub fn proxy_port(&self) -> u16 {
        let port = crate::log::lines(&self.log())
            .iter()
            .find(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(PROXY_LISTENING))
            })
            .and_then(|v| v["port"].as_u64())
            .unwrap_or_else(|| panic!("no proxy port in the log:\n{}", self.log()));
        assert!(
            (700..=799).contains(&port),
            "proxy port {port} outside 700..=799"
        );
        u16::try_from(port).unwrap_or_default()
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Drop for RunAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `egress-agent --log-format json detach --cgroup CGROUP` inside `ns`: its exit code (-1
/// when killed by a signal) and everything it printed.
pub fn detach(ns: &Netns, cgroup: &Path) -> Result<(i32, String)> {
    let mut cmd = Command::new(agent_bin()?);
    cmd.args(["--log-format", "json", "detach", "--cgroup"])
        .arg(cgroup)
        .stdin(Stdio::null());
    ns.run_in(&mut cmd);
    let out = cmd.output().context("running egress-agent detach")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}
