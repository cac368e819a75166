//! The policy core over BPF maps.

use aya_ebpf::{maps::lpm_trie::Key, programs::SockContext};
use egress_common::{
    Decision, Dest, PortKey, Proto, Reason, RuleKey, RuleValue, SlotConfig, Tables, decide,
    dest::{IPPROTO_MPTCP, IPPROTO_TCP, IPPROTO_UDP},
    maps::SLOT_ALLOW_OTHER_SOCKETS,
};

use crate::maps::{EXACT, LEARNED, PORTS, RULES, SLOTS, slot};

struct Maps;

impl Tables for Maps {
    #[inline(always)]
    fn rule(&self, key: &RuleKey, prefix_len: u32) -> Option<RuleValue> {
        RULES.get(Key::new(prefix_len, *key)).copied()
    }

    #[inline(always)]
    fn exact(&self, key: &RuleKey) -> Option<RuleValue> {
        // SAFETY: the value is copied out at once.
        unsafe { EXACT.get(key) }.copied()
    }

    #[inline(always)]
    fn now_s(&self) -> u32 {
        // SAFETY: reads the clock; available to every program type.
        let ns = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns() };
        (ns / 1_000_000_000) as u32
    }

    #[inline(always)]
    fn learned(&self, key: &RuleKey) -> Option<RuleValue> {
        // SAFETY: the value is copied out at once.
        unsafe { LEARNED.get(key) }.copied()
    }

    #[inline(always)]
    fn port(&self, key: &PortKey) -> Option<u32> {
        // SAFETY: the value is a plain u32 copied out at once.
        unsafe { PORTS.get(key) }.copied()
    }
}

/// The name tag of a learned address (0 when it has none). The decision that allowed the
/// connection read the same entry; it can only have been replaced by one with the same or
/// another name's tag since, and either is a budget of this rule.
#[inline(always)]
pub fn learned_name_tag(policy_id: u32, dst: &Dest) -> u32 {
    let key = RuleKey::for_dest(policy_id, dst);
    // SAFETY: the value is copied out at once.
    unsafe { LEARNED.get(key) }.map_or(0, |v| v.name_tag)
}

/// The slot's configuration, or the verdict to give when it cannot be read. A slot the agent
/// never configured reads as all-zero and so denies through `DenyNoPolicy`.
#[inline(always)]
pub fn slot_config() -> Result<SlotConfig, Reason> {
    match SLOTS.get(slot()) {
        Some(cfg) => Ok(*cfg),
        // Out-of-range slot: the program was loaded without a valid slot. Deny.
        None => Err(Reason::DenyInternal),
    }
}

#[inline(always)]
pub fn judge_dest(cfg: &SlotConfig, dst: &Dest) -> Decision {
    let mut decision = crate::ratelimit::limit(slot(), cfg, dst, decide(&Maps, cfg, dst));
    // The agent's start-up probe: a real decision, counted apart.
    if !decision.allowed() && cfg.is_probe(dst) {
        decision.reason = Reason::StartupProbe;
    }
    decision
}

/// A socket creation, judged.
pub struct SocketVerdict {
    pub reason: Reason,
    pub proto: Proto,
    /// AF_INET (2) / AF_INET6 (10) as 4 / 6.
    pub family: u8,
    pub sock_type: u32,
    pub sock_protocol: u32,
}

/// sock_create: TCP (and MPTCP) stream sockets and UDP datagram sockets may be created;
/// anything else only when the slot allows other sockets.
#[inline(always)]
pub fn judge_socket(ctx: &SockContext) -> SocketVerdict {
    let sk = ctx.sock;
    // SAFETY: the kernel passes a valid bpf_sock; whole 32-bit reads the verifier checks.
    let (sk_family, sk_type, sk_protocol) = unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*sk).family)),
            core::ptr::read_volatile(core::ptr::addr_of!((*sk).type_)),
            core::ptr::read_volatile(core::ptr::addr_of!((*sk).protocol)),
        )
    };
    const AF_INET6: u32 = 10;
    let verdict = |reason| SocketVerdict {
        reason,
        proto: Proto::from_ip_proto(sk_protocol),
        family: if sk_family == AF_INET6 { 6 } else { 4 },
        sock_type: sk_type,
        sock_protocol: sk_protocol,
    };
    let cfg = match slot_config() {
        Ok(cfg) => cfg,
        Err(reason) => return verdict(reason),
    };
    if cfg.policy_id == 0 {
        return verdict(Reason::DenyNoPolicy);
    }
    const SOCK_STREAM: u32 = 1;
    const SOCK_DGRAM: u32 = 2;
    let plain = matches!(
        (sk_type, sk_protocol),
        (SOCK_STREAM, IPPROTO_TCP) | (SOCK_STREAM, IPPROTO_MPTCP) | (SOCK_DGRAM, IPPROTO_UDP)
    );
    // Ping (ICMP, ICMPv6) and SCTP sockets send without the connect/sendmsg hooks seeing
    // every destination, so no policy setting lets them be created.
    const IPPROTO_ICMP: u32 = 1;
    const IPPROTO_ICMPV6: u32 = 58;
    const IPPROTO_SCTP: u32 = 132;
    let unjudged = matches!(sk_protocol, IPPROTO_ICMP | IPPROTO_ICMPV6 | IPPROTO_SCTP);
    if plain {
        verdict(Reason::AllowSocket)
    } else if cfg.flags & SLOT_ALLOW_OTHER_SOCKETS != 0 && !unjudged {
        verdict(Reason::AllowOtherSocket)
    } else {
        verdict(Reason::DenySocketType)
    }
}
