//! `dnsloop` (a query at a steady rate, one sample each) and `dnsserve` (a DNS server that
//! answers every query with one address).

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use egress_tests::probe::{DnsSample, ProbeResult, boot_time_ms};
use egress_tests::sockaddr::CSockAddr;

use crate::Failure;
use crate::dns::{be16, dns_exchange_within, dns_query, parse_reply, recv_from, skip_name};
use crate::op::{DNSLOOP_REPLY_TIMEOUT, DnsLoop, DnsProto, DnsServe, Transport};
use crate::resolve::query_id;
use crate::sock::{check, connect_fd, send_datagram, set_timeout, sock_addr, transport_socket};

/// `dnsloop`: a query every `l.every` for `l.total`, each on a fresh socket; one sample per
/// query, whatever became of it.
pub fn dns_loop(text: &str, l: &DnsLoop) -> ProbeResult {
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
pub fn one_dns_socket(l: &DnsLoop) -> Result<OwnedFd, Failure> {
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
pub fn squat_reply(query: &[u8], answer: IpAddr) -> Option<Vec<u8>> {
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
pub fn dns_serve(text: &str, d: &DnsServe) -> ProbeResult {
    let fail = |f: Failure| ProbeResult::failed(text, f.errno, f.error);
    let sock = match transport_socket(Transport::Udp, d.family) {
        Ok(s) => s,
        Err(f) => return fail(f),
    };
    let fd = sock.as_raw_fd();
    let addr = sock_addr(d.family, d.addr);
    // SAFETY: addr points to a valid sockaddr of addr.len bytes.
    if let Err(f) = check(unsafe { libc::bind(fd, addr.ptr(), addr.socklen()) }) {
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
