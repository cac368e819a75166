//! The decision as the policy author reads it, computed straight from the policy with linear
//! scans. It shares no code with `compile` or the kernel's lookups, so tests can hold both
//! against it: the compiled tables (without root) and the kernel (with real sockets).

use egress_common::{Decision, Dest, Family, Proto, Reason, verdict::NO_RULE};

use crate::compile::{Resolved, targets};
use crate::doh::DohList;
use crate::{Policy, Transport};

/// What `policy` says about `dst`.
pub fn decide(policy: &Policy, resolved: &Resolved, doh: &DohList, dst: &Dest) -> Decision {
    let loopback = is_loopback(dst);
    if loopback && policy.allow_loopback {
        return Decision {
            reason: Reason::AllowLoopback,
            rule_id: NO_RULE,
        };
    }
    let transport = match dst.proto {
        Proto::Tcp => Transport::Tcp,
        Proto::Udp => Transport::Udp,
        Proto::Other => {
            return Decision {
                reason: Reason::DenyProtocol,
                rule_id: NO_RULE,
            };
        }
    };
    if dst.port == egress_common::maps::DOT_PORT && policy.dns.as_ref().is_some_and(|d| d.block_dot)
    {
        return Decision {
            reason: Reason::DenyDot,
            rule_id: NO_RULE,
        };
    }
    // The unspecified address connects to loopback: judge it as loopback, never as "any".
    let addr = if ip(dst).is_unspecified() {
        loopback_addr(dst.family)
    } else {
        ip(dst)
    };

    // The most specific covering deny entry; the first one among equals.
    let mut deny: Option<(u8, u32)> = None;
    for (j, rule) in policy.denied.iter().enumerate() {
        for net in targets(&rule.target, resolved) {
            if net.contains(&addr) {
                let len = net.prefix_len();
                let better = match deny {
                    None => true,
                    Some((l, _)) => len > l,
                };
                if better {
                    deny = Some((len, j as u32));
                }
            }
        }
    }
    // A known DoH resolver's address (with block_doh) is a deny of its own address length;
    // among equally specific denials the policy's own entry is reported.
    if policy.dns.as_ref().is_some_and(|d| d.block_doh) {
        for (k, provider) in doh.providers().iter().enumerate() {
            if provider.addresses.iter().any(|a| a.to_canonical() == addr) {
                let len = if addr.is_ipv4() { 32 } else { 128 };
                if deny.is_none_or(|(l, _)| len > l) {
                    return Decision {
                        reason: Reason::DenyDoh,
                        rule_id: k as u32,
                    };
                }
            }
        }
    }
    if let Some((_, rule_id)) = deny {
        return Decision {
            reason: Reason::DenyRule,
            rule_id,
        };
    }

    let mut covering: Option<u32> = None;
    for (i, rule) in policy.allowed.iter().enumerate() {
        if !targets(&rule.target, resolved)
            .iter()
            .any(|n| n.contains(&addr))
        {
            continue;
        }
        covering.get_or_insert(i as u32);
        if rule
            .transport_ports()
            .any(|(t, p)| t == transport && p == dst.port)
        {
            return Decision {
                reason: Reason::AllowRule,
                rule_id: i as u32,
            };
        }
    }
    match covering {
        Some(rule_id) => Decision {
            reason: Reason::DenyPort,
            rule_id,
        },
        None => Decision {
            reason: Reason::DenyNoRule,
            rule_id: NO_RULE,
        },
    }
}

fn ip(dst: &Dest) -> std::net::IpAddr {
    match dst.family {
        Family::V4 => {
            std::net::Ipv4Addr::new(dst.addr[0], dst.addr[1], dst.addr[2], dst.addr[3]).into()
        }
        Family::V6 => std::net::Ipv6Addr::from(dst.addr).into(),
    }
}

fn is_loopback(dst: &Dest) -> bool {
    let a = ip(dst);
    a.is_loopback() || a.is_unspecified()
}

fn loopback_addr(family: Family) -> std::net::IpAddr {
    match family {
        Family::V4 => std::net::Ipv4Addr::LOCALHOST.into(),
        Family::V6 => std::net::Ipv6Addr::LOCALHOST.into(),
    }
}
