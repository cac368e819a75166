//! Sockets and the plain connect and send ops.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use egress_tests::sockaddr::CSockAddr;

use crate::op::{Family, SocketKind, Transport};
use crate::{Failure, OpResult};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `send` waits for the peer to close after our shutdown(SHUT_WR).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

pub fn domain(f: Family) -> libc::c_int {
    match f {
        Family::V4 => libc::AF_INET,
        Family::V6 => libc::AF_INET6,
    }
}

pub fn new_socket(
    family: Family,
    ty: libc::c_int,
    protocol: libc::c_int,
) -> Result<OwnedFd, Failure> {
    // SAFETY: plain syscall; the returned descriptor is owned by the OwnedFd below.
    let fd = unsafe { libc::socket(domain(family), ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(Failure::last());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn transport_socket(t: Transport, f: Family) -> Result<OwnedFd, Failure> {
    match t {
        Transport::Tcp => new_socket(f, libc::SOCK_STREAM, libc::IPPROTO_TCP),
        Transport::Udp => new_socket(f, libc::SOCK_DGRAM, libc::IPPROTO_UDP),
        Transport::Mptcp => new_socket(f, libc::SOCK_STREAM, libc::IPPROTO_MPTCP),
    }
}

pub fn socket_for_kind(kind: SocketKind, f: Family) -> Result<OwnedFd, Failure> {
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

pub fn sock_addr(f: Family, addr: SocketAddr) -> CSockAddr {
    // The parser already made the address match the family; mapped form for v4 on v6.
    let addr = match (f, addr) {
        (Family::V6, SocketAddr::V4(a)) => {
            SocketAddr::new(IpAddr::V6(a.ip().to_ipv6_mapped()), a.port())
        }
        _ => addr,
    };
    CSockAddr::new(addr)
}

pub fn check(ret: libc::c_int) -> Result<libc::c_int, Failure> {
    if ret < 0 {
        Err(Failure::last())
    } else {
        Ok(ret)
    }
}

pub fn set_nonblocking(fd: RawFd, on: bool) -> OpResult {
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

pub fn set_timeout(fd: RawFd, option: libc::c_int, d: Duration) -> OpResult {
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
pub fn wait_ready(fd: RawFd, events: libc::c_short, timeout: Duration) -> OpResult {
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

pub fn so_error(fd: RawFd) -> OpResult {
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
pub fn connect_fd(fd: RawFd, t: Transport, addr: &CSockAddr) -> OpResult {
    let stream = t != Transport::Udp;
    if stream {
        set_nonblocking(fd, true)?;
    }
    // SAFETY: addr points to a valid sockaddr of len bytes.
    let ret = unsafe { libc::connect(fd, addr.ptr(), addr.socklen()) };
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

pub fn connect_only(t: Transport, f: Family, addr: SocketAddr) -> OpResult {
    let sock = transport_socket(t, f)?;
    connect_fd(sock.as_raw_fd(), t, &sock_addr(f, addr))
}

pub fn write_all(fd: RawFd, mut data: &[u8]) -> OpResult {
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
pub fn finish_stream(fd: RawFd) -> OpResult {
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

pub fn send_stream(t: Transport, f: Family, addr: SocketAddr, data: &[u8]) -> OpResult {
    let sock = transport_socket(t, f)?;
    let fd = sock.as_raw_fd();
    connect_fd(fd, t, &sock_addr(f, addr))?;
    set_timeout(fd, libc::SO_SNDTIMEO, IO_TIMEOUT)?;
    write_all(fd, data)?;
    finish_stream(fd)
}

pub fn send_datagram(fd: RawFd, data: &[u8], to: Option<&CSockAddr>) -> OpResult {
    let (ptr, len) = to.map_or((std::ptr::null(), 0), |a| (a.ptr(), a.socklen()));
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

pub fn sendto_udp(f: Family, addr: SocketAddr, data: &[u8]) -> OpResult {
    let sock = transport_socket(Transport::Udp, f)?;
    send_datagram(sock.as_raw_fd(), data, Some(&sock_addr(f, addr)))
}

pub fn udp_connect_send(f: Family, addr: SocketAddr, data: &[u8]) -> OpResult {
    let sock = transport_socket(Transport::Udp, f)?;
    let fd = sock.as_raw_fd();
    connect_fd(fd, Transport::Udp, &sock_addr(f, addr))?;
    send_datagram(fd, data, None)
}

pub fn fastopen(t: Transport, f: Family, addr: SocketAddr, data: &[u8]) -> OpResult {
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
            to.socklen(),
        )
    };
    if n < 0 {
        return Err(Failure::last());
    }
    write_all(fd, data.get(n.unsigned_abs()..).unwrap_or_default())?;
    finish_stream(fd)
}
