use std::path::Path;

use super::*;

const POLICY: &str = "\
egress_policy:
  default_action: DENY
  allowed_destinations:
    - host: api.example.com
      ports: [443]
      protocols: [https]
    - host: \"*.example.org\"
      ports: [443, 8443]
      protocols: [tcp]
      rate_limit: {max_connections: 5, time_window: 10}
    - cidr: 198.51.100.0/24
      ports: [53]
      protocols: [udp]
  denied_destinations:
    - host: \"*.bad.example.org\"
    - cidr: 198.51.100.128/25
";

fn ctx() -> Context {
    let file = Path::new("p.yaml");
    let policy = match egress_policy::parse_str(POLICY, file) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    Context::new(policy, entry_lines(POLICY), file)
}

fn explain(q: &str) -> Explanation {
    match Query::parse(q) {
        Ok(q) => ctx().explain(&q),
        Err(e) => panic!("{e}"),
    }
}

fn at(e: &Explanation) -> String {
    e.rule
        .as_ref()
        .and_then(|r| r.at.clone())
        .unwrap_or_default()
}

fn why(e: &Explanation) -> String {
    e.why.join("\n")
}

#[test]
fn deny_wins_over_an_allowed_wildcard_for_names() {
    let e = explain("x.bad.example.org:443/tcp");
    assert_eq!(e.verdict, Verdict::Deny);
    assert_eq!(e.reason, "dns_name_denied");
    assert_eq!(
        e.rule.as_ref().map(|r| (r.list, r.index)),
        Some((List::Denied, 0))
    );
    assert_eq!(at(&e), "p.yaml:15");
    assert!(
        why(&e).contains(
            "deny wins: allowed_destinations[1] (*.example.org) at p.yaml:7 also names it"
        ),
        "{}",
        why(&e)
    );
}

#[test]
fn deny_wins_over_a_covering_allowed_range_for_addresses() {
    let e = explain("198.51.100.200:53/udp");
    assert_eq!(e.verdict, Verdict::Deny);
    assert_eq!(e.reason, "denied_by_rule");
    assert_eq!(
        e.rule.as_ref().map(|r| (r.list, r.index)),
        Some((List::Denied, 1))
    );
    assert_eq!(at(&e), "p.yaml:16");
    assert!(why(&e).contains("deny wins: allowed_destinations[2] (198.51.100.0/24) at p.yaml:11"));
    // Just below the denied half, the same rule allows it.
    let e = explain("198.51.100.7:53/udp");
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.reason, "allowed_by_rule");
    assert_eq!(at(&e), "p.yaml:11");
}

#[test]
fn a_port_no_rule_lists_is_refused_with_the_ports_that_are() {
    let e = explain("api.example.com:80");
    assert_eq!(e.verdict, Verdict::Deny);
    assert_eq!(e.reason, "port_not_allowed");
    assert_eq!(at(&e), "p.yaml:4");
    assert!(
        why(&e).contains("port: the rules covering it allow tcp/443 only, not tcp/80"),
        "{}",
        why(&e)
    );
    let e = explain("198.51.100.7:5353/udp");
    assert_eq!(e.reason, "port_not_allowed");
    assert!(
        why(&e).contains("allow udp/53 only, not udp/5353"),
        "{}",
        why(&e)
    );
}

#[test]
fn the_wrong_protocol_on_an_allowed_port_is_refused_as_such() {
    let e = explain("198.51.100.7:53/tcp");
    assert_eq!(e.verdict, Verdict::Deny);
    assert_eq!(e.reason, "port_not_allowed");
    assert!(
        why(&e).contains("protocol: port 53 is allowed only over udp, not tcp"),
        "{}",
        why(&e)
    );
    let e = explain("api.example.com:443/udp");
    assert_eq!(e.verdict, Verdict::Deny);
    assert!(
        why(&e).contains("allowed only over tcp, not udp"),
        "{}",
        why(&e)
    );
    // `https` is TCP.
    assert_eq!(explain("api.example.com:443/https").verdict, Verdict::Allow);
}

#[test]
fn wildcards_cover_names_strictly_below_their_suffix() {
    let e = explain("a.b.example.org:8443");
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.reason, "allowed_by_dns_answer");
    assert_eq!(at(&e), "p.yaml:7");
    let w = why(&e);
    assert!(w.contains("the wildcard `*.example.org`"), "{w}");
    assert!(
        w.contains("rate limit of allowed_destinations[1]: 5 connections per 10 s"),
        "{w}"
    );
    assert!(
        w.contains("denied_destinations[1] (198.51.100.128/25) is still refused"),
        "{w}"
    );

    let e = explain("example.org:443");
    assert_eq!(e.verdict, Verdict::Deny);
    assert_eq!(e.reason, "dns_name_not_allowed");
    assert!(
        why(&e).contains("allowed_destinations[1] (*.example.org) at p.yaml:7 covers only names strictly below `example.org`"),
        "{}",
        why(&e)
    );
    assert_eq!(explain("badexample.org:443").verdict, Verdict::Deny);
}

#[test]
fn without_a_port_the_allowed_pairs_are_listed() {
    let e = explain("API.Example.com.");
    assert_eq!(e.verdict, Verdict::AllowOn(vec![(Transport::Tcp, 443)]));
    let e = explain("198.51.100.9");
    assert_eq!(e.verdict, Verdict::AllowOn(vec![(Transport::Udp, 53)]));
    assert_eq!(explain("203.0.113.1").reason, "no_matching_rule");
}

#[test]
fn the_text_names_verdict_rule_and_reasons() {
    let e = explain("api.example.com:80/tcp");
    assert_eq!(
        e.to_string(),
        "explain api.example.com:80/tcp: DENY (port_not_allowed)\n  rule: \
         allowed_destinations[0] (api.example.com) at p.yaml:4\n  why: the DNS proxy answers \
         it: matched by allowed_destinations[0] by its exact name\n  why: port: the rules \
         covering it allow tcp/443 only, not tcp/80\n"
    );
}

#[test]
fn loopback_and_mapped_addresses() {
    assert_eq!(explain("127.0.0.1:9/tcp").reason, "loopback");
    let e = explain("[::ffff:198.51.100.7]:53/udp");
    assert_eq!(
        e.query.subject,
        Subject::Addr("198.51.100.7".parse().unwrap_or(IpAddr::from([0u8; 4])))
    );
    assert_eq!(e.verdict, Verdict::Allow);
}

#[test]
fn loopback_scoped_by_port_names_the_ports() {
    let text = "egress_policy:\n  default_action: DENY\n  loopback: {ports: [6379, 5432]}\n";
    let file = Path::new("lo.yaml");
    let policy = match crate::policy::parse_str(text, file) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let ctx = Context::new(policy, entry_lines(text), file);
    let explain = |q: &str| match Query::parse(q) {
        Ok(q) => ctx.explain(&q),
        Err(e) => panic!("{e}"),
    };
    for q in [
        "127.0.0.1:5432",
        "[::1]:6379/udp",
        "[::ffff:127.0.0.9]:5432",
        "0.0.0.0:5432",
    ] {
        let e = explain(q);
        assert_eq!(
            (e.verdict.clone(), e.reason),
            (Verdict::Allow, "loopback"),
            "{q}"
        );
        assert!(
            why(&e).contains("`loopback.ports` lists it"),
            "{q}: {}",
            why(&e)
        );
    }
    let e = explain("127.0.0.1:8080");
    assert_eq!(
        (e.verdict.clone(), e.reason),
        (Verdict::Deny, "loopback_port_not_allowed")
    );
    assert_eq!(
        why(&e),
        "loopback is allowed only at the ports `loopback.ports` lists (tcp/5432, udp/5432, \
         tcp/6379, udp/6379), not tcp/8080"
    );
    let e = explain("::1");
    assert_eq!(
        e.verdict,
        Verdict::AllowOn(vec![
            (Transport::Tcp, 5432),
            (Transport::Udp, 5432),
            (Transport::Tcp, 6379),
            (Transport::Udp, 6379),
        ])
    );
}

#[test]
fn query_syntax() {
    let q = |s: &str| {
        Query::parse(s)
            .map(|q| q.to_string())
            .map_err(|e| e.to_string())
    };
    assert_eq!(q("a.example.com"), Ok("a.example.com/tcp".into()));
    assert_eq!(q("a.example.com:53/dns"), Ok("a.example.com:53/udp".into()));
    assert_eq!(q("2001:db8::1"), Ok("2001:db8::1/tcp".into()));
    assert_eq!(
        q("[2001:db8::1]:443/udp"),
        Ok("[2001:db8::1]:443/udp".into())
    );
    for bad in [
        "a.example.com:0",
        "a.example.com:x",
        "a.example.com/icmp",
        "a..b",
        "2001:db8::1:443:x",
        "[::1",
        "a b",
    ] {
        assert!(q(bad).is_err(), "{bad}");
    }
    let Err(err) = q("a.example.com/sctp") else {
        panic!("sctp is not a protocol")
    };
    assert!(
        err.starts_with("--explain a.example.com/sctp: `sctp` is not a protocol"),
        "{err}"
    );
}

#[test]
fn explain_file_reads_the_seed_policy_with_lines() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/mcp-net-02-example.yaml"
    ));
    let text = match explain_file(
        path,
        &["10.1.2.3:5432".to_owned(), "api.company.com:443".to_owned()],
        &egress_policy::capacity::MapLimits::default(),
    ) {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    assert!(text.contains("explain 10.1.2.3:5432/tcp: DENY (denied_by_rule)\n  rule: denied_destinations[2] (10.0.0.0/8) at "), "{text}");
    assert!(text.contains("mcp-net-02-example.yaml:25\n"), "{text}");
    assert!(text.contains("explain api.company.com:443/tcp: ALLOW (allowed_by_rule)\n  rule: allowed_destinations[0] (api.company.com) at "), "{text}");
    assert!(
        text.contains("rate_limits.per_destination: 100 connections per 60 s"),
        "{text}"
    );
}
