//! The per-packet checks over packets held in byte slices, truncated where it matters.

use super::*;

struct Bytes<'a>(&'a [u8]);

impl Packet for Bytes<'_> {
    fn byte(&self, offset: usize) -> Option<u8> {
        self.0.get(offset).copied()
    }
    fn bytes4(&self, offset: usize) -> Option<[u8; 4]> {
        self.0.get(offset..offset + 4)?.try_into().ok()
    }
    fn bytes16(&self, offset: usize) -> Option<[u8; 16]> {
        self.0.get(offset..offset + 16)?.try_into().ok()
    }
}

const VETH: u32 = 7;

fn v4_packet(src: [u8; 4], dst: [u8; 4]) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0] = 0x45;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

/// An IPv6 header to `dst` followed by `ext` (next header values and lengths of extension
/// headers, in order), then 8 bytes of UDP.
fn v6_packet(dst: [u8; 16], ext: &[(u8, u8)]) -> [u8; 256] {
    let mut p = [0u8; 256];
    p[0] = 0x60;
    let mut src = [0u8; 16];
    src[0] = 0xfd;
    src[15] = 9;
    p[8..24].copy_from_slice(&src);
    p[24..40].copy_from_slice(&dst);
    let mut off = 40;
    let mut next_at = 6;
    for &(kind, len) in ext {
        p[next_at] = kind;
        next_at = off;
        p[off + 1] = len;
        off += (usize::from(len) + 1) * 8;
    }
    p[next_at] = 17;
    p
}

fn v6(last: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[15] = last;
    a
}

fn loopback6() -> [u8; 16] {
    let mut a = [0u8; 16];
    a[15] = 1;
    a
}

#[test]
fn ipv4_to_loopback_is_dropped_only_off_the_loopback_device() {
    let lo = v4_packet([127, 0, 0, 1], [127, 0, 0, 5]);
    assert_eq!(check_egress(&Bytes(&lo), ETH_P_IP, LOOPBACK_IFINDEX), None);
    assert_eq!(
        check_egress(&Bytes(&lo), ETH_P_IP, VETH),
        Some(Dropped {
            reason: Reason::DenyLoopbackOffDevice,
            dst: Dest::v4([127, 0, 0, 5], 0, Proto::Other),
        })
    );
    let out = v4_packet([198, 18, 0, 1], [198, 18, 0, 2]);
    assert_eq!(check_egress(&Bytes(&out), ETH_P_IP, VETH), None);
}

#[test]
fn a_packet_whose_header_cannot_be_read_is_dropped_as_unreadable() {
    let unreadable4 = Some(Dropped {
        reason: Reason::DenyPacketUnreadable,
        dst: Dest::v4([0; 4], 0, Proto::Other),
    });
    let v4 = v4_packet([198, 18, 0, 1], [198, 18, 0, 2]);
    for len in [0, 12, 16, 19] {
        assert_eq!(
            check_egress(&Bytes(&v4[..len]), ETH_P_IP, VETH),
            unreadable4,
            "{len} bytes"
        );
    }
    assert_eq!(check_egress(&Bytes(&v4[..20]), ETH_P_IP, VETH), None);
    // On the loopback device an IPv4 packet is not read at all.
    assert_eq!(
        check_egress(&Bytes(&v4[..3]), ETH_P_IP, LOOPBACK_IFINDEX),
        None
    );
    let v6p = v6_packet(v6(2), &[]);
    for len in [0, 6, 24, 39] {
        assert_eq!(
            check_egress(&Bytes(&v6p[..len]), ETH_P_IPV6, VETH),
            Some(Dropped {
                reason: Reason::DenyPacketUnreadable,
                dst: Dest::v6([0; 16], 0, Proto::Other),
            }),
            "{len} bytes"
        );
    }
    assert_eq!(check_egress(&Bytes(&v6p[..40]), ETH_P_IPV6, VETH), None);
    // Neither IPv4 nor IPv6.
    assert_eq!(check_egress(&Bytes(&v4), 0x0806, VETH), unreadable4);
}

#[test]
fn ipv6_header_chains_are_read_to_the_routing_header_or_dropped() {
    let dst = Dest::v6(v6(2), 0, Proto::Other);
    let verdict = |p: &[u8]| check_egress(&Bytes(p), ETH_P_IPV6, VETH).map(|d| d.reason);
    assert_eq!(verdict(&v6_packet(v6(2), &[])), None);
    assert_eq!(verdict(&v6_packet(v6(2), &[(NEXTHDR_HOP, 0)])), None);
    assert_eq!(
        check_egress(
            &Bytes(&v6_packet(v6(2), &[(NEXTHDR_HOP, 0), (NEXTHDR_ROUTING, 2)])),
            ETH_P_IPV6,
            LOOPBACK_IFINDEX
        ),
        Some(Dropped {
            reason: Reason::DenyRoutingHeader,
            dst
        }),
        "the routing header is looked for on every device"
    );
    assert_eq!(
        verdict(&v6_packet(
            v6(2),
            &[(NEXTHDR_DEST, 1), (NEXTHDR_ROUTING, 2)]
        )),
        Some(Reason::DenyRoutingHeader)
    );
    // Deeper than any sender needs before a routing header: counted as holding one.
    let deep = [
        (NEXTHDR_HOP, 0),
        (NEXTHDR_DEST, 0),
        (NEXTHDR_DEST, 0),
        (NEXTHDR_DEST, 0),
    ];
    assert_eq!(
        verdict(&v6_packet(v6(2), &deep)),
        Some(Reason::DenyRoutingHeader)
    );
    assert_eq!(verdict(&v6_packet(v6(2), &deep[..3])), None);
    // An extension header cut off: unreadable, with the destination that could be read.
    let cut = v6_packet(v6(2), &[(NEXTHDR_HOP, 0), (NEXTHDR_DEST, 0)]);
    for len in [40, 41, 48, 49] {
        assert_eq!(
            check_egress(&Bytes(&cut[..len]), ETH_P_IPV6, VETH),
            Some(Dropped {
                reason: Reason::DenyPacketUnreadable,
                dst
            }),
            "{len} bytes"
        );
    }
    assert_eq!(verdict(&cut[..50]), None);
}

#[test]
fn ipv6_loopback_off_the_loopback_device_is_dropped() {
    let mut mapped = [0u8; 16];
    mapped[10] = 0xff;
    mapped[11] = 0xff;
    mapped[12] = 127;
    mapped[15] = 1;
    for addr in [loopback6(), mapped] {
        let p = v6_packet(addr, &[]);
        assert_eq!(
            check_egress(&Bytes(&p), ETH_P_IPV6, VETH),
            Some(Dropped {
                reason: Reason::DenyLoopbackOffDevice,
                dst: Dest::v6(addr, 0, Proto::Other),
            })
        );
        assert_eq!(check_egress(&Bytes(&p), ETH_P_IPV6, LOOPBACK_IFINDEX), None);
    }
}

#[test]
fn a_listeners_peer_is_its_source_or_the_packet_is_unreadable() {
    let v4 = v4_packet([198, 18, 0, 1], [198, 18, 0, 2]);
    assert_eq!(
        listener_peer(&Bytes(&v4), ETH_P_IP, 8080),
        Ok(Dest::v4([198, 18, 0, 1], 8080, Proto::Tcp))
    );
    assert_eq!(
        listener_peer(&Bytes(&v4[..15]), ETH_P_IP, 8080),
        Err(Reason::DenyPacketUnreadable)
    );
    let v6p = v6_packet(v6(2), &[]);
    let mut src = [0u8; 16];
    src.copy_from_slice(&v6p[8..24]);
    assert_eq!(
        listener_peer(&Bytes(&v6p), ETH_P_IPV6, 8080),
        Ok(Dest::v6(src, 8080, Proto::Tcp))
    );
    assert_eq!(
        listener_peer(&Bytes(&v6p[..23]), ETH_P_IPV6, 8080),
        Err(Reason::DenyPacketUnreadable)
    );
    assert_eq!(
        listener_peer(&Bytes(&v4), 0x0806, 8080),
        Err(Reason::DenyPacketUnreadable)
    );
}
