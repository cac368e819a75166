use std::net::IpAddr;
use std::path::Path;

use egress_common::{Dest, Proto};

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or(IpAddr::from([0u8; 4]))
}

fn parse(text: &str) -> Policy {
    match egress_policy::parse_str(text, Path::new("learned.yaml")) {
        Ok(p) => p,
        Err(e) => panic!("{e}\n{text}"),
    }
}

fn seen(dests: &[(&str, u16, Transport)], names: &[(&str, &[&str])]) -> Seen {
    Seen {
        destinations: dests.iter().map(|&(a, p, t)| ((ip(a), p, t), 1)).collect(),
        names: names
            .iter()
            .map(|(n, addrs)| ((*n).to_owned(), addrs.iter().map(|a| ip(a)).collect()))
            .collect(),
        dropped: 0,
    }
}

fn allowed(p: &Policy, addr: &str, port: u16, proto: Proto) -> bool {
    let dst = match ip(addr) {
        IpAddr::V4(a) => Dest::v4(a.octets(), port, proto),
        IpAddr::V6(a) => Dest::v6(a.octets(), port, proto),
    };
    egress_policy::reference::decide(
        p,
        &egress_policy::compile::Resolved::new(),
        crate::dns::doh_list(),
        &dst,
    )
    .allowed()
}

#[test]
fn names_become_host_rules_and_bare_addresses_single_address_cidrs() {
    let start = match start_policy(None, &egress_policy::capacity::MapLimits::default()) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let s = seen(
        &[
            ("198.18.0.2", 443, Transport::Tcp),
            ("198.18.0.2", 8443, Transport::Tcp),
            ("198.18.0.9", 5353, Transport::Udp),
            ("fd00:e9::7", 80, Transport::Tcp),
        ],
        &[
            ("api.example.test", &["198.18.0.2"]),
            ("unused.example.test", &["198.18.0.77"]),
        ],
    );
    let text = build(&start, &s, false, "server --flag");
    let p = parse(&text);
    assert!(p.mode.is_none(), "written to be enforced\n{text}");
    let targets: Vec<(String, Vec<u16>, Vec<Protocol>)> = p
        .allowed
        .iter()
        .map(|r| (r.target.to_string(), r.ports.clone(), r.protocols.clone()))
        .collect();
    assert_eq!(
        targets,
        vec![
            (
                "api.example.test".to_owned(),
                vec![443, 8443],
                vec![Protocol::Tcp]
            ),
            ("198.18.0.9/32".to_owned(), vec![5353], vec![Protocol::Udp]),
            ("fd00:e9::7/128".to_owned(), vec![80], vec![Protocol::Tcp]),
        ],
        "{text}"
    );
    assert!(text.starts_with("# Learned by `egress-agent learn` from a run of: server --flag\n"));
    assert!(
        text.contains("# Resolved but never connected to (not allowed; add them with their ports if they are needed): unused.example.test"),
        "{text}"
    );
    // What was used is allowed, and only that.
    assert!(allowed(&p, "198.18.0.9", 5353, Proto::Udp));
    assert!(!allowed(&p, "198.18.0.9", 5353, Proto::Tcp));
    assert!(!allowed(&p, "198.18.0.10", 5353, Proto::Udp));
    assert!(allowed(&p, "fd00:e9::7", 80, Proto::Tcp));
    let names = crate::dns::install::NamePolicy::new(Arc::new(p.clone()));
    assert_eq!(
        names.decide("api.example.test"),
        NameDecision::Allowed(vec![0])
    );
    assert_eq!(
        names.decide("unused.example.test"),
        NameDecision::NotAllowed
    );
}

#[test]
fn one_entry_per_transport_so_ports_do_not_cross_protocols() {
    let start = parse("egress_policy:\n  default_action: DENY\n  allowed_destinations: []\n");
    let s = seen(
        &[
            ("198.18.0.2", 443, Transport::Tcp),
            ("198.18.0.2", 443, Transport::Udp),
            ("198.18.0.2", 53000, Transport::Udp),
        ],
        &[("h.example.test", &["198.18.0.2"])],
    );
    let p = parse(&build(&start, &s, false, "x"));
    assert_eq!(p.allowed.len(), 2);
    assert_eq!(p.allowed[0].ports, vec![443]);
    assert_eq!(p.allowed[0].protocols, vec![Protocol::Tcp]);
    assert_eq!(p.allowed[1].ports, vec![443, 53000]);
    assert_eq!(p.allowed[1].protocols, vec![Protocol::Udp]);
}

#[test]
fn the_starting_policy_is_kept_and_its_denials_stay() {
    let start = parse(
        "egress_policy:\n  name: base\n  default_action: DENY\n  allowed_destinations:\n    - cidr: \
         198.18.5.0/24\n      ports: [22]\n      protocols: [tcp]\n      purpose: ssh\n  \
         denied_destinations:\n    - host: \"*.bad.example.test\"\n    - cidr: 198.18.9.0/24\n  \
         dns_policy:\n    allowed_resolvers: [198.18.0.53]\n    block_doh: true\n  mode: audit\n",
    );
    let s = seen(
        &[
            ("198.18.0.2", 443, Transport::Tcp),
            ("198.18.9.1", 443, Transport::Tcp),
        ],
        &[("x.bad.example.test", &["198.18.0.2"])],
    );
    let text = build(&start, &s, false, "x");
    let p = parse(&text);
    assert_eq!(p.name, "base");
    assert_eq!(p.allowed.len(), 1, "{text}");
    assert_eq!(p.allowed[0].purpose.as_deref(), Some("ssh"));
    assert_eq!(p.denied, start.denied);
    assert_eq!(p.dns, start.dns);
    assert!(p.mode.is_none());
    assert!(
        text.contains(
            "# Used but denied: x.bad.example.test (tcp/443): denied by denied_destinations[0]"
        ),
        "{text}"
    );
    assert!(
        text.contains("# Used but denied: 198.18.9.1 (tcp/443): in denied_destinations"),
        "{text}"
    );
}

#[test]
fn wildcards_collapse_names_under_one_registrable_domain_only_when_asked() {
    let start = parse("egress_policy:\n  default_action: DENY\n  allowed_destinations: []\n");
    let s = seen(
        &[
            ("198.18.0.2", 443, Transport::Tcp),
            ("198.18.0.3", 443, Transport::Tcp),
            ("198.18.0.4", 8443, Transport::Tcp),
            ("198.18.0.5", 443, Transport::Tcp),
            ("198.18.0.6", 443, Transport::Tcp),
            ("198.18.0.7", 443, Transport::Tcp),
        ],
        &[
            ("a.example.com", &["198.18.0.2"]),
            ("b.c.example.com", &["198.18.0.3"]),
            ("example.com", &["198.18.0.4"]),
            // Under a public suffix of the private section: each is its own domain.
            ("one.github.io", &["198.18.0.5"]),
            ("two.github.io", &["198.18.0.6"]),
            ("solo.example.org", &["198.18.0.7"]),
        ],
    );
    let exact = parse(&build(&start, &s, false, "x"));
    assert_eq!(exact.allowed.len(), 6);
    let text = build(&start, &s, true, "x");
    let p = parse(&text);
    let targets: Vec<String> = p.allowed.iter().map(|r| r.target.to_string()).collect();
    assert_eq!(
        targets,
        vec![
            "example.com",
            "one.github.io",
            "solo.example.org",
            "two.github.io",
            "*.example.com"
        ],
        "{text}"
    );
    assert!(
        text.contains("# --wildcards: for a.example.com, b.c.example.com"),
        "{text}"
    );
    let names = crate::dns::install::NamePolicy::new(Arc::new(p));
    assert!(matches!(
        names.decide("new.example.com"),
        NameDecision::Allowed(_)
    ));
    assert!(matches!(
        names.decide("example.com"),
        NameDecision::Allowed(_)
    ));
    assert_eq!(names.decide("three.github.io"), NameDecision::NotAllowed);
}

#[test]
fn the_recorder_is_bounded_and_canonical() {
    let r = Recorder::default();
    r.connection(ip("::ffff:198.18.0.2"), 443, Transport::Tcp);
    r.connection(ip("198.18.0.2"), 443, Transport::Tcp);
    let s = r.snapshot();
    assert_eq!(
        s.destinations.get(&(ip("198.18.0.2"), 443, Transport::Tcp)),
        Some(&2)
    );
    for i in 0..(MAX_DESTINATIONS as u32 + 10) {
        r.connection(IpAddr::from(i.to_be_bytes()), 1, Transport::Udp);
    }
    let s = r.snapshot();
    assert_eq!(s.destinations.len(), MAX_DESTINATIONS);
    assert_eq!(s.dropped, 11);
}
