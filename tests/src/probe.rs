//! What the `egress-probe` workload reports, one JSON object per line on stdout, and the op
//! grammar it accepts (shared by the probe binary and the tests that drive it).
//!
//! Each op is one argument (or one line of an `--ops-file`) with space-separated fields:
//!
//! ```text
//! connect          tcp4|tcp6|udp4|udp6|mptcp4|mptcp6 ADDR PORT   socket + connect (UDP: no packet)
//! send             tcp4|tcp6|mptcp4|mptcp6 ADDR PORT DATA        connect, write, shutdown(WR), close
//! sendto           udp4|udp6 ADDR PORT DATA                      unconnected sendto
//! udpconnect-send  udp4|udp6 ADDR PORT DATA                      connect, then send
//! tfo              tcp4|tcp6|mptcp4|mptcp6 ADDR PORT DATA        sendto(MSG_FASTOPEN) on a fresh socket
//! socket           KIND                                          only create the socket
//!                  KIND: raw4 icmp4 sctp4 udplite4 tcp4 udp4 mptcp4 (and the same with 6)
//! flood            tcp4|tcp6 ADDR PORT N                             N x (socket, connect, close) in a tight
//!                                                                loop (at most 300 s); reports attempts and EPERMs
//! hammer           THREADS N OP                                  THREADS threads each run the
//!                                                                network op OP N times, started
//!                                                                together; reports attempts,
//!                                                                EPERMs and successes (`count`)
//! dns              connect|socket udp4|udp6 ADDR PORT NAME N     N DNS queries (type A) for NAME:
//!                                                                `connect`: new socket + connect()
//!                                                                per query (glibc, Go); `socket`:
//!                                                                one unconnected socket, sendto
//!                                                                per query; `count` = answers
//! sleep            MS
//! whoami                                                         uid, euid, gid, egid, groups, CapEff
//! cgroup                                                         this process's cgroup v2 path
//! exit             N                                             flush and exit with status N
//! ```
//!
//! DATA is the rest of the op after PORT (it may contain spaces). With a `6` family an IPv4
//! literal ADDR is used in its IPv4-mapped form `::ffff:a.b.c.d`.

use serde::{Deserialize, Serialize};

/// One op's outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// The op exactly as given.
    pub op: String,
    pub ok: bool,
    /// The failing syscall's errno (ETIMEDOUT for a connect that did not finish in time).
    pub errno: Option<i32>,
    /// Symbolic errno (`"EPERM"`) or another description of the failure.
    pub error: Option<String>,
    /// `whoami` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub euid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<u32>>,
    /// Effective capability set, hex as in /proc/self/status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_eff: Option<String>,
    /// `cgroup` only: the `0::` line of /proc/self/cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// `whoami` only: the process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `flood` only: attempts made, and how many failed with EPERM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eperm: Option<u64>,
    /// `hammer`: attempts that succeeded; `dns`: queries answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

impl ProbeResult {
    pub fn ok(op: &str) -> Self {
        Self {
            op: op.to_owned(),
            ok: true,
            ..Self::default()
        }
    }

    pub fn failed(op: &str, errno: Option<i32>, error: String) -> Self {
        Self {
            op: op.to_owned(),
            ok: false,
            errno,
            error: Some(error),
            ..Self::default()
        }
    }

    /// True when the op failed with exactly `errno`.
    pub fn failed_with(&self, errno: i32) -> bool {
        !self.ok && self.errno == Some(errno)
    }
}

/// Parses probe stdout: the results, and every line that was not a result.
pub fn parse_output(stdout: &str) -> (Vec<ProbeResult>, Vec<String>) {
    let mut results = Vec::new();
    let mut other = Vec::new();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<ProbeResult>(line) {
            Ok(r) => results.push(r),
            Err(_) => other.push(line.to_owned()),
        }
    }
    (results, other)
}

/// Symbolic name of an errno value (`EPERM`), or `errno N`.
pub fn errno_name(errno: i32) -> String {
    let e = nix::errno::Errno::from_raw(errno);
    if e == nix::errno::Errno::UnknownErrno {
        format!("errno {errno}")
    } else {
        format!("{e:?}")
    }
}
