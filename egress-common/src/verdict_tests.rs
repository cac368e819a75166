//! The policy core's routing and classification, as pure functions.

use super::*;

fn slot(dns_port: u16) -> SlotConfig {
    SlotConfig {
        policy_id: 1,
        dns_port,
        ..SlotConfig::default()
    }
}

#[test]
fn only_udp_connects_are_classified_as_carrying_no_data() {
    let udp = Dest::v4([198, 18, 0, 2], 443, Proto::Udp);
    let tcp = Dest::v4([198, 18, 0, 2], 443, Proto::Tcp);
    assert_eq!(
        classify_denial(true, &udp, Reason::DenyPort),
        (Reason::UdpConnectRefused, Reason::DenyPort)
    );
    assert_eq!(
        classify_denial(false, &udp, Reason::DenyPort),
        (Reason::DenyPort, Reason::DenyPort)
    );
    assert_eq!(
        classify_denial(true, &tcp, Reason::DenyNoRule),
        (Reason::DenyNoRule, Reason::DenyNoRule)
    );
    assert_eq!(
        classify_denial(true, &udp, Reason::StartupProbe),
        (Reason::StartupProbe, Reason::StartupProbe)
    );
}

#[test]
fn every_port_53_destination_goes_to_the_proxy_while_it_is_alive() {
    let s = slot(707);
    for dst in [
        Dest::v4([198, 18, 0, 2], 53, Proto::Udp),
        Dest::v4([127, 0, 0, 53], 53, Proto::Udp),
        Dest::v4([8, 8, 8, 8], 53, Proto::Tcp),
        Dest::v6(
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            53,
            Proto::Udp,
        ),
    ] {
        assert_eq!(
            dns_route(&s, &dst, || true, || true),
            DnsRoute::Redirect,
            "{dst:?}"
        );
        assert_eq!(
            dns_route(&s, &dst, || false, || true),
            DnsRoute::ProxyDown,
            "{dst:?}"
        );
        assert_eq!(
            dns_route(&slot(0), &dst, || true, || true),
            DnsRoute::Judge,
            "no proxy: {dst:?}"
        );
    }
    let judged = |d: Dest| {
        dns_route(
            &s,
            &d,
            || panic!("the clock is read only for DNS"),
            || panic!("resolvers are looked up only for DNS"),
        )
    };
    assert_eq!(
        judged(Dest::v4([8, 8, 8, 8], 853, Proto::Tcp)),
        DnsRoute::Judge
    );
    assert_eq!(
        judged(Dest::v4([8, 8, 8, 8], 53, Proto::Other)),
        DnsRoute::Judge
    );
    let no_policy = SlotConfig { policy_id: 0, ..s };
    assert_eq!(
        dns_route(
            &no_policy,
            &Dest::v4([8, 8, 8, 8], 53, Proto::Udp),
            || true,
            || true
        ),
        DnsRoute::Judge
    );
}

#[test]
fn queries_to_unauthorized_resolvers_are_told_apart_only_when_the_slot_asks() {
    let dst = Dest::v4([203, 0, 113, 9], 53, Proto::Udp);
    let plain = slot(707);
    assert_eq!(
        dns_route(&plain, &dst, || true, || panic!("no resolver check")),
        DnsRoute::Redirect
    );
    let checked = SlotConfig {
        flags: SLOT_DNS_RESOLVERS,
        ..plain
    };
    assert_eq!(
        dns_route(&checked, &dst, || true, || false),
        DnsRoute::RedirectUnauthorized
    );
    assert_eq!(
        dns_route(&checked, &dst, || true, || true),
        DnsRoute::Redirect
    );
    assert_eq!(
        dns_route(&checked, &dst, || false, || false),
        DnsRoute::ProxyDown
    );
    // A local stub resolver is the host's own: its queries are not flagged.
    assert_eq!(
        dns_route(
            &checked,
            &Dest::v4([127, 0, 0, 53], 53, Proto::Udp),
            || true,
            || panic!("loopback needs no lookup")
        ),
        DnsRoute::Redirect
    );
}

#[test]
fn only_the_own_proxy_passes_and_other_proxies_ports_are_refused() {
    let s = slot(707);
    let mut v6 = [0u8; 16];
    v6[15] = 1;
    let route = |d: Dest| dns_route(&s, &d, || true, || true);
    assert_eq!(
        route(Dest::v4([127, 0, 0, 1], 707, Proto::Udp)),
        DnsRoute::Proxy
    );
    assert_eq!(route(Dest::v6(v6, 707, Proto::Tcp)), DnsRoute::Proxy);
    assert_eq!(
        dns_route(
            &s,
            &Dest::v4([127, 0, 0, 1], 707, Proto::Udp),
            || false,
            || true
        ),
        DnsRoute::ProxyDown
    );
    assert_eq!(
        route(Dest::v4([127, 0, 0, 1], 807, Proto::Udp)),
        DnsRoute::Proxy,
        "the proxy's second port is its own too"
    );
    for port in [700, 708, 799, 800, 808, 899] {
        assert_eq!(
            route(Dest::v4([127, 0, 0, 1], port, Proto::Udp)),
            DnsRoute::OtherProxy
        );
        assert_eq!(
            route(Dest::v4([127, 0, 0, 2], port, Proto::Tcp)),
            DnsRoute::OtherProxy
        );
        assert_eq!(route(Dest::v6(v6, port, Proto::Tcp)), DnsRoute::OtherProxy);
    }
    assert_eq!(
        route(Dest::v4([127, 0, 0, 2], 707, Proto::Udp)),
        DnsRoute::OtherProxy
    );
    assert_eq!(
        route(Dest::v4([127, 0, 0, 1], 699, Proto::Udp)),
        DnsRoute::Judge
    );
    assert_eq!(
        route(Dest::v4([127, 0, 0, 1], 900, Proto::Udp)),
        DnsRoute::Judge
    );
    assert_eq!(
        route(Dest::v4([198, 18, 0, 2], 707, Proto::Udp)),
        DnsRoute::Judge
    );
}

fn lo6() -> [u8; 16] {
    let mut a = [0u8; 16];
    a[15] = 1;
    a
}

#[test]
fn a_connected_send_passes_except_with_ancillary_data_to_an_ipv6_loopback_peer() {
    let pass = |source| Step::Pass {
        reason: Reason::AllowConnected,
        source,
    };
    assert_eq!(connected_send(Hook::Sendmsg4, false), pass(Source::Keep));
    assert_eq!(connected_send(Hook::Sendmsg6, false), pass(Source::Keep));
    assert_eq!(
        connected_send(Hook::Sendmsg4, true),
        pass(Source::Loopback4)
    );
    assert_eq!(
        connected_send(Hook::Sendmsg6, true),
        Step::Refuse(Decision::of(Reason::DenyLoopbackAncillary, NO_RULE))
    );
    for hook in [Hook::Connect4, Hook::Connect6] {
        assert_eq!(
            connected_send(hook, false),
            Step::Refuse(Decision::of(Reason::DenyInternal, NO_RULE))
        );
    }
}

#[test]
fn dns_to_a_link_local_resolver_is_refused_only_on_sendmsg6() {
    let s = slot(707);
    let mut ll = [0u8; 16];
    ll[0] = 0xfe;
    ll[1] = 0x80;
    ll[15] = 0x53;
    let dns = Dest::v6(ll, 53, Proto::Udp);
    let step = |hook| route(hook, &s, &dns, || true, || true);
    assert_eq!(
        step(Hook::Sendmsg6),
        Step::Refuse(Decision::of(Reason::DenyDnsLinkLocal, NO_RULE))
    );
    assert_eq!(
        route(Hook::Sendmsg6, &s, &dns, || true, || false),
        Step::Refuse(Decision::of(Reason::DenyDnsLinkLocal, NO_RULE)),
        "unauthorized or not"
    );
    // A connect is judged at connect time and its later sends name no address.
    assert_eq!(
        step(Hook::Connect6),
        Step::Redirect {
            port: 707,
            reason: Reason::RedirectDns,
            source: Source::Keep
        }
    );
    // Not DNS: the policy decides.
    let other = Dest::v6(ll, 443, Proto::Udp);
    assert_eq!(
        route(Hook::Sendmsg6, &s, &other, || true, || true),
        Step::Judge
    );
    // The proxy down: refused as such.
    assert_eq!(
        route(Hook::Sendmsg6, &s, &dns, || false, || true),
        Step::Refuse(Decision::of(Reason::DnsProxyDown, NO_RULE))
    );
}

#[test]
fn redirected_and_proxy_sends_get_a_loopback_source_of_their_hooks_family() {
    let s = SlotConfig {
        flags: SLOT_DNS_RESOLVERS,
        ..slot(707)
    };
    let v4 = Dest::v4([198, 18, 0, 2], 53, Proto::Udp);
    let v6 = Dest::v6(
        [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        53,
        Proto::Udp,
    );
    assert_eq!(
        route(Hook::Sendmsg4, &s, &v4, || true, || true),
        Step::Redirect {
            port: 707,
            reason: Reason::RedirectDns,
            source: Source::Loopback4
        }
    );
    assert_eq!(
        route(Hook::Sendmsg6, &s, &v6, || true, || false),
        Step::Redirect {
            port: 807,
            reason: Reason::DnsUnauthorizedResolver,
            source: Source::Loopback6
        }
    );
    // An IPv4 destination on sendmsg6 cannot take an IPv6 source.
    assert_eq!(loopback_source(Hook::Sendmsg6, &v4), Source::Keep);
    for hook in [Hook::Connect4, Hook::Connect6] {
        assert_eq!(loopback_source(hook, &v6), Source::Keep);
    }
    assert_eq!(
        route(
            Hook::Sendmsg6,
            &s,
            &Dest::v6(lo6(), 707, Proto::Udp),
            || true,
            || true
        ),
        Step::Pass {
            reason: Reason::RedirectDns,
            source: Source::Loopback6
        }
    );
}

#[test]
fn settling_a_decision_sets_loopback_sources_and_audits_only_the_policys_denials() {
    let enforce = slot(0);
    let audit = SlotConfig {
        flags: SLOT_AUDIT,
        ..enforce
    };
    let lo = Dest::v4([127, 0, 0, 1], 5432, Proto::Udp);
    let remote = Dest::v4([198, 18, 0, 2], 443, Proto::Udp);
    let allowed = Decision::of(Reason::AllowLoopback, NO_RULE);
    assert_eq!(
        settle(Hook::Sendmsg4, &enforce, &lo, allowed),
        Outcome::Allow {
            reason: Reason::AllowLoopback,
            source: Source::Loopback4
        }
    );
    assert_eq!(
        settle(
            Hook::Sendmsg4,
            &enforce,
            &remote,
            Decision::of(Reason::AllowRule, 3)
        ),
        Outcome::Allow {
            reason: Reason::AllowRule,
            source: Source::Keep
        }
    );
    let denied = Decision::of(Reason::DenyPort, 2);
    assert_eq!(
        settle(Hook::Connect4, &enforce, &remote, denied),
        Outcome::Deny {
            reason: Reason::UdpConnectRefused,
            cause: Reason::DenyPort,
            rule_id: 2
        }
    );
    assert_eq!(
        settle(Hook::Sendmsg4, &audit, &lo, denied),
        Outcome::Audit {
            reason: Reason::DenyPort,
            cause: Reason::DenyPort,
            rule_id: 2,
            source: Source::Loopback4
        }
    );
    for reason in [
        Reason::StartupProbe,
        Reason::DenyNoPolicy,
        Reason::DenyInternal,
    ] {
        assert_eq!(
            settle(
                Hook::Sendmsg4,
                &audit,
                &remote,
                Decision::of(reason, NO_RULE)
            ),
            Outcome::Deny {
                reason,
                cause: reason,
                rule_id: NO_RULE
            },
            "{reason:?} is never audited"
        );
    }
    // Refusals before the policy are never audited either.
    assert_eq!(
        conclude(
            Hook::Sendmsg6,
            &remote,
            Step::Refuse(Decision::of(Reason::DenyDnsLinkLocal, NO_RULE))
        ),
        Some(Outcome::Deny {
            reason: Reason::DenyDnsLinkLocal,
            cause: Reason::DenyDnsLinkLocal,
            rule_id: NO_RULE
        })
    );
    assert_eq!(conclude(Hook::Sendmsg6, &remote, Step::Judge), None);
}

/// One address's prefixes, some of them expired, over a single allowed port.
struct Prefixes {
    /// (prefix length, expired) from the longest down.
    entries: &'static [(u8, bool)],
}

impl Tables for Prefixes {
    fn rule(&self, _key: &RuleKey, prefix_len: u32) -> Option<RuleValue> {
        let bits = prefix_len - RULE_KEY_FIXED_BITS;
        let &(prefix, expired) = self.entries.iter().find(|(p, _)| u32::from(*p) <= bits)?;
        let mut value = RuleValue {
            action: ACTION_ALLOW,
            prefix,
            n_inline: 1,
            rule_id: 0,
            expires_s: if expired { 50 } else { 0 },
            ..RuleValue::default()
        };
        value.inline[0].port = 443;
        value.inline[0].proto = Proto::Tcp as u8;
        Some(value)
    }
    fn exact(&self, _key: &RuleKey) -> Option<RuleValue> {
        None
    }
    fn port(&self, _key: &PortKey) -> Option<u32> {
        None
    }
    fn learned(&self, _key: &RuleKey) -> Option<RuleValue> {
        None
    }
    fn now_s(&self) -> u32 {
        100
    }
}

#[test]
fn a_lookup_looks_past_at_most_max_expired_skips_expired_entries_then_denies() {
    let s = slot(0);
    let dst = Dest::v4([198, 18, 0, 2], 443, Proto::Tcp);
    let past_three = Prefixes {
        entries: &[(31, true), (30, true), (29, true), (24, false)],
    };
    assert_eq!(decide(&past_three, &s, &dst).reason, Reason::AllowRule);
    let past_four = Prefixes {
        entries: &[(31, true), (30, true), (29, true), (28, true), (24, false)],
    };
    assert_eq!(MAX_EXPIRED_SKIPS, 4);
    assert_eq!(decide(&past_four, &s, &dst).reason, Reason::DenyNoRule);
}

#[test]
fn loopback_under_a_port_list_is_allowed_at_its_ports_only() {
    let mut ports = [0u16; crate::maps::MAX_LOOPBACK_PORTS];
    ports[0] = 5432;
    ports[1] = 853;
    let s = SlotConfig {
        flags: crate::maps::SLOT_LOOPBACK_PORTS | SLOT_BLOCK_DOT,
        loopback_ports: ports,
        ..slot(0)
    };
    let none = Prefixes { entries: &[] };
    let reason = |dst: Dest| decide(&none, &s, &dst).reason;
    for addr in [[127, 0, 0, 1], [127, 9, 9, 9], [0, 0, 0, 0]] {
        for proto in [Proto::Tcp, Proto::Udp] {
            assert_eq!(reason(Dest::v4(addr, 5432, proto)), Reason::AllowLoopback);
            assert_eq!(
                reason(Dest::v4(addr, 5433, proto)),
                Reason::DenyLoopbackPort
            );
            // A listed port wins over block_dot, as loopback always did.
            assert_eq!(reason(Dest::v4(addr, 853, proto)), Reason::AllowLoopback);
        }
        assert_eq!(
            reason(Dest::v4(addr, 5432, Proto::Other)),
            Reason::DenyProtocol
        );
        // Unused entries (0) allow nothing.
        assert_eq!(
            reason(Dest::v4(addr, 0, Proto::Tcp)),
            Reason::DenyLoopbackPort
        );
    }
    assert_eq!(
        reason(Dest::v6(lo6(), 5432, Proto::Udp)),
        Reason::AllowLoopback
    );
    assert_eq!(
        reason(Dest::v6([0; 16], 22, Proto::Tcp)),
        Reason::DenyLoopbackPort
    );
    // Not loopback: the rules decide (none here), and block_dot applies.
    assert_eq!(
        reason(Dest::v4([198, 18, 0, 2], 5432, Proto::Tcp)),
        Reason::DenyNoRule
    );
    assert_eq!(
        reason(Dest::v4([198, 18, 0, 2], 853, Proto::Tcp)),
        Reason::DenyDot
    );
    // allow_loopback still allows every port, and the list is not looked at.
    let all = SlotConfig {
        flags: SLOT_ALLOW_LOOPBACK,
        ..s
    };
    assert_eq!(
        decide(&none, &all, &Dest::v4([127, 0, 0, 1], 5433, Proto::Tcp)).reason,
        Reason::AllowLoopback
    );
}
