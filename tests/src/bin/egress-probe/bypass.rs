//! Ways around the address the hooks judge: a routing header, a ping socket, socket options
//! and control messages that name an interface.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

use crate::op::{Cmsg, Family, SockOption, Transport};
use crate::parse::if_index;
use crate::sock::{check, connect_fd, new_socket, sock_addr, transport_socket};
use crate::{Failure, OpResult};

/// A UDP datagram to `to` carrying an IPv6 segment-routing header (type 4) whose next segment
/// is `via`: the kernel sends it to `via`, not to `to`. Needs no privilege.
pub fn srh6(via: std::net::Ipv6Addr, to: SocketAddr, data: &[u8]) -> OpResult {
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
    check(unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            0,
            sa.ptr(),
            sa.socklen(),
        )
    } as libc::c_int)?;
    Ok(())
}

/// One ICMP echo request to `to` from an unprivileged ping socket.
pub fn ping4(to: std::net::Ipv4Addr) -> OpResult {
    let sock = new_socket(Family::V4, libc::SOCK_DGRAM, libc::IPPROTO_ICMP)?;
    let fd = sock.as_raw_fd();
    // Echo request: type 8, code 0, checksum and id filled in by the kernel, sequence 1.
    let echo = [8u8, 0, 0, 0, 0, 0, 0, 1, b'p', b'i', b'n', b'g'];
    let sa = sock_addr(Family::V4, SocketAddr::new(IpAddr::V4(to), 0));
    // SAFETY: sendto with a valid buffer and address.
    check(unsafe {
        libc::sendto(
            fd,
            echo.as_ptr().cast(),
            echo.len(),
            0,
            sa.ptr(),
            sa.socklen(),
        )
    } as libc::c_int)?;
    Ok(())
}

/// An IPPROTO_RAW IPv6 socket takes the packet's header from the data (IPV6_HDRINCL is
/// implied); `to` only routes it.
pub fn raw6(to: std::net::Ipv6Addr, packet: &[u8]) -> OpResult {
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
            sa.socklen(),
        )
    } as libc::c_int)?;
    Ok(())
}

/// setsockopt(fd, level, name, value) with `value`'s bytes.
pub fn setsockopt_bytes(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> OpResult {
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
pub fn struct_bytes<T: Copy>(value: &T) -> Vec<u8> {
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

pub fn in6_pktinfo(ifindex: u32) -> libc::in6_pktinfo {
    libc::in6_pktinfo {
        ipi6_addr: libc::in6_addr { s6_addr: [0; 16] },
        ipi6_ifindex: ifindex,
    }
}

/// One control message (level, type, data) in a buffer aligned for cmsghdr.
pub struct Control {
    pub buf: Vec<u64>,
    pub len: usize,
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
pub fn set_sockopt(t: Transport, f: Family, option: SockOption, ifname: &str) -> OpResult {
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
pub fn cmsg_send(connected: bool, f: Family, to: SocketAddr, cmsg: &Cmsg, data: &[u8]) -> OpResult {
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
        msg.msg_namelen = addr.socklen();
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
