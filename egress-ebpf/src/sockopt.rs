//! setsockopt: the options that would send packets somewhere the connect/sendmsg hooks did
//! not judge, or out of a device their destination does not route through. All are refused:
//! - an IPv6 routing header sends each packet to its first segment instead of the socket's
//!   destination, and an unprivileged process may set one (IPV6_RTHDR, type 4 segment
//!   routing; the RFC 2292 forms IPV6_2292RTHDR and IPV6_2292PKTOPTIONS, which can carry one);
//!   IPv4 options include source routing (IP_OPTIONS);
//! - binding a socket to a device (SO_BINDTODEVICE, SO_BINDTOIFINDEX, IP_UNICAST_IF,
//!   IPV6_UNICAST_IF, and the sticky IPV6_PKTINFO with an interface) sends even a loopback
//!   destination, the DNS proxy's included, out of that device onto the wire.
//!
//! Ancillary data can name an interface per message too (IP_PKTINFO, IPV6_PKTINFO): the send
//! hooks give every loopback destination a loopback source, which the kernel refuses to send
//! out of any other device. (Ancillary data can also carry a type 2 routing header, accepted
//! only by kernels built with Mobile IPv6; see docs/dns.md.)

use aya_ebpf::programs::SockoptContext;
use core::ptr::{addr_of, read_volatile};

const SOL_IP: i32 = 0;
const SOL_SOCKET: i32 = 1;
const SOL_IPV6: i32 = 41;
const IP_OPTIONS: i32 = 4;
const IP_UNICAST_IF: i32 = 50;
const SO_BINDTODEVICE: i32 = 25;
const SO_BINDTOIFINDEX: i32 = 62;
const IPV6_2292RTHDR: i32 = 5;
const IPV6_2292PKTOPTIONS: i32 = 6;
const IPV6_PKTINFO: i32 = 50;
const IPV6_RTHDR: i32 = 57;
const IPV6_UNICAST_IF: i32 = 76;

#[inline(always)]
pub fn read(ctx: &SockoptContext) -> (i32, i32) {
    let so = ctx.sockopt;
    // SAFETY: the kernel passes a valid bpf_sockopt; whole 32-bit reads.
    unsafe {
        (
            read_volatile(addr_of!((*so).level)),
            read_volatile(addr_of!((*so).optname)),
        )
    }
}

#[inline(always)]
pub fn reroutes(level: i32, optname: i32) -> bool {
    match level {
        SOL_IPV6 => matches!(
            optname,
            IPV6_RTHDR | IPV6_2292RTHDR | IPV6_2292PKTOPTIONS | IPV6_PKTINFO | IPV6_UNICAST_IF
        ),
        SOL_IP => matches!(optname, IP_OPTIONS | IP_UNICAST_IF),
        SOL_SOCKET => matches!(optname, SO_BINDTODEVICE | SO_BINDTOIFINDEX),
        _ => false,
    }
}
