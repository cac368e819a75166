//! The inbound check, per packet on the way in: a packet addressed to a listening TCP socket
//! of the cgroup from a peer that no `inbound` rule allows is dropped (see
//! `egress_common::inbound`). Every other packet passes after one read of its socket's state,
//! which keeps the cost for established connections and UDP to a minimum.

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_uid, bpf_skb_cgroup_id},
    macros::map,
    maps::{LpmTrie, lpm_trie::Key},
    programs::SkBuffContext,
};
use egress_common::{
    Decision, Dest, Proto,
    inbound::{InboundKey, InboundTables, InboundValue, MAX_INBOUND, TCP_LISTEN, decide_inbound},
};

#[map(name = "EGRESS_INBOUND")]
static INBOUND: LpmTrie<InboundKey, InboundValue> = LpmTrie::with_max_entries(MAX_INBOUND, 0);

/// EtherTypes in `skb->protocol`.
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

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
    /// The peer, with the local (listening) port as its port.
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
    if sk.is_null() {
        return None;
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
    let protocol = u16::from_be(ctx.skb.protocol() as u16);
    let peer = match protocol {
        ETH_P_IP => match ctx.load::<[u8; 4]>(12) {
            Ok(src) => Dest::v4(src, local_port, Proto::Tcp),
            // Too short for its header: judged as the unspecified peer, which only a rule
            // covering every address allows.
            Err(_) => Dest::v4([0; 4], local_port, Proto::Tcp),
        },
        ETH_P_IPV6 => match ctx.load::<[u8; 16]>(8) {
            Ok(src) => Dest::v6(src, local_port, Proto::Tcp),
            Err(_) => Dest::v6([0; 16], local_port, Proto::Tcp),
        },
        _ => Dest::v4([0; 4], local_port, Proto::Tcp),
    };
    let decision = match crate::tables::slot_config() {
        Ok(cfg) => decide_inbound(&Maps, cfg.policy_id, &peer),
        Err(reason) => Decision {
            reason,
            rule_id: egress_common::verdict::NO_RULE,
        },
    };
    Some(Judged { decision, peer })
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
