use super::*;

fn exact(s: &str) -> HostPattern {
    HostPattern::Exact(s.into())
}

fn wild(s: &str) -> HostPattern {
    HostPattern::Wildcard(s.into())
}

fn matcher(allowed: &[HostPattern], denied: &[HostPattern]) -> NameMatcher {
    NameMatcher::new(
        allowed.iter().cloned().enumerate(),
        denied.iter().cloned().enumerate(),
    )
}

fn allowed(rules: &[usize]) -> NameVerdict {
    NameVerdict::Allowed {
        rules: rules.to_vec(),
    }
}

#[test]
fn wildcard_matches_below_at_any_depth_but_not_the_suffix_itself() {
    let m = matcher(&[wild("example.com")], &[]);
    assert_eq!(m.lookup("a.example.com"), allowed(&[0]));
    assert_eq!(m.lookup("a.b.example.com"), allowed(&[0]));
    assert_eq!(m.lookup("x.y.z.a.b.example.com"), allowed(&[0]));
    assert_eq!(m.lookup("example.com"), NameVerdict::NotListed);
    assert_eq!(m.lookup("example.com."), NameVerdict::NotListed);
    assert_eq!(m.lookup("com"), NameVerdict::NotListed);
}

#[test]
fn wildcard_never_matches_a_name_that_merely_contains_the_suffix() {
    let m = matcher(&[wild("example.com")], &[]);
    for name in [
        "example.com.evil.com",
        "a.example.com.evil.com",
        "badexample.com",
        "a.badexample.com",
        "example.comm",
        "a.example.co",
        "xexample.com",
    ] {
        assert_eq!(m.lookup(name), NameVerdict::NotListed, "{name}");
    }
}

#[test]
fn case_and_one_trailing_dot_are_ignored() {
    let m = matcher(&[exact("example.com"), wild("example.org")], &[]);
    assert_eq!(m.lookup("EXAMPLE.COM."), allowed(&[0]));
    assert_eq!(m.lookup("Example.Com"), allowed(&[0]));
    assert_eq!(m.lookup("WWW.EXAMPLE.ORG."), allowed(&[1]));
    // Not a name: empty labels, two trailing dots, the empty string.
    for name in ["", ".", "example.com..", "a..example.org", ".example.com"] {
        assert_eq!(m.lookup(name), NameVerdict::NotListed, "{name:?}");
    }
    assert_eq!(
        m.lookup(&format!("{}.example.org", "a".repeat(250))),
        NameVerdict::NotListed
    );
}

#[test]
fn deny_wins_over_allow_exact_and_wildcard() {
    let m = matcher(
        &[
            wild("example.com"),
            exact("bad.example.com"),
            exact("api.example.com"),
        ],
        &[exact("bad.example.com"), wild("evil.example.com")],
    );
    assert_eq!(m.lookup("bad.example.com"), NameVerdict::Denied { rule: 0 });
    assert_eq!(
        m.lookup("x.evil.example.com"),
        NameVerdict::Denied { rule: 1 }
    );
    assert_eq!(
        m.lookup("a.b.evil.example.com"),
        NameVerdict::Denied { rule: 1 }
    );
    // The denied wildcard does not cover its own suffix: that falls to *.example.com.
    assert_eq!(m.lookup("evil.example.com"), allowed(&[0]));
    assert_eq!(m.lookup("api.example.com"), allowed(&[0, 2]));
    assert_eq!(m.lookup("example.com"), NameVerdict::NotListed);
}

#[test]
fn the_most_specific_denial_is_reported() {
    let m = matcher(
        &[],
        &[
            wild("com"),
            wild("example.com"),
            exact("a.example.com"),
            wild("b.example.com"),
        ],
    );
    assert_eq!(m.lookup("a.example.com"), NameVerdict::Denied { rule: 2 });
    assert_eq!(m.lookup("x.b.example.com"), NameVerdict::Denied { rule: 3 });
    assert_eq!(m.lookup("c.example.com"), NameVerdict::Denied { rule: 1 });
    assert_eq!(m.lookup("example.com"), NameVerdict::Denied { rule: 0 });
}

#[test]
fn every_allowing_rule_is_reported_once() {
    let m = matcher(
        &[
            exact("api.example.com"),
            wild("example.com"),
            exact("api.example.com"),
            wild("api.example.com"),
        ],
        &[],
    );
    assert_eq!(m.lookup("api.example.com"), allowed(&[0, 1, 2]));
    assert_eq!(m.lookup("v1.api.example.com"), allowed(&[1, 3]));
}

#[test]
fn seed_example_policy() {
    let p = crate::parse_str(
        include_str!("../../policies/mcp-net-02-example.yaml"),
        std::path::Path::new("mcp-net-02-example.yaml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let m = NameMatcher::from_policy(&p);
    assert_eq!(m.lookup("api.company.com"), allowed(&[0]));
    assert_eq!(m.lookup("s3.us-east-1.amazonaws.com"), allowed(&[1]));
    assert_eq!(m.lookup("amazonaws.com"), NameVerdict::NotListed);
    assert_eq!(m.lookup("database.internal"), allowed(&[2]));
    assert_eq!(
        m.lookup("pool.crypto-mining.com"),
        NameVerdict::Denied { rule: 0 }
    );
    assert_eq!(
        m.lookup("www.torproject.org"),
        NameVerdict::Denied { rule: 1 }
    );
    assert_eq!(m.lookup("torproject.org"), NameVerdict::NotListed);
    assert_eq!(m.lookup("evil.com"), NameVerdict::NotListed);
    assert_eq!(m.lookup("pastebin.com"), NameVerdict::NotListed);
}

#[test]
fn lookups_do_not_depend_on_the_number_of_rules() {
    // 20 000 rules; a lookup probes one exact entry and one wildcard entry per suffix.
    let allowed: Vec<HostPattern> = (0..10_000)
        .flat_map(|i| {
            [
                exact(&format!("h{i}.example.com")),
                wild(&format!("w{i}.example.net")),
            ]
        })
        .collect();
    let m = matcher(&allowed, &[]);
    assert_eq!(m.lookup("h9999.example.com"), allowed_rules(19_998));
    assert_eq!(m.lookup("a.b.w9999.example.net"), allowed_rules(19_999));
    assert_eq!(m.lookup("h10000.example.com"), NameVerdict::NotListed);

    fn allowed_rules(rule: usize) -> NameVerdict {
        NameVerdict::Allowed { rules: vec![rule] }
    }
}

#[test]
fn pattern_table_reports_the_most_specific_rule() {
    let mut t = PatternTable::default();
    assert!(t.is_empty());
    t.insert(&wild("example.com"), 0);
    t.insert(&wild("a.example.com"), 1);
    t.insert(&exact("x.a.example.com"), 2);
    assert_eq!(t.lookup("X.A.Example.com."), Some(2));
    assert_eq!(t.lookup("y.a.example.com"), Some(1));
    assert_eq!(t.lookup("a.example.com"), Some(0));
    assert_eq!(t.lookup("example.com"), None);
}

#[test]
fn wildcards_over_public_suffixes_are_detected() {
    for (suffix, kind) in [
        ("com", PublicSuffixKind::Icann),
        ("co.uk", PublicSuffixKind::Icann),
        ("com.au", PublicSuffixKind::Icann),
        ("uk", PublicSuffixKind::Icann),
        ("internal", PublicSuffixKind::Icann),
        ("github.io", PublicSuffixKind::Private),
        ("s3.amazonaws.com", PublicSuffixKind::Private),
        ("herokuapp.com", PublicSuffixKind::Private),
        // A `*.kawasaki.jp` rule makes every child of kawasaki.jp a public suffix.
        ("kawasaki.jp", PublicSuffixKind::Icann),
        ("CO.UK.", PublicSuffixKind::Icann),
    ] {
        assert_eq!(
            wildcard_public_suffix(&wild(suffix)),
            Some(kind),
            "*.{suffix}"
        );
        assert!(wildcard_over_public_suffix(&wild(suffix)), "*.{suffix}");
    }
    for suffix in [
        "amazonaws.com",
        "example.com",
        "company.co.uk",
        "crypto-mining.com",
        "corp.internal",
        "github.com",
        // The integration tests' names: `test` is a reserved TLD, not on the list.
        "example.test",
        "b.example.test",
    ] {
        assert_eq!(wildcard_public_suffix(&wild(suffix)), None, "*.{suffix}");
        assert!(!wildcard_over_public_suffix(&wild(suffix)), "*.{suffix}");
    }
    // Exact hosts are never wildcards over anything.
    assert!(!wildcard_over_public_suffix(&exact("com")));
    assert!(!wildcard_over_public_suffix(&exact("co.uk")));
}
