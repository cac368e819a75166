//! setsockopt: the options that would send packets somewhere the connect/sendmsg hooks did
//! not judge. An IPv6 routing header sends each packet to its first segment instead of the
//! socket's destination, and an unprivileged process may set one (IPV6_RTHDR, type 4
//! segment routing); IPv4 options include source routing. Both are refused. (Ancillary data
//! can carry a routing header too, but the kernel accepts only type 2 there, whose first hop
//! is the socket's destination.)

use aya_ebpf::programs::SockoptContext;
use core::ptr::{addr_of, read_volatile};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const IP_OPTIONS: i32 = 4;
const IPV6_2292RTHDR: i32 = 5;
const IPV6_RTHDR: i32 = 57;

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
    (level == SOL_IPV6 && (optname == IPV6_RTHDR || optname == IPV6_2292RTHDR))
        || (level == SOL_IP && optname == IP_OPTIONS)
}
