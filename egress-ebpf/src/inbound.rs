//! The inbound check, per packet on the way in: a packet addressed to a listening TCP socket
//! of the cgroup from a peer that no `inbound` rule allows is dropped (see
//! `egress_common::inbound`). Every other packet passes after one read of its socket's state,
//! which keeps the cost for established connections and UDP to a minimum.

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_uid, bpf_skb_cgroup_id},
    maps::lpm_trie::Key,
    programs::SkBuffContext,
};
use egress_common::{
    Decision, Dest, Proto, Reason,
    inbound::{InboundKey, InboundTables, InboundValue, TCP_LISTEN, decide_inbound},
    packet::listener_peer,
    verdict::NO_RULE,
};

use crate::backstop::{Skb, protocol};
use crate::maps::INBOUND;

struct Maps;

impl InboundTables for Maps {
    #[inline(always)]
    fn inbound(&self, key: &InboundKey, prefix_len: u32) -> Option<InboundValue> {
        INBOUND.get(Key::new(prefix_len, *key)).copied()
    }
}

/// What was decided about a packet to a listener, and what to report.
pub struct Judged {
    pub decision: Decision,
    /// The peer, with the local (listening) port as its port (the unspecified address when
    /// the packet's source cannot be read).
    pub peer: Dest,
}

/// `None` for a packet to any socket but a listener (the hot path); otherwise the decision.
#[inline(always)]
pub fn check(ctx: &SkBuffContext) -> Option<Judged> {
    // SAFETY: `sk` is a pointer field of the context (PTR_TO_SOCK_COMMON_OR_NULL), read whole;
    // it is checked for null before use.
    let sk = unsafe {
        core::ptr::read_volatile(core::ptr::addr_of!((*ctx.skb.skb).__bindgen_anon_2.sk))
    };
    // The kernel runs ingress programs for the socket that receives the packet (its cgroup is
    // how this program was found), so `sk` is never null; if it were, nothing could be judged.
    if sk.is_null() {
        return Some(unreadable(0));
    }
    // SAFETY: `state` and `src_port` are sock_common fields, readable from the socket the
    // context names (the listener itself for a packet to a listening socket).
    let state = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sk).state)) };
    if state != TCP_LISTEN {
        return None;
    }
    // SAFETY: as above; src_port is the local port in host byte order.
    let local_port = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sk).src_port)) };
    let local_port = local_port as u16;
    let peer = match listener_peer(&Skb(ctx), protocol(ctx), local_port) {
        Ok(peer) => peer,
        Err(_) => return Some(unreadable(local_port)),
    };
    let decision = match crate::tables::slot_config() {
        Ok(cfg) => decide_inbound(&Maps, cfg.policy_id, &peer),
        Err(reason) => Decision {
            reason,
            rule_id: NO_RULE,
        },
    };
    Some(Judged { decision, peer })
}

/// A packet to a listener whose peer cannot be read: dropped.
#[inline(always)]
fn unreadable(local_port: u16) -> Judged {
    Judged {
        decision: Decision {
            reason: Reason::DenyPacketUnreadable,
            rule_id: NO_RULE,
        },
        peer: Dest::v4([0; 4], local_port, Proto::Tcp),
    }
}

/// The listener's owner and cgroup: a packet arrives outside the context of any task of the
/// workload, so the event names the socket's, not the current task's.
#[inline(always)]
pub fn owner(ctx: &SkBuffContext) -> (u32, u64) {
    // SAFETY: both helpers read the socket the context names; available to cgroup_skb.
    unsafe {
        (
            bpf_get_socket_uid(ctx.skb.skb),
            bpf_skb_cgroup_id(ctx.skb.skb),
        )
    }
}
