//! The op grammar (documented in `egress_tests::probe`): text to [`Op`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::op::{
    Action, Cmsg, DNS_PORT, DnsLoop, DnsMode, DnsProto, DnsServe, Family, Listen, MAX_LOOP,
    MAX_REPEAT, MAX_THREADS, MAX_WAIT_FILE, Op, SockOption, SocketKind, Transport,
};
use crate::resolve::{
    DNS_PROTO_EXPECTED, parse_dns_proto, parse_hex, parse_resolve, rest_after, valid_query_name,
};

pub fn parse_args(args: &[String]) -> Result<Vec<Op>, String> {
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

pub fn parse_op(text: &str) -> Result<Op, String> {
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
pub fn parse_ms(s: &str) -> Option<Duration> {
    s.parse()
        .ok()
        .map(Duration::from_millis)
        .filter(|d| *d <= MAX_LOOP)
}

/// An interface name as the kernel takes it: 1..=15 bytes, no `/`, whitespace or NUL.
pub fn valid_ifname(s: &str) -> bool {
    (1..16).contains(&s.len())
        && s.is_ascii()
        && !s.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
}

/// `pktinfo=IFNAME` or `tos=N`.
pub fn parse_cmsg(s: &str) -> Option<Cmsg> {
    let (kind, value) = s.split_once('=')?;
    match kind {
        "pktinfo" => valid_ifname(value).then(|| Cmsg::Pktinfo(value.to_owned())),
        "tos" => value.parse().ok().map(Cmsg::Tos),
        _ => None,
    }
}

/// The index of interface `name` in the probe's network namespace, or a number as given.
pub fn if_index(name: &str) -> Result<u32, String> {
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
pub fn parse_sock_addr(family: Family, s: &str, port: u16) -> Result<SocketAddr, String> {
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

pub fn parse_proto(s: &str) -> Option<(Transport, Family)> {
    let (t, f) = s.split_at_checked(s.len().checked_sub(1)?)?;
    let transport = match t {
        "tcp" => Transport::Tcp,
        "udp" => Transport::Udp,
        "mptcp" => Transport::Mptcp,
        _ => return None,
    };
    Some((transport, parse_family(f)?))
}

pub fn parse_kind(s: &str) -> Option<(SocketKind, Family)> {
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

pub fn parse_family(s: &str) -> Option<Family> {
    match s {
        "4" => Some(Family::V4),
        "6" => Some(Family::V6),
        _ => None,
    }
}

pub fn parse_ip(family: Family, s: &str) -> Option<IpAddr> {
    let ip: IpAddr = s.parse().ok()?;
    match (family, ip) {
        (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_)) => Some(ip),
        (Family::V6, IpAddr::V4(v4)) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
        (Family::V4, IpAddr::V6(_)) => None,
    }
}
