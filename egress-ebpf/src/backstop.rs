//! The packet backstop (cgroup_skb/egress): what the socket-address hooks cannot see.
//!
//! - An IPv6 routing header (settable without privileges) sends the packet to its first
//!   segment, not to the address connect/sendmsg judged: such packets are refused.
//! - IPv4 options (source routing among them) are refused likewise.
//! - Packets of protocols other than TCP and UDP (ICMP from ping sockets, which run no
//!   sendmsg hook) are judged here by their destination: loopback as the policy says,
//!   anything else refused, as no rule can allow those protocols.
//!
//! TCP and UDP packets without those headers pass: their destination was judged at connect
//! or send time. Only packets of sockets in the cgroup reach this program.

use aya_ebpf::programs::SkBuffContext;
use egress_common::{Decision, Dest, Proto, Reason, verdict::NO_RULE};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_DEST: u8 = 60;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// `None`: pass. Otherwise the decision and the destination it was about.
#[inline(always)]
pub fn judge(ctx: &SkBuffContext) -> Option<(Decision, Dest)> {
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    if proto == ETH_P_IP {
        judge_v4(ctx)
    } else if proto == ETH_P_IPV6 {
        judge_v6(ctx)
    } else {
        None
    }
}

#[inline(always)]
fn refused(reason: Reason, dst: Dest) -> Option<(Decision, Dest)> {
    Some((
        Decision {
            reason,
            rule_id: NO_RULE,
        },
        dst,
    ))
}

#[inline(always)]
fn judge_v4(ctx: &SkBuffContext) -> Option<(Decision, Dest)> {
    let unknown = Dest::v4([0; 4], 0, Proto::Other);
    let Ok(vihl) = ctx.load::<u8>(0) else {
        return refused(Reason::DenyInternal, unknown);
    };
    let Ok(l4) = ctx.load::<u8>(9) else {
        return refused(Reason::DenyInternal, unknown);
    };
    let Ok(daddr) = ctx.load::<[u8; 4]>(16) else {
        return refused(Reason::DenyInternal, unknown);
    };
    let dst = Dest::v4(
        daddr,
        0,
        if l4 == IPPROTO_TCP {
            Proto::Tcp
        } else if l4 == IPPROTO_UDP {
            Proto::Udp
        } else {
            Proto::Other
        },
    );
    if vihl & 0x0f > 5 {
        return refused(Reason::DenyPacket, dst);
    }
    if l4 == IPPROTO_TCP || l4 == IPPROTO_UDP {
        return None;
    }
    other_protocol(dst)
}

#[inline(always)]
fn judge_v6(ctx: &SkBuffContext) -> Option<(Decision, Dest)> {
    let unknown = Dest::v6([0; 16], 0, Proto::Other);
    let Ok(mut next) = ctx.load::<u8>(6) else {
        return refused(Reason::DenyInternal, unknown);
    };
    let Ok(daddr) = ctx.load::<[u8; 16]>(24) else {
        return refused(Reason::DenyInternal, unknown);
    };
    let mut off: usize = 40;
    // Hop-by-hop and destination options may come first; look through at most three.
    let mut i = 0;
    while i < 3 {
        if next == NEXTHDR_ROUTING {
            return refused(Reason::DenyPacket, Dest::v6(daddr, 0, Proto::Other));
        }
        if next != NEXTHDR_HOP && next != NEXTHDR_DEST {
            break;
        }
        let Ok(n) = ctx.load::<u8>(off) else {
            return refused(Reason::DenyInternal, unknown);
        };
        let Ok(len) = ctx.load::<u8>(off + 1) else {
            return refused(Reason::DenyInternal, unknown);
        };
        next = n;
        off += (usize::from(len) + 1) * 8;
        i += 1;
    }
    if next == NEXTHDR_ROUTING || next == NEXTHDR_HOP || next == NEXTHDR_DEST {
        // Still an extension header after three: refuse rather than guess.
        return refused(Reason::DenyPacket, Dest::v6(daddr, 0, Proto::Other));
    }
    if next == IPPROTO_TCP || next == IPPROTO_UDP {
        return None;
    }
    other_protocol(Dest::v6(daddr, 0, Proto::Other))
}

/// A protocol no rule can allow: the policy core says loopback (if allowed) or refused.
#[inline(always)]
fn other_protocol(dst: Dest) -> Option<(Decision, Dest)> {
    let d = crate::tables::judge_dest(&dst);
    if d.allowed() { None } else { Some((d, dst)) }
}
