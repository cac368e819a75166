//! The decision as the policy author reads it, computed straight from the policy with linear
//! scans. It shares no code with `compile` or the kernel's lookups, so tests can hold both
//! against it: the compiled tables (without root) and the kernel (with real sockets).

use egress_common::{
    Decision, Dest, Family, Hook, Proto, Reason, SlotConfig,
    maps::{SLOT_AUDIT, SLOT_DNS_RESOLVERS},
    verdict::{NO_RULE, Outcome, conclude, connected_send, route, settle},
};

use crate::compile::{Resolved, targets};
use crate::doh::DohList;
use crate::{Policy, Transport};

/// The workload's DNS proxy as the hooks see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    /// Its port on 127.0.0.1 and ::1.
    pub port: u16,
    /// Whether its agent keeps it known alive.
    pub alive: bool,
    /// The resolvers the workload may address (the proxy's upstream servers); a query to any
    /// other is redirected to the proxy's second port.
    pub resolvers: Vec<std::net::IpAddr>,
}

/// A connect or sendmsg as the hook the kernel runs for it sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// The call names `dst`.
    To { hook: Hook, dst: Dest },
    /// A send on a connected socket with ancillary data: it names no address; the socket's
    /// peer is or is not on loopback.
    Connected { hook: Hook, peer_loopback: bool },
}

/// What the hooks make of `call`: the send rules and the DNS redirect with its guards (the
/// kernel's own pure core, `egress_common::verdict`), then [`decide`] for the policy. Rate
/// limits are left out (see `crate::limits::reference`).
pub fn judge(
    policy: &Policy,
    resolved: &Resolved,
    doh: &DohList,
    proxy: Option<&Proxy>,
    call: Call,
) -> Outcome {
    let mut slot = SlotConfig {
        policy_id: 1,
        ..SlotConfig::default()
    };
    if policy.audit() {
        slot.flags |= SLOT_AUDIT;
    }
    if let Some(p) = proxy {
        slot.dns_port = p.port;
        slot.flags |= SLOT_DNS_RESOLVERS;
    }
    let (hook, dst, step) = match call {
        Call::To { hook, dst } => {
            let alive = || proxy.is_some_and(|p| p.alive);
            let authorized = || proxy.is_some_and(|p| p.resolvers.contains(&ip(&dst)));
            (hook, dst, route(hook, &slot, &dst, alive, authorized))
        }
        // The hook reads no address: the event names none.
        Call::Connected {
            hook,
            peer_loopback,
        } => (
            hook,
            Dest::v4([0; 4], 0, Proto::Udp),
            connected_send(hook, peer_loopback),
        ),
    };
    conclude(hook, &dst, step)
        .unwrap_or_else(|| settle(hook, &slot, &dst, decide(policy, resolved, doh, &dst)))
}

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
    if loopback && !policy.loopback_ports.is_empty() {
        let reason = if policy.loopback_ports.contains(&dst.port) {
            Reason::AllowLoopback
        } else {
            Reason::DenyLoopbackPort
        };
        return Decision {
            reason,
            rule_id: NO_RULE,
        };
    }
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
