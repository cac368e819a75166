//! An op as parsed from its text, and the bounds that keep a mistake from running away.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
    Mptcp,
}

#[derive(Clone, Copy, Debug)]
pub enum SocketKind {
    Raw,
    Icmp,
    Sctp,
    Udplite,
    Tcp,
    Udp,
    Mptcp,
}

#[derive(Clone, Debug)]
pub enum Action {
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
pub struct Op {
    pub text: String,
    pub action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsMode {
    /// A new socket and connect() per query.
    Connect,
    /// One unconnected socket, sendto() per query.
    Socket,
}

/// How a `resolve` or `dnsraw` op carries its DNS message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsProto {
    /// connect() then send(): glibc, Go.
    UdpConnect,
    /// sendto() on an unconnected socket, reply by recvfrom().
    UdpSendto,
    /// 2-byte length framing over a TCP connection.
    Tcp,
}

/// `listen tcp4|tcp6 ADDR|- PORT FOR_MS READY_PATH DATA`.
#[derive(Clone, Debug)]
pub struct Listen {
    pub family: Family,
    /// `None`: no bind(), listen() picks the port.
    pub bind: Option<SocketAddr>,
    pub total: Duration,
    pub ready: std::path::PathBuf,
    pub data: Vec<u8>,
}

/// `resolve DNSPROTO SERVER NAME QTYPE [repeat N] [then-connect tcp4|tcp6 PORT DATA]`.
#[derive(Clone, Debug)]
pub struct Resolve {
    pub proto: DnsProto,
    pub family: Family,
    pub server: SocketAddr,
    /// May contain `{i}`, replaced by the iteration number.
    pub name: String,
    pub qtype: u16,
    pub repeat: u64,
    pub then_connect: Option<(Family, u16, Vec<u8>)>,
}

/// `dnsloop DNSPROTO SERVER NAME EVERY_MS FOR_MS`.
#[derive(Clone, Debug)]
pub struct DnsLoop {
    pub proto: DnsProto,
    pub family: Family,
    pub server: SocketAddr,
    pub name: String,
    pub every: Duration,
    pub total: Duration,
    /// `one-socket`: every query on the same UDP socket (connected once for `udp4|udp6`).
    pub one_socket: bool,
}

/// `dnsserve udp4|udp6 ADDR PORT ANSWER FOR_MS [READY_PATH]`.
#[derive(Clone, Debug)]
pub struct DnsServe {
    pub family: Family,
    pub addr: SocketAddr,
    pub answer: IpAddr,
    pub total: Duration,
    pub ready: Option<std::path::PathBuf>,
}

/// The socket options of the `setsockopt` op: each names an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockOption {
    BindToDevice,
    BindToIfindex,
    IpUnicastIf,
    Ipv6UnicastIf,
    Ipv6Pktinfo,
    Ipv6Pktoptions2292,
}

/// The control message of `cmsg-sendto` and `cmsg-send`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cmsg {
    /// IP_PKTINFO / IPV6_PKTINFO naming this interface, source address unspecified.
    Pktinfo(String),
    /// IP_TOS / IPV6_TCLASS.
    Tos(u8),
}

/// Bounds for `hammer` and `dns`, so a mistake cannot run away.
pub const MAX_THREADS: usize = 64;
pub const MAX_REPEAT: u64 = 100_000;
/// Bound for `resolve ... repeat N`.
pub const MAX_RESOLVE_REPEAT: u64 = 1000;
pub const REPEAT_DEADLINE: Duration = Duration::from_secs(120);
/// Bound for `dnsloop` and `dnsserve` durations.
pub const MAX_LOOP: Duration = Duration::from_secs(120);
/// How long each `dnsloop` query waits for its reply: short, so that a query into a dead
/// proxy port does not hide when the next one is refused.
pub const DNSLOOP_REPLY_TIMEOUT: Duration = Duration::from_millis(300);
/// Bound for `wait-file`.
pub const MAX_WAIT_FILE: Duration = Duration::from_secs(120);
pub const DNS_PORT: u16 = 53;
