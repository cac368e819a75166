//! AWS endpoint names: which service and region a host name is, by the hostname forms AWS
//! documents, and what an entry's `restrictions` admits. Pure: no I/O, no DNS.
//!
//! Sources of the forms (docs/policy.md lists them with links): the AWS General Reference
//! "Amazon S3 endpoints and quotas" and "Amazon DynamoDB endpoints and quotas", the S3 User
//! Guide ("Virtual hosting of buckets", "Using dual-stack endpoints", "Access points"), and the
//! DynamoDB Developer Guide (streams endpoints, account-based endpoints).
//!
//! A name that matches none of the forms below is not classified, and a restricted entry never
//! admits it: guessing would let a name whose region or service cannot be told through.

use std::fmt;

/// The DNS suffixes AWS service endpoints live under (partitions `aws`, `aws-cn`, and the
/// dual-stack `api.aws`). A `restrictions` key is only valid on a host under one of them.
pub const AWS_SUFFIXES: &[&str] = &["amazonaws.com", "amazonaws.com.cn", "api.aws"];

/// The services a restriction can name: a closed list, so that a typo is an error rather than
/// a rule that admits nothing (or, worse, is ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AwsService {
    S3,
    DynamoDb,
}

impl AwsService {
    pub const ALL: &'static [AwsService] = &[AwsService::S3, AwsService::DynamoDb];

    /// The name in a policy (`services: [s3]`).
    pub fn as_str(self) -> &'static str {
        match self {
            AwsService::S3 => "s3",
            AwsService::DynamoDb => "dynamodb",
        }
    }

    /// The `service` value of this service's prefixes in AWS's ip-ranges.json.
    pub fn ip_ranges_name(self) -> &'static str {
        match self {
            AwsService::S3 => "S3",
            AwsService::DynamoDb => "DYNAMODB",
        }
    }

    /// The service named `s` in a policy, in any case.
    pub fn parse(s: &str) -> Option<Self> {
        AwsService::ALL
            .iter()
            .copied()
            .find(|svc| svc.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for AwsService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an AWS endpoint name says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsEndpoint {
    pub service: AwsService,
    /// `None` for the one regionless form that is still an endpoint of a known service: a
    /// bucket on the global S3 name (`BUCKET.s3.amazonaws.com`), whose bucket may live in any
    /// region. Only its addresses can tell the region (`--aws-ip-ranges`).
    pub region: Option<String>,
    /// Which documented form matched, for `check --name` and logs.
    pub form: &'static str,
}

/// Whether `s` is an AWS region code: `us-east-1`, `eu-west-1`, `ap-southeast-4`,
/// `us-gov-west-1`, `cn-north-1`, `us-iso-east-1`, `us-isob-east-1`. Lowercase only: two
/// letters, an optional `gov`/`iso*` part, a direction word, a number 1..=99.
pub fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let (area, middle, number) = match parts.as_slice() {
        [area, direction, number] => (*area, vec![*direction], *number),
        [area, kind, direction, number] => {
            let kind_ok = *kind == "gov"
                || kind.strip_prefix("iso").is_some_and(|rest| {
                    rest.len() <= 1 && rest.bytes().all(|b| b.is_ascii_lowercase())
                });
            if !kind_ok {
                return false;
            }
            (*area, vec![*direction], *number)
        }
        _ => return false,
    };
    let lower = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase());
    area.len() == 2
        && lower(area)
        && middle.iter().all(|w| lower(w) && w.len() >= 4)
        && !number.is_empty()
        && number.len() <= 2
        && !number.starts_with('0')
        && number.bytes().all(|b| b.is_ascii_digit())
}

/// The AWS suffix `name` (lowercase, no trailing dot) lies strictly below, and the labels in
/// front of it.
fn split_suffix(name: &str) -> Option<(&'static str, Vec<&str>)> {
    // Longest first: `amazonaws.com.cn` must not be read as a name under `com.cn`.
    let mut suffixes: Vec<&'static str> = AWS_SUFFIXES.to_vec();
    suffixes.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for suffix in suffixes {
        if let Some(front) = name.strip_suffix(suffix)
            && let Some(front) = front.strip_suffix('.')
            && !front.is_empty()
        {
            return Some((suffix, front.split('.').collect()));
        }
    }
    None
}

/// Whether `name` is `suffix` or lies below one of the AWS suffixes.
pub fn is_under_aws_suffix(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    AWS_SUFFIXES
        .iter()
        .any(|s| name == *s || name.ends_with(&format!(".{s}")))
}

fn regional(service: AwsService, region: &str, form: &'static str) -> Option<AwsEndpoint> {
    Some(AwsEndpoint {
        service,
        region: Some(region.to_owned()),
        form,
    })
}

/// The service and region of an AWS endpoint name, in any case, with or without a trailing
/// dot; `None` when the name is not one of the documented forms of a known service.
pub fn classify(name: &str) -> Option<AwsEndpoint> {
    let name = crate::names::normalize(name)?;
    let (suffix, labels) = split_suffix(&name)?;
    let n = labels.len();
    let last = labels[n - 1];
    if suffix == "api.aws" {
        // Dual-stack DynamoDB: dynamodb.R.api.aws, dynamodb-fips.R.api.aws.
        return match labels.as_slice() {
            ["dynamodb", r] if is_region(r) => regional(AwsService::DynamoDb, r, "dual-stack"),
            ["dynamodb-fips", r] if is_region(r) => {
                regional(AwsService::DynamoDb, r, "dual-stack FIPS")
            }
            _ => None,
        };
    }
    if is_region(last) {
        if n < 2 {
            return None;
        }
        let front = &labels[..n - 2];
        return match labels[n - 2] {
            "s3" if front.is_empty() => regional(AwsService::S3, last, "regional"),
            "s3" => regional(AwsService::S3, last, "virtual-hosted bucket"),
            "s3-fips" if front.is_empty() => regional(AwsService::S3, last, "FIPS"),
            "s3-fips" => regional(AwsService::S3, last, "FIPS virtual-hosted bucket"),
            "dualstack" => classify_dualstack(front, last),
            "s3-accesspoint" if front.len() == 1 => regional(AwsService::S3, last, "access point"),
            "s3-accesspoint-fips" if front.len() == 1 => {
                regional(AwsService::S3, last, "FIPS access point")
            }
            "dynamodb" if front.is_empty() => regional(AwsService::DynamoDb, last, "regional"),
            "dynamodb" if front == ["streams"] => regional(AwsService::DynamoDb, last, "streams"),
            "dynamodb-fips" if front.is_empty() => regional(AwsService::DynamoDb, last, "FIPS"),
            "ddb" if front.len() == 1 && is_account_id(front[0]) => {
                regional(AwsService::DynamoDb, last, "account-based")
            }
            _ => None,
        };
    }
    if suffix != "amazonaws.com" {
        // The global and legacy dash forms exist only in the `aws` partition.
        return None;
    }
    if last == "s3" {
        // The global name is served from us-east-1; a bucket on it may be anywhere.
        return if n == 1 {
            regional(AwsService::S3, "us-east-1", "global (us-east-1)")
        } else {
            Some(AwsEndpoint {
                service: AwsService::S3,
                region: None,
                form: "virtual-hosted bucket on the global name (regionless)",
            })
        };
    }
    if let Some(rest) = last.strip_prefix("s3-") {
        // Legacy dash forms: s3-R.amazonaws.com, BUCKET.s3-R.amazonaws.com, and
        // s3-external-1, a legacy name of us-east-1.
        let (region, form) = if rest == "external-1" {
            ("us-east-1", "legacy s3-external-1 (us-east-1)")
        } else if is_region(rest) {
            (rest, "legacy dash-region")
        } else {
            return None;
        };
        return regional(AwsService::S3, region, form);
    }
    None
}

fn classify_dualstack(front: &[&str], region: &str) -> Option<AwsEndpoint> {
    let (svc, before) = front.split_last()?;
    match *svc {
        "s3" if before.is_empty() => regional(AwsService::S3, region, "dual-stack"),
        "s3" => regional(AwsService::S3, region, "dual-stack virtual-hosted bucket"),
        "s3-fips" => regional(AwsService::S3, region, "dual-stack FIPS"),
        "s3-accesspoint" | "s3-accesspoint-fips" if before.len() == 1 => {
            regional(AwsService::S3, region, "dual-stack access point")
        }
        _ => None,
    }
}

fn is_account_id(label: &str) -> bool {
    label.len() == 12 && label.bytes().all(|b| b.is_ascii_digit())
}

/// Why a restricted entry does not admit a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestrictionMiss {
    /// Not a documented endpoint form of a known service (or regionless, without ip-ranges
    /// to prove the region).
    Unclassified,
    /// An endpoint of a service the entry does not list.
    Service(AwsService),
    /// An endpoint in a region the entry does not list.
    Region(String),
}

impl RestrictionMiss {
    /// The `result` label of the refused query.
    pub fn result(&self) -> &'static str {
        match self {
            RestrictionMiss::Unclassified => "restriction_unclassified",
            RestrictionMiss::Service(_) => "restriction_service",
            RestrictionMiss::Region(_) => "restriction_region",
        }
    }
}

/// What an entry with `restrictions` says about a classified name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The name is an endpoint of a listed service in a listed region.
    Admitted,
    /// A regionless name of a listed service: admitted only for addresses that ip-ranges.json
    /// places in a listed region.
    NeedsRegionProof,
}

impl super::Restrictions {
    /// Whether an entry with these restrictions admits the name classified as `endpoint`.
    /// `services` empty means every known service, `regions` empty every region; both set
    /// means service AND region.
    pub fn admits(&self, endpoint: Option<&AwsEndpoint>) -> Result<Admission, RestrictionMiss> {
        let Some(ep) = endpoint else {
            return Err(RestrictionMiss::Unclassified);
        };
        if !self.services.is_empty() && !self.services.contains(&ep.service) {
            return Err(RestrictionMiss::Service(ep.service));
        }
        match &ep.region {
            Some(r) if self.regions.is_empty() || self.regions.iter().any(|x| x == r) => {
                Ok(Admission::Admitted)
            }
            Some(r) => Err(RestrictionMiss::Region(r.clone())),
            None => Ok(Admission::NeedsRegionProof),
        }
    }

    /// Whether `region` is one of the listed regions (any, when none are listed).
    pub fn allows_region(&self, region: &str) -> bool {
        self.regions.is_empty() || self.regions.iter().any(|r| r == region)
    }
}

#[cfg(test)]
#[path = "aws_tests.rs"]
mod tests;
