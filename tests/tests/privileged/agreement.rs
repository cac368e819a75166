//! The kernel and the userspace reference decide alike.
//!
//! A random policy over nested prefixes (loopback allowed, judged by the rules, or allowed at
//! some ports), and a few thousand random destinations (IPv4, IPv6, IPv4-mapped, loopback,
//! unspecified and link-local spellings, DNS among other ports; TCP connect, UDP connect and
//! unconnected UDP sends) go through the real programs and through
//! `egress_agent::reference::judge`, which shares the kernel's send rules and DNS redirect
//! (`egress_common::verdict`). The first workload runs in a namespace with nothing but
//! loopback: an allowed destination fails with ENETUNREACH after the hook let it pass, a
//! denied one with EPERM, and no packet leaves. The second sends on connected UDP sockets with
//! ancillary data, in a namespace whose routes lead onto a veth pair that ends in the same
//! namespace, so that its connects succeed and its sends reach the send hooks.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use egress_agent::compile::Resolved;
use egress_agent::policy::{self, Policy};
use egress_agent::reference::{self, Call, Proxy};
use egress_common::verdict::Outcome;
use egress_common::{Dest, Family, Hook, Proto, Reason};
use egress_tests::netns::Netns;
use egress_tests::policy::PolicyYaml;
use egress_tests::testbed::Testbed;
use rand::{Rng, rngs::StdRng};

use crate::{seeded_rng, testbed};
const DESTINATIONS: usize = 3000;

fn random_v4(rng: &mut StdRng) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, rng.random_range(0..4), rng.random_range(0..8))
}

fn random_v6(rng: &mut StdRng) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0xe9,
        rng.random_range(0..3),
        0,
        0,
        0,
        0,
        rng.random_range(0..8),
    )
}

fn random_link_local(rng: &mut StdRng) -> Ipv6Addr {
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, rng.random_range(1..8))
}

/// Ports of the random ops: a few that rules name, and DNS (never the proxies' own range,
/// whose verdict depends on which port this run's proxy got).
fn random_port(rng: &mut StdRng) -> u16 {
    if rng.random_bool(0.1) {
        53
    } else {
        1000 + rng.random_range(0..5)
    }
}

/// The workload's proxy, as far as these ops can tell: alive, at a port none of them names,
/// with no resolver the ops address (which only changes the reason a query is redirected
/// under, never whether it is).
fn proxy() -> Proxy {
    Proxy {
        port: egress_common::maps::DNS_PROXY_PORT_FIRST,
        alive: true,
        resolvers: Vec::new(),
    }
}

fn denies(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Deny { .. })
}

/// How a random policy treats loopback.
#[derive(Clone, Copy, Debug)]
enum Loopback {
    /// `allow_loopback: true` or `false`.
    Allow(bool),
    /// `loopback: {ports: [...]}`, some of the ports the ops use.
    Ports,
}

fn random_policy(rng: &mut StdRng, loopback: Loopback) -> PolicyYaml {
    let protos: [&[&str]; 5] = [&["tcp"], &["udp"], &["https"], &["dns"], &["tcp", "udp"]];
    let mut p = match loopback {
        Loopback::Allow(allow) => PolicyYaml::new().allow_loopback(allow),
        Loopback::Ports => {
            let ports: Vec<u16> = (1000..1005).filter(|_| rng.random_bool(0.5)).collect();
            PolicyYaml::new().loopback_ports(if ports.is_empty() { &[1002] } else { &ports })
        }
    };
    for _ in 0..rng.random_range(4..14) {
        let cidr = if rng.random_bool(0.65) {
            let len = [16, 22, 24, 30, 32][rng.random_range(0..5)];
            let net = ipnet::Ipv4Net::new(random_v4(rng), len).unwrap().trunc();
            net.to_string()
        } else {
            let len = [32, 48, 64, 126, 128][rng.random_range(0..5)];
            ipnet::Ipv6Net::new(random_v6(rng), len)
                .unwrap()
                .trunc()
                .to_string()
        };
        let mut ports: Vec<u16> = (0..rng.random_range(1..4))
            .map(|_| 1000 + rng.random_range(0..4))
            .collect();
        ports.sort();
        ports.dedup();
        p = p.allow_cidr(&cidr, &ports, protos[rng.random_range(0..protos.len())]);
    }
    for _ in 0..rng.random_range(1..4) {
        let cidr = if rng.random_bool(0.7) {
            ipnet::Ipv4Net::new(random_v4(rng), [24, 30, 32][rng.random_range(0..3)])
                .unwrap()
                .trunc()
                .to_string()
        } else {
            ipnet::Ipv6Net::new(random_v6(rng), [64, 126, 128][rng.random_range(0..3)])
                .unwrap()
                .trunc()
                .to_string()
        };
        p = p.deny_cidr(&cidr);
    }
    p
}

/// A random destination address, and whether the socket is IPv6.
fn random_addr(rng: &mut StdRng) -> (IpAddr, bool) {
    match rng.random_range(0..13) {
        0 => (
            Ipv4Addr::new(127, 0, 0, rng.random_range(1..4)).into(),
            rng.random_bool(0.5),
        ),
        1 => (Ipv4Addr::UNSPECIFIED.into(), rng.random_bool(0.5)),
        2 => (Ipv6Addr::LOCALHOST.into(), true),
        3 => (Ipv6Addr::UNSPECIFIED.into(), true),
        4 => (random_link_local(rng).into(), true),
        5..=8 => (random_v4(rng).into(), rng.random_bool(0.4)),
        _ => (random_v6(rng).into(), true),
    }
}

/// What a hook sees of `addr` on a socket of that family: the probe sends an IPv4 literal on
/// an IPv6 socket in its mapped form, which Dest::v6 canonicalises back to IPv4, as the
/// kernel side must.
fn dest(addr: IpAddr, v6_socket: bool, port: u16, proto: Proto) -> Dest {
    match (addr, v6_socket) {
        (IpAddr::V4(a), false) => Dest::v4(a.octets(), port, proto),
        (IpAddr::V4(a), true) => Dest::v6(a.to_ipv6_mapped().octets(), port, proto),
        (IpAddr::V6(a), _) => Dest::v6(a.octets(), port, proto),
    }
}

/// The connect hook runs by the socket's family; a send's by the (canonical) destination's:
/// an IPv6 socket sending to a mapped address runs sendmsg4.
fn connect_hook(v6_socket: bool) -> Hook {
    if v6_socket {
        Hook::Connect6
    } else {
        Hook::Connect4
    }
}

fn send_hook(dst: &Dest) -> Hook {
    match dst.family {
        Family::V4 => Hook::Sendmsg4,
        Family::V6 => Hook::Sendmsg6,
    }
}

/// One probe op and the call the reference should judge.
fn random_op(rng: &mut StdRng) -> (String, Call) {
    let port = random_port(rng);
    let (addr, v6_socket) = random_addr(rng);
    let family = if v6_socket { "6" } else { "4" };
    let (kind, proto) = match rng.random_range(0..3) {
        0 => ("connect tcp", Proto::Tcp),
        1 => ("connect udp", Proto::Udp),
        _ => ("sendto udp", Proto::Udp),
    };
    let data = if kind.starts_with("sendto") { " x" } else { "" };
    let op = format!("{kind}{family} {addr} {port}{data}");
    let dst = dest(addr, v6_socket, port, proto);
    let hook = if kind.starts_with("sendto") {
        send_hook(&dst)
    } else {
        connect_hook(v6_socket)
    };
    (op, Call::To { hook, dst })
}

/// A `cmsg-send` op (connect, then sendmsg with IP_TOS / IPV6_TCLASS and no address) and the
/// two calls the reference judges: the connect, and, when that passes, the send. The send
/// names no address; its socket's peer is on loopback when the destination is, or when the
/// connect went to the DNS proxy.
fn random_connected_send(rng: &mut StdRng) -> (String, Dest, Call, Hook) {
    let port = random_port(rng);
    let (addr, v6_socket) = random_addr(rng);
    let family = if v6_socket { "6" } else { "4" };
    let op = format!("cmsg-send udp{family} {addr} {port} tos=8 x");
    let dst = dest(addr, v6_socket, port, Proto::Udp);
    let connect = Call::To {
        hook: connect_hook(v6_socket),
        dst,
    };
    (op, dst, connect, send_hook(&dst))
}

/// The random policy of `round`, written and parsed as the agent will. Loopback is allowed
/// in the first round, judged by the rules in the second and allowed at some ports only in
/// the third, so that every rule about loopback is reached.
fn round_policy(tb: &Testbed, rng: &mut StdRng, round: usize) -> (PolicyYaml, Policy) {
    let loopback = match round {
        0 => Loopback::Allow(true),
        1 => Loopback::Allow(false),
        _ => Loopback::Ports,
    };
    let yaml = random_policy(rng, loopback);
    let path = tb.write_policy(&yaml.render()).expect("writing the policy");
    let policy = policy::load_file(&path).expect("the generated policy parses");
    (yaml, policy)
}

fn assert_no_disagreements(disagreements: &[String], yaml: &PolicyYaml) {
    if !disagreements.is_empty() {
        panic!(
            "{} disagreements under policy\n{}\nfirst ones:\n{}",
            disagreements.len(),
            yaml.render(),
            disagreements
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn kernel_agrees_with_reference_on_random_destinations() {
    let Some(tb) = testbed() else { return };
    let mut rng = seeded_rng(0x005e_ede9);
    // A namespace with only loopback: nothing the hook lets through can leave it.
    let isolated = Netns::new("agree").expect("creating the isolated namespace");

    let mut tally: BTreeMap<(&'static str, bool), usize> = BTreeMap::new();
    let mut disagreements = Vec::new();
    let rounds = 3;
    for round in 0..rounds {
        let (yaml, policy) = round_policy(&tb, &mut rng, round);
        let ops: Vec<(String, Call)> = (0..DESTINATIONS / rounds)
            .map(|_| random_op(&mut rng))
            .collect();
        let args: Vec<&str> = ops.iter().map(|(op, _)| op.as_str()).collect();
        let out = tb
            .agent(&yaml)
            .expect("agent command")
            .args(&args)
            .run_in(&isolated)
            .expect("running the agent");
        assert_eq!(
            out.exit_code(),
            Some(0),
            "round {round}: {}",
            out.describe()
        );
        assert_eq!(
            out.results.len(),
            ops.len(),
            "round {round}: {}",
            out.describe()
        );
        for ((op, call), result) in ops.iter().zip(&out.results) {
            assert_eq!(&result.op, op);
            let want = reference::judge(
                &policy,
                &Resolved::new(),
                egress_agent::dns::doh_list(),
                Some(&proxy()),
                *call,
            );
            let kernel_denied = result.errno == Some(libc::EPERM);
            let kind: &'static str = if op.starts_with("connect") {
                "connect"
            } else {
                "sendto"
            };
            *tally.entry((kind, !denies(&want))).or_default() += 1;
            if kernel_denied != denies(&want) {
                disagreements.push(format!(
                    "round {round}: {op}: reference {want:?}, kernel {:?}",
                    result.error
                ));
            }
        }
        assert_no_disagreements(&disagreements, &yaml);
    }
    eprintln!("verdicts (op, allowed) -> count: {tally:?}");
    // The comparison means something only if both verdicts occur for every kind of op.
    for kind in ["connect", "sendto"] {
        for allowed in [true, false] {
            let n = tally.get(&(kind, allowed)).copied().unwrap_or(0);
            assert!(
                n >= 50,
                "only {n} {kind} ops were {}",
                if allowed { "allowed" } else { "denied" }
            );
        }
    }
}

/// Sends on connected UDP sockets with ancillary data (which run the send hooks without an
/// address), to random destinations: the connect is judged, then the send by the rules for a
/// connected send (an IPv6 socket whose peer is loopback, the DNS proxy included, is refused;
/// an IPv4 one leaves from a loopback source). Also a DNS query to a link-local resolver,
/// sent over IPv6 without connecting, which is refused.
#[test]
fn kernel_agrees_with_reference_on_connected_sends_and_link_local_dns() {
    let Some(tb) = testbed() else { return };
    let mut rng = seeded_rng(0x005e_ede9 ^ 0xc0ec);
    // Routes to every random destination, onto a veth pair whose other end is in the same
    // namespace and answers nobody: a datagram waits for a neighbour that never answers, and
    // is dropped.
    let routed = Netns::new("agreec").expect("creating the namespace");
    for args in [
        &[
            "link", "add", "agr0", "type", "veth", "peer", "name", "agr1",
        ][..],
        &["link", "set", "agr0", "up"],
        &["link", "set", "agr1", "up"],
        &["addr", "add", "198.18.255.1/16", "dev", "agr0"],
        &[
            "-6",
            "addr",
            "add",
            "fd00:e9:ff::1/32",
            "dev",
            "agr0",
            "nodad",
        ],
    ] {
        routed.ip(args).expect("setting up the veth pair");
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum Seen {
        ConnectRefused,
        SendRefused,
        Sent,
    }
    let mut tally: BTreeMap<Seen, usize> = BTreeMap::new();
    let rounds = 3;
    for round in 0..rounds {
        let (yaml, policy) = round_policy(&tb, &mut rng, round);
        let mut ops: Vec<(String, Seen, String)> = Vec::new();
        for _ in 0..DESTINATIONS / rounds / 3 {
            let (op, dst, connect, send_hook) = random_connected_send(&mut rng);
            let want_connect = reference::judge(
                &policy,
                &Resolved::new(),
                egress_agent::dns::doh_list(),
                Some(&proxy()),
                connect,
            );
            let redirected = matches!(
                want_connect,
                Outcome::Allow {
                    reason: Reason::RedirectDns | Reason::DnsUnauthorizedResolver,
                    ..
                }
            );
            let want = if denies(&want_connect) {
                (Seen::ConnectRefused, format!("{want_connect:?}"))
            } else {
                let send = Call::Connected {
                    hook: send_hook,
                    peer_loopback: dst.is_loopback() || redirected,
                };
                let want_send = reference::judge(
                    &policy,
                    &Resolved::new(),
                    egress_agent::dns::doh_list(),
                    Some(&proxy()),
                    send,
                );
                let seen = if denies(&want_send) {
                    Seen::SendRefused
                } else {
                    Seen::Sent
                };
                (seen, format!("{want_connect:?} then {want_send:?}"))
            };
            ops.push((op, want.0, want.1));
        }
        for _ in 0..20 {
            let ll = random_link_local(&mut rng);
            let port = random_port(&mut rng);
            let op = format!("sendto udp6 {ll} {port} x");
            let dst = Dest::v6(ll.octets(), port, Proto::Udp);
            let want = reference::judge(
                &policy,
                &Resolved::new(),
                egress_agent::dns::doh_list(),
                Some(&proxy()),
                Call::To {
                    hook: Hook::Sendmsg6,
                    dst,
                },
            );
            let seen = if denies(&want) {
                Seen::SendRefused
            } else {
                Seen::Sent
            };
            ops.push((op, seen, format!("{want:?}")));
        }
        let out = tb
            .agent(&yaml)
            .expect("agent command")
            .args(ops.iter().map(|(op, _, _)| op.as_str()))
            .run_in(&routed)
            .expect("running the agent");
        assert_eq!(
            (out.exit_code(), out.results.len()),
            (Some(0), ops.len()),
            "round {round}: {}",
            out.describe()
        );
        let mut disagreements = Vec::new();
        for ((op, want, why), result) in ops.iter().zip(&out.results) {
            assert_eq!(&result.op, op);
            *tally.entry(*want).or_default() += 1;
            let kernel_denied = result.errno == Some(libc::EPERM);
            if kernel_denied != matches!(want, Seen::ConnectRefused | Seen::SendRefused) {
                disagreements.push(format!(
                    "round {round}: {op}: reference {why}, kernel {}",
                    if result.ok {
                        "sent".to_owned()
                    } else {
                        format!("{:?}", result.error)
                    }
                ));
            }
        }
        assert_no_disagreements(&disagreements, &yaml);
    }
    eprintln!("outcomes -> count: {tally:?}");
    for seen in [Seen::ConnectRefused, Seen::SendRefused, Seen::Sent] {
        let n = tally.get(&seen).copied().unwrap_or(0);
        assert!(n >= 50, "only {n} ops ended {seen:?}");
    }
}
