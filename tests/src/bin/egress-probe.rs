//! egress-probe: the workload the egress tests run under the agent, as an unprivileged user.
//!
//! It performs the network operations given on the command line, one op per argument (or
//! one per line of `--ops-file PATH`), and prints one JSON line per op on stdout. The op
//! grammar is documented in `egress_tests::probe`. Exit status: 0, or 64 when the arguments
//! are malformed, or N for an `exit N` op.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use egress_tests::probe::{DnsSample, ProbeResult, boot_time_ms, errno_name};

const EX_USAGE: u8 = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `send` waits for the peer to close after our shutdown(SHUT_WR).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Tcp,
    Udp,
    Mptcp,
}

#[derive(Clone, Copy, Debug)]
enum SocketKind {
    Raw,
    Icmp,
    Sctp,
    Udplite,
    Tcp,
    Udp,
    Mptcp,
}

#[derive(Clone, Debug)]
enum Action {
    Connect(Transport, Family, SocketAddr),
    Send(Transport, Family, SocketAddr, Vec<u8>),
    SendTo(Family, SocketAddr, Vec<u8>),
    UdpConnectSend(Family, SocketAddr, Vec<u8>),
    Tfo(Transport, Family, SocketAddr, Vec<u8>),
    Socket(SocketKind, Family),
    Sleep(Duration),
    /// Ignore SIGTERM and SIGINT from now on (a workload that will not stop).
    IgnoreStop,
    Flood(Family, SocketAddr, u64),
    /// UDP over IPv6 to ADDR with a segment-routing header whose first hop is VIA.
    Srh6(std::net::Ipv6Addr, SocketAddr, Vec<u8>),
    /// One ICMP echo request from a ping socket.
    Ping4(std::net::Ipv4Addr),
    /// One IPv6 packet written whole (header included) to ADDR from an IPPROTO_RAW socket.
    Raw6(std::net::Ipv6Addr, Vec<u8>),
    Hammer(usize, u64, Box<Op>),
    Dns(DnsMode, Family, SocketAddr, String, u64),
    Resolve(Box<Resolve>),
    DnsRaw(DnsProto, Family, SocketAddr, Vec<u8>),
    DnsLoop(Box<DnsLoop>),
    DnsServe(Box<DnsServe>),
    /// A fresh socket of that kind, then one option naming the interface.
    SetSockopt(Transport, Family, SockOption, String),
    /// sendmsg with one control message; `connected`: connect first and name no address.
    CmsgSend {
        connected: bool,
        family: Family,
        to: SocketAddr,
        cmsg: Cmsg,
        data: Vec<u8>,
    },
    Listen(Box<Listen>),
    Touch(std::path::PathBuf),
    WaitFile(std::path::PathBuf, Duration),
    Whoami,
    /// The environment and working directory.
    Environ,
    Cgroup,
    Exit(u8),
}

#[derive(Clone, Debug)]
struct Op {
    text: String,
    action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DnsMode {
    /// A new socket and connect() per query.
    Connect,
    /// One unconnected socket, sendto() per query.
    Socket,
}

/// How a `resolve` or `dnsraw` op carries its DNS message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DnsProto {
    /// connect() then send(): glibc, Go.
    UdpConnect,
    /// sendto() on an unconnected socket, reply by recvfrom().
    UdpSendto,
    /// 2-byte length framing over a TCP connection.
    Tcp,
}

/// `listen tcp4|tcp6 ADDR|- PORT FOR_MS READY_PATH DATA`.
#[derive(Clone, Debug)]
struct Listen {
    family: Family,
    /// `None`: no bind(), listen() picks the port.
    bind: Option<SocketAddr>,
    total: Duration,
    ready: std::path::PathBuf,
    data: Vec<u8>,
}

/// `resolve DNSPROTO SERVER NAME QTYPE [repeat N] [then-connect tcp4|tcp6 PORT DATA]`.
#[derive(Clone, Debug)]
struct Resolve {
    proto: DnsProto,
    family: Family,
    server: SocketAddr,
    /// May contain `{i}`, replaced by the iteration number.
    name: String,
    qtype: u16,
    repeat: u64,
    then_connect: Option<(Family, u16, Vec<u8>)>,
}

/// `dnsloop DNSPROTO SERVER NAME EVERY_MS FOR_MS`.
#[derive(Clone, Debug)]
struct DnsLoop {
    proto: DnsProto,
    family: Family,
    server: SocketAddr,
    name: String,
    every: Duration,
    total: Duration,
    /// `one-socket`: every query on the same UDP socket (connected once for `udp4|udp6`).
    one_socket: bool,
}

/// `dnsserve udp4|udp6 ADDR PORT ANSWER FOR_MS [READY_PATH]`.
#[derive(Clone, Debug)]
struct DnsServe {
    family: Family,
    addr: SocketAddr,
    answer: IpAddr,
    total: Duration,
    ready: Option<std::path::PathBuf>,
}

/// The socket options of the `setsockopt` op: each names an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SockOption {
    BindToDevice,
    BindToIfindex,
    IpUnicastIf,
    Ipv6UnicastIf,
    Ipv6Pktinfo,
    Ipv6Pktoptions2292,
}

/// The control message of `cmsg-sendto` and `cmsg-send`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Cmsg {
    /// IP_PKTINFO / IPV6_PKTINFO naming this interface, source address unspecified.
    Pktinfo(String),
    /// IP_TOS / IPV6_TCLASS.
    Tos(u8),
}

/// Bounds for `hammer` and `dns`, so a mistake cannot run away.
const MAX_THREADS: usize = 64;
const MAX_REPEAT: u64 = 100_000;
/// Bound for `resolve ... repeat N`.
const MAX_RESOLVE_REPEAT: u64 = 1000;
const REPEAT_DEADLINE: Duration = Duration::from_secs(120);
/// Bound for `dnsloop` and `dnsserve` durations.
const MAX_LOOP: Duration = Duration::from_secs(120);
/// How long each `dnsloop` query waits for its reply: short, so that a query into a dead
/// proxy port does not hide when the next one is refused.
const DNSLOOP_REPLY_TIMEOUT: Duration = Duration::from_millis(300);
/// Bound for `wait-file`.
const MAX_WAIT_FILE: Duration = Duration::from_secs(120);
const DNS_PORT: u16 = 53;

/// A syscall failure: errno plus, for non-errno failures, a description.
#[derive(Debug)]
struct Failure {
    errno: Option<i32>,
    error: String,
}

impl Failure {
    fn errno(errno: i32) -> Self {
        Self {
            errno: Some(errno),
            error: errno_name(errno),
        }
    }

    fn last() -> Self {
        Self::errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    fn other(error: String) -> Self {
        Self { errno: None, error }
    }
}

type OpResult = Result<(), Failure>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ops = match parse_args(&args) {
        Ok(ops) => ops,
        Err(e) => {
            eprintln!("egress-probe: {e}");
            eprintln!(
                "usage: egress-probe [--ops-file PATH] OP...   (see egress_tests::probe for the op grammar)"
            );
            return ExitCode::from(EX_USAGE);
        }
    };
    let stdout = std::io::stdout();
    for op in &ops {
        if let Action::Exit(code) = op.action {
            emit(&stdout, &ProbeResult::ok(&op.text));
            return ExitCode::from(code);
        }
        let result = run(op);
        emit(&stdout, &result);
    }
    ExitCode::SUCCESS
}

fn emit(stdout: &std::io::Stdout, result: &ProbeResult) {
    let line = serde_json::to_string(result).unwrap_or_else(|e| {
        format!(
            r#"{{"op":"<unserialisable>","ok":false,"errno":null,"error":"{}"}}"#,
            e.to_string().replace('"', "'")
        )
    });
    let mut out = stdout.lock();
    // A closed stdout must not turn into a panic; the exit status still reports the run.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn parse_args(args: &[String]) -> Result<Vec<Op>, String> {
    let mut ops = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--ops-file" {
            let path = args
                .get(i + 1)
                .ok_or_else(|| "--ops-file needs a path".to_owned())?;
            let text = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                ops.push(parse_op(line).map_err(|e| format!("{path}:{}: {e}", n + 1))?);
            }
            i += 2;
        } else {
            ops.push(parse_op(&args[i])?);
            i += 1;
        }
    }
    if ops.is_empty() {
        return Err("no ops given".to_owned());
    }
    Ok(ops)
}

fn parse_op(text: &str) -> Result<Op, String> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let bad = |why: &str| format!("malformed op {text:?}: {why}");
    let name = fields.first().copied().ok_or_else(|| bad("empty"))?;
    // DATA: everything after the fourth field, as written.
    let data = || -> Result<Vec<u8>, String> {
        let mut rest = text.trim_start();
        for _ in 0..4 {
            let end = rest
                .find(char::is_whitespace)
                .ok_or_else(|| bad("missing DATA"))?;
            rest = rest[end..].trim_start();
        }
        if rest.is_empty() {
            return Err(bad("missing DATA"));
        }
        Ok(rest.as_bytes().to_vec())
    };
    let dest = || -> Result<(Transport, Family, SocketAddr), String> {
        let (proto, family) = parse_proto(
            fields
                .get(1)
                .copied()
                .ok_or_else(|| bad("missing protocol"))?,
        )
        .ok_or_else(|| bad("protocol must be tcp4|tcp6|udp4|udp6|mptcp4|mptcp6"))?;
        let port: u16 = fields
            .get(3)
            .ok_or_else(|| bad("missing PORT"))?
            .parse()
            .map_err(|_| bad("PORT must be 0..=65535"))?;
        let addr = parse_sock_addr(
            family,
            fields.get(2).copied().ok_or_else(|| bad("missing ADDR"))?,
            port,
        )
        .map_err(|e| bad(&e))?;
        Ok((proto, family, addr))
    };
    let exact = |n: usize| {
        if fields.len() == n {
            Ok(())
        } else {
            Err(bad(&format!("expected {n} fields")))
        }
    };
    let action = match name {
        "connect" => {
            exact(4)?;
            let (t, f, a) = dest()?;
            Action::Connect(t, f, a)
        }
        "send" | "tfo" => {
            let (t, f, a) = dest()?;
            if t == Transport::Udp {
                return Err(bad("send/tfo take tcp4|tcp6|mptcp4|mptcp6"));
            }
            if name == "send" {
                Action::Send(t, f, a, data()?)
            } else {
                Action::Tfo(t, f, a, data()?)
            }
        }
        "sendto" | "udpconnect-send" => {
            let (t, f, a) = dest()?;
            if t != Transport::Udp {
                return Err(bad("sendto/udpconnect-send take udp4|udp6"));
            }
            if name == "sendto" {
                Action::SendTo(f, a, data()?)
            } else {
                Action::UdpConnectSend(f, a, data()?)
            }
        }
        "socket" => {
            exact(2)?;
            let (kind, family) = parse_kind(fields[1]).ok_or_else(|| {
                bad("KIND must be raw|icmp|sctp|udplite|tcp|udp|mptcp followed by 4 or 6")
            })?;
            Action::Socket(kind, family)
        }
        "srh6" => {
            // srh6 VIA ADDR PORT DATA
            if fields.len() < 5 {
                return Err(bad("srh6 takes VIA ADDR PORT DATA"));
            }
            let via = fields[1]
                .parse()
                .map_err(|_| bad("VIA must be an IPv6 address"))?;
            let addr: std::net::Ipv6Addr = fields[2]
                .parse()
                .map_err(|_| bad("ADDR must be an IPv6 address"))?;
            let port: u16 = fields[3]
                .parse()
                .map_err(|_| bad("PORT must be a number"))?;
            Action::Srh6(
                via,
                SocketAddr::new(IpAddr::V6(addr), port),
                fields[4..].join(" ").into_bytes(),
            )
        }
        "ping4" => {
            exact(2)?;
            Action::Ping4(
                fields[1]
                    .parse()
                    .map_err(|_| bad("ADDR must be an IPv4 address"))?,
            )
        }
        "raw6" => {
            exact(3)?;
            let addr = fields[1]
                .parse()
                .map_err(|_| bad("ADDR must be an IPv6 address"))?;
            let bytes = parse_hex(fields[2])
                .filter(|b| !b.is_empty() && b.len() <= 65535)
                .ok_or_else(|| bad("HEX must be 1..=65535 bytes as pairs of hex digits"))?;
            Action::Raw6(addr, bytes)
        }
        "ignore-sigterm" => {
            exact(1)?;
            Action::IgnoreStop
        }
        "sleep" => {
            exact(2)?;
            let ms: u64 = fields[1].parse().map_err(|_| bad("MS must be a number"))?;
            Action::Sleep(Duration::from_millis(ms))
        }
        "flood" => {
            exact(5)?;
            let (t, f, a) = dest()?;
            if t != Transport::Tcp {
                return Err(bad("flood connects tcp4|tcp6 sockets only"));
            }
            let n: u64 = fields[4].parse().map_err(|_| bad("N must be a number"))?;
            Action::Flood(f, a, n)
        }
        "hammer" => {
            let threads: usize = fields
                .get(1)
                .and_then(|f| f.parse().ok())
                .filter(|n| (1..=MAX_THREADS).contains(n))
                .ok_or_else(|| bad("THREADS must be 1..=64"))?;
            let n: u64 = fields
                .get(2)
                .and_then(|f| f.parse().ok())
                .filter(|n| (1..=MAX_REPEAT).contains(n))
                .ok_or_else(|| bad("N must be 1..=100000"))?;
            let mut rest = text.trim_start();
            for _ in 0..3 {
                let end = rest
                    .find(char::is_whitespace)
                    .ok_or_else(|| bad("missing OP"))?;
                rest = rest[end..].trim_start();
            }
            let inner = parse_op(rest)?;
            if !matches!(
                inner.action,
                Action::Connect(..)
                    | Action::Send(..)
                    | Action::SendTo(..)
                    | Action::UdpConnectSend(..)
                    | Action::Tfo(..)
            ) {
                return Err(bad(
                    "OP must be connect, send, sendto, udpconnect-send or tfo",
                ));
            }
            Action::Hammer(threads, n, Box::new(inner))
        }
        "dns" => {
            exact(7)?;
            let mode = match fields[1] {
                "connect" => DnsMode::Connect,
                "socket" => DnsMode::Socket,
                _ => return Err(bad("MODE must be connect or socket")),
            };
            let (_, family) = parse_proto(fields[2])
                .filter(|(t, _)| *t == Transport::Udp)
                .ok_or_else(|| bad("dns takes udp4|udp6"))?;
            let ip = parse_ip(family, fields[3])
                .ok_or_else(|| bad("ADDR is not an IP literal of that family"))?;
            let port: u16 = fields[4]
                .parse()
                .map_err(|_| bad("PORT must be 0..=65535"))?;
            let name = fields[5];
            if name.is_empty()
                || name.len() > 253
                || name.split('.').any(|l| l.is_empty() || l.len() > 63)
            {
                return Err(bad("NAME must be a DNS name"));
            }
            let n: u64 = fields[6]
                .parse()
                .ok()
                .filter(|n| (1..=MAX_REPEAT).contains(n))
                .ok_or_else(|| bad("N must be 1..=100000"))?;
            Action::Dns(mode, family, SocketAddr::new(ip, port), name.to_owned(), n)
        }
        "resolve" => Action::Resolve(Box::new(parse_resolve(text, &fields).map_err(|e| bad(&e))?)),
        "dnsraw" => {
            exact(4)?;
            let (proto, family) =
                parse_dns_proto(fields[1]).ok_or_else(|| bad(DNS_PROTO_EXPECTED))?;
            let ip = parse_ip(family, fields[2])
                .ok_or_else(|| bad("SERVER is not an IP literal of that family"))?;
            let bytes = parse_hex(fields[3])
                .filter(|b| !b.is_empty() && b.len() <= usize::from(u16::MAX))
                .ok_or_else(|| bad("HEX must be 1..=65535 bytes as pairs of hex digits"))?;
            Action::DnsRaw(proto, family, SocketAddr::new(ip, DNS_PORT), bytes)
        }
        "dnsloop" => {
            let one_socket = match fields.get(6) {
                None => false,
                Some(&"one-socket") if fields.len() == 7 => true,
                _ => return Err(bad("expected nothing or `one-socket` after FOR_MS")),
            };
            let (proto, family) =
                parse_dns_proto(fields[1]).ok_or_else(|| bad(DNS_PROTO_EXPECTED))?;
            let ip = parse_ip(family, fields[2])
                .ok_or_else(|| bad("SERVER is not an IP literal of that family"))?;
            if !valid_query_name(fields[3]) || fields[3].contains("{i}") {
                return Err(bad("NAME must be a DNS name"));
            }
            let every = parse_ms(fields[4])
                .filter(|d| *d >= Duration::from_millis(10))
                .ok_or_else(|| bad("EVERY_MS must be 10..=120000"))?;
            if fields.len() < 6 {
                return Err(bad("dnsloop takes DNSPROTO SERVER NAME EVERY_MS FOR_MS"));
            }
            let total = parse_ms(fields[5]).ok_or_else(|| bad("FOR_MS must be 0..=120000"))?;
            if one_socket && proto == DnsProto::Tcp {
                return Err(bad("one-socket takes a UDP DNSPROTO"));
            }
            Action::DnsLoop(Box::new(DnsLoop {
                proto,
                family,
                server: SocketAddr::new(ip, DNS_PORT),
                name: fields[3].to_owned(),
                every,
                total,
                one_socket,
            }))
        }
        "dnsserve" => {
            if !(6..=7).contains(&fields.len()) {
                return Err(bad(
                    "dnsserve takes udp4|udp6 ADDR PORT ANSWER FOR_MS [READY_PATH]",
                ));
            }
            let (t, family, addr) = dest()?;
            if t != Transport::Udp {
                return Err(bad("dnsserve takes udp4|udp6"));
            }
            let answer: IpAddr = fields[4]
                .parse()
                .map_err(|_| bad("ANSWER must be an IP literal"))?;
            let total = parse_ms(fields[5]).ok_or_else(|| bad("FOR_MS must be 0..=120000"))?;
            Action::DnsServe(Box::new(DnsServe {
                family,
                addr,
                answer,
                total,
                ready: fields.get(6).map(std::path::PathBuf::from),
            }))
        }
        "setsockopt" => {
            exact(4)?;
            let (t, family) = parse_proto(fields[1])
                .filter(|(t, _)| *t != Transport::Mptcp)
                .ok_or_else(|| bad("setsockopt takes tcp4|tcp6|udp4|udp6"))?;
            let option = match fields[2] {
                "bindtodevice" => SockOption::BindToDevice,
                "bindtoifindex" => SockOption::BindToIfindex,
                "ip_unicast_if" => SockOption::IpUnicastIf,
                "ipv6_unicast_if" => SockOption::Ipv6UnicastIf,
                "ipv6_pktinfo" => SockOption::Ipv6Pktinfo,
                "ipv6_2292pktoptions" => SockOption::Ipv6Pktoptions2292,
                _ => {
                    return Err(bad(
                        "OPTION must be bindtodevice|bindtoifindex|ip_unicast_if|ipv6_unicast_if|ipv6_pktinfo|ipv6_2292pktoptions",
                    ));
                }
            };
            if !valid_ifname(fields[3]) {
                return Err(bad("IFNAME must be an interface name"));
            }
            Action::SetSockopt(t, family, option, fields[3].to_owned())
        }
        "cmsg-sendto" | "cmsg-send" => {
            let (t, family, to) = dest()?;
            if t != Transport::Udp {
                return Err(bad("cmsg-sendto/cmsg-send take udp4|udp6"));
            }
            let cmsg = fields
                .get(4)
                .and_then(|c| parse_cmsg(c))
                .ok_or_else(|| bad("CMSG must be pktinfo=IFNAME or tos=N"))?;
            let data = rest_after(text, 5).ok_or_else(|| bad("missing DATA"))?;
            Action::CmsgSend {
                connected: name == "cmsg-send",
                family,
                to,
                cmsg,
                data: data.as_bytes().to_vec(),
            }
        }
        "listen" => {
            exact(7)?;
            let (t, family) = parse_proto(fields[1])
                .filter(|(t, _)| *t == Transport::Tcp)
                .ok_or_else(|| bad("listen takes tcp4|tcp6"))?;
            debug_assert_eq!(t, Transport::Tcp);
            let port: u16 = fields[3]
                .parse()
                .map_err(|_| bad("PORT must be 0..=65535"))?;
            let bind = match fields[2] {
                "-" if port == 0 => None,
                "-" => return Err(bad("without bind (`-`) the PORT must be 0")),
                a => Some(parse_sock_addr(family, a, port).map_err(|e| bad(&e))?),
            };
            let total = parse_ms(fields[4]).ok_or_else(|| bad("FOR_MS must be 0..=120000"))?;
            Action::Listen(Box::new(Listen {
                family,
                bind,
                total,
                ready: fields[5].into(),
                data: fields[6].as_bytes().to_vec(),
            }))
        }
        "touch" => {
            exact(2)?;
            Action::Touch(fields[1].into())
        }
        "wait-file" => {
            exact(3)?;
            let ms: u64 = fields[2]
                .parse()
                .ok()
                .filter(|ms| Duration::from_millis(*ms) <= MAX_WAIT_FILE)
                .ok_or_else(|| bad("MS must be 0..=120000"))?;
            Action::WaitFile(fields[1].into(), Duration::from_millis(ms))
        }
        "whoami" => {
            exact(1)?;
            Action::Whoami
        }
        "environ" => {
            exact(1)?;
            Action::Environ
        }
        "cgroup" => {
            exact(1)?;
            Action::Cgroup
        }
        "exit" => {
            exact(2)?;
            Action::Exit(fields[1].parse().map_err(|_| bad("N must be 0..=255"))?)
        }
        _ => return Err(bad("unknown op")),
    };
    Ok(Op {
        text: text.trim().to_owned(),
        action,
    })
}

/// `MS` of the loop ops: a duration of at most [`MAX_LOOP`].
fn parse_ms(s: &str) -> Option<Duration> {
    s.parse()
        .ok()
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_LOOP)
}

/// An interface name as the kernel takes it: 1..=15 bytes, no `/`, whitespace or NUL.
fn valid_ifname(s: &str) -> bool {
    (1..16).contains(&s.len())
        && s.is_ascii()
        && !s.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
}

/// `pktinfo=IFNAME` or `tos=N`.
fn parse_cmsg(s: &str) -> Option<Cmsg> {
    let (kind, value) = s.split_once('=')?;
    match kind {
        "pktinfo" => valid_ifname(value).then(|| Cmsg::Pktinfo(value.to_owned())),
        "tos" => value.parse().ok().map(Cmsg::Tos),
        _ => None,
    }
}

/// The index of interface `name` in the probe's network namespace, or a number as given.
fn if_index(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let c = std::ffi::CString::new(name).map_err(|_| format!("{name:?} holds a NUL"))?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(format!(
            "no interface {name:?} here: {}",
            std::io::Error::last_os_error()
        )),
        n => Ok(n),
    }
}

/// ADDR (with an optional IPv6 `%scope`, a name or a number) and PORT as one socket address.
fn parse_sock_addr(family: Family, s: &str, port: u16) -> Result<SocketAddr, String> {
    let (addr, scope) = match s.split_once('%') {
        Some((a, scope)) => (a, Some(scope)),
        None => (s, None),
    };
    let ip = parse_ip(family, addr).ok_or("ADDR is not an IP literal of that family")?;
    match (ip, scope) {
        (ip, None) => Ok(SocketAddr::new(ip, port)),
        (IpAddr::V6(v6), Some(scope)) if family == Family::V6 && addr.contains(':') => {
            let scope = if_index(scope)?;
            Ok(SocketAddr::V6(std::net::SocketAddrV6::new(
                v6, port, 0, scope,
            )))
        }
        _ => Err("only an IPv6 ADDR takes a %scope".to_owned()),
    }
}

const DNS_PROTO_EXPECTED: &str = "DNSPROTO must be udp4|udp6|udp4-sendto|udp6-sendto|tcp4|tcp6";

fn parse_dns_proto(s: &str) -> Option<(DnsProto, Family)> {
    let (base, proto) = match s.strip_suffix("-sendto") {
        Some(base) => (base, DnsProto::UdpSendto),
        None => (s, DnsProto::UdpConnect),
    };
    match parse_proto(base)? {
        (Transport::Udp, f) => Some((proto, f)),
        (Transport::Tcp, f) if proto == DnsProto::UdpConnect => Some((DnsProto::Tcp, f)),
        _ => None,
    }
}

/// `A`, `AAAA`, `TXT`, `MX`, `ANY` or a number.
fn parse_qtype(s: &str) -> Option<u16> {
    match s.to_ascii_uppercase().as_str() {
        "A" => Some(1),
        "MX" => Some(15),
        "TXT" => Some(16),
        "AAAA" => Some(28),
        "ANY" => Some(255),
        n => n.parse().ok(),
    }
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A name the probe can put into a query: labels of 1..=63 bytes without whitespace, at most
/// 253 bytes, one optional trailing dot. `{i}` stands for a number of up to 4 digits.
fn valid_query_name(name: &str) -> bool {
    let name = name.replace("{i}", "0000");
    let name = name.strip_suffix('.').unwrap_or(&name);
    !name.is_empty()
        && name.len() <= 253
        && name.is_ascii()
        && name.split('.').all(|l| !l.is_empty() && l.len() <= 63)
}

/// The text after the first `n` whitespace-separated fields of `text`.
fn rest_after(text: &str, n: usize) -> Option<&str> {
    let mut rest = text.trim_start();
    for _ in 0..n {
        let end = rest.find(char::is_whitespace)?;
        rest = rest[end..].trim_start();
    }
    (!rest.is_empty()).then_some(rest)
}

fn parse_resolve(text: &str, fields: &[&str]) -> Result<Resolve, String> {
    let (proto, family) = fields
        .get(1)
        .and_then(|p| parse_dns_proto(p))
        .ok_or(DNS_PROTO_EXPECTED)?;
    let ip = fields
        .get(2)
        .and_then(|a| parse_ip(family, a))
        .ok_or("SERVER must be an IP literal of that family")?;
    let name = fields.get(3).copied().ok_or("missing NAME")?;
    if !valid_query_name(name) {
        return Err("NAME must be a DNS name (`{i}` allowed)".to_owned());
    }
    let qtype = fields
        .get(4)
        .and_then(|q| parse_qtype(q))
        .ok_or("QTYPE must be A|AAAA|TXT|MX|ANY or a number")?;
    let mut next = 5;
    let mut port = DNS_PORT;
    if fields.get(next) == Some(&"port") {
        port = fields
            .get(next + 1)
            .and_then(|p| p.parse().ok())
            .filter(|p| *p != 0)
            .ok_or("port P must be 1..=65535")?;
        next += 2;
    }
    let mut repeat = 1;
    if fields.get(next) == Some(&"repeat") {
        repeat = fields
            .get(next + 1)
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=MAX_RESOLVE_REPEAT).contains(n))
            .ok_or("repeat N must be 1..=1000")?;
        next += 2;
    }
    let mut then_connect = None;
    if fields.get(next) == Some(&"then-connect") {
        let family = match fields.get(next + 1).and_then(|p| parse_proto(p)) {
            Some((Transport::Tcp, f)) => f,
            _ => return Err("then-connect takes tcp4|tcp6".to_owned()),
        };
        let port: u16 = fields
            .get(next + 2)
            .and_then(|p| p.parse().ok())
            .ok_or("then-connect PORT must be 0..=65535")?;
        let data = rest_after(text, next + 3).ok_or("then-connect needs DATA")?;
        then_connect = Some((family, port, data.as_bytes().to_vec()));
    } else if next < fields.len() {
        return Err(format!(
            "unexpected {:?}: expected `port P`, `repeat N` or `then-connect`",
            fields[next]
        ));
    }
    Ok(Resolve {
        proto,
        family,
        server: SocketAddr::new(ip, port),
        name: name.to_owned(),
        qtype,
        repeat,
        then_connect,
    })
}

fn parse_proto(s: &str) -> Option<(Transport, Family)> {
    let (t, f) = s.split_at_checked(s.len().checked_sub(1)?)?;
    let transport = match t {
        "tcp" => Transport::Tcp,
        "udp" => Transport::Udp,
        "mptcp" => Transport::Mptcp,
        _ => return None,
    };
    Some((transport, parse_family(f)?))
}

fn parse_kind(s: &str) -> Option<(SocketKind, Family)> {
    let (k, f) = s.split_at_checked(s.len().checked_sub(1)?)?;
    let kind = match k {
        "raw" => SocketKind::Raw,
        "icmp" => SocketKind::Icmp,
        "sctp" => SocketKind::Sctp,
        "udplite" => SocketKind::Udplite,
        "tcp" => SocketKind::Tcp,
        "udp" => SocketKind::Udp,
        "mptcp" => SocketKind::Mptcp,
        _ => return None,
    };
    Some((kind, parse_family(f)?))
}

fn parse_family(s: &str) -> Option<Family> {
    match s {
        "4" => Some(Family::V4),
        "6" => Some(Family::V6),
        _ => None,
    }
}

fn parse_ip(family: Family, s: &str) -> Option<IpAddr> {
    let ip: IpAddr = s.parse().ok()?;
    match (family, ip) {
        (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_)) => Some(ip),
        (Family::V6, IpAddr::V4(v4)) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
        (Family::V4, IpAddr::V6(_)) => None,
    }
}

fn run(op: &Op) -> ProbeResult {
    let text = op.text.as_str();
    let outcome = match &op.action {
        Action::Connect(t, f, addr) => connect_only(*t, *f, *addr),
        Action::Send(t, f, addr, data) => send_stream(*t, *f, *addr, data),
        Action::SendTo(f, addr, data) => sendto_udp(*f, *addr, data),
        Action::UdpConnectSend(f, addr, data) => udp_connect_send(*f, *addr, data),
        Action::Tfo(t, f, addr, data) => fastopen(*t, *f, *addr, data),
        Action::Socket(kind, f) => socket_for_kind(*kind, *f).map(drop),
        Action::Sleep(d) => {
            std::thread::sleep(*d);
            Ok(())
        }
        Action::IgnoreStop => {
            // SAFETY: setting the disposition of two signals to SIG_IGN.
            let failed = unsafe {
                libc::signal(libc::SIGTERM, libc::SIG_IGN) == libc::SIG_ERR
                    || libc::signal(libc::SIGINT, libc::SIG_IGN) == libc::SIG_ERR
            };
            if failed { Err(Failure::last()) } else { Ok(()) }
        }
        Action::Whoami => return whoami(text),
        Action::Environ => {
            return ProbeResult {
                env: Some(
                    std::env::vars_os()
                        .map(|(n, v)| {
                            (
                                n.to_string_lossy().into_owned(),
                                v.to_string_lossy().into_owned(),
                            )
                        })
                        .collect(),
                ),
                cwd: std::env::current_dir()
                    .ok()
                    .map(|d| d.display().to_string()),
                ..ProbeResult::ok(text)
            };
        }
        Action::Flood(f, a, n) => return flood(text, *f, *a, *n),
        Action::Srh6(via, a, data) => srh6(*via, *a, data),
        Action::Ping4(a) => ping4(*a),
        Action::Raw6(a, bytes) => raw6(*a, bytes),
        Action::Hammer(threads, n, inner) => return hammer(text, *threads, *n, inner),
        Action::Dns(mode, f, addr, name, n) => return dns(text, *mode, *f, *addr, name, *n),
        Action::Resolve(r) => return resolve(text, r),
        Action::DnsRaw(proto, f, addr, bytes) => return dns_raw(text, *proto, *f, *addr, bytes),
        Action::DnsLoop(l) => return dns_loop(text, l),
        Action::DnsServe(d) => return dns_serve(text, d),
        Action::Listen(l) => return listen(text, l),
        Action::SetSockopt(t, f, option, ifname) => set_sockopt(*t, *f, *option, ifname),
        Action::CmsgSend {
            connected,
            family,
            to,
            cmsg,
            data,
        } => cmsg_send(*connected, *family, *to, cmsg, data),
        Action::Touch(path) => std::fs::File::create(path).map(drop).map_err(|e| Failure {
            errno: e.raw_os_error(),
            error: e.to_string(),
        }),
        Action::WaitFile(path, timeout) => wait_file(path, *timeout),
        Action::Cgroup => return cgroup(text),
        Action::Exit(_) => Ok(()),
    };
    match outcome {
        Ok(()) => ProbeResult::ok(text),
        Err(f) => ProbeResult::failed(text, f.errno, f.error),
    }
}

fn whoami(text: &str) -> ProbeResult {
    // SAFETY: these getters have no preconditions and cannot fail.
    let (uid, euid, gid, egid) = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
        )
    };
    let groups = nix::unistd::getgroups()
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect::<Vec<u32>>())
        .ok();
    let cap_eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .map(|v| v.trim().to_owned())
        });
    ProbeResult {
        pid: Some(std::process::id()),
        uid: Some(uid),
        euid: Some(euid),
        gid: Some(gid),
        egid: Some(egid),
        groups,
        cap_eff,
        ..ProbeResult::ok(text)
    }
}

fn cgroup(text: &str) -> ProbeResult {
    match std::fs::read_to_string("/proc/self/cgroup") {
        Ok(s) => ProbeResult {
            cgroup: s
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(str::to_owned),
            ..ProbeResult::ok(text)
        },
        Err(e) => ProbeResult::failed(text, e.raw_os_error(), e.to_string()),
    }
}

fn domain(f: Family) -> libc::c_int {
    match f {
        Family::V4 => libc::AF_INET,
        Family::V6 => libc::AF_INET6,
    }
}

fn new_socket(family: Family, ty: libc::c_int, protocol: libc::c_int) -> Result<OwnedFd, Failure> {
    // SAFETY: plain syscall; the returned descriptor is owned by the OwnedFd below.
    let fd = unsafe { libc::socket(domain(family), ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(Failure::last());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn transport_socket(t: Transport, f: Family) -> Result<OwnedFd, Failure> {
    match t {
        Transport::Tcp => new_socket(f, libc::SOCK_STREAM, libc::IPPROTO_TCP),
        Transport::Udp => new_socket(f, libc::SOCK_DGRAM, libc::IPPROTO_UDP),
        Transport::Mptcp => new_socket(f, libc::SOCK_STREAM, libc::IPPROTO_MPTCP),
    }
}

fn socket_for_kind(kind: SocketKind, f: Family) -> Result<OwnedFd, Failure> {
    let icmp = match f {
        Family::V4 => libc::IPPROTO_ICMP,
        Family::V6 => libc::IPPROTO_ICMPV6,
    };
    match kind {
        SocketKind::Raw => new_socket(f, libc::SOCK_RAW, icmp),
        SocketKind::Icmp => new_socket(f, libc::SOCK_DGRAM, icmp),
        SocketKind::Sctp => new_socket(f, libc::SOCK_STREAM, libc::IPPROTO_SCTP),
        SocketKind::Udplite => new_socket(f, libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE),
        SocketKind::Tcp => transport_socket(Transport::Tcp, f),
        SocketKind::Udp => transport_socket(Transport::Udp, f),
        SocketKind::Mptcp => transport_socket(Transport::Mptcp, f),
    }
}

/// A socket address in the C layout the syscalls take.
struct CSockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl CSockAddr {
    fn new(addr: SocketAddr) -> Self {
        // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
                unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in6.
                unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        Self {
            storage,
            len: len as libc::socklen_t,
        }
    }

    fn ptr(&self) -> *const libc::sockaddr {
        std::ptr::from_ref(&self.storage).cast()
    }
}

fn sock_addr(f: Family, addr: SocketAddr) -> CSockAddr {
    // The parser already made the address match the family; mapped form for v4 on v6.
    let addr = match (f, addr) {
        (Family::V6, SocketAddr::V4(a)) => {
            SocketAddr::new(IpAddr::V6(a.ip().to_ipv6_mapped()), a.port())
        }
        _ => addr,
    };
    CSockAddr::new(addr)
}

fn check(ret: libc::c_int) -> Result<libc::c_int, Failure> {
    if ret < 0 {
        Err(Failure::last())
    } else {
        Ok(ret)
    }
}

fn set_nonblocking(fd: RawFd, on: bool) -> OpResult {
    // SAFETY: fcntl on a descriptor we own.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }).map(drop)
}

fn set_timeout(fd: RawFd, option: libc::c_int, d: Duration) -> OpResult {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: tv outlives the call and the length matches its type.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(&tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Waits until `fd` is ready for `events`, at most `timeout`; ETIMEDOUT otherwise.
fn wait_ready(fd: RawFd, events: libc::c_short, timeout: Duration) -> OpResult {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::errno(libc::ETIMEDOUT));
        }
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let f = Failure::last();
            if f.errno == Some(libc::EINTR) {
                continue;
            }
            return Err(f);
        }
        if n > 0 {
            return Ok(());
        }
    }
}

fn so_error(fd: RawFd) -> OpResult {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err and len are valid for writes of the sizes given.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            std::ptr::from_mut(&mut err).cast(),
            &mut len,
        )
    })?;
    if err != 0 {
        Err(Failure::errno(err))
    } else {
        Ok(())
    }
}

/// connect(); for stream sockets non-blocking with CONNECT_TIMEOUT, then back to blocking.
fn connect_fd(fd: RawFd, t: Transport, addr: &CSockAddr) -> OpResult {
    let stream = t != Transport::Udp;
    if stream {
        set_nonblocking(fd, true)?;
    }
    // SAFETY: addr points to a valid sockaddr of len bytes.
    let ret = unsafe { libc::connect(fd, addr.ptr(), addr.len) };
    if ret < 0 {
        let f = Failure::last();
        if !(stream && f.errno == Some(libc::EINPROGRESS)) {
            return Err(f);
        }
        wait_ready(fd, libc::POLLOUT, CONNECT_TIMEOUT)?;
        so_error(fd)?;
    }
    if stream {
        set_nonblocking(fd, false)?;
    }
    Ok(())
}

fn connect_only(t: Transport, f: Family, addr: SocketAddr) -> OpResult {
    let sock = transport_socket(t, f)?;
    connect_fd(sock.as_raw_fd(), t, &sock_addr(f, addr))
}

fn write_all(fd: RawFd, mut data: &[u8]) -> OpResult {
    while !data.is_empty() {
        // SAFETY: data is valid for reads of data.len() bytes.
        let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let f = Failure::last();
            if f.errno == Some(libc::EINTR) {
                continue;
            }
            return Err(f);
        }
        data = data.get(n.unsigned_abs()..).unwrap_or_default();
    }
    Ok(())
}

/// shutdown(SHUT_WR), then read until the peer closes (bounded), so the bytes are delivered
/// before we report success.
fn finish_stream(fd: RawFd) -> OpResult {
    // SAFETY: plain syscall on a descriptor we own.
    check(unsafe { libc::shutdown(fd, libc::SHUT_WR) })?;
    set_timeout(fd, libc::SO_RCVTIMEO, DRAIN_TIMEOUT)?;
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            break;
        }
    }
    Ok(())
}

fn send_stream(t: Transport, f: Family, addr: SocketAddr, data: &[u8]) -> OpResult {
    let sock = transport_socket(t, f)?;
    let fd = sock.as_raw_fd();
    connect_fd(fd, t, &sock_addr(f, addr))?;
    set_timeout(fd, libc::SO_SNDTIMEO, IO_TIMEOUT)?;
    write_all(fd, data)?;
    finish_stream(fd)
}

fn send_datagram(fd: RawFd, data: &[u8], to: Option<&CSockAddr>) -> OpResult {
    let (ptr, len) = to.map_or((std::ptr::null(), 0), |a| (a.ptr(), a.len));
    // SAFETY: data is valid for reads of its length; ptr/len describe a valid sockaddr or
    // are null/0 for a connected socket.
    let n = unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL,
            ptr,
            len,
        )
    };
    if n < 0 {
        return Err(Failure::last());
    }
    if n.unsigned_abs() != data.len() {
        return Err(Failure::other(format!("short send: {n} of {}", data.len())));
    }
    Ok(())
}

fn sendto_udp(f: Family, addr: SocketAddr, data: &[u8]) -> OpResult {
    let sock = transport_socket(Transport::Udp, f)?;
    send_datagram(sock.as_raw_fd(), data, Some(&sock_addr(f, addr)))
}

fn udp_connect_send(f: Family, addr: SocketAddr, data: &[u8]) -> OpResult {
    let sock = transport_socket(Transport::Udp, f)?;
    let fd = sock.as_raw_fd();
    connect_fd(fd, Transport::Udp, &sock_addr(f, addr))?;
    send_datagram(fd, data, None)
}

fn fastopen(t: Transport, f: Family, addr: SocketAddr, data: &[u8]) -> OpResult {
    let sock = transport_socket(t, f)?;
    let fd = sock.as_raw_fd();
    // Bounds the implicit connect inside sendto(MSG_FASTOPEN) on this blocking socket.
    set_timeout(fd, libc::SO_SNDTIMEO, CONNECT_TIMEOUT)?;
    let to = sock_addr(f, addr);
    // SAFETY: data and the address are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_FASTOPEN | libc::MSG_NOSIGNAL,
            to.ptr(),
            to.len,
        )
    };
    if n < 0 {
        return Err(Failure::last());
    }
    write_all(fd, data.get(n.unsigned_abs()..).unwrap_or_default())?;
    finish_stream(fd)
}

#[cfg(test)]
#[expect(clippy::expect_used, reason = "test assertions")]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    #[test]
    fn v4_literal_on_family_6_is_mapped() {
        assert_eq!(
            parse_ip(Family::V6, "198.18.0.2"),
            Some(IpAddr::V6(
                "::ffff:198.18.0.2".parse::<Ipv6Addr>().expect("literal")
            ))
        );
        assert_eq!(parse_ip(Family::V4, "::1"), None);
    }

    #[test]
    fn data_is_the_rest_of_the_op() {
        let op = parse_op("send tcp4 198.18.0.2 80 GET / HTTP/1.0").expect("valid op");
        match op.action {
            Action::Send(Transport::Tcp, Family::V4, addr, data) => {
                assert_eq!(addr, "198.18.0.2:80".parse().expect("literal"));
                assert_eq!(data, b"GET / HTTP/1.0");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn raw6_takes_an_address_and_the_whole_packet() {
        match parse_op("raw6 fd00:e9::2 6000000000003b40")
            .expect("valid op")
            .action
        {
            Action::Raw6(addr, bytes) => {
                assert_eq!(addr, "fd00:e9::2".parse::<Ipv6Addr>().expect("literal"));
                assert_eq!(bytes, [0x60, 0, 0, 0, 0, 0, 0x3b, 0x40]);
            }
            other => panic!("unexpected {other:?}"),
        }
        for bad in [
            "raw6 198.18.0.2 60",
            "raw6 fd00:e9::2 6",
            "raw6 fd00:e9::2",
            "raw6 ::1 zz",
        ] {
            assert!(parse_op(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn malformed_ops_are_rejected() {
        for bad in [
            "",
            "connect tcp5 1.2.3.4 80",
            "connect tcp4 1.2.3.4",
            "connect tcp4 1.2.3.4 99999",
            "send udp4 1.2.3.4 80 x",
            "sendto tcp4 1.2.3.4 80 x",
            "sendto udp4 1.2.3.4 80",
            "socket foo4",
            "exit 300",
            "whoami now",
            "hammer 0 10 connect tcp4 1.2.3.4 80",
            "hammer 65 10 connect tcp4 1.2.3.4 80",
            "hammer 2 0 connect tcp4 1.2.3.4 80",
            "hammer 2 10 sleep 5",
            "hammer 2 10",
            "dns connect tcp4 1.2.3.4 53 a.test 3",
            "dns other udp4 1.2.3.4 53 a.test 3",
            "dns socket udp4 1.2.3.4 53 bad..name 3",
            "dns socket udp4 1.2.3.4 53 a.test 0",
            "resolve udp4 1.2.3.4 a.test",
            "resolve udp5 1.2.3.4 a.test A",
            "resolve tcp4-sendto 1.2.3.4 a.test A",
            "resolve udp4 ::1 a.test A",
            "resolve udp4 1.2.3.4 a..test A",
            "resolve udp4 1.2.3.4 a.test QQ",
            "resolve udp4 1.2.3.4 a.test A repeat 0",
            "resolve udp4 1.2.3.4 a.test A repeat 1001",
            "resolve udp4 1.2.3.4 a.test A repeat",
            "resolve udp4 1.2.3.4 a.test A then-connect udp4 80 x",
            "resolve udp4 1.2.3.4 a.test A then-connect tcp4 80",
            "resolve udp4 1.2.3.4 a.test A extra",
            "dnsraw udp4 1.2.3.4",
            "dnsraw udp4 1.2.3.4 abc",
            "dnsraw udp4 1.2.3.4 zz",
            "dnsraw udp4 1.2.3.4 00 11",
            "wait-file /tmp/x 120001",
            "wait-file /tmp/x",
            "touch",
            "resolve udp4 1.2.3.4 a.test A port",
            "resolve udp4 1.2.3.4 a.test A port 0",
            "resolve udp4 1.2.3.4 a.test A repeat 2 port 53",
            "dnsloop udp4 1.2.3.4 a.test 100",
            "dnsloop udp4 1.2.3.4 a.test 5 1000",
            "dnsloop udp4 1.2.3.4 a.test 100 120001",
            "dnsloop udp4 1.2.3.4 n{i}.test 100 1000",
            "dnsloop tcp4 1.2.3.4 a.test 100 1000 one-socket",
            "dnsloop udp4 1.2.3.4 a.test 100 1000 two-sockets",
            "dnsserve tcp4 127.0.0.1 61000 1.2.3.4 1000",
            "dnsserve udp4 127.0.0.1 61000 nope 1000",
            "dnsserve udp4 127.0.0.1 61000 1.2.3.4",
            "setsockopt udp4 bindtodevice",
            "setsockopt udp4 so_mark lo",
            "setsockopt mptcp4 bindtodevice lo",
            "setsockopt udp4 bindtodevice a/b",
            "setsockopt udp4 bindtodevice waytoolonginterfacename",
            "cmsg-sendto tcp4 127.0.0.1 9 tos=1 x",
            "cmsg-sendto udp4 127.0.0.1 9 tos=1",
            "cmsg-sendto udp4 127.0.0.1 9 tos=300 x",
            "cmsg-sendto udp4 127.0.0.1 9 ttl=1 x",
            "cmsg-send udp4 127.0.0.1 9 pktinfo= x",
            "sendto udp4 127.0.0.1%1 53 x",
            "sendto udp6 fe80::1%no-such-if0 53 x",
        ] {
            assert!(parse_op(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn hammer_and_dns_parse() {
        let op = parse_op("hammer 8 100 connect tcp4 198.18.0.2 8080").expect("valid op");
        match op.action {
            Action::Hammer(8, 100, inner) => {
                assert_eq!(inner.text, "connect tcp4 198.18.0.2 8080");
                assert!(matches!(inner.action, Action::Connect(Transport::Tcp, ..)));
            }
            other => panic!("unexpected {other:?}"),
        }
        let op =
            parse_op("dns socket udp6 ::ffff:198.18.0.2 53 api.company.test 5").expect("valid op");
        match op.action {
            Action::Dns(DnsMode::Socket, Family::V6, addr, name, 5) => {
                assert_eq!(addr, "[::ffff:198.18.0.2]:53".parse().expect("literal"));
                assert_eq!(name, "api.company.test");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn resolve_op(text: &str) -> Resolve {
        match parse_op(text).expect("valid op").action {
            Action::Resolve(r) => *r,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn resolve_parses() {
        let r = resolve_op("resolve udp4 198.18.0.2 api.example.test A");
        assert_eq!(
            (
                r.proto,
                r.family,
                r.server,
                r.name.as_str(),
                r.qtype,
                r.repeat
            ),
            (
                DnsProto::UdpConnect,
                Family::V4,
                "198.18.0.2:53".parse().expect("literal"),
                "api.example.test",
                1,
                1
            )
        );
        assert!(r.then_connect.is_none());
        let r = resolve_op(
            "resolve udp6-sendto 198.18.0.2 n{i}.example.test. aaaa repeat 200 then-connect tcp6 8443 GET / HTTP/1.0",
        );
        assert_eq!(r.proto, DnsProto::UdpSendto);
        assert_eq!(
            r.server,
            "[::ffff:198.18.0.2]:53"
                .parse::<SocketAddr>()
                .expect("literal")
        );
        assert_eq!((r.qtype, r.repeat), (28, 200));
        assert_eq!(
            r.then_connect,
            Some((Family::V6, 8443, b"GET / HTTP/1.0".to_vec()))
        );
        let r = resolve_op("resolve tcp6 fd00:e9::2 x.test TXT then-connect tcp4 80 hi");
        assert_eq!(
            (r.proto, r.family, r.qtype),
            (DnsProto::Tcp, Family::V6, 16)
        );
        assert_eq!(r.then_connect, Some((Family::V4, 80, b"hi".to_vec())));
        assert_eq!(resolve_op("resolve udp4 1.2.3.4 x.test 65").qtype, 65);
    }

    #[test]
    fn dnsraw_touch_and_wait_file_parse() {
        match parse_op("dnsraw tcp4 198.18.0.2 1234ABcd")
            .expect("valid")
            .action
        {
            Action::DnsRaw(DnsProto::Tcp, Family::V4, addr, bytes) => {
                assert_eq!(addr, "198.18.0.2:53".parse().expect("literal"));
                assert_eq!(bytes, [0x12, 0x34, 0xab, 0xcd]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_op("touch /tmp/a").expect("valid").action,
            Action::Touch(_)
        ));
        assert!(matches!(
            parse_op("wait-file /tmp/a 5000").expect("valid").action,
            Action::WaitFile(_, d) if d == Duration::from_secs(5)
        ));
    }

    #[test]
    fn listen_parses_with_and_without_bind() {
        match parse_op("listen tcp6 :: 8080 3000 /tmp/p hi")
            .expect("valid")
            .action
        {
            Action::Listen(l) => {
                assert_eq!(l.bind, Some("[::]:8080".parse().expect("literal")));
                assert_eq!((l.family, l.total), (Family::V6, Duration::from_secs(3)));
                assert_eq!(l.data, b"hi");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_op("listen tcp4 - 0 3000 /tmp/p hi").expect("valid").action,
            Action::Listen(l) if l.bind.is_none()
        ));
        assert!(parse_op("listen tcp4 - 80 3000 /tmp/p hi").is_err());
        assert!(parse_op("listen udp4 0.0.0.0 80 3000 /tmp/p hi").is_err());
        assert!(parse_op("listen tcp4 0.0.0.0 80 999999 /tmp/p hi").is_err());
    }

    #[test]
    fn hardening_ops_parse() {
        let r = resolve_op("resolve udp4-sendto 127.0.0.1 a.test A port 61003 repeat 3");
        assert_eq!(
            (r.server, r.repeat),
            ("127.0.0.1:61003".parse().expect("literal"), 3)
        );
        match parse_op("dnsloop tcp6 fd00:e9::2 a.test 100 8000")
            .expect("valid")
            .action
        {
            Action::DnsLoop(l) => {
                assert_eq!(
                    (l.proto, l.family, l.server, l.name.as_str()),
                    (
                        DnsProto::Tcp,
                        Family::V6,
                        "[fd00:e9::2]:53".parse().expect("literal"),
                        "a.test"
                    )
                );
                assert_eq!(
                    (l.every, l.total),
                    (Duration::from_millis(100), Duration::from_secs(8))
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_op("dnsloop udp4 198.18.0.2 a.test 100 8000 one-socket").expect("valid").action,
            Action::DnsLoop(l) if l.one_socket && l.proto == DnsProto::UdpConnect
        ));
        match parse_op("dnsserve udp4 127.0.0.1 61000 198.18.0.66 9000 /tmp/ready")
            .expect("valid")
            .action
        {
            Action::DnsServe(d) => {
                assert_eq!(d.addr, "127.0.0.1:61000".parse().expect("literal"));
                assert_eq!(d.answer, "198.18.0.66".parse::<IpAddr>().expect("literal"));
                assert_eq!(d.ready.as_deref(), Some(std::path::Path::new("/tmp/ready")));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_op("setsockopt udp6 ipv6_2292pktoptions veth-c").expect("valid").action,
            Action::SetSockopt(
                Transport::Udp,
                Family::V6,
                SockOption::Ipv6Pktoptions2292,
                ref i
            ) if i == "veth-c"
        ));
        match parse_op("cmsg-send udp4 127.0.0.1 5300 pktinfo=veth-c leak me")
            .expect("valid")
            .action
        {
            Action::CmsgSend {
                connected,
                family,
                to,
                cmsg,
                data,
            } => {
                assert!(connected);
                assert_eq!(family, Family::V4);
                assert_eq!(to, "127.0.0.1:5300".parse().expect("literal"));
                assert_eq!(cmsg, Cmsg::Pktinfo("veth-c".into()));
                assert_eq!(data, b"leak me");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_op("cmsg-sendto udp6 ::1 53 tos=16 x")
                .expect("valid")
                .action,
            Action::CmsgSend {
                connected: false,
                cmsg: Cmsg::Tos(16),
                ..
            }
        ));
        // A scope by number (a name is looked up in the probe's namespace when parsed).
        match parse_op("sendto udp6 fe80::1%7 53 x")
            .expect("valid")
            .action
        {
            Action::SendTo(Family::V6, SocketAddr::V6(a), _) => {
                assert_eq!((a.scope_id(), a.port()), (7, 53));
            }
            other => panic!("unexpected {other:?}"),
        }
        match parse_op("sendto udp6 fe80::1%lo 53 x")
            .expect("valid")
            .action
        {
            Action::SendTo(Family::V6, SocketAddr::V6(a), _) => assert_ne!(a.scope_id(), 0),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_squatter_answers_queries_only() {
        let q = dns_query(0x4242, "a.test");
        let reply = squat_reply(&q, "198.18.0.66".parse().expect("literal")).expect("a reply");
        assert_eq!(
            parse_reply(0x4242, &reply),
            Ok(Reply {
                rcode: 0,
                addrs: vec!["198.18.0.66".parse().expect("literal")]
            })
        );
        assert!(squat_reply(&reply, "198.18.0.66".parse().expect("literal")).is_none());
        assert!(squat_reply(&q[..11], "198.18.0.66".parse().expect("literal")).is_none());
    }

    #[test]
    fn replies_are_read_with_compression_and_cnames() {
        // Query for w.test A, answered by a CNAME to x.test (pointer into the question for
        // the owner), an A and an AAAA record for x.test, and an unknown type.
        let mut m = dns_query_typed(7, "w.test", 1);
        m[2] |= 0x80;
        m[7] = 4;
        // CNAME: owner -> offset 12; rdata "x" + pointer to "test" at offset 14.
        m.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 4, 1, b'x', 0xc0, 14]);
        let x = u8::try_from(m.len() - 4).expect("offset");
        m.extend_from_slice(&[0xc0, x, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 0, 10]);
        m.extend_from_slice(&[0xc0, x, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]);
        m.extend_from_slice(&[0xfd, 0, 0, 0xe9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        m.extend_from_slice(&[0xc0, x, 0, 99, 0, 1, 0, 0, 0, 60, 0, 1, 0]);
        assert_eq!(
            parse_reply(7, &m),
            Ok(Reply {
                rcode: 0,
                addrs: vec![
                    "198.18.0.10".parse().expect("literal"),
                    "fd00:e9::10".parse().expect("literal")
                ]
            })
        );
        assert!(parse_reply(8, &m).is_err(), "wrong id");
        let mut nx = dns_query_typed(9, "evil.test", 1);
        nx[2] |= 0x80;
        nx[3] = 3;
        assert_eq!(
            parse_reply(9, &nx),
            Ok(Reply {
                rcode: 3,
                addrs: vec![]
            })
        );
        // An answer count with no records behind it, and a pointer loop, are errors.
        nx[7] = 1;
        assert!(parse_reply(9, &nx).is_err());
        let mut looped = dns_query_typed(9, "a.test", 1);
        looped[2] |= 0x80;
        looped[7] = 1;
        let here = u8::try_from(looped.len()).expect("offset");
        looped.extend_from_slice(&[0x01, b'a', 0xc0, here]);
        assert!(parse_reply(9, &looped).is_err());
        assert!(parse_reply(9, &looped[..11]).is_err());
    }

    #[test]
    fn then_connect_picks_the_first_address_of_its_family() {
        let addrs: Vec<IpAddr> = ["fd00:e9::10", "198.18.0.10", "198.18.0.11"]
            .iter()
            .map(|a| a.parse().expect("literal"))
            .collect();
        assert_eq!(first_addr(Family::V4, &addrs), Some(addrs[1]));
        assert_eq!(first_addr(Family::V6, &addrs), Some(addrs[0]));
        assert_eq!(first_addr(Family::V6, &addrs[1..]), Some(addrs[1]));
        assert_eq!(first_addr(Family::V4, &addrs[..1]), None);
        assert!(valid_query_name("n{i}.race.example.test"));
        assert!(valid_query_name("A.B.Example.Test."));
        assert!(!valid_query_name("."));
    }

    #[test]
    fn dns_messages() {
        let q = dns_query(0x1234, "a.test");
        assert_eq!(
            q,
            [
                0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 4, b't', b'e', b's', b't', 0, 0,
                1, 0, 1
            ]
        );
        let mut reply = q.clone();
        reply[2] |= 0x80;
        reply[7] = 1;
        assert!(dns_answered(0x1234, &reply));
        assert!(!dns_answered(0x1235, &reply));
        reply[3] = 3; // NXDOMAIN
        assert!(!dns_answered(0x1234, &reply));
    }
}

/// N blocking TCP connects as fast as possible; the time bound keeps a mistake from hanging.
fn flood(text: &str, family: Family, addr: SocketAddr, n: u64) -> ProbeResult {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let sa = sock_addr(family, addr);
    let domain = match family {
        Family::V4 => libc::AF_INET,
        Family::V6 => libc::AF_INET6,
    };
    let (mut attempts, mut eperm) = (0u64, 0u64);
    while attempts < n && (attempts % 4096 != 0 || std::time::Instant::now() < deadline) {
        // SAFETY: plain socket/connect/close on a descriptor this loop owns.
        let errno = unsafe {
            let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                *libc::__errno_location()
            } else {
                let r = libc::connect(fd, sa.ptr(), sa.len);
                let e = if r == 0 { 0 } else { *libc::__errno_location() };
                libc::close(fd);
                e
            }
        };
        attempts += 1;
        if errno == libc::EPERM {
            eperm += 1;
        }
    }
    ProbeResult {
        attempts: Some(attempts),
        eperm: Some(eperm),
        ..ProbeResult::ok(text)
    }
}

/// What one `hammer` thread saw.
#[derive(Default)]
struct Tally {
    attempts: u64,
    eperm: u64,
    ok: u64,
    /// The first failure other than EPERM.
    other: Option<String>,
}

/// `threads` threads, released together, each running `op` `n` times (bounded in time).
fn hammer(text: &str, threads: usize, n: u64, op: &Op) -> ProbeResult {
    let deadline = Instant::now() + REPEAT_DEADLINE;
    let start = std::sync::Barrier::new(threads);
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    let mut t = Tally::default();
                    while t.attempts < n && Instant::now() < deadline {
                        let r = run(op);
                        t.attempts += 1;
                        if r.ok {
                            t.ok += 1;
                        } else if r.errno == Some(libc::EPERM) {
                            t.eperm += 1;
                        } else if t.other.is_none() {
                            t.other = r.error;
                        }
                    }
                    t
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| Tally {
                    other: Some("thread panicked".to_owned()),
                    ..Tally::default()
                })
            })
            .collect()
    });
    ProbeResult {
        attempts: Some(tallies.iter().map(|t| t.attempts).sum()),
        eperm: Some(tallies.iter().map(|t| t.eperm).sum()),
        count: Some(tallies.iter().map(|t| t.ok).sum()),
        error: tallies.iter().find_map(|t| t.other.clone()),
        ..ProbeResult::ok(text)
    }
}

/// A DNS query for `name`, type A, class IN, recursion desired.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    dns_query_typed(id, name, 1)
}

/// A DNS query for `name` (a trailing dot is optional), type `qtype`, class IN, recursion
/// desired, no EDNS.
fn dns_query_typed(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// What `resolve` reads from a reply.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    rcode: u8,
    addrs: Vec<IpAddr>,
}

/// Past a (possibly compressed) name at `pos`; `None` when it runs off the message.
fn skip_name(msg: &[u8], mut pos: usize) -> Option<usize> {
    // A name has at most 127 labels; the bound also stops a malformed message.
    for _ in 0..128 {
        let len = *msg.get(pos)?;
        match len {
            0 => return Some(pos + 1),
            l if l & 0xc0 == 0xc0 => return (pos + 2 <= msg.len()).then_some(pos + 2),
            l if l & 0xc0 == 0 => pos += 1 + usize::from(l),
            _ => return None,
        }
    }
    None
}

fn be16(msg: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]))
}

/// The rcode and the A/AAAA records of the answer section of a reply to query `id`.
fn parse_reply(id: u16, msg: &[u8]) -> Result<Reply, String> {
    let bad = |why: &str| format!("reply to query {id}: {why} ({} bytes)", msg.len());
    if msg.len() < 12 {
        return Err(bad("shorter than a header"));
    }
    if be16(msg, 0) != Some(id) {
        return Err(bad("wrong id"));
    }
    if msg[2] & 0x80 == 0 {
        return Err(bad("not a response"));
    }
    let rcode = msg[3] & 0x0f;
    let (qd, an) = (be16(msg, 4).unwrap_or(0), be16(msg, 6).unwrap_or(0));
    let mut pos = 12;
    for _ in 0..qd {
        pos = skip_name(msg, pos).ok_or_else(|| bad("bad question name"))? + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..an {
        pos = skip_name(msg, pos).ok_or_else(|| bad("bad answer name"))?;
        let rtype = be16(msg, pos).ok_or_else(|| bad("truncated record"))?;
        let rdlen = usize::from(be16(msg, pos + 8).ok_or_else(|| bad("truncated record"))?);
        let rdata = msg
            .get(pos + 10..pos + 10 + rdlen)
            .ok_or_else(|| bad("truncated rdata"))?;
        match (
            rtype,
            <[u8; 4]>::try_from(rdata),
            <[u8; 16]>::try_from(rdata),
        ) {
            (1, Ok(v4), _) => addrs.push(IpAddr::from(v4)),
            (28, _, Ok(v6)) => addrs.push(IpAddr::from(v6)),
            _ => {}
        }
        pos += 10 + rdlen;
    }
    Ok(Reply { rcode, addrs })
}

fn socket_addr_from_c(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for AF_INET; storage is large enough and
            // suitably aligned.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read(std::ptr::from_ref(storage).cast()) };
            Some(SocketAddr::new(
                IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read(std::ptr::from_ref(storage).cast()) };
            Some(SocketAddr::new(
                IpAddr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

/// recvfrom() one datagram (SO_RCVTIMEO bounds the wait): the bytes and the sender.
fn recv_from(fd: RawFd) -> Result<(Vec<u8>, Option<SocketAddr>), Failure> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: buf and storage are valid for writes of the lengths given.
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            std::ptr::from_mut(&mut storage).cast(),
            &mut len,
        )
    };
    if n < 0 {
        let f = Failure::last();
        if f.errno == Some(libc::EAGAIN) {
            return Err(Failure::errno(libc::ETIMEDOUT));
        }
        return Err(f);
    }
    buf.truncate(n.unsigned_abs());
    Ok((buf, socket_addr_from_c(&storage)))
}

fn peer_addr(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage is valid for writes of len bytes.
    let r = unsafe { libc::getpeername(fd, std::ptr::from_mut(&mut storage).cast(), &mut len) };
    if r == 0 {
        socket_addr_from_c(&storage)
    } else {
        None
    }
}

/// Reads exactly `buf.len()` bytes (SO_RCVTIMEO bounds each read); `Ok(false)` when the peer
/// closed first.
fn read_exact_fd(fd: RawFd, buf: &mut [u8]) -> Result<bool, Failure> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: rest is valid for writes of its length.
        let n = unsafe { libc::recv(fd, rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let f = Failure::last();
            match f.errno {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Err(Failure::errno(libc::ETIMEDOUT)),
                _ => return Err(f),
            }
        }
        if n == 0 {
            return Ok(false);
        }
        done += n.unsigned_abs();
    }
    Ok(true)
}

/// Sends `msg` to `server` the way `proto` says and returns the reply and where it came from.
/// A TCP connection closed without a reply is an error without errno.
fn dns_exchange(
    proto: DnsProto,
    f: Family,
    server: SocketAddr,
    msg: &[u8],
) -> Result<(Vec<u8>, Option<SocketAddr>), Failure> {
    dns_exchange_within(proto, f, server, msg, IO_TIMEOUT)
}

/// [`dns_exchange`] with `timeout` for the reply (and for the TCP connect and writes).
fn dns_exchange_within(
    proto: DnsProto,
    f: Family,
    server: SocketAddr,
    msg: &[u8],
    timeout: Duration,
) -> Result<(Vec<u8>, Option<SocketAddr>), Failure> {
    let to = sock_addr(f, server);
    match proto {
        DnsProto::UdpConnect | DnsProto::UdpSendto => {
            let sock = transport_socket(Transport::Udp, f)?;
            let fd = sock.as_raw_fd();
            set_timeout(fd, libc::SO_RCVTIMEO, timeout)?;
            if proto == DnsProto::UdpConnect {
                connect_fd(fd, Transport::Udp, &to)?;
                send_datagram(fd, msg, None)?;
            } else {
                send_datagram(fd, msg, Some(&to))?;
            }
            recv_from(fd)
        }
        DnsProto::Tcp => {
            let sock = transport_socket(Transport::Tcp, f)?;
            let fd = sock.as_raw_fd();
            connect_fd(fd, Transport::Tcp, &to)?;
            set_timeout(fd, libc::SO_SNDTIMEO, timeout)?;
            set_timeout(fd, libc::SO_RCVTIMEO, timeout)?;
            let len = u16::try_from(msg.len())
                .map_err(|_| Failure::other("message longer than 65535 bytes".to_owned()))?;
            let mut framed = Vec::with_capacity(2 + msg.len());
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(msg);
            write_all(fd, &framed)?;
            let from = peer_addr(fd);
            let mut len = [0u8; 2];
            if !read_exact_fd(fd, &mut len)? {
                return Err(Failure::other("closed without a reply".to_owned()));
            }
            let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if !read_exact_fd(fd, &mut reply)? {
                return Err(Failure::other("closed in the middle of a reply".to_owned()));
            }
            Ok((reply, from))
        }
    }
}

/// The address `then-connect` goes to: for tcp4 the first IPv4 address; for tcp6 the first
/// IPv6 address, else the first IPv4 address (mapped by `sock_addr`).
fn first_addr(f: Family, addrs: &[IpAddr]) -> Option<IpAddr> {
    let v4 = addrs.iter().copied().find(IpAddr::is_ipv4);
    match f {
        Family::V4 => v4,
        Family::V6 => addrs.iter().copied().find(IpAddr::is_ipv6).or(v4),
    }
}

/// A query id that differs between iterations and between probe runs.
fn query_id(i: u64) -> u16 {
    (std::process::id() as u16)
        .wrapping_mul(0x9e37)
        .wrapping_add(i as u16)
}

/// `resolve`: `r.repeat` iterations of query, answer, and (with then-connect) an immediate
/// connection to the answered address; stops at the first failure.
fn resolve(text: &str, r: &Resolve) -> ProbeResult {
    let deadline = Instant::now() + REPEAT_DEADLINE;
    let mut result = ProbeResult::ok(text);
    let mut completed = 0;
    let mut failure: Option<Failure> = None;
    let mut first_rcode = None;
    for i in 0..r.repeat {
        let name = r.name.replace("{i}", &i.to_string());
        let context = |f: Failure, what: &str| Failure {
            errno: f.errno,
            error: format!("{} ({what}, iteration {i}, {name})", f.error),
        };
        if Instant::now() > deadline {
            failure = Some(context(Failure::errno(libc::ETIMEDOUT), "deadline"));
            break;
        }
        let id = query_id(i);
        let query = dns_query_typed(id, &name, r.qtype);
        let (bytes, from) = match dns_exchange(r.proto, r.family, r.server, &query) {
            Ok(x) => x,
            Err(f) => {
                failure = Some(context(f, "query"));
                break;
            }
        };
        result.from = from;
        let reply = match parse_reply(id, &bytes) {
            Ok(reply) => reply,
            Err(e) => {
                failure = Some(context(Failure::other(e), "reply"));
                break;
            }
        };
        result.rcode = Some(reply.rcode);
        result.addrs = Some(reply.addrs.clone());
        match first_rcode {
            None => first_rcode = Some(reply.rcode),
            Some(first) if first != reply.rcode => {
                failure = Some(context(
                    Failure::other(format!(
                        "rcode {} where earlier replies had {first}",
                        reply.rcode
                    )),
                    "reply",
                ));
                break;
            }
            Some(_) => {}
        }
        if let Some((family, port, data)) = &r.then_connect {
            let Some(ip) = first_addr(*family, &reply.addrs) else {
                failure = Some(context(
                    Failure::other(format!(
                        "no address to connect to in the answer (rcode {})",
                        reply.rcode
                    )),
                    "then-connect",
                ));
                break;
            };
            let to = SocketAddr::new(ip, *port);
            if let Err(f) = send_stream(Transport::Tcp, *family, to, data) {
                failure = Some(context(f, &format!("then-connect to {to}")));
                break;
            }
        }
        completed += 1;
    }
    let result = match failure {
        None => result,
        Some(f) => ProbeResult {
            ok: false,
            errno: f.errno,
            error: Some(f.error),
            ..result
        },
    };
    ProbeResult {
        count: Some(completed),
        ..result
    }
}

/// `dnsraw`: one message as given, and the rcode of whatever comes back.
fn dns_raw(text: &str, proto: DnsProto, f: Family, server: SocketAddr, msg: &[u8]) -> ProbeResult {
    match dns_exchange(proto, f, server, msg) {
        Ok((reply, from)) if reply.len() >= 4 => ProbeResult {
            rcode: Some(reply[3] & 0x0f),
            from,
            ..ProbeResult::ok(text)
        },
        Ok((reply, from)) => ProbeResult {
            from,
            ..ProbeResult::failed(text, None, format!("a {}-byte reply", reply.len()))
        },
        Err(e) => ProbeResult::failed(text, e.errno, e.error),
    }
}

/// Polls (bounded) until `path` exists.
fn wait_file(path: &std::path::Path, timeout: Duration) -> OpResult {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(Failure::errno(libc::ETIMEDOUT));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// An answer to query `id`: a response, NOERROR, at least one answer record.
fn dns_answered(id: u16, reply: &[u8]) -> bool {
    reply.len() >= 12
        && reply[..2] == id.to_be_bytes()
        && reply[2] & 0x80 != 0
        && reply[3] & 0x0f == 0
        && u16::from_be_bytes([reply[6], reply[7]]) > 0
}

fn recv_reply(fd: RawFd) -> Result<Vec<u8>, Failure> {
    recv_from(fd).map(|(reply, _)| reply)
}

fn dns_once(
    mode: DnsMode,
    shared: Option<RawFd>,
    f: Family,
    addr: SocketAddr,
    id: u16,
    name: &str,
) -> OpResult {
    let query = dns_query(id, name);
    let to = sock_addr(f, addr);
    let owned;
    let fd = match (mode, shared) {
        (DnsMode::Socket, Some(fd)) => {
            send_datagram(fd, &query, Some(&to))?;
            fd
        }
        _ => {
            owned = transport_socket(Transport::Udp, f)?;
            let fd = owned.as_raw_fd();
            set_timeout(fd, libc::SO_RCVTIMEO, IO_TIMEOUT)?;
            connect_fd(fd, Transport::Udp, &to)?;
            send_datagram(fd, &query, None)?;
            fd
        }
    };
    let reply = recv_reply(fd)?;
    if dns_answered(id, &reply) {
        Ok(())
    } else {
        Err(Failure::other(format!(
            "query {id}: not an answer ({} bytes)",
            reply.len()
        )))
    }
}

/// `n` queries, one after the other; stops at the first failure.
fn dns(text: &str, mode: DnsMode, f: Family, addr: SocketAddr, name: &str, n: u64) -> ProbeResult {
    let deadline = Instant::now() + REPEAT_DEADLINE;
    let shared = match mode {
        DnsMode::Socket => match transport_socket(Transport::Udp, f) {
            Ok(s) => match set_timeout(s.as_raw_fd(), libc::SO_RCVTIMEO, IO_TIMEOUT) {
                Ok(()) => Some(s),
                Err(e) => return ProbeResult::failed(text, e.errno, e.error),
            },
            Err(e) => return ProbeResult::failed(text, e.errno, e.error),
        },
        DnsMode::Connect => None,
    };
    let mut answered = 0;
    let mut failure = None;
    for i in 0..n {
        if Instant::now() > deadline {
            failure = Some(Failure::errno(libc::ETIMEDOUT));
            break;
        }
        let id = (i % 65536) as u16;
        match dns_once(
            mode,
            shared.as_ref().map(AsRawFd::as_raw_fd),
            f,
            addr,
            id,
            name,
        ) {
            Ok(()) => answered += 1,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let result = match failure {
        None => ProbeResult::ok(text),
        Some(e) => ProbeResult::failed(text, e.errno, e.error),
    };
    ProbeResult {
        count: Some(answered),
        ..result
    }
}

/// A UDP datagram to `to` carrying an IPv6 segment-routing header (type 4) whose next segment
/// is `via`: the kernel sends it to `via`, not to `to`. Needs no privilege.
fn srh6(via: std::net::Ipv6Addr, to: SocketAddr, data: &[u8]) -> OpResult {
    let sock = new_socket(Family::V6, libc::SOCK_DGRAM, 0)?;
    let fd = sock.as_raw_fd();
    // RFC 8754: next header, hdr ext len (8-octet units after the first 8), type 4,
    // segments left 1, last entry 1, flags, tag; then segment[0] (the final destination,
    // which the kernel fills in) and segment[1] (the first hop).
    let mut srh = [0u8; 8 + 32];
    srh[1] = 4;
    srh[2] = 4;
    srh[3] = 1;
    srh[4] = 1;
    if let IpAddr::V6(t) = to.ip() {
        srh[8..24].copy_from_slice(&t.octets());
    }
    srh[24..40].copy_from_slice(&via.octets());
    // SAFETY: setsockopt with a buffer of the given length.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_RTHDR,
            srh.as_ptr().cast(),
            srh.len() as libc::socklen_t,
        )
    })?;
    let sa = sock_addr(Family::V6, to);
    // SAFETY: sendto with a valid buffer and address.
    check(
        unsafe { libc::sendto(fd, data.as_ptr().cast(), data.len(), 0, sa.ptr(), sa.len) }
            as libc::c_int,
    )?;
    Ok(())
}

/// One ICMP echo request to `to` from an unprivileged ping socket.
fn ping4(to: std::net::Ipv4Addr) -> OpResult {
    let sock = new_socket(Family::V4, libc::SOCK_DGRAM, libc::IPPROTO_ICMP)?;
    let fd = sock.as_raw_fd();
    // Echo request: type 8, code 0, checksum and id filled in by the kernel, sequence 1.
    let echo = [8u8, 0, 0, 0, 0, 0, 0, 1, b'p', b'i', b'n', b'g'];
    let sa = sock_addr(Family::V4, SocketAddr::new(IpAddr::V4(to), 0));
    // SAFETY: sendto with a valid buffer and address.
    check(
        unsafe { libc::sendto(fd, echo.as_ptr().cast(), echo.len(), 0, sa.ptr(), sa.len) }
            as libc::c_int,
    )?;
    Ok(())
}

/// An IPPROTO_RAW IPv6 socket takes the packet's header from the data (IPV6_HDRINCL is
/// implied); ADDR only routes it.
fn raw6(to: std::net::Ipv6Addr, packet: &[u8]) -> OpResult {
    let sock = new_socket(Family::V6, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
    let fd = sock.as_raw_fd();
    let sa = sock_addr(Family::V6, SocketAddr::new(IpAddr::V6(to), 0));
    // SAFETY: sendto with a valid buffer and address.
    check(unsafe {
        libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            sa.ptr(),
            sa.len,
        )
    } as libc::c_int)?;
    Ok(())
}

/// `dnsloop`: a query every `l.every` for `l.total`, each on a fresh socket; one sample per
/// query, whatever became of it.
fn dns_loop(text: &str, l: &DnsLoop) -> ProbeResult {
    let shared = if l.one_socket {
        match one_dns_socket(l) {
            Ok(s) => Some(s),
            Err(f) => return ProbeResult::failed(text, f.errno, f.error),
        }
    } else {
        None
    };
    let to = sock_addr(l.family, l.server);
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut i: u32 = 0;
    while start.elapsed() < l.total {
        let at_ms = boot_time_ms();
        let id = query_id(u64::from(i));
        let query = dns_query(id, &l.name);
        let exchanged = match &shared {
            Some(sock) => {
                let fd = sock.as_raw_fd();
                let dest = (l.proto == DnsProto::UdpSendto).then_some(&to);
                send_datagram(fd, &query, dest).and_then(|()| recv_from(fd))
            }
            None => dns_exchange_within(l.proto, l.family, l.server, &query, DNSLOOP_REPLY_TIMEOUT),
        };
        let sample = match exchanged {
            Ok((bytes, from)) => match parse_reply(id, &bytes) {
                Ok(reply) => DnsSample {
                    at_ms,
                    ok: true,
                    rcode: Some(reply.rcode),
                    addrs: reply.addrs,
                    from,
                    ..DnsSample::default()
                },
                Err(_) => DnsSample {
                    at_ms,
                    ..DnsSample::default()
                },
            },
            Err(f) => DnsSample {
                at_ms,
                errno: f.errno,
                ..DnsSample::default()
            },
        };
        samples.push(sample);
        i = i.saturating_add(1);
        let next = start + l.every.saturating_mul(i);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    ProbeResult {
        count: Some(samples.iter().filter(|s| s.ok).count() as u64),
        samples: Some(samples),
        ..ProbeResult::ok(text)
    }
}

/// The socket of a `dnsloop ... one-socket`: connected to the server once for `udp4|udp6`.
fn one_dns_socket(l: &DnsLoop) -> Result<OwnedFd, Failure> {
    let sock = transport_socket(Transport::Udp, l.family)?;
    let fd = sock.as_raw_fd();
    set_timeout(fd, libc::SO_RCVTIMEO, DNSLOOP_REPLY_TIMEOUT)?;
    if l.proto == DnsProto::UdpConnect {
        connect_fd(fd, Transport::Udp, &sock_addr(l.family, l.server))?;
    }
    Ok(sock)
}

/// The reply `dnsserve` gives to `query`: its header and question, one answer record for
/// `answer` (A or AAAA) with TTL 60, nothing else. `None` for what is not a query.
fn squat_reply(query: &[u8], answer: IpAddr) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || be16(query, 4) != Some(1) {
        return None;
    }
    let question_end = skip_name(query, 12)? + 4;
    let mut reply = query.get(..question_end)?.to_vec();
    reply[2] = 0x80 | (query[2] & 0x01);
    reply[3] = 0x80;
    reply[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
    let (rtype, rdata): (u16, Vec<u8>) = match answer {
        IpAddr::V4(a) => (1, a.octets().to_vec()),
        IpAddr::V6(a) => (28, a.octets().to_vec()),
    };
    reply.extend_from_slice(&[0xc0, 12]);
    reply.extend_from_slice(&rtype.to_be_bytes());
    reply.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
    reply.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    reply.extend_from_slice(&rdata);
    Some(reply)
}

/// `dnsserve`: binds, signals readiness through the file, then answers every query for the
/// whole duration.
fn dns_serve(text: &str, d: &DnsServe) -> ProbeResult {
    let fail = |f: Failure| ProbeResult::failed(text, f.errno, f.error);
    let sock = match transport_socket(Transport::Udp, d.family) {
        Ok(s) => s,
        Err(f) => return fail(f),
    };
    let fd = sock.as_raw_fd();
    let addr = sock_addr(d.family, d.addr);
    // SAFETY: addr points to a valid sockaddr of addr.len bytes.
    if let Err(f) = check(unsafe { libc::bind(fd, addr.ptr(), addr.len) }) {
        return fail(f);
    }
    if let Err(f) = set_timeout(fd, libc::SO_RCVTIMEO, Duration::from_millis(50)) {
        return fail(f);
    }
    if let Some(path) = &d.ready
        && let Err(e) = std::fs::File::create(path)
    {
        return ProbeResult::failed(text, e.raw_os_error(), e.to_string());
    }
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < d.total {
        // Nothing within the receive timeout: look at the clock again.
        let Ok((query, Some(peer))) = recv_from(fd) else {
            continue;
        };
        let at_ms = boot_time_ms();
        let Some(reply) = squat_reply(&query, d.answer) else {
            continue;
        };
        let sent = send_datagram(fd, &reply, Some(&CSockAddr::new(peer)));
        samples.push(DnsSample {
            at_ms,
            ok: sent.is_ok(),
            addrs: vec![d.answer],
            ..DnsSample::default()
        });
    }
    ProbeResult {
        count: Some(samples.iter().filter(|s| s.ok).count() as u64),
        samples: Some(samples),
        ..ProbeResult::ok(text)
    }
}

/// A TCP listener (bound, or autobound by listen() itself) that writes its port to the ready
/// path, then for the given time accepts every connection, writes DATA to it and closes it.
/// `count` = connections accepted, `addrs` = their peers, `from` = the listening address.
fn listen(text: &str, l: &Listen) -> ProbeResult {
    use std::io::Write as _;
    let fail = |f: Failure| ProbeResult::failed(text, f.errno, f.error);
    let io_fail = |e: std::io::Error| ProbeResult::failed(text, e.raw_os_error(), e.to_string());
    let sock = match transport_socket(Transport::Tcp, l.family) {
        Ok(s) => s,
        Err(f) => return fail(f),
    };
    let fd = sock.as_raw_fd();
    if let Some(bind) = l.bind {
        // As servers do: connections of an earlier listener on the port may be in TIME_WAIT.
        if let Err(f) = setsockopt_bytes(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &1i32.to_ne_bytes(),
        ) {
            return fail(f);
        }
        let addr = sock_addr(l.family, bind);
        // SAFETY: addr points to a valid sockaddr of addr.len bytes.
        if let Err(f) = check(unsafe { libc::bind(fd, addr.ptr(), addr.len) }) {
            return fail(f);
        }
    }
    // SAFETY: listen(2) on a socket this function owns.
    if let Err(f) = check(unsafe { libc::listen(fd, 16) }) {
        return fail(f);
    }
    let listener = std::net::TcpListener::from(sock);
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => return io_fail(e),
    };
    if let Err(e) = listener.set_nonblocking(true) {
        return io_fail(e);
    }
    let tmp = l.ready.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, local.port().to_string())
        .and_then(|()| std::fs::rename(&tmp, &l.ready))
    {
        return io_fail(e);
    }
    let start = Instant::now();
    let mut peers = Vec::new();
    while start.elapsed() < l.total {
        match listener.accept() {
            Ok((mut conn, peer)) => {
                peers.push(peer.ip().to_canonical());
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
                let _ = conn.write_all(&l.data);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return io_fail(e),
        }
    }
    ProbeResult {
        count: Some(peers.len() as u64),
        addrs: Some(peers),
        from: Some(local),
        ..ProbeResult::ok(text)
    }
}

/// setsockopt(fd, level, name, value) with `value`'s bytes.
fn setsockopt_bytes(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &[u8]) -> OpResult {
    // SAFETY: value is valid for reads of its length.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The bytes of a plain C struct, for option values and control messages.
fn struct_bytes<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: T is a plain C struct (Copy, no padding read as anything but bytes); the slice
    // covers exactly its size.
    unsafe {
        std::slice::from_raw_parts(
            std::ptr::from_ref(value).cast::<u8>(),
            std::mem::size_of::<T>(),
        )
    }
    .to_vec()
}

fn in6_pktinfo(ifindex: u32) -> libc::in6_pktinfo {
    libc::in6_pktinfo {
        ipi6_addr: libc::in6_addr { s6_addr: [0; 16] },
        ipi6_ifindex: ifindex,
    }
}

/// One control message (level, type, data) in a buffer aligned for cmsghdr.
struct Control {
    buf: Vec<u64>,
    len: usize,
}

impl Control {
    fn new(level: libc::c_int, ty: libc::c_int, data: &[u8]) -> Self {
        let data_len = data.len() as libc::c_uint;
        // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
        let (space, len) = unsafe { (libc::CMSG_SPACE(data_len), libc::CMSG_LEN(data_len)) };
        let space = space as usize;
        let mut buf = vec![0u64; space.div_ceil(8)];
        // A msghdr that describes only the buffer, for CMSG_FIRSTHDR.
        // SAFETY: msghdr is plain data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = buf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the buffer holds CMSG_SPACE(data.len()) bytes, aligned for cmsghdr, so the
        // first header and its data fit.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = level;
            (*cmsg).cmsg_type = ty;
            (*cmsg).cmsg_len = len as _;
            std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(cmsg), data.len());
        }
        Self { buf, len: space }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: buf holds at least len bytes.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), self.len) }
    }
}

/// `setsockopt`: a fresh socket, then the option naming `ifname`.
fn set_sockopt(t: Transport, f: Family, option: SockOption, ifname: &str) -> OpResult {
    let sock = transport_socket(t, f)?;
    let fd = sock.as_raw_fd();
    let index = if_index(ifname).map_err(Failure::other)?;
    let int = |v: u32| (v as libc::c_int).to_ne_bytes().to_vec();
    let (level, name, value) = match option {
        SockOption::BindToDevice => (
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            ifname.as_bytes().to_vec(),
        ),
        SockOption::BindToIfindex => (libc::SOL_SOCKET, libc::SO_BINDTOIFINDEX, int(index)),
        // Both take the index in network byte order.
        SockOption::IpUnicastIf => (libc::IPPROTO_IP, libc::IP_UNICAST_IF, int(index.to_be())),
        SockOption::Ipv6UnicastIf => (
            libc::IPPROTO_IPV6,
            libc::IPV6_UNICAST_IF,
            int(index.to_be()),
        ),
        SockOption::Ipv6Pktinfo => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            struct_bytes(&in6_pktinfo(index)),
        ),
        SockOption::Ipv6Pktoptions2292 => {
            let control = Control::new(
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                &struct_bytes(&in6_pktinfo(index)),
            );
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_2292PKTOPTIONS,
                control.bytes().to_vec(),
            )
        }
    };
    setsockopt_bytes(fd, level, name, &value)
}

/// `cmsg-sendto` / `cmsg-send`: one datagram with one control message.
fn cmsg_send(connected: bool, f: Family, to: SocketAddr, cmsg: &Cmsg, data: &[u8]) -> OpResult {
    let sock = transport_socket(Transport::Udp, f)?;
    let fd = sock.as_raw_fd();
    let addr = sock_addr(f, to);
    if connected {
        connect_fd(fd, Transport::Udp, &addr)?;
    }
    let mut control = match (cmsg, f) {
        (Cmsg::Pktinfo(ifname), Family::V4) => {
            let index = if_index(ifname).map_err(Failure::other)?;
            let info = libc::in_pktinfo {
                ipi_ifindex: index as libc::c_int,
                ipi_spec_dst: libc::in_addr { s_addr: 0 },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            Control::new(libc::IPPROTO_IP, libc::IP_PKTINFO, &struct_bytes(&info))
        }
        (Cmsg::Pktinfo(ifname), Family::V6) => {
            let index = if_index(ifname).map_err(Failure::other)?;
            Control::new(
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                &struct_bytes(&in6_pktinfo(index)),
            )
        }
        (Cmsg::Tos(tos), Family::V4) => Control::new(
            libc::IPPROTO_IP,
            libc::IP_TOS,
            &libc::c_int::from(*tos).to_ne_bytes(),
        ),
        (Cmsg::Tos(tos), Family::V6) => Control::new(
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            &libc::c_int::from(*tos).to_ne_bytes(),
        ),
    };
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf.as_mut_ptr().cast();
    msg.msg_controllen = control.len as _;
    if !connected {
        msg.msg_name = addr.ptr().cast_mut().cast();
        msg.msg_namelen = addr.len;
    }
    // SAFETY: every pointer in msg refers to a buffer that outlives the call.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(Failure::last());
    }
    if n.unsigned_abs() != data.len() {
        return Err(Failure::other(format!("short send: {n} of {}", data.len())));
    }
    Ok(())
}
