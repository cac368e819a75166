//! Inbound connections: which peers may connect to the workload's listening TCP sockets.
//!
//! No cgroup hook sees `listen()` or `accept()`, so the decision is made per packet, on the way
//! in: a packet that reaches a socket in state LISTEN (a SYN, the handshake's last ACK, a
//! syncookie ACK) from a non-loopback peer is dropped unless an `inbound` rule allows that peer
//! on that local port. A refused connection never gets a child socket, so packets of any other
//! socket need no decision.

use crate::counters::Reason;
use crate::dest::{Dest, Family};
use crate::maps::{ACTION_ALLOW, ACTION_DENY, address_bits};
use crate::verdict::{Decision, NO_RULE};

/// `LpmTrie<InboundKey, InboundValue>`: the peers each policy allows per local port.
pub const MAP_INBOUND: &str = "EGRESS_INBOUND";
pub const MAX_INBOUND: u32 = 1 << 16;

/// `TCP_LISTEN` in the kernel's socket states (`bpf_sock.state`).
pub const TCP_LISTEN: u32 = 10;

/// Data part of the LPM key. The prefix covers the policy id, the local port, the family and
/// the padding ([`INBOUND_KEY_FIXED_BITS`]), then the peer's address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InboundKey {
    /// Policy id, big-endian, so that the trie's bitwise match treats it as a whole.
    pub policy_id: [u8; 4],
    /// Local (listening) port, big-endian.
    pub port: [u8; 2],
    pub family: u8,
    pub _pad: u8,
    /// The peer's address; IPv4 in the first four bytes, network order.
    pub addr: [u8; 16],
}

/// Bits of the key before the address starts.
pub const INBOUND_KEY_FIXED_BITS: u32 = 64;

impl InboundKey {
    #[inline(always)]
    pub const fn new(policy_id: u32, port: u16, family: Family, addr: [u8; 16]) -> Self {
        InboundKey {
            policy_id: policy_id.to_be_bytes(),
            port: port.to_be_bytes(),
            family: family as u8,
            _pad: 0,
            addr,
        }
    }

    /// Full-length prefix for looking up a peer.
    #[inline(always)]
    pub const fn full_prefix_len(family: Family) -> u32 {
        INBOUND_KEY_FIXED_BITS + address_bits(family)
    }
}

/// What the longest matching entry says.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundValue {
    /// [`ACTION_ALLOW`]: a rule's `from` covers the peer. [`ACTION_DENY`]: the port is listed
    /// (by `rule_id`) but no `from` of it covers the peer. Anything else denies.
    pub action: u8,
    pub _pad: [u8; 3],
    /// Index of the rule in `inbound`.
    pub rule_id: u32,
}

/// The lookup the decision needs: the kernel's trie, or the agent's compiled table.
pub trait InboundTables {
    /// Longest-prefix match of `key` among prefixes of at most `prefix_len` bits.
    fn inbound(&self, key: &InboundKey, prefix_len: u32) -> Option<InboundValue>;
}

/// Whether a peer is this host's loopback (127.0.0.0/8, ::1; mapped addresses are already
/// IPv4 in a [`Dest`]).
#[inline(always)]
pub const fn peer_is_loopback(peer: &Dest) -> bool {
    match peer.family {
        Family::V4 => peer.addr[0] == 127,
        Family::V6 => {
            let mut i = 0;
            while i < 15 {
                if peer.addr[i] != 0 {
                    return false;
                }
                i += 1;
            }
            peer.addr[15] == 1
        }
    }
}

/// Judges a packet from `peer` (its `port` the local, listening port) to a listening socket
/// of the slot whose policy id is `policy_id`. Loopback peers are out of scope and pass;
/// policy id 0 (no policy in the slot) denies.
#[inline(always)]
pub fn decide_inbound<T: InboundTables>(tables: &T, policy_id: u32, peer: &Dest) -> Decision {
    if peer_is_loopback(peer) {
        return Decision {
            reason: Reason::AllowLoopback,
            rule_id: NO_RULE,
        };
    }
    if policy_id == 0 {
        return Decision {
            reason: Reason::DenyNoPolicy,
            rule_id: NO_RULE,
        };
    }
    let key = InboundKey::new(policy_id, peer.port, peer.family, peer.addr);
    match tables.inbound(&key, InboundKey::full_prefix_len(peer.family)) {
        Some(v) if v.action == ACTION_ALLOW => Decision {
            reason: Reason::AllowInbound,
            rule_id: v.rule_id,
        },
        Some(v) if v.action == ACTION_DENY => Decision {
            reason: Reason::DenyInbound,
            rule_id: v.rule_id,
        },
        _ => Decision {
            reason: Reason::DenyInbound,
            rule_id: NO_RULE,
        },
    }
}

const _: () = {
    assert!(core::mem::size_of::<InboundKey>() == 24);
    assert!(core::mem::align_of::<InboundKey>() == 1);
    assert!(core::mem::size_of::<InboundValue>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers and byte arrays only, no implicit padding (sizes asserted
    // above).
    unsafe impl aya::Pod for super::InboundKey {}
    unsafe impl aya::Pod for super::InboundValue {}
}
