use super::*;

/// A policy of `entries` allowed /32s (built directly: parsing half a million entries would
/// dominate the test).
fn policy_of(entries: usize) -> Policy {
    let text = "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - \
                cidr: 10.0.0.0/32\n      ports: [443]\n      protocols: [tcp]\n";
    let mut policy = match crate::parse_str(text, Path::new("big.yaml")) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let first = policy.allowed[0].clone();
    policy.allowed = (0..entries)
        .map(|i| {
            let [_, a, b, c] = u32::try_from(i).unwrap_or(0).to_be_bytes();
            let net = ipnet::IpNet::V4(
                ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, a, b, c), 32)
                    .unwrap_or_else(|e| panic!("{e}")),
            );
            crate::AllowedDestination {
                target: crate::Target::Cidr(net),
                ..first.clone()
            }
        })
        .collect();
    policy
}

fn refusal(policy: &Policy, limits: &MapLimits) -> String {
    match check(
        policy,
        crate::doh::testing::builtin(),
        Path::new("big.yaml"),
        limits,
    ) {
        Ok(()) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_policy_over_half_a_map_is_refused_naming_the_map_and_its_size() {
    let defaults = MapLimits::default();
    let fits = policy_of(1000);
    assert!(
        check(
            &fits,
            crate::doh::testing::builtin(),
            Path::new("big.yaml"),
            &defaults
        )
        .is_ok()
    );
    let used = usage(&fits, crate::doh::testing::builtin(), &defaults);
    assert_eq!((used[0].needed, used[2].needed), (1000, 1000), "{used:?}");
    // Every allowed entry has its own port set: the port map is the first to fill.
    let half = (MAX_PORTS / 2) as usize;
    assert!(
        check(
            &policy_of(half),
            crate::doh::testing::builtin(),
            Path::new("big.yaml"),
            &defaults
        )
        .is_ok()
    );
    assert_eq!(
        refusal(&policy_of(half + 1), &defaults),
        format!(
            "big.yaml: the policy does not fit the kernel's maps (a policy may use half of \
             each map, so that a reload can write the new policy next to the old one):\n  - \
             {} port-set entries needed, at most {half} allowed (MAX_PORTS = {MAX_PORTS}; \
             `--max-entries ports=N` sets another size)",
            half + 1
        )
    );
}

#[test]
fn configured_sizes_decide_and_are_named_as_configured() {
    let small = MapLimits::from_flags(&[
        MaxEntries {
            kind: MapKind::Ports,
            entries: 1000,
        },
        MaxEntries {
            kind: MapKind::Addresses,
            entries: 64,
        },
        // The last one for a map wins.
        MaxEntries {
            kind: MapKind::Addresses,
            entries: 2000,
        },
    ]);
    assert_eq!(small.entries(MapKind::Addresses), 2000);
    assert_eq!(small.entries(MapKind::Prefixes), MAX_RULES);
    assert!(
        check(
            &policy_of(500),
            crate::doh::testing::builtin(),
            Path::new("big.yaml"),
            &small
        )
        .is_ok()
    );
    assert_eq!(
        refusal(&policy_of(501), &small),
        "big.yaml: the policy does not fit the kernel's maps (a policy may use half of each \
         map, so that a reload can write the new policy next to the old one):\n  - 501 \
         port-set entries needed, at most 500 allowed (--max-entries ports=1000; the default \
         is MAX_PORTS = 262144)"
    );
    // Raised: a policy over the default's half fits.
    let half = (MAX_PORTS / 2) as usize;
    let big = MapLimits::from_flags(&[MaxEntries {
        kind: MapKind::Ports,
        entries: MAX_PORTS * 2,
    }]);
    assert!(
        check(
            &policy_of(half + 1),
            crate::doh::testing::builtin(),
            Path::new("big.yaml"),
            &big
        )
        .is_ok()
    );
    assert_eq!(
        big.overrides().collect::<Vec<_>>(),
        vec![(MapKind::Ports, MAX_PORTS * 2)]
    );
    assert_eq!(MapLimits::default().overrides().count(), 0);
    let mut pinned = MapLimits::default();
    pinned.set(MapKind::Ports, 1000, Origin::Pinned);
    assert!(refusal(&policy_of(501), &pinned).ends_with(
        "(ports = 1000 in the maps pinned for this cgroup, which keep their size until it \
             is detached)"
    ));
}

#[test]
fn max_entries_values_are_parsed_and_bounded() {
    let ok = |s: &str| s.parse::<MaxEntries>().map(|m| (m.kind, m.entries));
    assert_eq!(ok("ports=524288"), Ok((MapKind::Ports, 524_288)));
    assert_eq!(ok("rate-limits=2"), Ok((MapKind::RateLimits, 2)));
    assert_eq!(ok("learned=16777216"), Ok((MapKind::Learned, 1 << 24)));
    for kind in MapKind::ALL {
        assert_eq!(
            ok(&format!("{}=100", kind.name())),
            Ok((kind, 100)),
            "{kind:?}"
        );
    }
    let err = |s: &str| match s.parse::<MaxEntries>() {
        Ok(m) => panic!("{s} parsed as {m:?}"),
        Err(e) => e.to_string(),
    };
    assert_eq!(err("ports"), "`ports` is not KIND=N, e.g. `ports=524288`");
    assert_eq!(
        err("counters=5"),
        "unknown map `counters`; the maps that can be sized are `ports`, `addresses`, \
         `prefixes`, `inbound`, `rate-limits`, `resolvers`, `learned`"
    );
    for bad in [
        "ports=1",
        "ports=0",
        "ports=16777217",
        "ports=-3",
        "ports=1e6",
        "ports=",
    ] {
        assert!(
            err(bad).contains("is not a number of entries from 2 to 16777216"),
            "{bad}: {}",
            err(bad)
        );
    }
}
