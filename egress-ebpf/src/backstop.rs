//! The per-packet check, for what no socket hook can see: the ancillary data of a message can
//! name an output interface (IP_PKTINFO, IPV6_PKTINFO) and, on kernels built with Mobile
//! IPv6, carry a type 2 routing header. Dropped on the way out:
//! - a packet to a loopback address leaving through a device other than loopback (the
//!   interface named per message sends even `::1` out of it, onto the wire);
//! - an IPv6 packet whose header chain holds a routing header (it goes to an address the
//!   hooks never judged).

use aya_ebpf::programs::SkBuffContext;

/// EtherTypes in `skb->protocol`.
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// The loopback device has this index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_DEST: u8 = 60;
const IPV6_HEADER_LEN: usize = 40;
/// Extension headers looked through before the routing header would have to come.
const MAX_EXTENSIONS: usize = 4;

pub enum Drop {
    /// A loopback destination off the loopback device: IPv4 (first four bytes) or IPv6.
    LoopbackOffDevice { v6: bool, dst: [u8; 16] },
    /// An IPv6 routing header; the packet's IPv6 destination.
    RoutingHeader { dst: [u8; 16] },
}

#[inline(always)]
pub fn check(ctx: &SkBuffContext) -> Option<Drop> {
    let protocol = u16::from_be(ctx.skb.protocol() as u16);
    // SAFETY: a plain read of the context's ifindex field.
    let ifindex = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.skb.skb).ifindex)) };
    match protocol {
        ETH_P_IP => {
            if ifindex == LOOPBACK_IFINDEX {
                return None;
            }
            let d: [u8; 4] = ctx.load(16).ok()?;
            if d[0] != 127 {
                return None;
            }
            let mut dst = [0u8; 16];
            dst[..4].copy_from_slice(&d);
            Some(Drop::LoopbackOffDevice { v6: false, dst })
        }
        ETH_P_IPV6 => {
            let dst: [u8; 16] = ctx.load(24).ok()?;
            if ifindex != LOOPBACK_IFINDEX && is_loopback6(&dst) {
                return Some(Drop::LoopbackOffDevice { v6: true, dst });
            }
            routing_header(ctx).then_some(Drop::RoutingHeader { dst })
        }
        _ => None,
    }
}

/// ::1, or ::ffff:127.x.y.z.
#[inline(always)]
fn is_loopback6(a: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    let one = a[10] == 0 && a[11] == 0 && a[12] == 0 && a[13] == 0 && a[14] == 0 && a[15] == 1;
    let mapped = a[10] == 0xff && a[11] == 0xff && a[12] == 127;
    one || mapped
}

/// Whether the IPv6 header chain holds a routing header (or is deeper than any sender needs
/// before one, which counts as holding one).
#[inline(always)]
fn routing_header(ctx: &SkBuffContext) -> bool {
    let Ok(mut next) = ctx.load::<u8>(6) else {
        return false;
    };
    let mut off = IPV6_HEADER_LEN;
    let mut i = 0;
    while i < MAX_EXTENSIONS {
        match next {
            NEXTHDR_ROUTING => return true,
            NEXTHDR_HOP | NEXTHDR_DEST => {
                let (Ok(n), Ok(len)) = (ctx.load::<u8>(off), ctx.load::<u8>(off + 1)) else {
                    return true;
                };
                next = n;
                off += (usize::from(len) + 1) * 8;
            }
            _ => return false,
        }
        i += 1;
    }
    true
}
