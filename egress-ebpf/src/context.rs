//! Reading the destination out of a sock_addr context.
//!
//! Which hook runs does not tell the socket's family (an AF_INET6 socket sending to a mapped
//! address runs sendmsg4), so each reader only trusts the hook's own address field, and the
//! IPv6 reader canonicalises mapped addresses to IPv4. Fields are read whole (32-bit,
//! volatile) so the compiler never emits a narrow context load the verifier might refuse.

use aya_ebpf::programs::SockAddrContext;
use core::ptr::{addr_of, read_volatile};
use egress_common::{Dest, Proto};

#[inline(always)]
fn port_and_proto(ctx: &SockAddrContext) -> (u16, Proto) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr; the verifier checks each access.
    let (user_port, protocol) = unsafe {
        (
            read_volatile(addr_of!((*sa).user_port)),
            read_volatile(addr_of!((*sa).protocol)),
        )
    };
    // user_port holds the port in network order in its first two bytes.
    (
        u16::from_be(user_port as u16),
        Proto::from_ip_proto(protocol),
    )
}

#[inline(always)]
pub fn dest4(ctx: &SockAddrContext) -> Dest {
    let sa = ctx.sock_addr;
    // SAFETY: as above.
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    let (port, proto) = port_and_proto(ctx);
    Dest::v4(ip.to_ne_bytes(), port, proto)
}

#[inline(always)]
pub fn dest6(ctx: &SockAddrContext) -> Dest {
    let sa = ctx.sock_addr;
    // SAFETY: as above.
    let w = unsafe {
        [
            read_volatile(addr_of!((*sa).user_ip6[0])),
            read_volatile(addr_of!((*sa).user_ip6[1])),
            read_volatile(addr_of!((*sa).user_ip6[2])),
            read_volatile(addr_of!((*sa).user_ip6[3])),
        ]
    };
    let (port, proto) = port_and_proto(ctx);
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    Dest::v6(addr, port, proto)
}
