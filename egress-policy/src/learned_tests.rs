use std::net::IpAddr;

use egress_common::{Dest, Proto, Reason, RuleKey, RuleValue, SlotConfig, Tables, decide};

use super::*;
use crate::compile::{Compiled, SetIds, compile};
use crate::parse_str;

const YAML: &str = r#"
egress_policy:
  default_action: DENY
  allowed_destinations:
    - host: "*.example.test"
      ports: [443]
      protocols: [https]
    - host: api.example.test
      ports: [8080, 8081, 8082]
      protocols: [tcp]
  denied_destinations:
    - cidr: 198.18.9.0/24
"#;

/// The compiled tables plus a learned map, read at one clock second, as the kernel does.
struct WithLearned<'a> {
    compiled: &'a Compiled,
    learned: &'a BTreeMap<RuleKey, RuleValue>,
    ports: BTreeMap<PortKey, u32>,
    now_s: u32,
}

impl Tables for WithLearned<'_> {
    fn rule(&self, key: &RuleKey, prefix_len: u32) -> Option<RuleValue> {
        self.compiled.rule(key, prefix_len)
    }
    fn exact(&self, key: &RuleKey) -> Option<RuleValue> {
        self.compiled.exact.get(key).copied()
    }
    fn port(&self, key: &PortKey) -> Option<u32> {
        self.compiled
            .ports
            .get(key)
            .or_else(|| self.ports.get(key))
            .copied()
    }
    fn learned(&self, key: &RuleKey) -> Option<RuleValue> {
        self.learned.get(key).copied()
    }
    fn now_s(&self) -> u32 {
        self.now_s
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn tcp(addr: &str, port: u16) -> Dest {
    match ip(addr) {
        IpAddr::V4(v4) => Dest::v4(v4.octets(), port, Proto::Tcp),
        IpAddr::V6(v6) => Dest::v6(v6.octets(), port, Proto::Tcp),
    }
}

struct Fixture {
    policy: Policy,
    compiled: Compiled,
    ports: BTreeMap<PortKey, u32>,
}

impl Fixture {
    fn new() -> Self {
        let policy = parse_str(YAML, std::path::Path::new("test.yaml")).unwrap();
        let compiled = compile(
            &policy,
            7,
            &Default::default(),
            crate::doh::testing::builtin(),
            &mut SetIds::default(),
        );
        Fixture {
            policy,
            compiled,
            ports: BTreeMap::new(),
        }
    }

    fn apply(&mut self, w: &Writes) {
        self.ports.extend(w.ports.iter().copied());
    }

    fn judge(&self, table: &LearnedTable, dst: &Dest, now_s: u32) -> Reason {
        let tables = WithLearned {
            compiled: &self.compiled,
            learned: table.entries(),
            ports: self.ports.clone(),
            now_s,
        };
        let slot = SlotConfig {
            policy_id: 7,
            ..SlotConfig::default()
        };
        decide(&tables, &slot, dst).reason
    }
}

#[test]
fn learned_address_opens_the_rules_ports_until_its_deadline() {
    let mut f = Fixture::new();
    let mut t = LearnedTable::new(7, 8);
    let w = t.learn(&f.policy, "a.example.test", &[0], &[ip("198.18.1.1")], 100);
    f.apply(&w);
    assert_eq!(w.entries.len(), 1);
    assert_eq!(
        f.judge(&t, &tcp("198.18.1.1", 443), 50),
        Reason::AllowLearned
    );
    assert_eq!(f.judge(&t, &tcp("198.18.1.1", 80), 50), Reason::DenyNoRule);
    assert_eq!(f.judge(&t, &tcp("198.18.1.2", 443), 50), Reason::DenyNoRule);
    // Past the deadline the kernel ignores it; expire removes it.
    assert_eq!(
        f.judge(&t, &tcp("198.18.1.1", 443), 101),
        Reason::DenyNoRule
    );
    let w = t.expire(&f.policy, 101);
    assert_eq!(w.removed.len(), 1);
    assert!(t.is_empty());
}

#[test]
fn two_names_on_one_address_get_the_union_and_a_large_set_uses_the_port_map() {
    let mut f = Fixture::new();
    let mut t = LearnedTable::new(7, 8);
    let a = ip("198.18.1.1");
    f.apply(&t.learn(&f.policy, "cdn.example.test", &[0], &[a], 100));
    let w = t.learn(&f.policy, "api.example.test", &[0, 1], &[a], 200);
    f.apply(&w);
    // Four (proto, port) pairs: the port map holds them.
    assert!(!w.ports.is_empty());
    for port in [443, 8080, 8081, 8082] {
        assert_eq!(
            f.judge(&t, &tcp("198.18.1.1", port), 150),
            Reason::AllowLearned,
            "{port}"
        );
    }
    assert_eq!(f.judge(&t, &tcp("198.18.1.1", 22), 150), Reason::DenyNoRule);
}

#[test]
fn a_denied_range_wins_over_a_learned_address() {
    let mut f = Fixture::new();
    let mut t = LearnedTable::new(7, 8);
    f.apply(&t.learn(&f.policy, "a.example.test", &[0], &[ip("198.18.9.9")], 100));
    assert_eq!(f.judge(&t, &tcp("198.18.9.9", 443), 50), Reason::DenyRule);
}

#[test]
fn mapped_and_v6_addresses() {
    let mut f = Fixture::new();
    let mut t = LearnedTable::new(7, 8);
    f.apply(&t.learn(
        &f.policy,
        "a.example.test",
        &[0],
        &[ip("::ffff:198.18.1.7"), ip("fd00:e9::7")],
        100,
    ));
    assert_eq!(
        f.judge(&t, &tcp("198.18.1.7", 443), 1),
        Reason::AllowLearned
    );
    assert_eq!(
        f.judge(&t, &tcp("fd00:e9::7", 443), 1),
        Reason::AllowLearned
    );
}

#[test]
fn the_cap_keeps_the_newest_answer_and_reports_what_it_left_out() {
    let f = Fixture::new();
    let mut t = LearnedTable::new(7, 3);
    let first: Vec<IpAddr> = (1..=3).map(|i| ip(&format!("198.18.2.{i}"))).collect();
    t.learn(&f.policy, "a.example.test", &[0], &first, 100);
    let second: Vec<IpAddr> = (4..=8).map(|i| ip(&format!("198.18.2.{i}"))).collect();
    let w = t.learn(&f.policy, "a.example.test", &[0], &second, 200);
    assert_eq!(w.capped, 2);
    assert_eq!(t.len(), 3);
    assert!(t.entries().keys().all(|k| k.addr[3] >= 4));
}

#[test]
fn rebase_moves_allowed_names_to_the_new_id_and_drops_the_others() {
    let f = Fixture::new();
    let mut t = LearnedTable::new(7, 8);
    t.learn(&f.policy, "a.example.test", &[0], &[ip("198.18.1.1")], 100);
    t.learn(&f.policy, "b.example.test", &[0], &[ip("198.18.1.2")], 100);
    let w = t.rebase(&f.policy, 8, |name, addrs| {
        if name == "a.example.test" {
            (vec![0], addrs.to_vec())
        } else {
            (Vec::new(), Vec::new())
        }
    });
    assert_eq!(w.entries.len(), 1);
    assert_eq!(t.policy_id(), 8);
    let key = w.entries[0].0;
    assert_eq!(u32::from_be_bytes(key.policy_id), 8);
    assert_eq!(key.addr[..4], [198, 18, 1, 1]);
}

#[test]
fn a_write_that_failed_is_written_again_by_the_next_answer() {
    let f = Fixture::new();
    let mut t = LearnedTable::new(7, 8);
    let a = ip("198.18.1.1");
    let w = t.learn(&f.policy, "api.example.test", &[0, 1], &[a], 100);
    assert_eq!(w.entries.len(), 1);
    assert!(!w.ports.is_empty());
    t.unwrite(&w);
    let again = t.learn(&f.policy, "api.example.test", &[0, 1], &[a], 100);
    assert_eq!(again.entries.len(), 1, "the entry is written again");
    assert!(!again.ports.is_empty(), "and its port set");
    assert_ne!(
        again.ports[0].0.set_id, w.ports[0].0.set_id,
        "under a fresh set id"
    );
}

#[test]
fn each_name_tags_its_addresses_and_a_shared_address_takes_the_first_names_budget() {
    let f = Fixture::new();
    let mut t = LearnedTable::new(7, 8);
    let tag_of = |t: &LearnedTable, addr: &str| {
        t.entries()
            .get(&rule_key(7, ip(addr)))
            .map(|v| v.name_tag)
            .unwrap()
    };
    t.learn(&f.policy, "b.example.test", &[0], &[ip("198.18.1.2")], 100);
    t.learn(&f.policy, "c.example.test", &[0], &[ip("198.18.1.3")], 100);
    let b = tag_of(&t, "198.18.1.2");
    let c = tag_of(&t, "198.18.1.3");
    assert_ne!(b, 0);
    assert_ne!(b, c, "two names, two budgets");
    assert_eq!(
        b,
        name_tag(b"B.Example.Test"),
        "case does not make a new budget"
    );
    // a.example.test also answers 198.18.1.3: the address now counts against the first name
    // in byte order, so more names on one address never add budget.
    t.learn(&f.policy, "a.example.test", &[0], &[ip("198.18.1.3")], 100);
    assert_eq!(tag_of(&t, "198.18.1.3"), name_tag(b"a.example.test"));
    assert_eq!(tag_of(&t, "198.18.1.2"), b);
}
