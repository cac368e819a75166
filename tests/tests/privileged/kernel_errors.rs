//! Paths where the kernel programs cannot decide: they deny, and count it.
//!
//! These drive the programs through the agent's library (no agent process): load, attach to a
//! test cgroup, and run the probe in that cgroup with the slot left unconfigured or the
//! programs bound to a slot outside the table.

use egress_agent::loader::Programs;
use egress_agent::maps::MapSet;
use egress_common::{Proto, Reason, maps::MAX_SLOTS};
use egress_tests::netns::Netns;

use crate::testbed;

fn check_denies_and_counts(slot: u32, reason: Reason) {
    let Some(tb) = testbed() else { return };
    let ns = Netns::new("kerr").expect("namespace");
    let cgroup = tb.cgroups.child("kerr").expect("child cgroup");
    let mut programs = Programs::load(slot).expect("loading the programs");
    let maps = MapSet::take(&mut programs).expect("maps");
    // No policy is ever written: the slot reads as all-zero.
    programs.attach(&cgroup).expect("attaching");

    let ops = [
        "socket tcp4",
        "connect tcp4 127.0.0.1 9",
        "connect udp6 ::1 9",
        "sendto udp4 198.18.0.2 9 x",
    ];
    let out = tb.run_in_cgroup_ns(&ns, &cgroup, &ops);
    for op in ops {
        out.assert_errno(op, libc::EPERM);
    }
    // socket() itself is refused, so the connect ops never reach the sock_addr hooks: each of
    // the four ops creates one socket and is counted at creation.
    let counted: u64 = [Proto::Tcp, Proto::Udp]
        .iter()
        .map(|p| maps.counter(slot, reason, *p).expect("counter"))
        .sum();
    assert_eq!(
        counted,
        4,
        "{reason:?} counter; probe output: {}",
        out.describe()
    );
    let allowed: u64 = Reason::ALL
        .iter()
        .filter(|r| r.allows())
        .flat_map(|r| {
            [Proto::Tcp, Proto::Udp, Proto::Other].map(|p| maps.counter(slot, *r, p).unwrap_or(0))
        })
        .sum();
    assert_eq!(allowed, 0, "nothing may be allowed without a policy");
}

#[test]
fn unconfigured_slot_denies_everything_and_counts_no_policy() {
    check_denies_and_counts(5, Reason::DenyNoPolicy);
}

#[test]
fn out_of_range_slot_denies_everything_and_counts_internal_error() {
    check_denies_and_counts(MAX_SLOTS + 3, Reason::DenyInternal);
}

/// An IPv6 header to the remote end of the veth pair, with `next` as its next header, and
/// `rest` after it.
fn raw6_packet(next: u8, rest: &[u8]) -> String {
    let mut p = vec![0x60, 0, 0, 0, 0, 0, next, 64];
    p.extend_from_slice(
        &"fd00:e9::1"
            .parse::<std::net::Ipv6Addr>()
            .expect("literal")
            .octets(),
    );
    p.extend_from_slice(
        &"fd00:e9::2"
            .parse::<std::net::Ipv6Addr>()
            .expect("literal")
            .octets(),
    );
    let len = u16::try_from(rest.len()).expect("short");
    p[4..6].copy_from_slice(&len.to_be_bytes());
    p.extend_from_slice(rest);
    let hex: String = p.iter().map(|b| format!("{b:02x}")).collect();
    format!("raw6 fd00:e9::2 {hex}")
}

/// A packet whose IPv6 header chain is cut off (a hop-by-hop header announced, none there),
/// sent whole from a raw socket (root, with `allow_other_socket_types`), is dropped by the
/// per-packet check as unreadable and counted as such; the same packet with its hop-by-hop
/// header, or with no next header, leaves.
#[test]
fn a_truncated_raw_packet_is_dropped_and_counted_as_unreadable() {
    use egress_agent::compile::Resolved;
    use egress_agent::enforcer::Enforcer;
    let Some(tb) = testbed() else { return };
    egress_agent::kernel::mip6::check_always();
    let cgroup = tb.cgroups.child("kerr-raw").expect("child cgroup");
    let yaml = egress_tests::policy::PolicyYaml::new()
        .allow_other_socket_types(true)
        .render();
    let policy = egress_agent::policy::parse_str(&yaml, std::path::Path::new("raw.yaml"))
        .expect("the policy parses");
    let slot = 2;
    let mut enforcer = Enforcer::start(policy, Resolved::new(), slot).expect("starting");
    enforcer.attach(&cgroup).expect("attaching");

    const NO_NEXT_HEADER: u8 = 59;
    const HOP_BY_HOP: u8 = 0;
    let cut = raw6_packet(HOP_BY_HOP, &[]);
    let plain = raw6_packet(NO_NEXT_HEADER, &[]);
    let with_hop = raw6_packet(HOP_BY_HOP, &[NO_NEXT_HEADER, 0, 1, 4, 0, 0, 0, 0]);
    let out = tb.run_in_cgroup_ns_as_root(tb.client(), &cgroup, &[&cut, &plain, &with_hop]);
    out.assert_errno(&cut, libc::EPERM);
    out.assert_ok(&plain);
    out.assert_ok(&with_hop);
    let maps = enforcer.maps();
    assert_eq!(
        (
            maps.counter(slot, Reason::DenyPacketUnreadable, Proto::Other)
                .expect("counter"),
            maps.counter(slot, Reason::DenyRoutingHeader, Proto::Other)
                .expect("counter"),
        ),
        (1, 0),
        "{}",
        out.describe()
    );
}
