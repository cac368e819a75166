//! The per-packet check on the way out (see `egress_common::packet::check_egress`): a loopback
//! destination leaving through another device, an IPv6 routing header, and a packet whose
//! header cannot be read are dropped.

use aya_ebpf::programs::SkBuffContext;
use egress_common::packet::{Dropped, Packet, check_egress};

/// The socket buffer from its network header on.
pub struct Skb<'a>(pub &'a SkBuffContext);

impl Packet for Skb<'_> {
    #[inline(always)]
    fn byte(&self, offset: usize) -> Option<u8> {
        self.0.load::<u8>(offset).ok()
    }

    #[inline(always)]
    fn bytes4(&self, offset: usize) -> Option<[u8; 4]> {
        self.0.load::<[u8; 4]>(offset).ok()
    }

    #[inline(always)]
    fn bytes16(&self, offset: usize) -> Option<[u8; 16]> {
        self.0.load::<[u8; 16]>(offset).ok()
    }
}

/// `skb->protocol` in host order.
#[inline(always)]
pub fn protocol(ctx: &SkBuffContext) -> u16 {
    u16::from_be(ctx.skb.protocol() as u16)
}

#[inline(always)]
pub fn check(ctx: &SkBuffContext) -> Option<Dropped> {
    // SAFETY: a plain read of the context's ifindex field.
    let ifindex = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.skb.skb).ifindex)) };
    check_egress(&Skb(ctx), protocol(ctx), ifindex)
}
