//! DNS queries go to the agent's proxy: connect/sendmsg to port 53 is rewritten to the slot's
//! proxy on loopback, and recvmsg/getpeername put the queried address back, so that the
//! workload's resolver accepts the answer as coming from the server it asked.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    },
    programs::SockAddrContext,
};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use egress_common::{
    Dest, Family,
    maps::{DNS_UNAUTHORIZED_PORT_OFFSET, DnsOrigin, ResolverKey},
};

use crate::maps::{DNS_ALIVE as ALIVE, DNS_ORIGINS as ORIGINS, DNS_RESOLVERS as RESOLVERS, slot};

/// Whether the slot authorizes queries addressed to `dst`'s address.
#[inline(always)]
pub fn authorized(dst: &Dest) -> bool {
    let key = ResolverKey::for_dest(slot(), dst);
    // SAFETY: only presence is read.
    unsafe { RESOLVERS.get(key) }.is_some()
}

/// Whether the slot's proxy was alive within its last renewal (the agent renews the deadline
/// every second; a stopped agent lets it lapse within seconds, or clears it on the way out).
#[inline(always)]
pub fn alive() -> bool {
    let Some(until) = ALIVE.get(slot()) else {
        return false;
    };
    // SAFETY: reads the clock; available to every program type.
    let now = unsafe { bpf_ktime_get_boot_ns() } / 1_000_000_000;
    now <= u64::from(*until)
}

/// sendmsg4: a loopback destination leaves with source 127.0.0.1, which the kernel refuses
/// to send out of any device but loopback (an interface named in ancillary data would
/// otherwise put the packet on the wire).
#[inline(always)]
pub fn loopback_source4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: msg_src_ip4 is writable in sendmsg4.
    unsafe {
        write_volatile(
            addr_of_mut!((*sa).msg_src_ip4),
            u32::from_ne_bytes(LOOPBACK4),
        )
    };
}

/// sendmsg6: as [`loopback_source4`], with source ::1.
#[inline(always)]
pub fn loopback_source6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let one = u32::from_ne_bytes([0, 0, 0, 1]);
    // SAFETY: msg_src_ip6 is writable in sendmsg6.
    unsafe {
        write_volatile(addr_of_mut!((*sa).msg_src_ip6[0]), 0);
        write_volatile(addr_of_mut!((*sa).msg_src_ip6[1]), 0);
        write_volatile(addr_of_mut!((*sa).msg_src_ip6[2]), 0);
        write_volatile(addr_of_mut!((*sa).msg_src_ip6[3]), one);
    }
}

/// Whether the socket's connected peer is loopback (for a send that names no address).
#[inline(always)]
pub fn peer_is_loopback(ctx: &SockAddrContext, v6: bool) -> bool {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid bpf_sock_addr whose `sk` is a valid socket; whole
    // 32-bit reads of bpf_sock fields.
    unsafe {
        let sk = read_volatile(addr_of!((*sa).__bindgen_anon_1.sk));
        if v6 {
            let w = [
                read_volatile(addr_of!((*sk).dst_ip6[0])),
                read_volatile(addr_of!((*sk).dst_ip6[1])),
                read_volatile(addr_of!((*sk).dst_ip6[2])),
                read_volatile(addr_of!((*sk).dst_ip6[3])),
            ];
            let mapped_lo = w[0] == 0
                && w[1] == 0
                && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
                && w[3].to_ne_bytes()[0] == 127;
            let lo =
                w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == u32::from_ne_bytes([0, 0, 0, 1]);
            lo || mapped_lo
        } else {
            read_volatile(addr_of!((*sk).dst_ip4)).to_ne_bytes()[0] == 127
        }
    }
}

/// Whether the hook was called without an address: a send on a connected socket with
/// ancillary data (the kernel then hands the hooks AF_UNSPEC).
#[inline(always)]
pub fn no_address(ctx: &SockAddrContext) -> bool {
    let sa = ctx.sock_addr;
    // SAFETY: a whole 32-bit context read.
    unsafe { read_volatile(addr_of!((*sa).user_family)) == 0 }
}

const LOOPBACK4: [u8; 4] = [127, 0, 0, 1];

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper takes the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// Remembers where the socket's query was going. The origin is kept canonical: an IPv4 (or
/// IPv4-mapped) destination as IPv4.
#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: &Dest) {
    let origin = DnsOrigin {
        addr: dst.addr,
        port_be: dst.port.to_be(),
        family: match dst.family {
            Family::V4 => DnsOrigin::FAMILY_V4,
            Family::V6 => DnsOrigin::FAMILY_V6,
        },
        _pad: 0,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    // A failed insert only means the answer shows the proxy's address; the resolver then
    // ignores it, which fails closed.
    let _ = ORIGINS.insert(cookie(ctx), origin, 0);
}

#[inline(always)]
fn write_ip4(ctx: &SockAddrContext, ip: [u8; 4], port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4 and user_port are writable in the 4-family hooks that call this.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip4), u32::from_ne_bytes(ip));
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(port.to_be()));
    }
}

#[inline(always)]
fn write_ip6(ctx: &SockAddrContext, ip: [u8; 16], port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: user_ip6 and user_port are writable in the 6-family hooks that call this.
    unsafe {
        write_volatile(
            addr_of_mut!((*sa).user_ip6[0]),
            u32::from_ne_bytes([ip[0], ip[1], ip[2], ip[3]]),
        );
        write_volatile(
            addr_of_mut!((*sa).user_ip6[1]),
            u32::from_ne_bytes([ip[4], ip[5], ip[6], ip[7]]),
        );
        write_volatile(
            addr_of_mut!((*sa).user_ip6[2]),
            u32::from_ne_bytes([ip[8], ip[9], ip[10], ip[11]]),
        );
        write_volatile(
            addr_of_mut!((*sa).user_ip6[3]),
            u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        );
        write_volatile(addr_of_mut!((*sa).user_port), u32::from(port.to_be()));
    }
}

#[inline(always)]
const fn mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

#[inline(always)]
const fn loopback6() -> [u8; 16] {
    let mut a = [0u8; 16];
    a[15] = 1;
    a
}

/// connect4/sendmsg4: to 127.0.0.1:`proxy`.
#[inline(always)]
pub fn redirect4(ctx: &SockAddrContext, dst: &Dest, proxy: u16) {
    remember(ctx, dst);
    write_ip4(ctx, LOOPBACK4, proxy);
}

/// connect6/sendmsg6: a mapped destination to ::ffff:127.0.0.1 (the socket stays on IPv4),
/// any other to [::1], port `proxy`.
#[inline(always)]
pub fn redirect6(ctx: &SockAddrContext, dst: &Dest, proxy: u16) {
    remember(ctx, dst);
    match dst.family {
        Family::V4 => write_ip6(ctx, mapped(LOOPBACK4), proxy),
        Family::V6 => write_ip6(ctx, loopback6(), proxy),
    }
}

#[inline(always)]
fn read_port(ctx: &SockAddrContext) -> u16 {
    let sa = ctx.sock_addr;
    // SAFETY: a whole 32-bit context read.
    let p = unsafe { read_volatile(addr_of!((*sa).user_port)) };
    u16::from_be(p as u16)
}

/// Whether `port` is one of the proxy's two ports.
#[inline(always)]
fn proxy_port(port: u16, proxy: u16) -> bool {
    proxy != 0 && (port == proxy || port == proxy.wrapping_add(DNS_UNAUTHORIZED_PORT_OFFSET))
}

/// recvmsg/getpeername: while the slot's proxy is alive, an address that is the proxy's
/// becomes the one queried. Nothing to do without a slot, a proxy, or a live proxy.
#[inline(always)]
pub fn restore(ctx: &SockAddrContext, v6: bool) {
    let Ok(cfg) = crate::tables::slot_config() else {
        return;
    };
    if cfg.dns_port == 0 || !alive() {
        return;
    }
    if v6 {
        restore6(ctx, cfg.dns_port);
    } else {
        restore4(ctx, cfg.dns_port);
    }
}

/// recvmsg4/getpeername4: an address that is the proxy's becomes the one queried.
#[inline(always)]
fn restore4(ctx: &SockAddrContext, proxy: u16) {
    if !proxy_port(read_port(ctx), proxy) {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: as above.
    let ip = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    if ip.to_ne_bytes() != LOOPBACK4 {
        return;
    }
    // SAFETY: the value is copied out at once.
    let Some(origin) = (unsafe { ORIGINS.get(cookie(ctx)) }).copied() else {
        return;
    };
    if origin.family == DnsOrigin::FAMILY_V4 {
        write_ip4(
            ctx,
            [
                origin.addr[0],
                origin.addr[1],
                origin.addr[2],
                origin.addr[3],
            ],
            u16::from_be(origin.port_be),
        );
    }
}

/// recvmsg6/getpeername6: as [`restore4`], for [::1] and ::ffff:127.0.0.1.
#[inline(always)]
fn restore6(ctx: &SockAddrContext, proxy: u16) {
    if !proxy_port(read_port(ctx), proxy) {
        return;
    }
    let seen = crate::context::dest6(ctx);
    let from_v4 = seen.family == Family::V4
        && seen.addr[0] == LOOPBACK4[0]
        && seen.addr[1] == LOOPBACK4[1]
        && seen.addr[2] == LOOPBACK4[2]
        && seen.addr[3] == LOOPBACK4[3];
    let from_v6 = seen.family == Family::V6 && seen.addr == loopback6();
    if !from_v4 && !from_v6 {
        return;
    }
    // SAFETY: the value is copied out at once.
    let Some(origin) = (unsafe { ORIGINS.get(cookie(ctx)) }).copied() else {
        return;
    };
    let port = u16::from_be(origin.port_be);
    match origin.family {
        DnsOrigin::FAMILY_V4 if from_v4 => write_ip6(
            ctx,
            mapped([
                origin.addr[0],
                origin.addr[1],
                origin.addr[2],
                origin.addr[3],
            ]),
            port,
        ),
        DnsOrigin::FAMILY_V6 if from_v6 => write_ip6(ctx, origin.addr, port),
        _ => {}
    }
}
