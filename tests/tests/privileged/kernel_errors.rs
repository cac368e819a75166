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
