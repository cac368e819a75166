//! The DNS ops a resolver library would send: `resolve`, `dnsraw` and `dns`, and the parsing
//! of `resolve`'s arguments.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use egress_tests::probe::ProbeResult;

use crate::dns::{dns_answered, dns_exchange, dns_query, dns_query_typed, parse_reply, recv_reply};
use crate::op::{
    DNS_PORT, DnsMode, DnsProto, Family, MAX_RESOLVE_REPEAT, REPEAT_DEADLINE, Resolve, Transport,
};
use crate::parse::{parse_ip, parse_proto};
use crate::sock::{
    IO_TIMEOUT, connect_fd, send_datagram, send_stream, set_timeout, sock_addr, transport_socket,
};
use crate::{Failure, OpResult};

pub const DNS_PROTO_EXPECTED: &str = "DNSPROTO must be udp4|udp6|udp4-sendto|udp6-sendto|tcp4|tcp6";

pub fn parse_dns_proto(s: &str) -> Option<(DnsProto, Family)> {
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
pub fn parse_qtype(s: &str) -> Option<u16> {
    match s.to_ascii_uppercase().as_str() {
        "A" => Some(1),
        "MX" => Some(15),
        "TXT" => Some(16),
        "AAAA" => Some(28),
        "ANY" => Some(255),
        n => n.parse().ok(),
    }
}

pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
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
pub fn valid_query_name(name: &str) -> bool {
    let name = name.replace("{i}", "0000");
    let name = name.strip_suffix('.').unwrap_or(&name);
    !name.is_empty()
        && name.len() <= 253
        && name.is_ascii()
        && name.split('.').all(|l| !l.is_empty() && l.len() <= 63)
}

/// The text after the first `n` whitespace-separated fields of `text`.
pub fn rest_after(text: &str, n: usize) -> Option<&str> {
    let mut rest = text.trim_start();
    for _ in 0..n {
        let end = rest.find(char::is_whitespace)?;
        rest = rest[end..].trim_start();
    }
    (!rest.is_empty()).then_some(rest)
}

pub fn parse_resolve(text: &str, fields: &[&str]) -> Result<Resolve, String> {
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

/// The address `then-connect` goes to: for tcp4 the first IPv4 address; for tcp6 the first
/// IPv6 address, else the first IPv4 address (mapped by `sock_addr`).
pub fn first_addr(f: Family, addrs: &[IpAddr]) -> Option<IpAddr> {
    let v4 = addrs.iter().copied().find(IpAddr::is_ipv4);
    match f {
        Family::V4 => v4,
        Family::V6 => addrs.iter().copied().find(IpAddr::is_ipv6).or(v4),
    }
}

/// A query id that differs between iterations and between probe runs.
pub fn query_id(i: u64) -> u16 {
    (std::process::id() as u16)
        .wrapping_mul(0x9e37)
        .wrapping_add(i as u16)
}

/// `resolve`: `r.repeat` iterations of query, answer, and (with then-connect) an immediate
/// connection to the answered address; stops at the first failure.
pub fn resolve(text: &str, r: &Resolve) -> ProbeResult {
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
pub fn dns_raw(
    text: &str,
    proto: DnsProto,
    f: Family,
    server: SocketAddr,
    msg: &[u8],
) -> ProbeResult {
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

pub fn dns_once(
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
pub fn dns(
    text: &str,
    mode: DnsMode,
    f: Family,
    addr: SocketAddr,
    name: &str,
    n: u64,
) -> ProbeResult {
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
