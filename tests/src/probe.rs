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
//! resolve          DNSPROTO SERVER NAME QTYPE [port P] [repeat N] [then-connect tcp4|tcp6 PORT DATA]
//!                                                                one query (QTYPE: A AAAA TXT MX ANY
//!                                                                or a number) to SERVER port 53 (or
//!                                                                P);
//!                                                                reports `rcode`, the A/AAAA `addrs`
//!                                                                of the answer and the address the
//!                                                                reply came `from` (recvfrom, or
//!                                                                getpeername for TCP). `repeat N`
//!                                                                (1..=1000): N queries, `{i}` in NAME
//!                                                                replaced by 0..N-1; every reply must
//!                                                                have the first one's rcode; `count`
//!                                                                = iterations completed. `then-connect`:
//!                                                                after each answer, at once, `send` DATA
//!                                                                to the first answered address of that
//!                                                                family (tcp6: AAAA, else mapped A) on
//!                                                                PORT; an answer without one fails
//! dnsraw           DNSPROTO SERVER HEX                           the bytes HEX as one DNS message to
//!                                                                SERVER port 53 (TCP: length-framed);
//!                                                                ok with `rcode` when a reply of at
//!                                                                least 4 bytes comes, ETIMEDOUT when
//!                                                                none does within 2 s
//!                  DNSPROTO: udp4 udp6 (connect + send), udp4-sendto udp6-sendto (unconnected
//!                  sendto), tcp4 tcp6 (2-byte length framing, RFC 1035 4.2.2)
//! dnsloop          DNSPROTO SERVER NAME EVERY_MS FOR_MS [one-socket]
//!                                                                a type-A query for NAME to SERVER
//!                                                                port 53 every EVERY_MS (>= 10) ms
//!                                                                for FOR_MS (<= 120000) ms, each on
//!                                                                a fresh socket (`one-socket`: all
//!                                                                on one UDP socket, connected once
//!                                                                for udp4|udp6) with a 300 ms reply
//!                                                                timeout; ok, with one `samples`
//!                                                                entry per query (see DnsSample)
//! dnsserve         udp4|udp6 ADDR PORT ANSWER FOR_MS [READY_PATH]
//!                                                                a DNS server on ADDR:PORT for FOR_MS
//!                                                                (<= 120000) ms that answers every
//!                                                                query with one record for the
//!                                                                address ANSWER (A or AAAA), TTL 60;
//!                                                                creates READY_PATH once bound;
//!                                                                `count` = queries answered, one
//!                                                                `samples` entry per query
//! setsockopt       tcp4|tcp6|udp4|udp6 OPTION IFNAME             a fresh socket, then one option that
//!                                                                names the interface IFNAME:
//!                  OPTION: bindtodevice (SO_BINDTODEVICE, the name), bindtoifindex
//!                  (SO_BINDTOIFINDEX), ip_unicast_if (IP_UNICAST_IF, index in network order),
//!                  ipv6_unicast_if (IPV6_UNICAST_IF), ipv6_pktinfo (sticky IPV6_PKTINFO, in6_pktinfo
//!                  with source ::), ipv6_2292pktoptions (IPV6_2292PKTOPTIONS holding one
//!                  IPV6_PKTINFO control message)
//! cmsg-sendto      udp4|udp6 ADDR PORT CMSG DATA                 unconnected sendmsg with one control
//!                                                                message
//! cmsg-send        udp4|udp6 ADDR PORT CMSG DATA                 connect, then sendmsg without an
//!                                                                address, with one control message
//!                  CMSG: pktinfo=IFNAME (IP_PKTINFO / IPV6_PKTINFO: that interface, source
//!                  unspecified), tos=N (IP_TOS / IPV6_TCLASS)
//! listen           tcp4|tcp6 ADDR|- PORT FOR_MS READY_PATH DATA  a TCP listener: bind(ADDR, PORT) then
//!                                                                listen(), or with `-` (PORT 0) no
//!                                                                bind at all (listen() picks the
//!                                                                port); writes the port to
//!                                                                READY_PATH, then for FOR_MS
//!                                                                (<= 120000) ms accepts every
//!                                                                connection, writes DATA, closes;
//!                                                                `count` = connections accepted,
//!                                                                `addrs` = their peers, `from` = the
//!                                                                listening address
//! raw6             ADDR HEX                                      the bytes HEX as one IPv6 packet, header
//!                                                                included, to ADDR from an IPPROTO_RAW
//!                                                                socket (needs CAP_NET_RAW)
//! touch            PATH                                          create the file (for a test to sync on)
//! wait-file        PATH MS                                       wait until PATH exists, at most MS
//!                                                                (<= 120000) ms; ETIMEDOUT otherwise
//! sleep            MS
//! ignore-sigterm                                                 ignore SIGTERM and SIGINT from now on
//! whoami                                                         uid, euid, gid, egid, groups, CapEff
//! cgroup                                                         this process's cgroup v2 path
//! exit             N                                             flush and exit with status N
//! ```
//!
//! DATA is the rest of the op after PORT (or CMSG) (it may contain spaces). With a `6` family
//! an IPv4 literal ADDR is used in its IPv4-mapped form `::ffff:a.b.c.d`. An IPv6 ADDR may carry
//! a scope, `fe80::1%veth-c` or `fe80::1%2` (sin6_scope_id; a name is looked up when the op is
//! parsed, in the probe's network namespace).

use std::net::{IpAddr, SocketAddr};

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
    /// `hammer`: attempts that succeeded; `dns`: queries answered; `resolve`: iterations
    /// completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// `resolve`, `dnsraw`: the RCODE of the (last) reply (0 NOERROR, 1 FORMERR, 3 NXDOMAIN,
    /// 5 REFUSED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcode: Option<u8>,
    /// `resolve`: the A and AAAA addresses in the (last) reply's answer section, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addrs: Option<Vec<IpAddr>>,
    /// `resolve`, `dnsraw`: where the (last) reply came from, as the workload saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<SocketAddr>,
    /// `environ` only: the process's environment and working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// `dnsloop`: one entry per query sent; `dnsserve`: one entry per query answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<Vec<DnsSample>>,
}

/// One query of a `dnsloop` (or one query a `dnsserve` answered).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSample {
    /// When the query was sent (received, for `dnsserve`): [`boot_time_ms`].
    pub at_ms: u64,
    /// A reply came.
    pub ok: bool,
    /// The failing syscall's errno (ETIMEDOUT when no reply came in time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcode: Option<u8>,
    /// The A/AAAA addresses of the reply's answer section.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addrs: Vec<IpAddr>,
    /// Where the reply came from, as the socket reports it (UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<std::net::SocketAddr>,
}

/// CLOCK_BOOTTIME in milliseconds: the clock the kernel's DNS liveness deadline uses, shared by
/// every process on the host, so a test can compare the probe's `at_ms` with its own.
pub fn boot_time_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is valid for writes; CLOCK_BOOTTIME is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000
}

/// DNS RCODE values the tests check.
pub mod rcode {
    pub const NOERROR: u8 = 0;
    pub const FORMERR: u8 = 1;
    pub const SERVFAIL: u8 = 2;
    pub const NXDOMAIN: u8 = 3;
    pub const REFUSED: u8 = 5;
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
