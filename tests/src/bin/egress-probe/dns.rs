//! DNS messages and one query-reply exchange over UDP or TCP.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use crate::Failure;
use crate::op::{DnsProto, Family, Transport};
use crate::sock::{
    IO_TIMEOUT, connect_fd, send_datagram, set_timeout, sock_addr, transport_socket, write_all,
};

/// A DNS query for `name`, type A, class IN, recursion desired.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    dns_query_typed(id, name, 1)
}

/// A DNS query for `name` (a trailing dot is optional), type `qtype`, class IN, recursion
/// desired, no EDNS.
pub fn dns_query_typed(id: u16, name: &str, qtype: u16) -> Vec<u8> {
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
pub struct Reply {
    pub rcode: u8,
    pub addrs: Vec<IpAddr>,
}

/// Past a (possibly compressed) name at `pos`; `None` when it runs off the message.
pub fn skip_name(msg: &[u8], mut pos: usize) -> Option<usize> {
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

pub fn be16(msg: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]))
}

/// The rcode and the A/AAAA records of the answer section of a reply to query `id`.
pub fn parse_reply(id: u16, msg: &[u8]) -> Result<Reply, String> {
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

pub fn socket_addr_from_c(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
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
pub fn recv_from(fd: RawFd) -> Result<(Vec<u8>, Option<SocketAddr>), Failure> {
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

pub fn peer_addr(fd: RawFd) -> Option<SocketAddr> {
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
pub fn read_exact_fd(fd: RawFd, buf: &mut [u8]) -> Result<bool, Failure> {
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
pub fn dns_exchange(
    proto: DnsProto,
    f: Family,
    server: SocketAddr,
    msg: &[u8],
) -> Result<(Vec<u8>, Option<SocketAddr>), Failure> {
    dns_exchange_within(proto, f, server, msg, IO_TIMEOUT)
}

/// [`dns_exchange`] with `timeout` for the reply (and for the TCP connect and writes).
pub fn dns_exchange_within(
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

/// An answer to query `id`: a response, NOERROR, at least one answer record.
pub fn dns_answered(id: u16, reply: &[u8]) -> bool {
    reply.len() >= 12
        && reply[..2] == id.to_be_bytes()
        && reply[2] & 0x80 != 0
        && reply[3] & 0x0f == 0
        && u16::from_be_bytes([reply[6], reply[7]]) > 0
}

pub fn recv_reply(fd: RawFd) -> Result<Vec<u8>, Failure> {
    recv_from(fd).map(|(reply, _)| reply)
}
