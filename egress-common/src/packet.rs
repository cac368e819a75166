//! The per-packet checks' reading of IP headers, as pure functions over a [`Packet`] (the
//! kernel reads the socket buffer, the tests a byte slice), so that every header that cannot
//! be read has a deliberate verdict the tests can reach.
//!
//! The workload's own packets always carry whole headers: the kernel builds them. Only a raw
//! socket (which takes `CAP_NET_RAW` and `allow_other_socket_types: true`) can hand the
//! egress check a packet shorter than its header; the TCP stack has parsed a received
//! packet's header before the inbound check runs. Both checks drop what they cannot read,
//! with [`Reason::DenyPacketUnreadable`].

use crate::counters::Reason;
use crate::dest::{Dest, Family, Proto};

/// EtherTypes in `skb->protocol`.
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// The loopback device has this index in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_DEST: u8 = 60;
const IPV6_HEADER_LEN: usize = 40;
/// Extension headers looked through before the routing header would have to come.
const MAX_EXTENSIONS: usize = 4;
/// Offsets in the IPv4 and IPv6 headers.
const V4_SRC: usize = 12;
const V4_DST: usize = 16;
const V6_NEXT_HEADER: usize = 6;
const V6_SRC: usize = 8;
const V6_DST: usize = 24;

/// Reads of a packet from its network header on; `None` past its end.
pub trait Packet {
    fn byte(&self, offset: usize) -> Option<u8>;
    fn bytes4(&self, offset: usize) -> Option<[u8; 4]>;
    fn bytes16(&self, offset: usize) -> Option<[u8; 16]>;
}

/// Why the egress check drops a packet, and where it was going (port 0, protocol other: the
/// check reads no transport header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub reason: Reason,
    pub dst: Dest,
}

/// The egress check, for what no socket hook can see: the ancillary data of a message can name
/// an output interface (IP_PKTINFO, IPV6_PKTINFO) and, on kernels built with Mobile IPv6, carry
/// a type 2 routing header. Dropped are:
/// - a packet to a loopback address leaving through a device other than loopback (the
///   interface named per message sends even `::1` out of it, onto the wire);
/// - an IPv6 packet whose header chain holds a routing header (it goes to an address the hooks
///   never judged), or is deeper than any sender needs before one;
/// - a packet whose destination or header chain cannot be read, or that is neither IPv4 nor
///   IPv6 (the kernel runs this check only for IP output, so nothing else can arrive).
///
/// `None`: the packet passes (the hot path, not counted).
#[inline(always)]
pub fn check_egress<P: Packet>(p: &P, protocol: u16, ifindex: u32) -> Option<Dropped> {
    let unreadable = |dst: Dest| {
        Some(Dropped {
            reason: Reason::DenyPacketUnreadable,
            dst,
        })
    };
    match protocol {
        ETH_P_IP => {
            if ifindex == LOOPBACK_IFINDEX {
                return None;
            }
            let Some(d) = p.bytes4(V4_DST) else {
                return unreadable(Dest::v4([0; 4], 0, Proto::Other));
            };
            if d[0] != 127 {
                return None;
            }
            Some(Dropped {
                reason: Reason::DenyLoopbackOffDevice,
                dst: Dest::v4(d, 0, Proto::Other),
            })
        }
        ETH_P_IPV6 => {
            let Some(d) = p.bytes16(V6_DST) else {
                return unreadable(Dest::v6([0; 16], 0, Proto::Other));
            };
            let dst = Dest::v6(d, 0, Proto::Other);
            if ifindex != LOOPBACK_IFINDEX && is_loopback_address(&dst) {
                return Some(Dropped {
                    reason: Reason::DenyLoopbackOffDevice,
                    dst,
                });
            }
            match routing_header(p) {
                Chain::Plain => None,
                Chain::Routing => Some(Dropped {
                    reason: Reason::DenyRoutingHeader,
                    dst,
                }),
                Chain::Unreadable => unreadable(dst),
            }
        }
        _ => unreadable(Dest::v4([0; 4], 0, Proto::Other)),
    }
}

/// ::1, or ::ffff:127.x.y.z (canonical: 127.x.y.z). The unspecified addresses are no
/// packet's destination.
#[inline(always)]
const fn is_loopback_address(dst: &Dest) -> bool {
    match dst.family {
        Family::V4 => dst.addr[0] == 127,
        Family::V6 => dst.is_ipv6_localhost(),
    }
}

/// What an IPv6 header chain holds, as far as the egress check looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chain {
    /// No routing header within [`MAX_EXTENSIONS`] extension headers.
    Plain,
    /// A routing header, or more extension headers than any sender needs before one.
    Routing,
    /// A header of the chain is past the end of the packet.
    Unreadable,
}

#[inline(always)]
fn routing_header<P: Packet>(p: &P) -> Chain {
    let Some(mut next) = p.byte(V6_NEXT_HEADER) else {
        return Chain::Unreadable;
    };
    let mut off = IPV6_HEADER_LEN;
    let mut i = 0;
    while i < MAX_EXTENSIONS {
        match next {
            NEXTHDR_ROUTING => return Chain::Routing,
            NEXTHDR_HOP | NEXTHDR_DEST => {
                let (Some(n), Some(len)) = (p.byte(off), p.byte(off + 1)) else {
                    return Chain::Unreadable;
                };
                next = n;
                off += (len as usize + 1) * 8;
            }
            _ => return Chain::Plain,
        }
        i += 1;
    }
    Chain::Routing
}

/// The peer of a packet to a listening socket, with the listener's `local_port` as its port;
/// `Err` when its source address cannot be read (or it is neither IPv4 nor IPv6): the
/// inbound check drops it.
#[inline(always)]
pub fn listener_peer<P: Packet>(p: &P, protocol: u16, local_port: u16) -> Result<Dest, Reason> {
    match protocol {
        ETH_P_IP => match p.bytes4(V4_SRC) {
            Some(src) => Ok(Dest::v4(src, local_port, Proto::Tcp)),
            None => Err(Reason::DenyPacketUnreadable),
        },
        ETH_P_IPV6 => match p.bytes16(V6_SRC) {
            Some(src) => Ok(Dest::v6(src, local_port, Proto::Tcp)),
            None => Err(Reason::DenyPacketUnreadable),
        },
        _ => Err(Reason::DenyPacketUnreadable),
    }
}

#[cfg(test)]
#[path = "packet_tests.rs"]
mod tests;
