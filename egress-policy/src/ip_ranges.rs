//! AWS's published address ranges (`ip-ranges.json`), from a local file the operator keeps
//! current: never downloaded by the agent. With it, every address of an answer admitted by a
//! restricted entry must lie in a prefix AWS publishes for the name's service in an allowed
//! region, which also lets a regionless bucket name prove its region by its addresses.
//!
//! Format (https://docs.aws.amazon.com/vpc/latest/userguide/aws-ip-ranges.html):
//! `{"syncToken", "createDate": "YYYY-MM-DD-hh-mm-ss", "prefixes": [{"ip_prefix", "region",
//! "service", ...}], "ipv6_prefixes": [{"ipv6_prefix", "region", "service", ...}]}`. Only the
//! prefixes of the services a restriction can name (`S3`, `DYNAMODB`) are kept: `AMAZON` covers
//! every service and so proves nothing about one.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::Deserialize;

use crate::AwsService;

#[derive(Debug, thiserror::Error)]
pub enum IpRangesError {
    #[error("{}: cannot read the AWS ip-ranges file", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: not an AWS ip-ranges.json file: {message}", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "{}: `{field}` `{value}` is not an address prefix such as `52.216.0.0/15` or `2600:1f18::/33`",
        path.display()
    )]
    Prefix {
        path: PathBuf,
        field: &'static str,
        value: String,
    },
    #[error(
        "{}: `createDate` `{value}` is not of the form YYYY-MM-DD-hh-mm-ss, as AWS writes it",
        path.display()
    )]
    CreateDate { path: PathBuf, value: String },
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(rename = "createDate")]
    create_date: String,
    #[serde(default)]
    prefixes: Vec<RawV4>,
    #[serde(default)]
    ipv6_prefixes: Vec<RawV6>,
}

#[derive(Deserialize)]
struct RawV4 {
    ip_prefix: String,
    region: String,
    service: String,
}

#[derive(Deserialize)]
struct RawV6 {
    ipv6_prefix: String,
    region: String,
    service: String,
}

/// One published prefix of a service a restriction can name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Range {
    net: IpNet,
    region: String,
    service: AwsService,
}

/// The S3 and DynamoDB prefixes of one ip-ranges.json.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsIpRanges {
    ranges: Vec<Range>,
    /// `createDate`, seconds since the Unix epoch (UTC).
    created_unix: i64,
    pub path: PathBuf,
}

impl AwsIpRanges {
    pub fn load(path: &Path) -> Result<Self, IpRangesError> {
        let text = std::fs::read_to_string(path).map_err(|source| IpRangesError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, IpRangesError> {
        let raw: RawFile = serde_json::from_str(text).map_err(|e| IpRangesError::Json {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        let created_unix =
            parse_create_date(&raw.create_date).ok_or_else(|| IpRangesError::CreateDate {
                path: path.to_path_buf(),
                value: raw.create_date.clone(),
            })?;
        let mut ranges = Vec::new();
        let v4 = raw
            .prefixes
            .into_iter()
            .map(|p| ("ip_prefix", p.ip_prefix, p.region, p.service));
        let v6 = raw
            .ipv6_prefixes
            .into_iter()
            .map(|p| ("ipv6_prefix", p.ipv6_prefix, p.region, p.service));
        for (field, prefix, region, service) in v4.chain(v6) {
            let net: IpNet = prefix.parse().map_err(|_| IpRangesError::Prefix {
                path: path.to_path_buf(),
                field,
                value: prefix.clone(),
            })?;
            let Some(service) = AwsService::ALL
                .iter()
                .copied()
                .find(|s| s.ip_ranges_name() == service)
            else {
                continue;
            };
            ranges.push(Range {
                net: net.trunc(),
                region,
                service,
            });
        }
        Ok(AwsIpRanges {
            ranges,
            created_unix,
            path: path.to_path_buf(),
        })
    }

    /// Whether AWS publishes `addr` for `service` in a region that `region_ok` accepts.
    pub fn proves(
        &self,
        addr: IpAddr,
        service: AwsService,
        region_ok: impl Fn(&str) -> bool,
    ) -> bool {
        let addr = addr.to_canonical();
        self.ranges
            .iter()
            .any(|r| r.service == service && r.net.contains(&addr) && region_ok(&r.region))
    }

    /// Prefixes kept (those of S3 and DynamoDB).
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Seconds between the file's `createDate` and `now` (negative for a date in the future).
    pub fn age_seconds(&self, now: SystemTime) -> i64 {
        let now = match now.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        };
        now.saturating_sub(self.created_unix)
    }
}

/// `YYYY-MM-DD-hh-mm-ss` (UTC) as seconds since the Unix epoch.
fn parse_create_date(s: &str) -> Option<i64> {
    let parts: Vec<&str> = s.split('-').collect();
    let [y, mo, d, h, mi, se] = parts.as_slice() else {
        return None;
    };
    let num = |v: &str, len: usize| -> Option<i64> {
        (v.len() == len && v.bytes().all(|b| b.is_ascii_digit()))
            .then(|| v.parse().ok())
            .flatten()
    };
    let (y, mo, d) = (num(y, 4)?, num(mo, 2)?, num(d, 2)?);
    let (h, mi, se) = (num(h, 2)?, num(mi, 2)?, num(se, 2)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const FIXTURE: &str = include_str!("../tests/data/aws-ip-ranges.json");

    fn fixture() -> AwsIpRanges {
        match AwsIpRanges::parse(FIXTURE, Path::new("aws-ip-ranges.json")) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        match s.parse() {
            Ok(a) => a,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn keeps_s3_and_dynamodb_prefixes_only() {
        let r = fixture();
        // The fixture has 4 S3, 2 DYNAMODB (v4 and v6) and AMAZON/EC2 entries.
        assert_eq!(r.len(), 6);
        let eu = |reg: &str| reg == "eu-west-1";
        assert!(r.proves(ip("52.218.0.10"), AwsService::S3, eu));
        assert!(!r.proves(ip("52.218.0.10"), AwsService::DynamoDb, eu));
        assert!(!r.proves(ip("52.218.0.10"), AwsService::S3, |r| r == "us-east-1"));
        // Inside AMAZON only: proves nothing.
        assert!(!r.proves(ip("3.5.0.1"), AwsService::S3, |_| true));
        assert!(r.proves(ip("2a05:d07a:a000::1"), AwsService::S3, eu));
        assert!(r.proves(ip("::ffff:52.216.0.1"), AwsService::S3, |r| r
            == "us-east-1"));
        assert!(r.proves(ip("52.94.0.7"), AwsService::DynamoDb, |r| r == "us-east-1"));
    }

    #[test]
    fn age_from_create_date() {
        let r = fixture();
        // createDate 2024-03-01-12-00-00 = 1709294400.
        let at = UNIX_EPOCH + Duration::from_secs(1_709_294_400 + 90);
        assert_eq!(r.age_seconds(at), 90);
        assert_eq!(parse_create_date("1970-01-01-00-00-00"), Some(0));
        assert_eq!(parse_create_date("2000-03-01-00-00-01"), Some(951_868_801));
        for bad in [
            "2024-03-01",
            "2024-13-01-00-00-00",
            "24-03-01-00-00-00",
            "x",
        ] {
            assert_eq!(parse_create_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn errors_name_the_file_and_what_is_wrong() {
        let p = Path::new("r.json");
        let e = AwsIpRanges::parse("{\"prefixes\": []}", p).map(|_| ());
        assert!(
            matches!(&e, Err(IpRangesError::Json { .. }))
                && e.as_ref()
                    .err()
                    .is_some_and(|e| e.to_string().contains("createDate")),
            "{e:?}"
        );
        let e = AwsIpRanges::parse(
            "{\"createDate\": \"2024-03-01-12-00-00\", \"prefixes\": [{\"ip_prefix\": \
             \"52.1/8\", \"region\": \"x\", \"service\": \"S3\"}]}",
            p,
        );
        assert!(
            matches!(&e, Err(IpRangesError::Prefix { value, .. }) if value == "52.1/8"),
            "{e:?}"
        );
        let e = AwsIpRanges::parse("{\"createDate\": \"yesterday\"}", p);
        assert!(matches!(&e, Err(IpRangesError::CreateDate { .. })), "{e:?}");
        let e = AwsIpRanges::load(Path::new("/nonexistent/ip-ranges.json"));
        assert!(matches!(&e, Err(IpRangesError::Io { .. })), "{e:?}");
    }
}
