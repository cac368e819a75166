//! A per-packet check, attached only on kernels that accept a type 2 IPv6 routing header in a
//! message's ancillary data (built with Mobile IPv6): no socket option guard sees that header,
//! and it sends the packet to an address the hooks never judged. Every outgoing IPv6 packet
//! whose header chain holds a routing header is dropped.

use aya_ebpf::programs::SkBuffContext;

/// EtherType of IPv6 in `skb->protocol` (network order as the context reads it).
const ETH_P_IPV6: u32 = 0x86dd;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_DEST: u8 = 60;
const IPV6_HEADER_LEN: usize = 40;
/// Extension headers looked through before the routing header would have to come.
const MAX_EXTENSIONS: usize = 4;

/// What a packet holds: a routing header (then its IPv6 destination, for the event), or not.
#[inline(always)]
pub fn routing_header(ctx: &SkBuffContext) -> Option<[u8; 16]> {
    // skb->protocol holds the EtherType in network order.
    if u32::from(u16::from_be(ctx.skb.protocol() as u16)) != ETH_P_IPV6 {
        return None;
    }
    let mut next: u8 = ctx.load(6).ok()?;
    let mut off = IPV6_HEADER_LEN;
    let mut i = 0;
    while i < MAX_EXTENSIONS {
        match next {
            NEXTHDR_ROUTING => {
                let dst: [u8; 16] = ctx.load(24).unwrap_or([0; 16]);
                return Some(dst);
            }
            NEXTHDR_HOP | NEXTHDR_DEST => {
                next = ctx.load(off).ok()?;
                let len: u8 = ctx.load(off + 1).ok()?;
                off += (usize::from(len) + 1) * 8;
            }
            _ => return None,
        }
        i += 1;
    }
    // Deeper chains than any sender needs before a routing header: treat as one.
    Some(ctx.load(24).unwrap_or([0; 16]))
}
