use std::path::Path;

use super::*;

fn policy(text: &str) -> Arc<Policy> {
    match egress_policy::parse_str(text, Path::new("t.yaml")) {
        Ok(p) => Arc::new(p),
        Err(e) => panic!("{e}"),
    }
}

fn seed() -> Arc<Policy> {
    policy(include_str!("../../../policies/mcp-net-02-example.yaml"))
}

fn ranges() -> Arc<AwsIpRanges> {
    let text = include_str!("../../../egress-policy/tests/data/aws-ip-ranges.json");
    match AwsIpRanges::parse(text, Path::new("aws-ip-ranges.json")) {
        Ok(r) => Arc::new(r),
        Err(e) => panic!("{e}"),
    }
}

fn rec(s: &str) -> AddressRecord {
    match s.parse() {
        Ok(addr) => AddressRecord { addr, ttl: 60 },
        Err(e) => panic!("{s}: {e}"),
    }
}

fn addrs(a: &Admitted) -> Vec<String> {
    a.addrs.iter().map(|r| r.addr.to_string()).collect()
}

#[test]
fn the_seeds_restricted_wildcard_admits_only_listed_services_and_regions() {
    let v = NamePolicy::new(seed());
    assert_eq!(
        v.decide("bucket.s3.eu-west-1.amazonaws.com"),
        NameDecision::Allowed(vec![1])
    );
    assert_eq!(
        v.decide("dynamodb.us-east-1.amazonaws.com"),
        NameDecision::Allowed(vec![1])
    );
    let d = v.decide("s3.us-west-2.amazonaws.com");
    assert_eq!(
        d,
        NameDecision::Restricted {
            rule: 1,
            miss: RestrictionMiss::Region("us-west-2".into())
        }
    );
    assert_eq!(d.result(), "restriction_region");
    let d = v.decide("ec2-3-80-1-2.compute-1.amazonaws.com");
    assert_eq!(d.result(), "restriction_unclassified");
    // Regionless without ip-ranges: refused.
    assert_eq!(
        v.decide("bucket.s3.amazonaws.com").result(),
        "restriction_unclassified"
    );
    // Outside the wildcard nothing changes.
    assert_eq!(v.decide("api.company.com"), NameDecision::Allowed(vec![0]));
    assert_eq!(v.decide("evil.com"), NameDecision::NotAllowed);
    assert_eq!(v.decide("x.crypto-mining.com"), NameDecision::Denied(0));
}

#[test]
fn refused_by_service_with_a_narrower_list() {
    let p = policy(
        "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - host: \
         \"*.amazonaws.com\"\n      ports: [443]\n      protocols: [https]\n      \
         restrictions: {services: [s3]}\n",
    );
    let d = NamePolicy::new(p).decide("dynamodb.eu-west-1.amazonaws.com");
    assert_eq!(
        d,
        NameDecision::Restricted {
            rule: 0,
            miss: RestrictionMiss::Service(AwsService::DynamoDb)
        }
    );
    assert_eq!(d.result(), "restriction_service");
}

/// `*.amazonaws.com` restricted (rule 0), the EC2 API name unrestricted (rule 1).
fn mixed() -> Arc<Policy> {
    policy(
        "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - host: \
         \"*.amazonaws.com\"\n      ports: [443]\n      protocols: [https]\n      \
         restrictions: {regions: [eu-west-1], services: [s3]}\n    - host: \
         s3.eu-west-1.amazonaws.com\n      ports: [8443]\n      protocols: [tcp]\n    - host: \
         ec2.us-east-1.amazonaws.com\n      ports: [443]\n      protocols: [https]\n",
    )
}

#[test]
fn another_unrestricted_rule_still_allows_the_name() {
    let v = NamePolicy::new(mixed());
    // Not admitted by the restricted wildcard, allowed by the exact host.
    assert_eq!(
        v.decide("ec2.us-east-1.amazonaws.com"),
        NameDecision::Allowed(vec![2])
    );
    // Both hold: the union.
    assert_eq!(
        v.decide("s3.eu-west-1.amazonaws.com"),
        NameDecision::Allowed(vec![0, 1])
    );
}

#[test]
fn without_ip_ranges_every_address_is_kept() {
    let v = NamePolicy::new(seed());
    let a = v.admit(
        "s3.us-east-1.amazonaws.com",
        &[1],
        vec![rec("198.51.100.7"), rec("52.216.1.1")],
    );
    assert_eq!(a.rules, vec![1]);
    assert_eq!(addrs(&a), ["198.51.100.7", "52.216.1.1"]);
    assert!(a.unproven.is_empty());
}

#[test]
fn with_ip_ranges_addresses_must_prove_service_and_region() {
    let v = NamePolicy::new(seed()).with_aws_ranges(Some(ranges()));
    // us-east-1 S3 name: the eu-west-1 S3 prefix, the DynamoDB prefix and an address outside
    // AWS do not prove it.
    let a = v.admit(
        "bucket.s3.us-east-1.amazonaws.com",
        &[1],
        vec![
            rec("52.216.1.1"),
            rec("52.218.0.1"),
            rec("52.94.0.1"),
            rec("198.51.100.7"),
        ],
    );
    assert_eq!(a.rules, vec![1]);
    assert_eq!(addrs(&a), ["52.216.1.1"]);
    assert_eq!(a.unproven.len(), 3);
    assert_eq!(
        a.unproven[0].1.to_string(),
        "not in a prefix AWS publishes for S3 in us-east-1 (allowed_destinations[1].restrictions, \
         --aws-ip-ranges)"
    );
    let a = v.admit(
        "dynamodb.us-east-1.amazonaws.com",
        &[1],
        vec![rec("52.94.0.9"), rec("2600:1f18:8000::9"), rec("3.5.0.1")],
    );
    assert_eq!(addrs(&a), ["52.94.0.9", "2600:1f18:8000::9"]);
}

#[test]
fn with_ip_ranges_a_regionless_bucket_proves_its_region_by_its_addresses() {
    let v = NamePolicy::new(seed()).with_aws_ranges(Some(ranges()));
    assert_eq!(
        v.decide("bucket.s3.amazonaws.com"),
        NameDecision::Allowed(vec![1])
    );
    // eu-west-1 and us-east-1 are listed; us-west-2 is not.
    let a = v.admit(
        "bucket.s3.amazonaws.com",
        &[1],
        vec![rec("52.218.0.1"), rec("52.92.16.1"), rec("52.216.0.1")],
    );
    assert_eq!(addrs(&a), ["52.218.0.1", "52.216.0.1"]);
    assert_eq!(a.unproven.len(), 1);
    assert_eq!(a.unproven[0].0, rec("52.92.16.1"));
    // A bucket only in us-west-2: nothing is kept.
    let a = v.admit("other.s3.amazonaws.com", &[1], vec![rec("52.92.16.2")]);
    assert!(a.addrs.is_empty());
    assert_eq!(a.unproven.len(), 1);
}

#[test]
fn with_ip_ranges_unproven_addresses_lose_the_restricted_rule_not_the_open_one() {
    let v = NamePolicy::new(mixed()).with_aws_ranges(Some(ranges()));
    let a = v.admit(
        "s3.eu-west-1.amazonaws.com",
        &[0, 1],
        vec![rec("52.218.0.1"), rec("198.51.100.7")],
    );
    // The open rule keeps both addresses; the restricted one does not hold for the second,
    // so the answer carries only the open rule's ports.
    assert_eq!(addrs(&a), ["52.218.0.1", "198.51.100.7"]);
    assert_eq!(a.rules, vec![1]);
    assert!(a.unproven.is_empty());
    let a = v.admit(
        "s3.eu-west-1.amazonaws.com",
        &[0, 1],
        vec![rec("52.218.0.1")],
    );
    assert_eq!(a.rules, vec![0, 1]);
}
