//! Running a command with captured output and a deadline, and what such a run produced.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::probe::{ProbeResult, errno_name, parse_output, rcode};

/// How long to wait for stdout/stderr to close after the process exited (a surviving
/// grandchild could hold them open).
const PIPE_WAIT: Duration = Duration::from_secs(5);

/// What a run of the agent (or of the bare probe) produced.
#[derive(Debug)]
pub struct RunOutput {
    /// The command line, for messages.
    pub command: String,
    pub status: ExitStatus,
    /// The deadline passed and the process was killed.
    pub timed_out: bool,
    pub elapsed: Duration,
    pub stdout: String,
    pub stderr: String,
    /// The probe's JSON lines, in order.
    pub results: Vec<ProbeResult>,
    /// Stdout lines that were not probe results.
    pub other_stdout: Vec<String>,
}

impl RunOutput {
    pub fn exit_code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The first result for `op` (the op string exactly as passed).
    pub fn result(&self, op: &str) -> Option<&ProbeResult> {
        self.results.iter().find(|r| r.op == op)
    }

    /// A multi-line summary for assertion messages: command, status, results, stderr tail.
    pub fn describe(&self) -> String {
        const TAIL: usize = 40;
        let lines: Vec<&str> = self.stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(TAIL)..].join("\n    ");
        let results = self
            .results
            .iter()
            .map(|r| serde_json::to_string(r).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n    ");
        format!(
            "command: {}\nstatus: {}{} after {:?}\nresults:\n    {results}\nother stdout: {:?}\nstderr (last {TAIL} lines):\n    {tail}",
            self.command,
            self.status,
            if self.timed_out {
                " (TIMED OUT, killed)"
            } else {
                ""
            },
            self.elapsed,
            self.other_stdout,
        )
    }

    /// Panics (with [`describe`](Self::describe)) unless `op` ran and succeeded.
    #[track_caller]
    pub fn assert_ok(&self, op: &str) -> &ProbeResult {
        match self.result(op) {
            Some(r) if r.ok => r,
            Some(r) => panic!(
                "expected `{op}` to succeed, it failed with {}\n{}",
                r.error.as_deref().unwrap_or("?"),
                self.describe()
            ),
            None => panic!("`{op}` did not run\n{}", self.describe()),
        }
    }

    /// Panics unless `op` ran and failed with `errno`.
    #[track_caller]
    pub fn assert_errno(&self, op: &str, errno: i32) -> &ProbeResult {
        match self.result(op) {
            Some(r) if r.failed_with(errno) => r,
            Some(r) => panic!(
                "expected `{op}` to fail with {}, got {}\n{}",
                errno_name(errno),
                if r.ok {
                    "success".to_owned()
                } else {
                    r.error.clone().unwrap_or_default()
                },
                self.describe()
            ),
            None => panic!("`{op}` did not run\n{}", self.describe()),
        }
    }

    /// Panics unless `op` got a DNS reply with `rcode` and exactly the addresses `addrs` (IP
    /// literals), in that order.
    #[track_caller]
    pub fn assert_answer(&self, op: &str, rcode: u8, addrs: &[&str]) -> &ProbeResult {
        let r = self.assert_ok(op);
        let want: Vec<IpAddr> = addrs
            .iter()
            .map(|a| {
                a.parse()
                    .unwrap_or_else(|e| panic!("{a:?} is not an IP address: {e}"))
            })
            .collect();
        assert_eq!(
            (r.rcode, r.addrs.as_deref()),
            (Some(rcode), Some(&want[..])),
            "`{op}`: (rcode, addresses)\n{}",
            self.describe()
        );
        r
    }

    /// Panics unless `op` got NXDOMAIN with no address.
    #[track_caller]
    pub fn assert_nxdomain(&self, op: &str) -> &ProbeResult {
        self.assert_answer(op, rcode::NXDOMAIN, &[])
    }

    /// Panics unless the workload saw `op`'s reply come from `from` (a socket address).
    #[track_caller]
    pub fn assert_from(&self, op: &str, from: &str) {
        let r = self.assert_ok(op);
        let want: SocketAddr = from
            .parse()
            .unwrap_or_else(|e| panic!("{from:?} is not a socket address: {e}"));
        assert_eq!(
            r.from,
            Some(want),
            "`{op}`: the reply's source as the workload saw it\n{}",
            self.describe()
        );
    }

    /// Panics unless the process exited with `code`.
    #[track_caller]
    pub fn assert_exit(&self, code: i32) {
        assert_eq!(
            self.exit_code(),
            Some(code),
            "unexpected exit status\n{}",
            self.describe()
        );
    }
}

/// Runs `cmd` with stdin null and stdout/stderr captured. If it is still running at
/// `timeout`, it is killed by pid and `on_timeout` runs (e.g. to kill its descendants).
pub fn run_captured(
    cmd: &mut Command,
    timeout: Duration,
    on_timeout: impl FnOnce(),
) -> Result<RunOutput> {
    let command = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {command}"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for child")? {
            break status;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            // Child::kill signals the child's pid (SIGKILL).
            let _ = child.kill();
            on_timeout();
            break child.wait().context("waiting for killed child")?;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    let stdout = stdout
        .recv_timeout(PIPE_WAIT)
        .unwrap_or_else(|_| "<stdout still open: a descendant outlived the process>".to_owned());
    let stderr = stderr
        .recv_timeout(PIPE_WAIT)
        .unwrap_or_else(|_| "<stderr still open: a descendant outlived the process>".to_owned());
    let (results, other_stdout) = parse_output(&stdout);
    Ok(RunOutput {
        command,
        status,
        timed_out,
        elapsed,
        stdout,
        stderr,
        results,
        other_stdout,
    })
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}
