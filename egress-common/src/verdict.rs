//! The policy core: one decision, shared by every hook and by the agent's table checks.

use crate::counters::{Hook, Reason};
use crate::dest::{Dest, Family, Proto};
use crate::maps::{
    ACTION_ALLOW, DNS_PORT, DNS_PROXY_PORT_FIRST, DNS_PROXY_RANGE_LAST,
    DNS_UNAUTHORIZED_PORT_OFFSET, DOT_PORT, MAX_EXPIRED_SKIPS, PortKey, RULE_DOH_BIT,
    RULE_KEY_FIXED_BITS, RuleKey, RuleValue, SLOT_ALLOW_LOOPBACK, SLOT_AUDIT, SLOT_BLOCK_DOT,
    SLOT_DNS_RESOLVERS, SLOT_LOOPBACK_PORTS, SlotConfig, address_bits,
};

/// Lookups the decision needs. The kernel implements it over BPF maps, the agent over the
/// tables it compiled.
pub trait Tables {
    /// Longest-prefix match of `key`, considering only prefixes of at most `prefix_len`
    /// bits (the LPM key's prefix length, [`RULE_KEY_FIXED_BITS`] included).
    fn rule(&self, key: &RuleKey, prefix_len: u32) -> Option<RuleValue>;
    /// Exact lookup of a single address (the map of /32 and /128 entries).
    fn exact(&self, key: &RuleKey) -> Option<RuleValue>;
    /// Exact lookup in the port map: the allowing rule id.
    fn port(&self, key: &PortKey) -> Option<u32>;
    /// Exact lookup of an address learned from a DNS answer.
    fn learned(&self, key: &RuleKey) -> Option<RuleValue>;
    /// CLOCK_BOOTTIME in whole seconds, for entry lifetimes.
    fn now_s(&self) -> u32;
}

/// Whether an entry still applies. The clock is read only for entries with a deadline.
#[inline(always)]
fn live<T: Tables>(tables: &T, value: &RuleValue) -> bool {
    value.expires_s == 0 || !value.expired(tables.now_s())
}

/// The longest prefix covering `key` whose entry has not expired. Looks past at most
/// [`MAX_EXPIRED_SKIPS`] expired entries; beyond that, nothing matches (deny).
#[inline(always)]
fn live_rule<T: Tables>(tables: &T, key: &RuleKey, family: Family) -> Option<RuleValue> {
    let mut bits = address_bits(family);
    if let Some(value) = tables.exact(key)
        && live(tables, &value)
    {
        return Some(value);
    }
    let mut i = 0;
    while i < MAX_EXPIRED_SKIPS {
        let value = tables.rule(key, RULE_KEY_FIXED_BITS + bits)?;
        if live(tables, &value) {
            return Some(value);
        }
        if value.prefix == 0 || u32::from(value.prefix) > bits {
            return None;
        }
        bits = u32::from(value.prefix) - 1;
        i += 1;
    }
    None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    /// The rule that decided, when one did (`u32::MAX` otherwise).
    pub rule_id: u32,
}

pub const NO_RULE: u32 = u32::MAX;

impl Decision {
    #[inline(always)]
    pub const fn allowed(&self) -> bool {
        self.reason.allows()
    }

    #[inline(always)]
    const fn of(reason: Reason, rule_id: u32) -> Self {
        Decision { reason, rule_id }
    }
}

/// Judges one destination under one slot's configuration.
///
/// Order: no policy -> deny; loopback (when the policy leaves it out of scope) -> allow;
/// protocol that no rule can name -> deny; loopback under `loopback.ports` -> allow at a listed
/// port, deny at any other; DNS over TLS when blocked -> deny; longest prefix:
/// deny entry -> deny, allow entry whose port set holds (protocol, port) -> allow; otherwise an
/// address learned from DNS whose port set holds it -> allow; anything else -> deny. Deny entries win over allow
/// entries because the compiler never lets an allow prefix shadow a covering deny.
#[inline(always)]
pub fn decide<T: Tables>(tables: &T, slot: &SlotConfig, dst: &Dest) -> Decision {
    let policy_id = slot.policy_id;
    if policy_id == 0 {
        return Decision::of(Reason::DenyNoPolicy, NO_RULE);
    }
    let loopback = dst.is_loopback();
    if loopback && slot.flags & SLOT_ALLOW_LOOPBACK != 0 {
        return Decision::of(Reason::AllowLoopback, NO_RULE);
    }
    if let Proto::Other = dst.proto {
        return Decision::of(Reason::DenyProtocol, NO_RULE);
    }
    if loopback && slot.flags & SLOT_LOOPBACK_PORTS != 0 {
        return if slot.loopback_port(dst.port) {
            Decision::of(Reason::AllowLoopback, NO_RULE)
        } else {
            Decision::of(Reason::DenyLoopbackPort, NO_RULE)
        };
    }
    if dst.port == DOT_PORT && slot.flags & SLOT_BLOCK_DOT != 0 {
        return Decision::of(Reason::DenyDot, NO_RULE);
    }
    // The unspecified address connects to loopback: match it as loopback, never as "any".
    let mut lookup = *dst;
    if loopback {
        lookup = loopback_spelling(dst);
    }
    let key = RuleKey::for_dest(policy_id, &lookup);
    let decision = match live_rule(tables, &key, lookup.family) {
        None => Decision::of(Reason::DenyNoRule, NO_RULE),
        Some(value) if value.action != ACTION_ALLOW => {
            // ACTION_DENY, or a value we do not understand: deny either way. A deny is final:
            // no learned address can reopen it.
            return if value.rule_id != NO_RULE && value.rule_id & RULE_DOH_BIT != 0 {
                Decision::of(Reason::DenyDoh, value.rule_id & !RULE_DOH_BIT)
            } else {
                Decision::of(Reason::DenyRule, value.rule_id)
            };
        }
        Some(value) => match allowed_port(tables, policy_id, &value, &lookup) {
            Some(rule_id) => return Decision::of(Reason::AllowRule, rule_id),
            None => Decision::of(Reason::DenyPort, value.rule_id),
        },
    };
    // No rule allows it: an address learned from a DNS answer to an allowed name may.
    if let Some(value) = tables.learned(&key)
        && value.action == ACTION_ALLOW
        && live(tables, &value)
        && let Some(rule_id) = allowed_port(tables, policy_id, &value, &lookup)
    {
        return Decision::of(Reason::AllowLearned, rule_id);
    }
    decision
}

/// The rule of `value`'s port set that allows the destination's (protocol, port), if any.
#[inline(always)]
fn allowed_port<T: Tables>(
    tables: &T,
    policy_id: u32,
    value: &RuleValue,
    lookup: &Dest,
) -> Option<u32> {
    if value.n_inline != 0 {
        // The whole set is in the value: no port-map lookup.
        let want = lookup.proto as u8;
        let a = value.inline[0];
        if a.port == lookup.port && a.proto == want {
            return Some(a.rule_id);
        }
        let b = value.inline[1];
        if value.n_inline > 1 && b.port == lookup.port && b.proto == want {
            return Some(b.rule_id);
        }
        return None;
    }
    tables.port(&PortKey::new(
        policy_id,
        value.set_id,
        lookup.port,
        lookup.proto,
    ))
}

/// How a denial is counted and reported: a UDP `connect()` carries no data (it only names the
/// peer), so its refusal is [`Reason::UdpConnectRefused`], with the policy's reason kept as
/// the cause. The start-up probe, a UDP connect by design, stays what it is. Returns
/// `(reason, cause)`.
#[inline(always)]
pub const fn classify_denial(connect: bool, dst: &Dest, reason: Reason) -> (Reason, Reason) {
    if connect && matches!(dst.proto, Proto::Udp) && !matches!(reason, Reason::StartupProbe) {
        (Reason::UdpConnectRefused, reason)
    } else {
        (reason, reason)
    }
}

/// What the DNS redirect makes of a destination, before (and instead of) the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsRoute {
    /// Not DNS: the policy decides.
    Judge,
    /// A DNS query (TCP or UDP to port 53, any address, loopback included: a local stub
    /// resolver forwards anything): to the slot's proxy instead.
    Redirect,
    /// As [`DnsRoute::Redirect`], addressed to a resolver the slot does not authorize: to the
    /// proxy's second port, which reports the attempt.
    RedirectUnauthorized,
    /// The slot's proxy itself (127.0.0.1 or ::1 at its port): a socket whose connect was
    /// redirected may run a send hook again with the rewritten address. Passes whatever the
    /// policy says of loopback.
    Proxy,
    /// A query or a send to the proxy while the proxy is not known to be alive: denied.
    ProxyDown,
    /// Loopback, at a port of the proxies' range that is not this slot's proxy: denied.
    OtherProxy,
}

/// Routes a destination of a slot with a DNS proxy; `alive` is asked (it reads the clock) only
/// for DNS and proxy destinations, `authorized` (a map lookup) only for queries of a slot
/// that tells resolvers apart. A slot without a proxy or a policy is left to the policy.
#[inline(always)]
pub fn dns_route<F: FnOnce() -> bool, A: FnOnce() -> bool>(
    slot: &SlotConfig,
    dst: &Dest,
    alive: F,
    authorized: A,
) -> DnsRoute {
    if slot.dns_port == 0 || slot.policy_id == 0 || !matches!(dst.proto, Proto::Tcp | Proto::Udp) {
        return DnsRoute::Judge;
    }
    let own = (dst.port == slot.dns_port
        || dst.port == slot.dns_port.wrapping_add(DNS_UNAUTHORIZED_PORT_OFFSET))
        && is_proxy_address(dst);
    if dst.port == DNS_PORT || own {
        if !alive() {
            return DnsRoute::ProxyDown;
        }
        return if own {
            DnsRoute::Proxy
        } else if slot.flags & SLOT_DNS_RESOLVERS != 0 && !dst.is_loopback() && !authorized() {
            DnsRoute::RedirectUnauthorized
        } else {
            DnsRoute::Redirect
        };
    }
    if dst.is_loopback() && (DNS_PROXY_PORT_FIRST..=DNS_PROXY_RANGE_LAST).contains(&dst.port) {
        return DnsRoute::OtherProxy;
    }
    DnsRoute::Judge
}

/// The source address a send must leave with. Only the send hooks can set one; connects need
/// none, since the options that bind a socket to a device are refused at setsockopt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The kernel chooses.
    Keep,
    /// 127.0.0.1 (sendmsg4): the kernel refuses to send from it out of any device but
    /// loopback, whatever interface ancillary data names.
    Loopback4,
    /// ::1 (sendmsg6), likewise.
    Loopback6,
}

/// The source a send to loopback (or to the proxy on loopback) gets from `hook`. sendmsg6 sees
/// IPv6 destinations (mapped ones run sendmsg4): a mapped one there would need an IPv4
/// source, so it is left alone.
#[inline(always)]
pub const fn loopback_source(hook: Hook, dst: &Dest) -> Source {
    match (hook, dst.family) {
        (Hook::Sendmsg4, _) => Source::Loopback4,
        (Hook::Sendmsg6, Family::V6) => Source::Loopback6,
        _ => Source::Keep,
    }
}

/// What a connect or sendmsg hook does before, or instead of, asking the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Let through, counted under `reason`, from `source`.
    Pass { reason: Reason, source: Source },
    /// Rewritten to the slot's DNS proxy on loopback at `port`, then let through, counted
    /// under `reason`, from `source`.
    Redirect {
        port: u16,
        reason: Reason,
        source: Source,
    },
    /// Refused by a guard of the DNS proxy or of the send rules: never audited.
    Refuse(Decision),
    /// The policy decides; [`settle`] says what its decision means for the hook.
    Judge,
}

/// A send hook called without an address: a send on a connected socket with ancillary data
/// (the kernel then hands the hooks AF_UNSPEC). The connect was judged. A loopback peer (the
/// proxy, say) keeps a loopback source over IPv4, which no interface named in the data can
/// take off the host; IPv6 has no such rule, so there the send is refused. A connect hook
/// never runs without an address: should one, it is refused.
#[inline(always)]
pub const fn connected_send(hook: Hook, peer_loopback: bool) -> Step {
    match hook {
        Hook::Sendmsg4 | Hook::Sendmsg6 if !peer_loopback => Step::Pass {
            reason: Reason::AllowConnected,
            source: Source::Keep,
        },
        Hook::Sendmsg4 => Step::Pass {
            reason: Reason::AllowConnected,
            source: Source::Loopback4,
        },
        Hook::Sendmsg6 => Step::Refuse(Decision::of(Reason::DenyLoopbackAncillary, NO_RULE)),
        _ => Step::Refuse(Decision::of(Reason::DenyInternal, NO_RULE)),
    }
}

/// The step for a destination a connect or sendmsg names: the DNS redirect and its guards
/// ([`dns_route`]), else the policy. A DNS query over sendmsg6 to a link-local resolver is
/// refused: its scope id would take even the redirected query out of that interface. A query
/// to a resolver the slot does not authorize goes to the proxy's second port, which answers it
/// by the policy all the same and reports it.
#[inline(always)]
pub fn route<F: FnOnce() -> bool, A: FnOnce() -> bool>(
    hook: Hook,
    slot: &SlotConfig,
    dst: &Dest,
    alive: F,
    authorized: A,
) -> Step {
    match dns_route(slot, dst, alive, authorized) {
        DnsRoute::Redirect | DnsRoute::RedirectUnauthorized
            if matches!(hook, Hook::Sendmsg6) && dst.is_link_local() =>
        {
            Step::Refuse(Decision::of(Reason::DenyDnsLinkLocal, NO_RULE))
        }
        DnsRoute::Redirect => Step::Redirect {
            port: slot.dns_port,
            reason: Reason::RedirectDns,
            source: loopback_source(hook, dst),
        },
        DnsRoute::RedirectUnauthorized => Step::Redirect {
            port: slot.dns_port.wrapping_add(DNS_UNAUTHORIZED_PORT_OFFSET),
            reason: Reason::DnsUnauthorizedResolver,
            source: loopback_source(hook, dst),
        },
        DnsRoute::Proxy => Step::Pass {
            reason: Reason::RedirectDns,
            source: loopback_source(hook, dst),
        },
        DnsRoute::ProxyDown => Step::Refuse(Decision::of(Reason::DnsProxyDown, NO_RULE)),
        DnsRoute::OtherProxy => Step::Refuse(Decision::of(Reason::DenyOtherProxy, NO_RULE)),
        DnsRoute::Judge => Step::Judge,
    }
}

/// What a connect or sendmsg hook ends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Let through, counted under `reason`, from `source`.
    Allow { reason: Reason, source: Source },
    /// Denied by the policy and let through by audit mode: counted as audited under `reason`
    /// and reported with the policy's `cause`.
    Audit {
        reason: Reason,
        cause: Reason,
        rule_id: u32,
        source: Source,
    },
    /// Refused, counted under `reason` and reported with the policy's `cause` (see
    /// [`classify_denial`]).
    Deny {
        reason: Reason,
        cause: Reason,
        rule_id: u32,
    },
}

/// A refusal by `hook`, classified (a UDP connect carries no data).
#[inline(always)]
pub const fn refusal(hook: Hook, dst: &Dest, decision: Decision) -> Outcome {
    let connect = matches!(hook, Hook::Connect4 | Hook::Connect6);
    let (reason, cause) = classify_denial(connect, dst, decision.reason);
    Outcome::Deny {
        reason,
        cause,
        rule_id: decision.rule_id,
    }
}

/// What the policy's `decision` about `dst` means for `hook` under `slot`: an allowed
/// loopback send gets a loopback source; audit mode lets a denial through, except the
/// start-up probe (which proves enforcement is attached) and a slot without a policy (which
/// fails closed whatever its flags say).
#[inline(always)]
pub const fn settle(hook: Hook, slot: &SlotConfig, dst: &Dest, decision: Decision) -> Outcome {
    if decision.allowed() {
        return Outcome::Allow {
            reason: decision.reason,
            source: policy_source(hook, dst),
        };
    }
    let audit = slot.flags & SLOT_AUDIT != 0
        && !matches!(
            decision.reason,
            Reason::StartupProbe | Reason::DenyNoPolicy | Reason::DenyInternal
        );
    match refusal(hook, dst, decision) {
        Outcome::Deny {
            reason,
            cause,
            rule_id,
        } if audit => Outcome::Audit {
            reason,
            cause,
            rule_id,
            source: policy_source(hook, dst),
        },
        denied => denied,
    }
}

/// The source a send the policy lets through gets: a loopback one to loopback.
#[inline(always)]
const fn policy_source(hook: Hook, dst: &Dest) -> Source {
    if dst.is_loopback() {
        loopback_source(hook, dst)
    } else {
        Source::Keep
    }
}

/// The outcome of a step that did not ask the policy.
#[inline(always)]
pub const fn conclude(hook: Hook, dst: &Dest, step: Step) -> Option<Outcome> {
    match step {
        Step::Pass { reason, source } | Step::Redirect { reason, source, .. } => {
            Some(Outcome::Allow { reason, source })
        }
        Step::Refuse(decision) => Some(refusal(hook, dst, decision)),
        Step::Judge => None,
    }
}

/// 127.0.0.1 (a mapped ::ffff:127.0.0.1 arrives canonical) or ::1.
#[inline(always)]
fn is_proxy_address(dst: &Dest) -> bool {
    match dst.family {
        Family::V4 => {
            dst.addr[0] == 127 && dst.addr[1] == 0 && dst.addr[2] == 0 && dst.addr[3] == 1
        }
        Family::V6 => dst.is_ipv6_localhost(),
    }
}

#[inline(always)]
const fn loopback_spelling(dst: &Dest) -> Dest {
    match dst.family {
        Family::V4 if dst.addr[0] == 0 => Dest::v4([127, 0, 0, 1], dst.port, dst.proto),
        Family::V6 => {
            let mut addr = [0u8; 16];
            addr[15] = 1;
            Dest {
                family: Family::V6,
                addr,
                port: dst.port,
                proto: dst.proto,
            }
        }
        _ => *dst,
    }
}

#[cfg(test)]
#[path = "verdict_tests.rs"]
mod tests;
