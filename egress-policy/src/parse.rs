//! Strict parsing of a policy file into the validated model.
//!
//! Three passes over the (small) text:
//! 1. well-formed YAML, into `IgnoredAny`: failures are `PolicyError::Syntax`;
//! 2. duplicate keys anywhere, which serde's derive would only report at the enclosing
//!    mapping, and an empty document;
//! 3. the policy itself, through `serde_path_to_error` for the field path.
//!
//! Every value check runs inside deserialization, in a visitor of the value it checks:
//! serde_norway attaches the position of the value being deserialized to an error raised
//! there, so messages point at the offending scalar, key or mapping. Checks across the fields
//! of one entry (exactly one of `host`/`cidr`, `ports` present) run in the entry's
//! `visit_map`, so they point at the entry.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IgnoredAny, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};

use super::aws;
use super::error::PolicyError;
use super::model::{
    AllowedDestination, DefaultAction, DeniedDestination, DnsPolicy, HostPattern, InboundRule,
    MAX_LOOPBACK_PORTS, Mode, Policy, Protocol, RateLimit, RateLimits, Restrictions, Target,
};
use crate::names::{PublicSuffixKind, wildcard_public_suffix};

mod inbound;

/// Name used when neither `name:` nor a file stem is available.
const FALLBACK_NAME: &str = "policy";
/// Longest accepted `name:`.
const MAX_NAME_LEN: usize = 128;

const HOST_EXPECTED: &str = "expected a DNS name such as `api.example.com`, a wildcard such as \
                             `*.example.com`, or an IP address";
const CIDR_EXPECTED: &str = "expected a network such as `10.0.0.0/8` or `2001:db8::/32`, or a \
                             single address such as `192.0.2.1`";
const PROTOCOLS_EXPECTED: &str = "tcp, udp, http, https or dns";

/// Reads and parses the policy file at `path` (a regular file within the caps of
/// `policy::bounds`).
pub fn load_file(path: &Path) -> Result<Policy, PolicyError> {
    let text = super::bounds::read_policy_text(path)?;
    parse_str(&text, path)
}

/// Parses policy `text`; `file` is only used in error messages and for the default name.
pub fn parse_str(text: &str, file: &Path) -> Result<Policy, PolicyError> {
    super::bounds::check_depth(text, file)?;
    // Each pass reads the whole document: the syntax check runs only when the duplicate-key
    // pass fails, to tell a YAML syntax error from an invalid policy (a large policy is
    // parsed twice, not three times).
    let top: DupCheck =
        match serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(text)) {
            Ok(top) => top,
            Err(err) => {
                if let Err(syntax) = serde_norway::from_str::<IgnoredAny>(text) {
                    return Err(syntax_error(&syntax, file));
                }
                return Err(invalid_error(err, file));
            }
        };
    if top.0 == NodeKind::Null {
        return Err(PolicyError::Empty {
            file: file.to_path_buf(),
        });
    }
    let body: RawFile =
        serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(text))
            .map_err(|err| invalid_error(err, file))?;
    Ok(body.0.into_policy(file))
}

fn syntax_error(err: &serde_norway::Error, file: &Path) -> PolicyError {
    let location = err.location();
    let mut message = err.to_string();
    if let Some(loc) = &location {
        let at = format!(" at line {} column {}", loc.line(), loc.column());
        message = message.replacen(&at, "", 1);
    }
    PolicyError::Syntax {
        file: file.to_path_buf(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message,
    }
}

fn invalid_error(err: serde_path_to_error::Error<serde_norway::Error>, file: &Path) -> PolicyError {
    let path = err.path().to_string();
    let inner = err.into_inner();
    let location = inner.location();
    let message = bare_message(&inner, &path);
    PolicyError::Invalid {
        file: file.to_path_buf(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        path,
        message,
    }
}

/// serde_norway renders a message as `{its path}: {message} at line L column C`; the path and
/// the position are reported separately, so keep only the message. Its path is the field path
/// or, for an error in a key, the path of the mapping holding the key.
fn bare_message(err: &serde_norway::Error, path: &str) -> String {
    let mut text = err.to_string();
    if let Some(loc) = err.location() {
        let at = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = text.strip_suffix(&at) {
            text.truncate(stripped.len());
        }
    }
    if let Some((head, rest)) = text.split_once(": ")
        && path
            .strip_prefix(head)
            .is_some_and(|tail| tail.is_empty() || tail.starts_with(['.', '[']))
    {
        return rest.to_owned();
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Pass 2: duplicate keys and the empty document.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeKind {
    Null,
    Mapping,
    Other,
}

/// Walks any YAML value and fails on the second occurrence of a key within one mapping. The
/// error is raised while deserializing that key, so it carries the key's position.
struct DupCheck(NodeKind);

impl<'de> Deserialize<'de> for DupCheck {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DupVisitor)
    }
}

struct DupVisitor;

impl<'de> Visitor<'de> for DupVisitor {
    type Value = DupCheck;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<DupCheck, E> {
        Ok(DupCheck(NodeKind::Other))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<DupCheck, E> {
        Ok(DupCheck(NodeKind::Other))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<DupCheck, E> {
        Ok(DupCheck(NodeKind::Other))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<DupCheck, E> {
        Ok(DupCheck(NodeKind::Other))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<DupCheck, E> {
        Ok(DupCheck(NodeKind::Other))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<DupCheck, E> {
        Ok(DupCheck(NodeKind::Other))
    }

    fn visit_none<E: de::Error>(self) -> Result<DupCheck, E> {
        Ok(DupCheck(NodeKind::Null))
    }

    fn visit_unit<E: de::Error>(self) -> Result<DupCheck, E> {
        Ok(DupCheck(NodeKind::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<DupCheck, D::Error> {
        DupCheck::deserialize(deserializer)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<DupCheck, D::Error> {
        DupCheck::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DupCheck, A::Error> {
        while seq.next_element::<DupCheck>()?.is_some() {}
        Ok(DupCheck(NodeKind::Other))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DupCheck, A::Error> {
        let mut seen = HashSet::new();
        while map.next_key_seed(KeySeen { seen: &mut seen })?.is_some() {
            map.next_value::<DupCheck>()?;
        }
        Ok(DupCheck(NodeKind::Mapping))
    }

    // A YAML tag (`!name value`); the policy pass rejects it, but look inside for duplicates.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<DupCheck, A::Error> {
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        variant.newtype_variant::<DupCheck>()?;
        Ok(DupCheck(NodeKind::Other))
    }
}

struct KeySeen<'a> {
    seen: &'a mut HashSet<String>,
}

impl KeySeen<'_> {
    fn record<E: de::Error>(self, key: String) -> Result<(), E> {
        if self.seen.contains(&key) {
            return Err(E::custom(format_args!(
                "duplicate key `{key}`; each key may appear once in a mapping (YAML would \
                 otherwise keep only one of the values)"
            )));
        }
        self.seen.insert(key);
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for KeySeen<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeen<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.record(v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.record(v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.record(v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.record(v.to_string())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.record(v.to_owned())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.record("null".to_owned())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.record("null".to_owned())
    }

    // Complex keys cannot be policy keys; the policy pass reports them.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        variant.newtype_variant::<IgnoredAny>()?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Pass 3: the policy.

/// The document: exactly one key, `egress_policy`.
struct RawFile(Body);

impl<'de> Deserialize<'de> for RawFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FileVisitor)
    }
}

struct FileVisitor;

impl<'de> Visitor<'de> for FileVisitor {
    type Value = RawFile;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping with the single top-level key `egress_policy`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawFile, A::Error> {
        let mut body = None;
        while map.next_key_seed(TopKey)?.is_some() {
            body = Some(map.next_value::<PolicyBody>()?.0);
        }
        body.map(RawFile).ok_or_else(|| {
            de::Error::custom(
                "missing the top-level key `egress_policy`; a policy file is a mapping with the \
                 single top-level key `egress_policy:` holding `default_action` and \
                 `allowed_destinations`",
            )
        })
    }
}

/// Accepts `egress_policy` only; says where a misplaced policy key belongs.
struct TopKey;

impl<'de> DeserializeSeed<'de> for TopKey {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for TopKey {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the top-level key `egress_policy`")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<(), E> {
        if key == "egress_policy" {
            return Ok(());
        }
        if POLICY_KEYS.contains(&key) {
            return Err(E::custom(format_args!(
                "`{key}` belongs under `egress_policy:`; the top level of a policy file is the \
                 single key `egress_policy`"
            )));
        }
        Err(E::custom(format_args!(
            "unknown top-level key `{key}`; the top level of a policy file is the single key \
             `egress_policy`"
        )))
    }
}

const POLICY_KEYS: &[&str] = &[
    "name",
    "default_action",
    "allowed_destinations",
    "denied_destinations",
    "dns_policy",
    "rate_limits",
    "allow_loopback",
    "loopback",
    "allow_other_socket_types",
    "inbound",
    "mode",
];

/// Everything of the policy except the name's default, which depends on the file name.
struct Body {
    name: Option<String>,
    default_action: DefaultAction,
    allowed: Vec<AllowedDestination>,
    denied: Vec<DeniedDestination>,
    dns: Option<DnsPolicy>,
    rate_limits: Option<RateLimits>,
    allow_loopback: bool,
    loopback_ports: Vec<u16>,
    allow_other_socket_types: bool,
    inbound: Vec<InboundRule>,
    mode: Option<Mode>,
}

impl Body {
    fn into_policy(self, file: &Path) -> Policy {
        let name = self.name.unwrap_or_else(|| {
            file.file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .filter(|stem| !stem.is_empty())
                .unwrap_or_else(|| FALLBACK_NAME.to_owned())
        });
        Policy {
            name,
            default_action: self.default_action,
            allowed: self.allowed,
            denied: self.denied,
            dns: self.dns,
            rate_limits: self.rate_limits,
            allow_loopback: self.allow_loopback,
            loopback_ports: self.loopback_ports,
            allow_other_socket_types: self.allow_other_socket_types,
            inbound: self.inbound,
            mode: self.mode,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<Name>,
    default_action: Option<Action>,
    allowed_destinations: Option<Vec<AllowedEntry>>,
    denied_destinations: Option<Vec<DeniedEntry>>,
    dns_policy: Option<RawDnsPolicy>,
    rate_limits: Option<RawRateLimits>,
    allow_loopback: Option<bool>,
    loopback: Option<LoopbackValue>,
    allow_other_socket_types: Option<bool>,
    inbound: Option<Vec<inbound::InboundEntry>>,
    mode: Option<ModeValue>,
}

struct PolicyBody(Body);

impl<'de> Deserialize<'de> for PolicyBody {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(Checked {
            expecting: "a mapping with `default_action`, `allowed_destinations` and optionally \
                        `denied_destinations`, `dns_policy`, `rate_limits`, `name`, \
                        `allow_loopback`, `loopback`, `allow_other_socket_types`, `inbound`, \
                        `mode`",
            check: check_policy,
            raw: PhantomData,
        })
    }
}

fn check_policy(raw: RawPolicy) -> Result<PolicyBody, String> {
    let default_action = raw.default_action.ok_or(
        "missing `default_action`; egress enforces allowlists: write `default_action: DENY`",
    )?;
    if raw.loopback.is_some() && raw.allow_loopback.is_some() {
        return Err(
            "`loopback` and `allow_loopback` exclude each other: `loopback: {ports: \
                    [...]}` allows loopback at those ports only, `allow_loopback` at every port \
                    (true) or by the rules (false); keep one"
                .into(),
        );
    }
    Ok(PolicyBody(Body {
        name: raw.name.map(|n| n.0),
        default_action: default_action.0,
        allowed: raw
            .allowed_destinations
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.0)
            .collect(),
        denied: raw
            .denied_destinations
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.0)
            .collect(),
        dns: raw.dns_policy.map(|d| DnsPolicy {
            allowed_resolvers: d
                .allowed_resolvers
                .map(|list| first_occurrences(list.0.into_iter().map(|r| r.0)))
                .unwrap_or_default(),
            block_doh: d.block_doh.unwrap_or(false),
            block_dot: d.block_dot.unwrap_or(false),
        }),
        rate_limits: raw.rate_limits.map(|r| RateLimits {
            per_destination: r.per_destination.map(RawRateLimit::into_model),
            global: r.global.map(|g| RateLimit {
                max_connections: g.max_new_connections.0,
                time_window_secs: g.time_window.0,
            }),
        }),
        allow_loopback: raw.allow_loopback.unwrap_or(raw.loopback.is_none()),
        loopback_ports: raw.loopback.map(|l| l.0).unwrap_or_default(),
        allow_other_socket_types: raw.allow_other_socket_types.unwrap_or(false),
        inbound: raw
            .inbound
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.0)
            .collect(),
        mode: raw.mode.map(|m| m.0),
    }))
}

// --- loopback -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoopback {
    ports: Option<NonEmpty<PortValue>>,
}

/// `loopback: {ports: [...]}`: the ports, sorted, without repeats.
struct LoopbackValue(Vec<u16>);

impl<'de> Deserialize<'de> for LoopbackValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(Checked {
            expecting: "a mapping with `ports`, e.g. `loopback: {ports: [5432]}`",
            check: check_loopback,
            raw: PhantomData,
        })
    }
}

fn check_loopback(raw: RawLoopback) -> Result<LoopbackValue, String> {
    let ports = raw.ports.ok_or(
        "missing `ports`: the loopback ports the workload may reach, e.g. `loopback: {ports: \
         [5432]}`",
    )?;
    let mut ports: Vec<u16> = ports.0.into_iter().map(|p| p.0).collect();
    ports.sort_unstable();
    ports.dedup();
    if ports.len() > MAX_LOOPBACK_PORTS {
        return Err(format!(
            "{} ports: `loopback.ports` holds at most {MAX_LOOPBACK_PORTS} (for more, write \
             `allow_loopback: false` and allow them as `cidr: 127.0.0.1/32` entries)",
            ports.len()
        ));
    }
    Ok(LoopbackValue(ports))
}

/// `items` without repeats, in the order of their first occurrence (resolvers are tried in
/// the order written).
fn first_occurrences<T: PartialEq>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// Deserializes a mapping as `R`, then checks it across fields with `check`. The check's
/// error is raised inside the mapping, so it is reported at the mapping's position and path.
struct Checked<R, T> {
    expecting: &'static str,
    check: fn(R) -> Result<T, String>,
    raw: PhantomData<R>,
}

impl<'de, R: Deserialize<'de>, T> Visitor<'de> for Checked<R, T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        let raw = R::deserialize(de::value::MapAccessDeserializer::new(map))?;
        (self.check)(raw).map_err(de::Error::custom)
    }
}

// --- allowed_destinations -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllowed {
    host: Option<AllowedHostValue>,
    cidr: Option<CidrValue>,
    ports: Option<NonEmpty<PortValue>>,
    protocols: Option<NonEmpty<ProtocolValue>>,
    purpose: Option<String>,
    rate_limit: Option<RawRateLimit>,
    restrictions: Option<RawRestrictions>,
}

struct AllowedEntry(AllowedDestination);

impl<'de> Deserialize<'de> for AllowedEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(Checked {
            expecting: "an allowed destination: a mapping with `host` or `cidr`, `ports`, \
                        `protocols` and optionally `purpose`, `rate_limit`, `restrictions`",
            check: check_allowed,
            raw: PhantomData,
        })
    }
}

fn check_allowed(raw: RawAllowed) -> Result<AllowedEntry, String> {
    let target = one_target(raw.host.map(|h| h.0), raw.cidr.map(|c| c.0))?;
    let mut ports: Vec<u16> = raw
        .ports
        .ok_or(
            "missing `ports`; list the destination ports this entry allows, e.g. `ports: [443]`",
        )?
        .0
        .into_iter()
        .map(|p| p.0)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    let mut protocols: Vec<Protocol> = raw
        .protocols
        .ok_or_else(|| {
            format!(
                "missing `protocols`; list the protocols this entry allows \
                 ({PROTOCOLS_EXPECTED}), e.g. `protocols: [https]`"
            )
        })?
        .0
        .into_iter()
        .map(|p| p.0)
        .collect();
    protocols.sort_unstable();
    protocols.dedup();
    Ok(AllowedEntry(AllowedDestination {
        ports,
        protocols,
        purpose: raw.purpose.filter(|p| !p.trim().is_empty()),
        rate_limit: raw.rate_limit.map(RawRateLimit::into_model),
        restrictions: raw
            .restrictions
            .map(|r| check_restrictions(r, &target))
            .transpose()?,
        target,
    }))
}

/// `restrictions` applies to AWS endpoint names only: elsewhere there is no service or region
/// a name could be judged by, and ignoring the key would allow more than the file says.
fn check_restrictions(raw: RawRestrictions, target: &Target) -> Result<Restrictions, String> {
    let regions = first_occurrences(
        raw.regions
            .map(|l| l.0)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.0),
    );
    let services = first_occurrences(
        raw.services
            .map(|l| l.0)
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.0),
    );
    if regions.is_empty() && services.is_empty() {
        return Err(format!(
            "`restrictions` lists neither `regions` nor `services`, so it restricts nothing; \
             give at least one, e.g. `restrictions: {{regions: [us-east-1], services: [s3]}}` \
             ({})",
            known_services()
        ));
    }
    let restrictions = Restrictions { regions, services };
    let suffixes = aws::AWS_SUFFIXES.join("`, `");
    match target {
        Target::Host(HostPattern::Wildcard(suffix)) if aws::is_under_aws_suffix(suffix) => {
            Ok(restrictions)
        }
        Target::Host(HostPattern::Exact(name)) if aws::is_under_aws_suffix(name) => {
            // The agent resolves an exact host itself, outside the DNS proxy: the name must be
            // an admitted endpoint by itself.
            let endpoint = aws::classify(name);
            match restrictions.admits(endpoint.as_ref()) {
                Ok(aws::Admission::Admitted) => Ok(restrictions),
                Ok(aws::Admission::NeedsRegionProof) | Err(_) => Err(format!(
                    "`restrictions` on the exact host `{name}`, which is not an endpoint of a \
                     listed service in a listed region ({}); name a regional endpoint such as \
                     `s3.us-east-1.amazonaws.com`, or use a wildcard such as `*.amazonaws.com`",
                    describe_endpoint(endpoint.as_ref())
                )),
            }
        }
        other => Err(format!(
            "`restrictions` (regions, services) applies only to a `host` under an AWS DNS suffix \
             (`{suffixes}`), such as `*.amazonaws.com`; `{other}` is not one: remove \
             `restrictions` from this entry"
        )),
    }
}

fn describe_endpoint(endpoint: Option<&aws::AwsEndpoint>) -> String {
    match endpoint {
        None => "it matches no documented endpoint form of a known service".to_owned(),
        Some(ep) => format!(
            "it is {} in {}",
            ep.service,
            ep.region.as_deref().unwrap_or("no particular region")
        ),
    }
}

fn known_services() -> String {
    let names: Vec<&str> = aws::AwsService::ALL.iter().map(|s| s.as_str()).collect();
    format!("known services: {}", names.join(", "))
}

fn one_target(host: Option<Target>, cidr: Option<IpNet>) -> Result<Target, String> {
    match (host, cidr) {
        (Some(host), None) => Ok(host),
        (None, Some(cidr)) => Ok(Target::Cidr(cidr)),
        (Some(_), Some(_)) => Err(
            "both `host` and `cidr` are set; an entry names exactly one \
                                   destination: either `host` (a DNS name, `*.domain` or an IP \
                                   address) or `cidr` (an address range)"
                .to_owned(),
        ),
        (None, None) => Err(
            "neither `host` nor `cidr` is set; an entry names exactly one \
                             destination: either `host` (a DNS name, `*.domain` or an IP \
                             address) or `cidr` (an address range)"
                .to_owned(),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    max_connections: Count,
    time_window: Count,
}

impl RawRateLimit {
    fn into_model(self) -> RateLimit {
        RateLimit {
            max_connections: self.max_connections.0,
            time_window_secs: self.time_window.0,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestrictions {
    regions: Option<NonEmpty<RegionValue>>,
    services: Option<NonEmpty<ServiceValue>>,
}

// --- denied_destinations --------------------------------------------------------------------

struct DeniedEntry(DeniedDestination);

impl<'de> Deserialize<'de> for DeniedEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(DeniedVisitor)
    }
}

struct DeniedVisitor;

impl<'de> Visitor<'de> for DeniedVisitor {
    type Value = DeniedEntry;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a denied destination: a mapping with either `host` or `cidr`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DeniedEntry, A::Error> {
        let mut host = None;
        let mut cidr = None;
        while let Some(key) = map.next_key_seed(DeniedKey)? {
            match key {
                DeniedField::Host => host = Some(map.next_value::<HostValue>()?),
                DeniedField::Cidr => cidr = Some(map.next_value::<CidrValue>()?),
            }
        }
        let target = one_target(host.map(|h: HostValue| h.0), cidr.map(|c: CidrValue| c.0))
            .map_err(de::Error::custom)?;
        Ok(DeniedEntry(DeniedDestination { target }))
    }
}

enum DeniedField {
    Host,
    Cidr,
}

/// Keys of a denied entry. Rejecting them while reading the key puts the error on the key.
struct DeniedKey;

impl<'de> DeserializeSeed<'de> for DeniedKey {
    type Value = DeniedField;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<DeniedField, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for DeniedKey {
    type Value = DeniedField;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`host` or `cidr`")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<DeniedField, E> {
        match key {
            "host" => Ok(DeniedField::Host),
            "cidr" => Ok(DeniedField::Cidr),
            "ports" | "protocols" => Err(E::custom(format_args!(
                "`{key}` is not accepted in denied_destinations: a denied destination is blocked \
                 on every port and protocol; an entry here has only `host` or `cidr`"
            ))),
            _ => Err(E::custom(format_args!(
                "unknown key `{key}` in a denied destination; expected `host` or `cidr`"
            ))),
        }
    }
}

// --- dns_policy and rate_limits -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDnsPolicy {
    allowed_resolvers: Option<NonEmpty<ResolverValue>>,
    block_doh: Option<bool>,
    block_dot: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimits {
    per_destination: Option<RawRateLimit>,
    global: Option<RawGlobalLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobalLimit {
    max_new_connections: Count,
    time_window: Count,
}

// ---------------------------------------------------------------------------------------------
// Scalars. Each checks its value in its visitor, so errors point at the value.

/// Implements `Deserialize` for a newtype over a string-valued scalar checked by `parse`.
macro_rules! string_scalar {
    ($ty:ident, $expecting:expr, $parse:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $ty;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }

                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        let parse: fn(&str) -> Result<$ty, String> = $parse;
                        parse(v).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(V)
            }
        }
    };
}

struct Action(DefaultAction);

string_scalar!(Action, "DENY or ALLOW", |v| {
    if v.eq_ignore_ascii_case("deny") {
        Ok(Action(DefaultAction::Deny))
    } else if v.eq_ignore_ascii_case("allow") {
        Ok(Action(DefaultAction::Allow))
    } else {
        Err(format!(
            "unknown default action `{v}`; expected DENY or ALLOW"
        ))
    }
});

struct ModeValue(Mode);

string_scalar!(ModeValue, "enforce or audit", |v| match v {
    "enforce" => Ok(ModeValue(Mode::Enforce)),
    "audit" => Ok(ModeValue(Mode::Audit)),
    _ => Err(format!(
        "unknown mode `{v}`; expected `enforce` (denied attempts fail, the default) or `audit` \
         (denied attempts are let through and logged with verdict audit)"
    )),
});

struct HostValue(Target);

string_scalar!(HostValue, HOST_EXPECTED, |v| parse_host(v).map(HostValue));

/// The `host:` of an allowed entry: a denied entry's host may also be a wildcard over a public
/// suffix (it only denies more); an allowed one may not.
struct AllowedHostValue(Target);

string_scalar!(AllowedHostValue, HOST_EXPECTED, |v| {
    let target = parse_host(v)?;
    if let Target::Host(pattern @ HostPattern::Wildcard(suffix)) = &target
        && let Some(kind) = wildcard_public_suffix(pattern)
    {
        return Err(public_suffix_wildcard(suffix, kind));
    }
    Ok(AllowedHostValue(target))
});

struct CidrValue(IpNet);

string_scalar!(CidrValue, CIDR_EXPECTED, |v| parse_cidr(v).map(CidrValue));

struct ProtocolValue(Protocol);

string_scalar!(ProtocolValue, "one of tcp, udp, http, https, dns", |v| {
    let protocol = match v.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "http" => Protocol::Http,
        "https" => Protocol::Https,
        "dns" => Protocol::Dns,
        _ => {
            return Err(format!(
                "unknown protocol `{v}`; expected one of {PROTOCOLS_EXPECTED}"
            ));
        }
    };
    Ok(ProtocolValue(protocol))
});

struct ResolverValue(IpAddr);

string_scalar!(
    ResolverValue,
    "the IP address of a DNS resolver, such as `10.0.0.53`",
    |v| match v.parse::<IpAddr>() {
        Ok(ip) => check_resolver(ip.to_canonical()).map(ResolverValue),
        Err(_) if v.parse::<SocketAddr>().is_ok() => Err(format!(
            "`{v}` has a port; a resolver is an IP address without a port (DNS port 53 is \
             implied), such as `10.0.0.53`"
        )),
        Err(_) => Err(format!(
            "`{v}` is not an IP address; a resolver is an IP address such as `10.0.0.53` or \
             `2001:db8::53` (the agent resolves through it, so it cannot be a name)"
        )),
    }
);

impl ListOf for ResolverValue {
    const WHAT: &'static str = "resolver IP addresses (leave `allowed_resolvers` out to use the \
                                host's resolvers from --resolv-conf)";
    const EXAMPLE: &'static str = "[10.0.0.53]";
}

/// A resolver the agent can send queries to: a unicast address. Loopback is accepted (the
/// agent, not the workload, talks to it: a local caching resolver is a common upstream), and so
/// is IPv4 link-local (cloud resolvers such as 169.254.169.253).
fn check_resolver(ip: IpAddr) -> Result<IpAddr, String> {
    let why = match ip {
        _ if ip.is_unspecified() => "the unspecified address, not a server",
        _ if ip.is_multicast() => "a multicast address, not a server",
        IpAddr::V4(v4) if v4.is_broadcast() => "the broadcast address, not a server",
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            "an IPv6 link-local address, which needs an interface that a policy cannot name"
        }
        _ => return Ok(ip),
    };
    Err(format!(
        "`{ip}` is {why}; a resolver is the unicast address of a DNS server, such as \
         `10.0.0.53` or `2001:db8::53`"
    ))
}

struct RegionValue(String);

string_scalar!(RegionValue, "an AWS region code such as `us-east-1`", |v| {
    if aws::is_region(v) {
        Ok(RegionValue(v.to_owned()))
    } else if aws::is_region(&v.to_ascii_lowercase()) {
        Err(format!(
            "invalid region `{v}`: region codes are lowercase; write `{}`",
            v.to_ascii_lowercase()
        ))
    } else {
        Err(format!(
            "invalid region `{v}`; expected an AWS region code such as `us-east-1`, \
             `eu-west-1` or `us-gov-west-1` (not an availability zone such as `us-east-1a`)"
        ))
    }
});

impl ListOf for RegionValue {
    const WHAT: &'static str = "AWS region codes (leave `regions` out for any region)";
    const EXAMPLE: &'static str = "[us-east-1]";
}

struct ServiceValue(aws::AwsService);

string_scalar!(ServiceValue, "an AWS service name such as `s3`", |v| {
    aws::AwsService::parse(v).map(ServiceValue).ok_or_else(|| {
        format!(
            "unknown service `{v}`; only services whose endpoint names egress can classify \
             are accepted ({})",
            known_services()
        )
    })
});

impl ListOf for ServiceValue {
    const WHAT: &'static str = "AWS services (leave `services` out for every known service)";
    const EXAMPLE: &'static str = "[s3]";
}

struct Name(String);

string_scalar!(Name, "a policy name", |v| {
    let name = v.trim();
    if name.is_empty() {
        Err("empty policy name; expected a short display name such as `github-api`".to_owned())
    } else if name.chars().count() > MAX_NAME_LEN {
        Err(format!(
            "the policy name is {} characters long; at most {MAX_NAME_LEN} are accepted",
            name.chars().count()
        ))
    } else if name.chars().any(char::is_control) {
        Err(
            "the policy name contains control characters; expected a short display name such \
             as `github-api`"
                .to_owned(),
        )
    } else {
        Ok(Name(name.to_owned()))
    }
});

/// An integer in `MIN..=MAX`.
struct Int<const MIN: u64, const MAX: u64>(u64);

impl<const MIN: u64, const MAX: u64> Int<MIN, MAX> {
    fn check<E: de::Error>(v: i128, what: &str) -> Result<Self, E> {
        match u64::try_from(v) {
            Ok(v) if (MIN..=MAX).contains(&v) => Ok(Int(v)),
            _ => Err(E::custom(format_args!(
                "{what} {v} is out of range; expected an integer from {MIN} to {MAX}"
            ))),
        }
    }
}

struct IntVisitor<const MIN: u64, const MAX: u64> {
    what: &'static str,
}

impl<'de, const MIN: u64, const MAX: u64> Visitor<'de> for IntVisitor<MIN, MAX> {
    type Value = Int<MIN, MAX>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (an integer from {MIN} to {MAX})", self.what)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Int::check(i128::from(v), self.what)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Int::check(i128::from(v), self.what)
    }
}

struct PortValue(u16);

impl<'de> Deserialize<'de> for PortValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Int(v) =
            deserializer.deserialize_any(IntVisitor::<1, { u16::MAX as u64 }> { what: "port" })?;
        u16::try_from(v)
            .map(PortValue)
            .map_err(|_| de::Error::custom("port out of range"))
    }
}

/// A count or a number of seconds: at least 1.
struct Count(u32);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Int(v) =
            deserializer.deserialize_any(IntVisitor::<1, { u32::MAX as u64 }> { what: "value" })?;
        u32::try_from(v)
            .map(Count)
            .map_err(|_| de::Error::custom("value out of range"))
    }
}

/// A list with at least one element.
struct NonEmpty<T>(Vec<T>);

trait ListOf {
    /// What the list holds, for messages: "ports", "protocols".
    const WHAT: &'static str;
    const EXAMPLE: &'static str;
}

impl ListOf for PortValue {
    const WHAT: &'static str = "port numbers";
    const EXAMPLE: &'static str = "[443]";
}

impl ListOf for ProtocolValue {
    const WHAT: &'static str = "protocols (tcp, udp, http, https, dns)";
    const EXAMPLE: &'static str = "[https]";
}

impl<'de, T: Deserialize<'de> + ListOf> Deserialize<'de> for NonEmpty<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + ListOf> Visitor<'de> for V<T> {
            type Value = NonEmpty<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a non-empty list of {}, e.g. {}", T::WHAT, T::EXAMPLE)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NonEmpty<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                if items.is_empty() {
                    return Err(de::Error::custom(format_args!(
                        "empty list; expected at least one of the {}, e.g. {}",
                        T::WHAT,
                        T::EXAMPLE
                    )));
                }
                Ok(NonEmpty(items))
            }
        }
        deserializer.deserialize_seq(V(PhantomData))
    }
}

// ---------------------------------------------------------------------------------------------
// Hosts and networks.

/// A `host:` value: an IP literal (a single-address network), `*.suffix`, or a DNS name.
fn parse_host(raw: &str) -> Result<Target, String> {
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Ok(Target::Cidr(canonical(IpNet::from(ip))));
    }
    let bad = |why: &str| Err(format!("invalid host `{raw}`: {why}; {HOST_EXPECTED}"));
    if raw.is_empty() {
        return bad("empty");
    }
    if raw.contains("://") {
        return bad("a URL; `host` takes only the host name (ports go in `ports`)");
    }
    if raw.starts_with('[') {
        return bad("write an IPv6 address without brackets");
    }
    if raw.contains('/') {
        return bad("`/` is not allowed in a host name; for an address range use `cidr:`");
    }
    if raw.contains(':') {
        return bad("`:` is not allowed; `host` takes no port (ports go in `ports`)");
    }
    if !raw.is_ascii() {
        return bad(
            "non-ASCII characters; write internationalized names in their ASCII form \
                    (`xn--...`)",
        );
    }
    let lower = raw.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if let Some(suffix) = name.strip_prefix("*.") {
        if suffix.contains('*') {
            return bad(
                "`*` is only allowed once, as the whole first label, as in `*.example.com`",
            );
        }
        if let Err(why) = check_dns_name(suffix) {
            return bad(&why);
        }
        return Ok(Target::Host(HostPattern::Wildcard(suffix.to_owned())));
    }
    if name.contains('*') {
        return bad("`*` is only allowed as the whole first label, as in `*.example.com`");
    }
    if let Err(why) = check_dns_name(name) {
        return bad(&why);
    }
    Ok(Target::Host(HostPattern::Exact(name.to_owned())))
}

/// Why an allowed `*.suffix` over a public suffix is refused, and what to write instead.
fn public_suffix_wildcard(suffix: &str, kind: PublicSuffixKind) -> String {
    let what = match kind {
        _ if !suffix.contains('.') => {
            format!("`{suffix}` is a top-level domain: anyone can register names below it")
        }
        PublicSuffixKind::Icann => format!(
            "`{suffix}` is a registry suffix on the Public Suffix List: anyone can register \
             names below it"
        ),
        PublicSuffixKind::Private => format!(
            "`{suffix}` is on the Public Suffix List (private section): its operator lets anyone \
             create names below it, an attacker included"
        ),
    };
    let example = format!("example.{suffix}");
    let instead = if wildcard_public_suffix(&HostPattern::Wildcard(example.clone())).is_none() {
        format!("a wildcard over a domain your organisation holds, such as `*.{example}`,")
    } else {
        "a wildcard over a domain your organisation holds".to_owned()
    };
    format!(
        "`*.{suffix}` is a wildcard over a public suffix and is refused in allowed_destinations: \
         {what}, so it would allow all of them; write {instead} or list exact host names"
    )
}

/// LDH syntax: labels of 1..=63 letters, digits and inner hyphens; at most 253 characters;
/// the last label not all digits (that would be a malformed IPv4 address).
fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".to_owned());
    }
    if name.len() > 253 {
        return Err(format!(
            "the name is {} characters long; a DNS name has at most 253",
            name.len()
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label (a leading dot, or two dots in a row)".to_owned());
        }
        if label.len() > 63 {
            return Err(format!(
                "label `{label}` is {} characters long; a DNS label has at most 63",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!(
                "`{c}` is not allowed; DNS names consist of letters, digits, `-` and `.`"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label `{label}` starts or ends with `-`"));
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(
            "not a valid IP address, and not a DNS name either (the last label of a \
                    name is not all digits)"
                .to_owned(),
        );
    }
    Ok(())
}

/// A `cidr:` value: `address/prefix`, or a bare address meaning /32 or /128.
fn parse_cidr(raw: &str) -> Result<IpNet, String> {
    let bad = |why: String| Err(format!("invalid cidr `{raw}`: {why}; {CIDR_EXPECTED}"));
    let (addr_text, prefix_text) = match raw.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (raw, None),
    };
    let Ok(addr) = addr_text.parse::<IpAddr>() else {
        return bad(format!("`{addr_text}` is not an IP address"));
    };
    let (family, max) = match addr {
        IpAddr::V4(_) => ("IPv4", 32u8),
        IpAddr::V6(_) => ("IPv6", 128u8),
    };
    let prefix = match prefix_text {
        None => max,
        Some(p) if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) => {
            return bad(format!("the prefix length `/{p}` is not a number"));
        }
        Some(p) => match p.parse::<u8>() {
            Ok(len) if len <= max => len,
            _ => {
                return bad(format!(
                    "the prefix /{p} is too long for an {family} network (at most /{max})"
                ));
            }
        },
    };
    let net = match IpNet::new(addr, prefix) {
        Ok(net) => net,
        Err(e) => return bad(e.to_string()),
    };
    if net.network() != addr {
        return bad(format!(
            "host bits are set; the network is `{}` (for the single address write `{}`)",
            net.trunc(),
            IpNet::from(addr)
        ));
    }
    Ok(canonical(net))
}

/// IPv4-mapped IPv6 networks (`::ffff:a.b.c.d/96+n`) as the IPv4 network `a.b.c.d/n`: the
/// kernel side judges mapped destinations as IPv4.
fn canonical(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.network().to_ipv4_mapped()
        && let Ok(v4net) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(v4net);
    }
    net
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn file() -> &'static Path {
        Path::new("policies/t.yaml")
    }

    fn ok(text: &str) -> Policy {
        match parse_str(text, file()) {
            Ok(p) => p,
            Err(e) => panic!("expected the policy to parse, got: {e}"),
        }
    }

    fn err(text: &str) -> PolicyError {
        match parse_str(text, file()) {
            Ok(p) => panic!("expected an error, got {p:?}"),
            Err(e) => e,
        }
    }

    fn msg(text: &str) -> String {
        err(text).to_string()
    }

    /// A one-entry policy around `entry` (indented as a list item under allowed_destinations,
    /// so its first line is line 4).
    fn allowed(entry: &str) -> String {
        format!("egress_policy:\n  default_action: DENY\n  allowed_destinations:\n{entry}")
    }

    fn net(s: &str) -> IpNet {
        match s.parse() {
            Ok(n) => n,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn only_target(p: &Policy) -> &Target {
        match p.allowed.as_slice() {
            [rule] => &rule.target,
            other => panic!("expected one rule, got {other:?}"),
        }
    }

    #[test]
    fn seed_example_parses_into_the_expected_policy() {
        let text = include_str!("../../policies/mcp-net-02-example.yaml");
        let p = match parse_str(text, Path::new("policies/mcp-net-02-example.yaml")) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let https_443 = |target: Target, purpose: &str| AllowedDestination {
            target,
            ports: vec![443],
            protocols: vec![Protocol::Https],
            purpose: Some(purpose.to_owned()),
            rate_limit: None,
            restrictions: None,
        };
        let expected = Policy {
            name: "mcp-net-02-example".to_owned(),
            default_action: DefaultAction::Deny,
            allowed: vec![
                https_443(
                    Target::Host(HostPattern::Exact("api.company.com".into())),
                    "Internal API access",
                ),
                AllowedDestination {
                    restrictions: Some(Restrictions {
                        regions: vec!["us-east-1".into(), "eu-west-1".into()],
                        services: vec![aws::AwsService::S3, aws::AwsService::DynamoDb],
                    }),
                    ..https_443(
                        Target::Host(HostPattern::Wildcard("amazonaws.com".into())),
                        "AWS service access",
                    )
                },
                AllowedDestination {
                    target: Target::Host(HostPattern::Exact("database.internal".into())),
                    ports: vec![5432],
                    protocols: vec![Protocol::Tcp],
                    purpose: Some("PostgreSQL database".into()),
                    rate_limit: None,
                    restrictions: None,
                },
            ],
            denied: vec![
                DeniedDestination {
                    target: Target::Host(HostPattern::Wildcard("crypto-mining.com".into())),
                },
                DeniedDestination {
                    target: Target::Host(HostPattern::Wildcard("torproject.org".into())),
                },
                DeniedDestination {
                    target: Target::Cidr(net("10.0.0.0/8")),
                },
            ],
            dns: Some(DnsPolicy {
                allowed_resolvers: vec![
                    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 53)),
                    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 54)),
                ],
                block_doh: true,
                block_dot: true,
            }),
            rate_limits: Some(RateLimits {
                per_destination: Some(RateLimit {
                    max_connections: 100,
                    time_window_secs: 60,
                }),
                global: Some(RateLimit {
                    max_connections: 1000,
                    time_window_secs: 60,
                }),
            }),
            allow_loopback: true,
            loopback_ports: Vec::new(),
            allow_other_socket_types: false,
            inbound: Vec::new(),
            mode: None,
        };
        assert_eq!(p, expected);
    }

    #[test]
    fn loopback_ports_are_sorted_bounded_and_exclude_allow_loopback() {
        let head = "egress_policy:\n  default_action: DENY\n";
        let p = ok(&format!(
            "{head}  loopback: {{ports: [6379, 5432, 6379]}}\n"
        ));
        assert_eq!(p.loopback_ports, vec![5432, 6379]);
        assert!(!p.allow_loopback);
        assert!(ok(head).loopback_ports.is_empty());
        assert_eq!(
            msg(&format!(
                "{head}  allow_loopback: false\n  loopback: {{ports: [5432]}}\n"
            )),
            "policies/t.yaml:2:3: egress_policy: `loopback` and `allow_loopback` exclude each \
             other: `loopback: {ports: [...]}` allows loopback at those ports only, \
             `allow_loopback` at every port (true) or by the rules (false); keep one"
        );
        let many: Vec<String> = (1..=17).map(|i| (5000 + i).to_string()).collect();
        for (value, want) in [
            (
                "{ports: []}",
                "empty list; expected at least one of the port numbers",
            ),
            ("{ports: [0]}", "port"),
            ("{ports: [65536]}", "port"),
            (
                "{}",
                "missing `ports`: the loopback ports the workload may reach",
            ),
            ("{ports: [5432], tcp: true}", "unknown field `tcp`"),
            ("[5432]", "a mapping with `ports`"),
        ] {
            let m = msg(&format!("{head}  loopback: {value}\n"));
            assert!(
                m.starts_with("policies/t.yaml:3:") && m.contains(want),
                "{value}: {m}"
            );
        }
        assert!(
            msg(&format!(
                "{head}  loopback: {{ports: [{}]}}\n",
                many.join(", ")
            ))
            .contains("17 ports: `loopback.ports` holds at most 16"),
        );
        // Exactly 16, with repeats, is fine.
        let sixteen: Vec<String> = (1..=16)
            .chain([3])
            .map(|i| (5000 + i).to_string())
            .collect();
        assert_eq!(
            ok(&format!(
                "{head}  loopback: {{ports: [{}]}}\n",
                sixteen.join(", ")
            ))
            .loopback_ports
            .len(),
            16
        );
    }

    #[test]
    fn extensions_and_defaults() {
        let p = ok("egress_policy:\n  default_action: DENY\n");
        assert_eq!(p.name, "t");
        assert!(p.allowed.is_empty() && p.denied.is_empty());
        assert!(p.allow_loopback);
        assert!(!p.allow_other_socket_types);
        assert_eq!(p.dns, None);
        assert_eq!(p.rate_limits, None);

        let p = ok(
            "egress_policy:\n  name: \" my tools \"\n  default_action: deny\n  \
                    allow_loopback: false\n  allow_other_socket_types: true\n",
        );
        assert_eq!(p.name, "my tools");
        assert_eq!(p.default_action, DefaultAction::Deny);
        assert!(!p.allow_loopback);
        assert!(p.allow_other_socket_types);

        assert_eq!(
            ok("egress_policy:\n  default_action: Allow\n").default_action,
            DefaultAction::Allow
        );
    }

    #[test]
    fn ports_and_protocols_are_sorted_and_deduplicated() {
        let p = ok(&allowed(
            "    - host: example.com\n      ports: [8443, 443, 8443]\n      protocols: [HTTPS, \
             dns, Tcp, https]\n",
        ));
        assert_eq!(p.allowed[0].ports, vec![443, 8443]);
        assert_eq!(
            p.allowed[0].protocols,
            vec![Protocol::Tcp, Protocol::Https, Protocol::Dns]
        );
    }

    #[test]
    fn hosts_are_normalised() {
        let p = ok(&allowed(
            "    - host: API.GitHub.com.\n      ports: [443]\n      protocols: [https]\n",
        ));
        assert_eq!(
            only_target(&p),
            &Target::Host(HostPattern::Exact("api.github.com".into()))
        );
        let p = ok(&allowed(
            "    - host: localhost\n      ports: [80]\n      protocols: [http]\n",
        ));
        assert_eq!(
            only_target(&p),
            &Target::Host(HostPattern::Exact("localhost".into()))
        );
    }

    #[test]
    fn ip_literal_hosts_become_single_address_networks() {
        let cases = [
            ("192.0.2.7", "192.0.2.7/32"),
            ("2001:db8::1", "2001:db8::1/128"),
            ("\"::ffff:192.0.2.7\"", "192.0.2.7/32"),
        ];
        for (host, want) in cases {
            let p = ok(&allowed(&format!(
                "    - host: {host}\n      ports: [443]\n      protocols: [tcp]\n"
            )));
            assert_eq!(only_target(&p), &Target::Cidr(net(want)), "{host}");
        }
    }

    #[test]
    fn wildcard_hosts() {
        let p = ok(&allowed(
            "    - host: \"*.Example.COM.\"\n      ports: [443]\n      protocols: [https]\n",
        ));
        assert_eq!(
            only_target(&p),
            &Target::Host(HostPattern::Wildcard("example.com".into()))
        );

        for (host, needle) in [
            ("*", "only allowed as the whole first label"),
            ("a.*.b.com", "only allowed as the whole first label"),
            ("*foo.com", "only allowed as the whole first label"),
            ("*.*.example.com", "only allowed once"),
        ] {
            let text = msg(&allowed(&format!(
                "    - host: \"{host}\"\n      ports: [443]\n      protocols: [https]\n"
            )));
            assert!(
                text.starts_with(
                    "policies/t.yaml:4:13: egress_policy.allowed_destinations[0].host: invalid host"
                ),
                "{host}: {text}"
            );
            assert!(text.contains(needle), "{host}: {text}");
        }
    }

    #[test]
    fn allowed_wildcards_over_a_public_suffix_are_refused_where_written() {
        for (host, pattern, needle) in [
            ("*.com", "*.com", "`com` is a top-level domain"),
            (
                "*.internal",
                "*.internal",
                "`internal` is a top-level domain",
            ),
            (
                "*.CO.UK.",
                "*.co.uk",
                "`co.uk` is a registry suffix on the Public Suffix List",
            ),
            ("*.github.io", "*.github.io", "(private section)"),
            (
                "*.s3.amazonaws.com",
                "*.s3.amazonaws.com",
                "(private section)",
            ),
            // Every child of kawasaki.jp is a public suffix (rule `*.kawasaki.jp`).
            ("*.kawasaki.jp", "*.kawasaki.jp", "registry suffix"),
        ] {
            let text = msg(&format!(
                "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - host: \
                 api.example.com\n      ports: [443]\n      protocols: [https]\n    - host: \
                 \"{host}\"\n      ports: [443]\n      protocols: [https]\n"
            ));
            assert!(
                text.starts_with(&format!(
                    "policies/t.yaml:7:13: egress_policy.allowed_destinations[1].host: \
                     `{pattern}` is a wildcard over a public suffix and is refused in \
                     allowed_destinations: "
                )),
                "{host}: {text}"
            );
            assert!(text.contains(needle), "{host}: {text}");
            assert!(text.contains("list exact host names"), "{host}: {text}");
        }
        let text = msg(&allowed(
            "    - host: \"*.co.uk\"\n      ports: [443]\n      protocols: [https]\n",
        ));
        assert!(text.contains("such as `*.example.co.uk`"), "{text}");
        // No example that would itself be refused: example.kawasaki.jp is a public suffix.
        let text = msg(&allowed(
            "    - host: \"*.kawasaki.jp\"\n      ports: [443]\n      protocols: [https]\n",
        ));
        assert!(!text.contains("such as"), "{text}");

        // Below a public suffix is fine, and so is the seed's `*.amazonaws.com`.
        for host in ["*.example.co.uk", "*.myorg.github.io", "*.amazonaws.com"] {
            let p = ok(&allowed(&format!(
                "    - host: \"{host}\"\n      ports: [443]\n      protocols: [https]\n"
            )));
            assert_eq!(only_target(&p).to_string(), host);
        }
    }

    #[test]
    fn denied_wildcards_may_cover_a_public_suffix() {
        let p = ok(
            "egress_policy:\n  default_action: DENY\n  denied_destinations:\n    - \
                    host: \"*.com\"\n    - host: \"*.co.uk\"\n    - host: \"*.github.io\"\n",
        );
        let hosts: Vec<String> = p.denied.iter().map(|d| d.target.to_string()).collect();
        assert_eq!(hosts, ["*.com", "*.co.uk", "*.github.io"]);
    }

    #[test]
    fn malformed_hosts() {
        for (host, needle) in [
            ("https://api.github.com", "a URL"),
            ("api.github.com:443", "takes no port"),
            ("under_score.com", "`_` is not allowed"),
            ("-lead.example.com", "starts or ends with `-`"),
            ("a..example.com", "empty label"),
            ("example.com..", "empty label"),
            ("10.0.0.256", "not a valid IP address"),
            ("10.0.0.0/8", "use `cidr:`"),
            ("b\u{fc}cher.de", "non-ASCII"),
            (&format!("{}.com", "a".repeat(64)), "at most 63"),
            (&format!("{}com", "abcdefghi.".repeat(26)), "at most 253"),
        ] {
            let text = msg(&allowed(&format!(
                "    - host: \"{host}\"\n      ports: [443]\n      protocols: [https]\n"
            )));
            assert!(
                text.contains("egress_policy.allowed_destinations[0].host: invalid host"),
                "{host}: {text}"
            );
            assert!(text.contains(needle), "{host}: {text}");
        }
    }

    #[test]
    fn cidrs() {
        for (cidr, want) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("192.0.2.1", "192.0.2.1/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("2001:db8::1", "2001:db8::1/128"),
            ("\"::ffff:10.0.0.0/104\"", "10.0.0.0/8"),
            ("\"::ffff:192.0.2.1\"", "192.0.2.1/32"),
            ("\"::ffff:0.0.0.0/96\"", "0.0.0.0/0"),
        ] {
            let p = ok(&allowed(&format!(
                "    - cidr: {cidr}\n      ports: [443]\n      protocols: [tcp]\n"
            )));
            assert_eq!(only_target(&p), &Target::Cidr(net(want)), "{cidr}");
        }
        let mapped = ok(&allowed(
            "    - cidr: \"::ffff:10.0.0.0/104\"\n      ports: [443]\n      protocols: [tcp]\n",
        ));
        assert!(matches!(only_target(&mapped), Target::Cidr(IpNet::V4(_))));
        // Not in the mapped range: stays IPv6.
        let v6 = ok(&allowed(
            "    - cidr: \"::/0\"\n      ports: [443]\n      protocols: [tcp]\n",
        ));
        assert!(
            matches!(only_target(&v6), Target::Cidr(IpNet::V6(n)) if n.prefix_len() == 0
                && n.network() == Ipv6Addr::UNSPECIFIED)
        );
    }

    #[test]
    fn cidr_errors() {
        let text = msg(&allowed(
            "    - cidr: 10.0.0.1/8\n      ports: [443]\n      protocols: [tcp]\n",
        ));
        assert_eq!(
            text,
            "policies/t.yaml:4:13: egress_policy.allowed_destinations[0].cidr: invalid cidr \
             `10.0.0.1/8`: host bits are set; the network is `10.0.0.0/8` (for the single \
             address write `10.0.0.1/32`); expected a network such as `10.0.0.0/8` or \
             `2001:db8::/32`, or a single address such as `192.0.2.1`"
        );
        for (cidr, needle) in [
            (
                "10.0.0.0/33",
                "the prefix /33 is too long for an IPv4 network (at most /32)",
            ),
            (
                "\"2001:db8::/129\"",
                "too long for an IPv6 network (at most /128)",
            ),
            ("10.0.0.0/999", "the prefix /999 is too long"),
            ("10.0.0.0/", "is not a number"),
            ("10.0.0.0/x", "is not a number"),
            ("10.0.0/8", "`10.0.0` is not an IP address"),
            ("example.com", "is not an IP address"),
            ("\"2001:db8::1/32\"", "the network is `2001:db8::/32`"),
        ] {
            let text = msg(&allowed(&format!(
                "    - cidr: {cidr}\n      ports: [443]\n      protocols: [tcp]\n"
            )));
            assert!(
                text.starts_with(
                    "policies/t.yaml:4:13: egress_policy.allowed_destinations[0].cidr: invalid cidr"
                ),
                "{cidr}: {text}"
            );
            assert!(text.contains(needle), "{cidr}: {text}");
        }
    }

    #[test]
    fn port_errors_point_at_the_port() {
        let text = msg(&allowed(
            "    - host: example.com\n      ports: [443, 0]\n      protocols: [tcp]\n",
        ));
        assert_eq!(
            text,
            "policies/t.yaml:5:20: egress_policy.allowed_destinations[0].ports[1]: port 0 is out \
             of range; expected an integer from 1 to 65535"
        );
        let text = msg(&allowed(
            "    - host: example.com\n      ports:\n        - 65536\n      protocols: [tcp]\n",
        ));
        assert_eq!(
            text,
            "policies/t.yaml:6:11: egress_policy.allowed_destinations[0].ports[0]: port 65536 is \
             out of range; expected an integer from 1 to 65535"
        );
        let text = msg(&allowed(
            "    - host: example.com\n      ports: [\"443\"]\n      protocols: [tcp]\n",
        ));
        assert_eq!(
            text,
            "policies/t.yaml:5:15: egress_policy.allowed_destinations[0].ports[0]: invalid type: \
             string \"443\", expected port (an integer from 1 to 65535)"
        );
        let text = msg(&allowed(
            "    - host: example.com\n      ports: [-1]\n      protocols: [tcp]\n",
        ));
        assert!(text.contains("port -1 is out of range"), "{text}");
        let text = msg(&allowed(
            "    - host: example.com\n      ports: []\n      protocols: [tcp]\n",
        ));
        assert_eq!(
            text,
            "policies/t.yaml:5:14: egress_policy.allowed_destinations[0].ports: empty list; \
             expected at least one of the port numbers, e.g. [443]"
        );
        let text = msg(&allowed(
            "    - host: example.com\n      ports: 443\n      protocols: [tcp]\n",
        ));
        assert!(
            text.starts_with("policies/t.yaml:5:14: egress_policy.allowed_destinations[0].ports: "),
            "{text}"
        );
        assert!(
            text.contains("expected a non-empty list of port numbers"),
            "{text}"
        );
    }

    #[test]
    fn unknown_protocol() {
        let text = msg(&allowed(
            "    - host: example.com\n      ports: [21]\n      protocols: [tcp, ftp]\n",
        ));
        assert_eq!(
            text,
            "policies/t.yaml:6:24: egress_policy.allowed_destinations[0].protocols[1]: unknown \
             protocol `ftp`; expected one of tcp, udp, http, https or dns"
        );
        let text = msg(&allowed(
            "    - host: example.com\n      ports: [21]\n      protocols: []\n",
        ));
        assert!(text.contains("protocols: empty list"), "{text}");
    }

    #[test]
    fn unknown_keys() {
        let text = msg("foo: 1\n");
        assert_eq!(
            text,
            "policies/t.yaml:1:1: foo: unknown top-level key `foo`; the top level of a policy \
             file is the single key `egress_policy`"
        );
        let text = msg("default_action: DENY\n");
        assert!(
            text.starts_with("policies/t.yaml:1:1: default_action: "),
            "{text}"
        );
        assert!(text.contains("belongs under `egress_policy:`"), "{text}");

        let text = msg("egress_policy:\n  default_action: DENY\n  allowed_destination: []\n");
        assert!(
            text.starts_with(
                "policies/t.yaml:3:3: egress_policy.allowed_destination: unknown field \
                 `allowed_destination`, expected one of `name`, `default_action`, \
                 `allowed_destinations`"
            ),
            "{text}"
        );

        let text = msg(&allowed(
            "    - host: example.com\n      ports: [443]\n      protocols: [https]\n      \
             porpose: x\n",
        ));
        assert!(
            text.starts_with(
                "policies/t.yaml:7:7: egress_policy.allowed_destinations[0].porpose: unknown \
                 field `porpose`, expected one of `host`, `cidr`, `ports`, `protocols`, \
                 `purpose`, `rate_limit`, `restrictions`"
            ),
            "{text}"
        );

        let text = msg(
            "egress_policy:\n  default_action: DENY\n  rate_limits:\n    global:\n      \
                        max_connections: 1\n      time_window: 1\n",
        );
        assert!(
            text.starts_with(
                "policies/t.yaml:5:7: egress_policy.rate_limits.global.max_connections: unknown \
                 field `max_connections`, expected `max_new_connections` or `time_window`"
            ),
            "{text}"
        );
    }

    #[test]
    fn host_and_cidr_exactly_one() {
        let text = msg(&allowed(
            "    - host: a.example.com\n      ports: [443]\n      protocols: [https]\n    - \
             host: b.example.com\n      cidr: 192.0.2.0/24\n      ports: [443]\n      \
             protocols: [https]\n",
        ));
        assert!(
            text.starts_with(
                "policies/t.yaml:7:7: egress_policy.allowed_destinations[1]: both `host` and \
                 `cidr` are set"
            ),
            "{text}"
        );
        let text = msg(&allowed(
            "    - ports: [443]\n      protocols: [https]\n      purpose: nowhere\n",
        ));
        assert!(
            text.starts_with(
                "policies/t.yaml:4:7: egress_policy.allowed_destinations[0]: neither `host` nor \
                 `cidr` is set"
            ),
            "{text}"
        );
        let text = msg(
            "egress_policy:\n  default_action: DENY\n  denied_destinations:\n    - \
                        host: a.example.com\n      cidr: 10.0.0.0/8\n",
        );
        assert!(
            text.starts_with(
                "policies/t.yaml:4:7: egress_policy.denied_destinations[0]: both `host` and \
                 `cidr` are set"
            ),
            "{text}"
        );
    }

    #[test]
    fn missing_ports_or_protocols() {
        let text = msg(&allowed(
            "    - host: example.com\n      protocols: [https]\n",
        ));
        assert_eq!(
            text,
            "policies/t.yaml:4:7: egress_policy.allowed_destinations[0]: missing `ports`; list \
             the destination ports this entry allows, e.g. `ports: [443]`"
        );
        let text = msg(&allowed("    - host: example.com\n      ports: [443]\n"));
        assert!(text.contains("missing `protocols`"), "{text}");
    }

    #[test]
    fn denied_entries_take_no_ports() {
        let text = msg(
            "egress_policy:\n  default_action: DENY\n  denied_destinations:\n    - \
                        cidr: 10.0.0.0/8\n      ports: [22]\n",
        );
        assert_eq!(
            text,
            "policies/t.yaml:5:7: egress_policy.denied_destinations[0].ports: `ports` is not \
             accepted in denied_destinations: a denied destination is blocked on every port and \
             protocol; an entry here has only `host` or `cidr`"
        );
        let text = msg(
            "egress_policy:\n  default_action: DENY\n  denied_destinations:\n    - \
                        host: x.example.com\n      purpose: no\n",
        );
        assert!(
            text.starts_with(
                "policies/t.yaml:5:7: egress_policy.denied_destinations[0].purpose: unknown key \
                 `purpose` in a denied destination; expected `host` or `cidr`"
            ),
            "{text}"
        );
    }

    #[test]
    fn duplicate_keys_point_at_the_second_key() {
        let text = msg(&allowed(
            "    - host: example.com\n      ports: [443]\n      protocols: [https]\n      ports: \
             [80]\n",
        ));
        assert!(
            text.starts_with(
                "policies/t.yaml:7:7: egress_policy.allowed_destinations[0].ports: duplicate key \
                 `ports`"
            ),
            "{text}"
        );
        let text = msg("egress_policy:\n  default_action: DENY\n  default_action: ALLOW\n");
        assert!(
            text.starts_with(
                "policies/t.yaml:3:3: egress_policy.default_action: duplicate key \
                 `default_action`"
            ),
            "{text}"
        );
        let text = msg("egress_policy:\n  default_action: DENY\negress_policy:\n  \
                        default_action: ALLOW\n");
        assert!(
            text.starts_with("policies/t.yaml:3:1: egress_policy: duplicate key `egress_policy`"),
            "{text}"
        );
    }

    #[test]
    fn empty_and_non_policy_documents() {
        for text in ["", "\n\n", "# just a comment\n", "---\n", "~\n"] {
            assert!(
                matches!(err(text), PolicyError::Empty { .. }),
                "{text:?}: {}",
                msg(text)
            );
        }
        assert!(msg("").starts_with("policies/t.yaml: the file is empty"));

        let text = msg("- egress_policy: {}\n");
        assert_eq!(
            text,
            "policies/t.yaml:1:1: invalid type: sequence, expected a mapping with the single \
             top-level key `egress_policy`"
        );
        let text = msg("egress_policy:\n");
        assert!(
            text.starts_with("policies/t.yaml:1:15: egress_policy: missing `default_action`"),
            "{text}"
        );
        let text = msg("egress_policy: DENY\n");
        assert!(text.contains("invalid type: string \"DENY\""), "{text}");
    }

    #[test]
    fn yaml_syntax_errors() {
        let e = err("egress_policy:\n  default_action: DENY\n  allowed_destinations: [\n");
        match &e {
            PolicyError::Syntax { line, .. } => assert!(line.is_some(), "{e}"),
            other => panic!("expected a syntax error, got {other:?}"),
        }
        assert!(e.to_string().starts_with("policies/t.yaml:4:1: "), "{e}");

        let e = err(
            "egress_policy:\n  default_action: DENY\n---\negress_policy:\n  \
                     default_action: DENY\n",
        );
        assert!(matches!(e, PolicyError::Syntax { .. }), "{e:?}");
        assert!(e.to_string().contains("more than one document"), "{e}");

        let e = err("egress_policy:\n\tdefault_action: DENY\n");
        assert!(
            matches!(e, PolicyError::Syntax { line: Some(2), .. }),
            "{e}"
        );
    }

    #[test]
    fn comments_are_fine() {
        let p = ok(
            "# policy\negress_policy:  # the policy\n  default_action: DENY  # deny\n  \
                    denied_destinations:\n    - cidr: \"10.0.0.0/8\"  # Except explicitly \
                    allowed\n",
        );
        assert_eq!(p.denied.len(), 1);
    }

    #[test]
    fn numbers_of_limits_are_at_least_one() {
        let text = msg(&allowed(
            "    - host: example.com\n      ports: [443]\n      protocols: [https]\n      \
             rate_limit: {max_connections: 0, time_window: 60}\n",
        ));
        assert_eq!(
            text,
            "policies/t.yaml:7:37: egress_policy.allowed_destinations[0].rate_limit.\
             max_connections: value 0 is out of range; expected an integer from 1 to 4294967295"
        );
        let text = msg(
            "egress_policy:\n  default_action: DENY\n  rate_limits:\n    \
                        per_destination: {max_connections: 1}\n",
        );
        assert!(text.contains("missing field `time_window`"), "{text}");
    }

    #[test]
    fn dns_policy_values() {
        let p = ok(
            "egress_policy:\n  default_action: DENY\n  dns_policy:\n    \
                    allowed_resolvers: [10.0.0.53, \"2001:db8::53\"]\n",
        );
        let dns = match p.dns {
            Some(d) => d,
            None => panic!("dns_policy missing"),
        };
        assert_eq!(dns.allowed_resolvers.len(), 2);
        assert!(!dns.block_doh && !dns.block_dot);

        let text = msg(
            "egress_policy:\n  default_action: DENY\n  dns_policy:\n    \
                        allowed_resolvers:\n      - 10.0.0.53:53\n",
        );
        assert!(
            text.starts_with(
                "policies/t.yaml:5:9: egress_policy.dns_policy.allowed_resolvers[0]: \
                 `10.0.0.53:53` has a port"
            ),
            "{text}"
        );
        for (resolver, needle) in [
            ("dns.google", "`dns.google` is not an IP address"),
            ("0.0.0.0", "the unspecified address"),
            ("\"::\"", "the unspecified address"),
            ("224.0.0.251", "a multicast address"),
            ("\"ff02::fb\"", "a multicast address"),
            ("255.255.255.255", "the broadcast address"),
            ("\"fe80::1\"", "IPv6 link-local"),
        ] {
            let text = msg(&format!(
                "egress_policy:\n  default_action: DENY\n  dns_policy:\n    \
                 allowed_resolvers:\n      - 10.0.0.53\n      - {resolver}\n"
            ));
            assert!(
                text.starts_with(
                    "policies/t.yaml:6:9: egress_policy.dns_policy.allowed_resolvers[1]: "
                ),
                "{resolver}: {text}"
            );
            assert!(text.contains(needle), "{resolver}: {text}");
        }
        let text = msg(
            "egress_policy:\n  default_action: DENY\n  dns_policy:\n    allowed_resolvers: []\n",
        );
        assert!(
            text.contains("egress_policy.dns_policy.allowed_resolvers: empty list"),
            "{text}"
        );
        assert!(text.contains("leave `allowed_resolvers` out"), "{text}");

        // Loopback and IPv4 link-local resolvers serve the agent; repeats are dropped, the
        // order of first occurrences kept.
        let p = ok(
            "egress_policy:\n  default_action: DENY\n  dns_policy:\n    \
                    allowed_resolvers: [127.0.0.53, 169.254.169.253, \"::ffff:127.0.0.53\", \
                    \"::1\"]\n",
        );
        let resolvers: Vec<String> = p
            .dns
            .map(|d| {
                d.allowed_resolvers
                    .iter()
                    .map(ToString::to_string)
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(resolvers, ["127.0.0.53", "169.254.169.253", "::1"]);

        let text = msg(
            "egress_policy:\n  default_action: DENY\n  dns_policy:\n    block_doh: \
                        yes\n",
        );
        assert!(
            text.contains("egress_policy.dns_policy.block_doh: invalid type"),
            "{text}"
        );
    }

    #[test]
    fn other_value_errors() {
        let text = msg("egress_policy:\n  default_action: REJECT\n");
        assert_eq!(
            text,
            "policies/t.yaml:2:19: egress_policy.default_action: unknown default action \
             `REJECT`; expected DENY or ALLOW"
        );
        let text = msg("egress_policy:\n  name: \"\"\n  default_action: DENY\n");
        assert!(
            text.contains("egress_policy.name: empty policy name"),
            "{text}"
        );
        let text = msg(
            "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - \
                        api.github.com\n",
        );
        assert!(
            text.contains("expected an allowed destination: a mapping with `host` or `cidr`"),
            "{text}"
        );
    }

    #[test]
    fn io_errors_name_the_file_and_every_error_exits_78() {
        let missing = Path::new("/nonexistent/egress/policy.yaml");
        let e = match load_file(missing) {
            Ok(p) => panic!("{p:?}"),
            Err(e) => e,
        };
        assert!(matches!(e, PolicyError::Io { .. }));
        assert_eq!(
            e.to_string(),
            "/nonexistent/egress/policy.yaml: cannot read the policy file: No such file or \
             directory"
        );
        assert_eq!(e.exit_code(), 78);
        assert_eq!(e.file(), missing);
        assert_eq!(err("foo: 1\n").exit_code(), 78);
    }

    #[test]
    fn summary_lists_rules() {
        let p = ok("egress_policy:\n  name: demo\n  default_action: DENY\n  \
                    allowed_destinations:\n    - host: api.github.com\n      ports: [443]\n      \
                    protocols: [https]\n      purpose: GitHub API\n    - cidr: 192.0.2.53\n      \
                    ports: [53]\n      protocols: [dns]\n  denied_destinations:\n    - cidr: \
                    169.254.0.0/16\n");
        assert_eq!(
            p.summary(),
            "policy demo\n  default: DENY (every destination not allowed below is refused)\n  \
             allow api.github.com tcp/443 (https): GitHub API\n  allow 192.0.2.53/32 tcp/53, \
             udp/53 (dns)\n  deny  169.254.0.0/16 (every port and protocol)\n  inbound: no \
             connections from other hosts (no `inbound` rules)\n  loopback (127.0.0.0/8, ::1): \
             allowed\n  other socket types (raw, ICMP, SCTP, ...): refused"
        );

        let p = ok("egress_policy:\n  name: dns\n  default_action: DENY\n  \
                    allowed_destinations:\n    - host: \"*.Example.com\"\n      ports: [443]\n      \
                    protocols: [https]\n  denied_destinations:\n    - host: \"*.com\"\n  \
                    dns_policy:\n    block_dot: true\n");
        let summary = p.summary();
        assert!(
            summary.contains("\n  allow *.example.com tcp/443 (https)\n"),
            "{summary}"
        );
        assert!(
            summary.contains("\n  deny  *.com (every port and protocol)\n"),
            "{summary}"
        );
        assert!(
            summary.contains(
                "\n  dns_policy: resolvers from --resolv-conf, block DoH: no, block DoT: \
                 yes\n"
            ),
            "{summary}"
        );
    }

    /// An `*.amazonaws.com` entry with the given `restrictions` flow mapping.
    fn aws_entry(host: &str, restrictions: &str) -> String {
        allowed(&format!(
            "    - host: \"{host}\"\n      ports: [443]\n      protocols: [https]\n      \
             restrictions: {restrictions}\n"
        ))
    }

    #[test]
    fn restrictions_are_typed_and_deduplicated() {
        let p = match parse_str(
            &aws_entry(
                "*.amazonaws.com",
                "{regions: [eu-west-1, eu-west-1], services: [S3, s3]}",
            ),
            Path::new("t.yaml"),
        ) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            p.allowed[0].restrictions,
            Some(Restrictions {
                regions: vec!["eu-west-1".into()],
                services: vec![aws::AwsService::S3],
            })
        );
        for (host, restrictions) in [
            ("*.amazonaws.com.cn", "{regions: [cn-north-1]}"),
            ("*.api.aws", "{services: [dynamodb]}"),
            ("s3.eu-west-1.amazonaws.com", "{regions: [eu-west-1]}"),
            ("dynamodb.us-east-1.amazonaws.com", "{services: [dynamodb]}"),
        ] {
            if let Err(e) = parse_str(&aws_entry(host, restrictions), Path::new("t.yaml")) {
                panic!("{host}: {e}");
            }
        }
    }

    #[test]
    fn restrictions_errors_name_the_place_and_what_is_valid() {
        let text = msg(&aws_entry(
            "*.amazonaws.com",
            "{regions: [us-east-1], services: [ec2]}",
        ));
        assert_eq!(
            text,
            "policies/t.yaml:7:55: egress_policy.allowed_destinations[0].restrictions.services[0]: \
             unknown service `ec2`; only services whose endpoint names egress can classify are \
             accepted (known services: s3, dynamodb)"
        );
        let text = msg(&aws_entry("*.amazonaws.com", "{regions: [us-east-1a]}"));
        assert!(
            text.starts_with(
                "policies/t.yaml:7:32: egress_policy.allowed_destinations[0].restrictions.\
                 regions[0]: invalid region `us-east-1a`"
            ),
            "{text}"
        );
        let text = msg(&aws_entry("*.amazonaws.com", "{regions: [US-EAST-1]}"));
        assert!(text.contains("write `us-east-1`"), "{text}");
        let text = msg(&aws_entry("*.amazonaws.com", "{regions: []}"));
        assert!(
            text.contains(
                "restrictions.regions: empty list; expected at least one of the AWS region codes"
            ),
            "{text}"
        );
        let text = msg(&aws_entry("*.amazonaws.com", "{}"));
        assert!(
            text.starts_with("policies/t.yaml:4:7: egress_policy.allowed_destinations[0]: `restrictions` lists neither"),
            "{text}"
        );
        let text = msg(&aws_entry("*.amazonaws.com", "{zones: [a]}"));
        assert!(text.contains("unknown field `zones`"), "{text}");
        let text = msg(&aws_entry("*.example.com", "{regions: [us-east-1]}"));
        assert_eq!(
            text,
            "policies/t.yaml:4:7: egress_policy.allowed_destinations[0]: `restrictions` \
             (regions, services) applies only to a `host` under an AWS DNS suffix \
             (`amazonaws.com`, `amazonaws.com.cn`, `api.aws`), such as `*.amazonaws.com`; \
             `*.example.com` is not one: remove `restrictions` from this entry"
        );
        let text = msg(&allowed(
            "    - cidr: 52.216.0.0/15\n      ports: [443]\n      protocols: [https]\n      \
             restrictions: {services: [s3]}\n",
        ));
        assert!(text.contains("`52.216.0.0/15` is not one"), "{text}");
        let text = msg(&aws_entry(
            "s3.us-west-2.amazonaws.com",
            "{regions: [us-east-1]}",
        ));
        assert!(
            text.contains("the exact host `s3.us-west-2.amazonaws.com`, which is not an endpoint of a listed service in a listed region (it is s3 in us-west-2)"),
            "{text}"
        );
        let text = msg(&aws_entry("bucket.s3.amazonaws.com", "{services: [s3]}"));
        assert!(text.contains("no particular region"), "{text}");
        let text = msg(&aws_entry(
            "ec2.us-east-1.amazonaws.com",
            "{services: [s3]}",
        ));
        assert!(text.contains("no documented endpoint form"), "{text}");
    }
}
