//! A DNS server for tests: Debian's dnsmasq inside a test namespace, answering only the
//! names it is given. Stopped by pid on drop.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

const START_WAIT: Duration = Duration::from_secs(5);
const STOP_WAIT: Duration = Duration::from_secs(3);

/// A running dnsmasq.
#[derive(Debug)]
pub struct Dnsmasq {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq in `ns`, listening on `listen` port 53, answering `records`
    /// (`name -> address`) and nothing else.
    pub fn start(ns: &Netns, listen: IpAddr, records: &[(&str, IpAddr)]) -> Result<Self> {
        let bin = crate::find_tool("dnsmasq").context(
            "dnsmasq not found: the DNS tests need Debian package dnsmasq-base \
             (scripts/bootstrap.sh installs it)",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("egress-dnsmasq-")
            .tempdir()
            .context("creating a temp dir for dnsmasq")?;
        let log = dir.path().join("queries.log");
        let mut cmd = Command::new(bin);
        cmd.args([
            "-k",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--bind-interfaces",
            "--log-queries",
            "--user=root",
            "--pid-file=",
        ])
        .arg(format!("--listen-address={listen}"))
        .arg(format!("--log-facility={}", log.display()))
        .args(
            records
                .iter()
                .map(|(name, ip)| format!("--address=/{name}/{ip}")),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        ns.run_in(&mut cmd);
        let child = cmd.spawn().context("spawning dnsmasq")?;
        let mut d = Self {
            child,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + START_WAIT;
        while !d.log().contains("started") {
            if let Some(status) = d.child.try_wait().context("waiting for dnsmasq")? {
                bail!("dnsmasq exited at start-up ({status}): {}", d.log());
            }
            if Instant::now() > deadline {
                bail!("dnsmasq did not start in {START_WAIT:?}: {}", d.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// The query log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Query lines (`query[A] name from ip`).
    pub fn queries(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("query["))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_WAIT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
