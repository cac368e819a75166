//! Through the library: the programs of one slot loaded and attached directly, so that a
//! test can read and write the bucket map itself.

use std::path::PathBuf;

use egress_agent::compile::{Compiled, Resolved, SetIds, compile};
use egress_agent::enforcer::Enforcer;
use egress_agent::loader::Programs;
use egress_agent::maps::MapSet;
use egress_agent::policy::Policy;
use egress_agent::ratelimit::{CompiledLimits, RateMaps, compile_limits, monotonic_ns};
use egress_common::ratelimit::{BUCKET_DESTINATION, Bucket, BucketKey, MAX_BUCKETS};
use egress_common::{Proto, Reason, SlotConfig};
use egress_tests::netns::Netns;
use egress_tests::process::RunOutput;
use egress_tests::testbed::Testbed;
use libc::EPERM;

use super::{parse_policy, policy_yaml, rule};
use crate::testbed;

/// `ok`: the hook let the connect through (in a namespace with only loopback it then fails
/// with ENETUNREACH); otherwise it must have been refused with EPERM.
#[track_caller]
fn assert_verdicts(out: &RunOutput, want: &[bool]) {
    let got: Vec<bool> = out
        .results
        .iter()
        .map(|r| {
            assert!(
                r.failed_with(EPERM) || r.failed_with(libc::ENETUNREACH),
                "unexpected outcome {r:?}\n{}",
                out.describe()
            );
            r.failed_with(libc::ENETUNREACH)
        })
        .collect();
    assert_eq!(got, want, "{}", out.describe());
}

/// A full bucket table fails closed: a destination that needs a new bucket is refused
/// (`rate_limit_table_full`, counted), a destination with a bucket keeps exactly the budget
/// it had (no reset), and once there is room again new destinations get their budget. The
/// collector deletes only full buckets.
#[test]
fn a_full_bucket_table_refuses_new_destinations_and_resets_no_budget() {
    let Some(tb) = testbed() else { return };
    let ns = Netns::new("rlfull").expect("namespace");
    let cgroup = tb.cgroups.child("rlfull").expect("child cgroup");
    let yaml = policy_yaml(
        &[rule("cidr", "198.18.0.0/24", &[9], "tcp", Some((2, 3600)))],
        None,
        None,
    );
    let slot = 3;
    let mut enforcer =
        Enforcer::start(parse_policy(&tb, &yaml), Resolved::new(), slot).expect("enforcer");
    enforcer.attach(&cgroup).expect("attaching");
    let a = "connect tcp4 198.18.0.1 9";
    let b = "connect tcp4 198.18.0.7 9";

    let out = tb.run_in_cgroup_ns(&ns, &cgroup, &[a]);
    assert_verdicts(&out, &[true]);

    // Fill the table with buckets that are far from full (the collector leaves them).
    let rate = enforcer.rate_limits();
    let mut filler = Vec::new();
    for i in 0..u64::from(MAX_BUCKETS) {
        let key = BucketKey {
            slot,
            kind: BUCKET_DESTINATION,
            family: 0,
            _pad: [0; 2],
            budget: 0xf111_0000_0000_0000 | i,
            addr: [0; 16],
        };
        match rate.insert_bucket(
            &key,
            &Bucket {
                tat_ns: u64::MAX / 2,
            },
        ) {
            Ok(()) => filler.push(key),
            Err(_) => break,
        }
    }
    let total = rate.buckets().expect("buckets").len();
    assert_eq!(total, MAX_BUCKETS as usize, "the table should be full");

    // A has one connection left, and only one; B cannot get a bucket.
    let out = tb.run_in_cgroup_ns(&ns, &cgroup, &[a, a, b, b]);
    assert_verdicts(&out, &[true, false, false, false]);
    let maps = enforcer.maps();
    assert_eq!(
        maps.counter(slot, Reason::RateLimitTableFull, Proto::Tcp)
            .unwrap(),
        2
    );
    assert_eq!(
        maps.counter(slot, Reason::RateLimitedDestination, Proto::Tcp)
            .unwrap(),
        1
    );

    // The collector deletes a full bucket and none of the others.
    let stale = BucketKey {
        budget: 0xdead,
        ..filler[0]
    };
    rate.remove_bucket(&filler[0]).expect("remove");
    rate.insert_bucket(&stale, &Bucket { tat_ns: 1 })
        .expect("insert");
    // (The background collector may have got there first.)
    assert!(rate.collect_full(slot, monotonic_ns()).expect("collect") <= 1);
    let left = rate.buckets().expect("buckets");
    assert_eq!(left.len(), MAX_BUCKETS as usize - 1);
    assert!(left.iter().all(|(k, _)| *k != stale));

    // Room for one: B gets its whole budget, A still has nothing.
    let out = tb.run_in_cgroup_ns(&ns, &cgroup, &[b, b, b, a]);
    assert_verdicts(&out, &[true, true, false, false]);
    for k in &filler[1..] {
        rate.remove_bucket(k).expect("remove");
    }
}

/// The programs of one slot, loaded and attached to a fresh cgroup through the library, with
/// their maps, for tests that write the maps themselves.
struct Direct {
    _programs: Programs,
    maps: MapSet,
    rate: RateMaps,
    slot: u32,
    cgroup: PathBuf,
    ns: Netns,
    /// What is in force.
    current: (Compiled, CompiledLimits),
}

impl Direct {
    fn new(tb: &Testbed, label: &str, slot: u32) -> Self {
        let ns = Netns::new(label).expect("namespace");
        let cgroup = tb.cgroups.child(label).expect("child cgroup");
        let mut programs = Programs::load(slot).expect("loading");
        let maps = MapSet::take(&mut programs).expect("maps");
        let rate = RateMaps::take(&mut programs).expect("rate maps");
        programs.attach(&cgroup).expect("attaching");
        Direct {
            _programs: programs,
            maps,
            rate,
            slot,
            cgroup,
            ns,
            current: (Compiled::default(), CompiledLimits::default()),
        }
    }

    /// What a reload does: writes `next` (compiled under a new policy id) next to what is in
    /// force, switches the slot to it in one write, then removes the old entries.
    fn switch(&mut self, next: (Compiled, CompiledLimits)) {
        let (c, l) = &next;
        self.maps.apply(&Compiled::default(), c).expect("rules");
        self.rate
            .apply(&CompiledLimits::default(), l)
            .expect("limits");
        let config = SlotConfig {
            policy_id: c.policy_id,
            flags: c.slot_flags,
            ..SlotConfig::default()
        };
        self.maps.set_slot(self.slot, config).expect("slot");
        self.maps
            .apply(&self.current.0, &Compiled::default())
            .expect("old rules");
        self.rate
            .apply(&self.current.1, &CompiledLimits::default())
            .expect("old limits");
        self.current = next;
    }

    fn probe(&self, tb: &Testbed, ops: &[&str]) -> RunOutput {
        tb.run_in_cgroup_ns(&self.ns, &self.cgroup, ops)
    }
}

fn compiled(p: &Policy, policy_id: u32) -> (Compiled, CompiledLimits) {
    (
        compile(
            p,
            policy_id,
            &Resolved::new(),
            egress_agent::dns::doh_list(),
            &mut SetIds::default(),
        ),
        compile_limits(p, policy_id),
    )
}

/// Budgets are keyed by what the policy says about them, not by the policy id: switching the
/// slot to a recompiled policy (what a reload does) keeps the budgets it leaves unchanged,
/// with what they have used, and starts a changed budget afresh.
#[test]
fn budgets_survive_a_policy_switch_unless_the_switch_changes_them() {
    let Some(tb) = testbed() else { return };
    let mut d = Direct::new(&tb, "rlswitch", 4);
    let v1 = parse_policy(
        &tb,
        &policy_yaml(
            &[
                rule("cidr", "198.18.0.1/32", &[9], "tcp", Some((3, 3600))),
                rule("cidr", "198.18.0.2/32", &[9], "tcp", Some((3, 3600))),
            ],
            None,
            None,
        ),
    );
    // v2: an unrelated rule in front (rule ids move), A's budget unchanged, B's changed.
    let v2 = parse_policy(
        &tb,
        &policy_yaml(
            &[
                rule("cidr", "198.18.0.9/32", &[9], "tcp", None),
                rule("cidr", "198.18.0.1/32", &[9], "tcp", Some((3, 3600))),
                rule("cidr", "198.18.0.2/32", &[9], "tcp", Some((4, 3600))),
            ],
            None,
            None,
        ),
    );
    let a = "connect tcp4 198.18.0.1 9";
    let b = "connect tcp4 198.18.0.2 9";
    d.switch(compiled(&v1, 1));
    let out = d.probe(&tb, &[a, a, b, b, b, b]);
    assert_verdicts(&out, &[true, true, true, true, true, false]);

    d.switch(compiled(&v2, 2));
    // A: one left of three. B: a new budget of four.
    let out = d.probe(&tb, &[a, a, b, b, b, b, b]);
    assert_verdicts(&out, &[true, false, true, true, true, true, false]);
}

/// A limit entry the agent never writes (a budget of zero connections, or no refill
/// interval) denies, counted as the destination's rate limit; it never allows.
#[test]
fn a_limit_entry_the_agent_never_writes_denies() {
    let Some(tb) = testbed() else { return };
    let mut d = Direct::new(&tb, "rlbad", 5);
    let p = parse_policy(
        &tb,
        &policy_yaml(
            &[
                rule("cidr", "198.18.0.1/32", &[9], "tcp", Some((5, 3600))),
                rule("cidr", "198.18.0.2/32", &[9], "tcp", Some((5, 3600))),
            ],
            None,
            None,
        ),
    );
    let (c, mut l) = compiled(&p, 1);
    let mut entries = l.limits.values_mut();
    entries.next().expect("rule 0").destination.burst = 0;
    entries.next().expect("rule 1").destination.interval_ns = 0;
    d.switch((c, l));
    let out = d.probe(
        &tb,
        &["connect tcp4 198.18.0.1 9", "connect tcp4 198.18.0.2 9"],
    );
    assert_verdicts(&out, &[false, false]);
    let count = |r| d.maps.counter(d.slot, r, Proto::Tcp).unwrap();
    assert_eq!(count(Reason::RateLimitedDestination), 2);
    assert_eq!(count(Reason::AllowRule), 0);
}
