//! `restrictions` (regions, services) on the real kernel: the DNS proxy admits a name under a
//! restricted `*.amazonaws.com` only when it is an endpoint of a listed service in a listed
//! region, and with `--aws-ip-ranges` only the answer addresses AWS publishes for that service
//! and region reach the kernel's allow map.
//!
//! The test's dnsmasq in the remote namespace serves AWS-shaped names with test addresses
//! (198.18.5.0/24, 198.18.6.0/24 and 198.18.7.0/24, local to the remote namespace); the
//! ip-ranges file the test writes publishes those test prefixes as S3 and DYNAMODB ranges.
//! Nothing leaves the test's namespaces: the client namespace has no default route.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use egress_tests::agent::AgentRun;
use egress_tests::dnsmasq::{Dnsmasq, DnsmasqConfig};
use egress_tests::log;
use egress_tests::probe::rcode;
use egress_tests::process::RunOutput;
use egress_tests::scenario::UPSTREAM;
use egress_tests::server::{Listener, SETTLE, WAIT};
use egress_tests::testbed::Testbed;
use libc::EPERM;
use serde_json::Value;

use crate::{ip, sa, testbed};

/// The seed's AWS entry, with the test's resolver.
const POLICY: &str = "egress_policy:
  name: restrictions-test
  default_action: DENY
  allowed_destinations:
    - host: \"*.amazonaws.com\"
      ports: [443]
      protocols: [https]
      purpose: \"AWS service access\"
      restrictions:
        regions: [us-east-1, eu-west-1]
        services: [s3, dynamodb]
  dns_policy:
    allowed_resolvers: [198.18.0.2]
";

/// Test prefixes published as AWS ranges: S3 us-east-1, S3 eu-west-1, S3 us-west-2,
/// DYNAMODB us-east-1, and an AMAZON range (which proves nothing about a service).
const IP_RANGES: &str = r#"{
  "syncToken": "1",
  "createDate": "2024-03-01-12-00-00",
  "prefixes": [
    {"ip_prefix": "198.18.5.0/26", "region": "us-east-1", "service": "S3"},
    {"ip_prefix": "198.18.5.64/26", "region": "eu-west-1", "service": "S3"},
    {"ip_prefix": "198.18.5.128/26", "region": "us-west-2", "service": "S3"},
    {"ip_prefix": "198.18.6.0/24", "region": "us-east-1", "service": "DYNAMODB"},
    {"ip_prefix": "198.18.7.0/24", "region": "us-east-1", "service": "AMAZON"}
  ],
  "ipv6_prefixes": []
}"#;

/// (name, addresses) served exactly (hosts file).
const NAMES: &[(&str, &[&str])] = &[
    ("s3.us-east-1.amazonaws.com", &["198.18.5.1"]),
    ("bucket.s3.eu-west-1.amazonaws.com", &["198.18.5.65"]),
    ("dynamodb.us-east-1.amazonaws.com", &["198.18.6.1"]),
    // A regional name whose answer mixes a published address with one that is not.
    (
        "mixed.s3.us-east-1.amazonaws.com",
        &["198.18.5.2", "198.18.7.1"],
    ),
    ("s3.us-west-2.amazonaws.com", &["198.18.5.129"]),
    ("ec2.us-east-1.amazonaws.com", &["198.18.7.10"]),
    ("sqs.eu-west-1.amazonaws.com", &["198.18.7.11"]),
    // Regionless bucket names: one in eu-west-1, one in us-west-2 (by their addresses).
    ("eubucket.s3.amazonaws.com", &["198.18.5.66"]),
    ("westbucket.s3.amazonaws.com", &["198.18.5.130"]),
];

struct World {
    tb: Testbed,
    listener: Listener,
    dns: Dnsmasq,
    ranges: tempfile::NamedTempFile,
}

fn world() -> Option<World> {
    let tb = testbed()?;
    assert!(
        !tb.client().has_default_route().expect("reading routes"),
        "the client namespace must have no default route"
    );
    for net in ["198.18.5.0/24", "198.18.6.0/24", "198.18.7.0/24"] {
        tb.topo.add_remote_net(net).expect("remote range");
    }
    let listener = tb.listen_tcp(sa("0.0.0.0:443")).expect("listener");
    let mut config = DnsmasqConfig::default().listen(ip(UPSTREAM)).ttl(60);
    for (name, addrs) in NAMES {
        for a in *addrs {
            config = config.host(name, ip(a));
        }
    }
    let dns = config.start(tb.remote()).expect("starting dnsmasq");
    let mut ranges = tempfile::NamedTempFile::new().expect("temp file");
    std::io::Write::write_all(&mut ranges, IP_RANGES.as_bytes()).expect("writing ip-ranges");
    Some(World {
        tb,
        listener,
        dns,
        ranges,
    })
}

impl World {
    fn agent(&self) -> AgentRun {
        let path = self.tb.write_policy(POLICY).expect("policy file");
        AgentRun::new(&path, &self.tb.cgroups, self.tb.probe.path())
            .expect("agent command")
            .json_log()
    }

    fn run(&self, run: AgentRun, ops: &[String]) -> RunOutput {
        let out = run.args(ops).run_in(self.tb.client()).expect("agent run");
        out.assert_exit(0);
        out
    }

    /// Connections whose bytes were exactly `payload`.
    fn arrived(&self, payload: &str) -> usize {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let n = self
                .listener
                .messages()
                .iter()
                .filter(|m| m.as_slice() == payload.as_bytes())
                .count();
            if n > 0 || std::time::Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn resolve_connect(name: &str, tag: &str) -> String {
    format!("resolve udp4 {UPSTREAM} {name} A then-connect tcp4 443 {tag}")
}

fn resolve(name: &str) -> String {
    format!("resolve udp4 {UPSTREAM} {name} A")
}

fn connect(addr: &str) -> String {
    format!("connect tcp4 {addr} 443")
}

/// The blocked-attempt line of the refusal of `name` (its `result` says why).
#[track_caller]
fn refusal(out: &RunOutput, name: &str) -> Value {
    log::lines(&out.stderr)
        .into_iter()
        .find(|v| {
            v["event"] == "egress_blocked" && v["hook"] == "dns_proxy" && v["dns.name"] == name
        })
        .unwrap_or_else(|| panic!("no refusal line for {name}\n{}", out.stderr))
}

#[track_caller]
fn assert_not_forwarded(w: &World, name: &str, out: &RunOutput) {
    let asked = w.dns.queries_for(name);
    assert!(
        asked.is_empty(),
        "the upstream resolver was asked about {name}: {asked:?}\n{}",
        out.describe()
    );
}

/// Without ip-ranges: names are judged by their form alone. Listed service and region
/// resolve and connect; another region, another service, EC2 names and regionless bucket
/// names get NXDOMAIN with the restriction's reason, are never forwarded, and their addresses
/// stay closed.
#[test]
fn names_are_admitted_by_service_and_region() {
    let Some(w) = world() else { return };
    let allowed = [
        ("s3.us-east-1.amazonaws.com", "198.18.5.1", "a-s3"),
        (
            "bucket.s3.eu-west-1.amazonaws.com",
            "198.18.5.65",
            "a-bucket",
        ),
        ("dynamodb.us-east-1.amazonaws.com", "198.18.6.1", "a-ddb"),
    ];
    let refused = [
        (
            "s3.us-west-2.amazonaws.com",
            "restriction_region",
            "198.18.5.129",
        ),
        (
            "ec2.us-east-1.amazonaws.com",
            "restriction_unclassified",
            "198.18.7.10",
        ),
        (
            "sqs.eu-west-1.amazonaws.com",
            "restriction_unclassified",
            "198.18.7.11",
        ),
        (
            "eubucket.s3.amazonaws.com",
            "restriction_unclassified",
            "198.18.5.66",
        ),
    ];
    let mut ops: Vec<String> = allowed
        .iter()
        .map(|(name, _, tag)| resolve_connect(name, tag))
        .collect();
    ops.push(resolve("mixed.s3.us-east-1.amazonaws.com"));
    ops.extend(refused.iter().map(|(name, _, _)| resolve(name)));
    ops.extend(refused.iter().map(|(_, _, addr)| connect(addr)));
    let out = w.run(w.agent(), &ops);
    for (name, addr, tag) in allowed {
        out.assert_answer(&resolve_connect(name, tag), rcode::NOERROR, &[addr]);
        assert_eq!(w.arrived(tag), 1, "{tag}\n{}", out.describe());
    }
    // Without ip-ranges, both addresses of a classified name are installed.
    let r = out.assert_ok(&resolve("mixed.s3.us-east-1.amazonaws.com"));
    let mut got: Vec<IpAddr> = r.addrs.clone().unwrap_or_default();
    got.sort();
    assert_eq!(
        got,
        [ip("198.18.5.2"), ip("198.18.7.1")],
        "{}",
        out.describe()
    );
    for (name, result, addr) in refused {
        out.assert_answer(&resolve(name), rcode::NXDOMAIN, &[]);
        let line = refusal(&out, name);
        assert_eq!(line["result"], result, "{line}");
        assert!(
            line["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("allowed_destinations[0].restrictions")),
            "{line}"
        );
        assert_not_forwarded(&w, name, &out);
        out.assert_errno(&connect(addr), EPERM);
    }
    std::thread::sleep(SETTLE);
    assert_eq!(
        w.listener.connections(),
        3,
        "only the three allowed names' connections arrive\n{}",
        out.describe()
    );
}

/// With `--aws-ip-ranges`: an admitted answer keeps only the addresses published for the
/// name's service and region (the other is stripped, logged, and stays closed), and a
/// regionless bucket name works when its addresses prove an allowed region, and is refused
/// when they prove another.
#[test]
fn ip_ranges_confirm_addresses_and_prove_regionless_buckets() {
    let Some(w) = world() else { return };
    let mixed = "mixed.s3.us-east-1.amazonaws.com";
    let ops = vec![
        resolve_connect("s3.us-east-1.amazonaws.com", "b-s3"),
        resolve_connect("dynamodb.us-east-1.amazonaws.com", "b-ddb"),
        resolve_connect(mixed, "b-mixed"),
        connect("198.18.7.1"),
        resolve_connect("eubucket.s3.amazonaws.com", "b-eubucket"),
        resolve("westbucket.s3.amazonaws.com"),
        connect("198.18.5.130"),
        resolve("s3.us-west-2.amazonaws.com"),
        resolve("ec2.us-east-1.amazonaws.com"),
    ];
    let run = w
        .agent()
        .agent_arg("--aws-ip-ranges")
        .agent_arg(w.ranges.path());
    let out = w.run(run, &ops);
    out.assert_answer(&ops[0], rcode::NOERROR, &["198.18.5.1"]);
    out.assert_answer(&ops[1], rcode::NOERROR, &["198.18.6.1"]);
    out.assert_answer(&ops[2], rcode::NOERROR, &["198.18.5.2"]);
    out.assert_errno(&ops[3], EPERM);
    out.assert_answer(&ops[4], rcode::NOERROR, &["198.18.5.66"]);
    out.assert_answer(&ops[5], rcode::NXDOMAIN, &[]);
    out.assert_errno(&ops[6], EPERM);
    out.assert_answer(&ops[7], rcode::NXDOMAIN, &[]);
    out.assert_answer(&ops[8], rcode::NXDOMAIN, &[]);
    for tag in ["b-s3", "b-ddb", "b-mixed", "b-eubucket"] {
        assert_eq!(w.arrived(tag), 1, "{tag}\n{}", out.describe());
    }
    std::thread::sleep(SETTLE);
    assert_eq!(w.listener.connections(), 4, "{}", out.describe());
    let lines = log::lines(&out.stderr);
    let unproven: Vec<&Value> = lines
        .iter()
        .filter(|v| v["event"] == "dns_aws_address_unproven")
        .collect();
    assert!(
        unproven
            .iter()
            .any(|v| v["name"] == mixed && v["address"] == "198.18.7.1"),
        "no dns_aws_address_unproven line for {mixed} 198.18.7.1\n{}",
        out.stderr
    );
    assert!(
        unproven
            .iter()
            .any(|v| v["name"] == "westbucket.s3.amazonaws.com" && v["address"] == "198.18.5.130"),
        "{}",
        out.stderr
    );
    assert!(
        lines.iter().any(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("AWS ip-ranges loaded"))
            && v["prefixes"] == 4),
        "{}",
        out.stderr
    );
    // Regionless names are forwarded (their addresses decide); other regions are not.
    assert!(!w.dns.queries_for("westbucket.s3.amazonaws.com").is_empty());
    assert_not_forwarded(&w, "s3.us-west-2.amazonaws.com", &out);
}

/// A broken ip-ranges file is a configuration error: exit 78 before anything runs.
#[test]
fn a_broken_ip_ranges_file_refuses_to_start() {
    let Some(w) = world() else { return };
    let bad =
        w.tb.write_policy("{\"createDate\": \"soon\"}")
            .expect("file");
    let out = w
        .agent()
        .agent_arg("--aws-ip-ranges")
        .agent_arg(&bad)
        .arg(connect("198.18.5.1"))
        .run_in(w.tb.client())
        .expect("agent run");
    out.assert_exit(78);
    assert!(out.stderr.contains("createDate"), "{}", out.stderr);
    assert!(out.results.is_empty(), "{}", out.describe());
}

/// `policies/mcp-net-02-example.yaml`, the seed's example verbatim, loads and runs under
/// `exec`: its resolver 10.0.0.53 is played by dnsmasq inside the test's remote namespace
/// (never routed from the root namespace), and every kind of entry it has decides as written.
#[test]
fn the_seed_example_policy_runs_verbatim_under_exec() {
    let Some(tb) = testbed() else { return };
    let resolver = ip("10.0.0.53");
    let denied = ip("10.0.0.5");
    let s3 = ip("198.18.0.31");
    for a in [resolver, denied, s3] {
        tb.topo.add_remote_addr(a).expect("seed address");
    }
    let api = tb.listen_tcp(sa("198.18.0.2:443")).expect("listener");
    let aws = tb.listen_tcp(SocketAddr::new(s3, 443)).expect("listener");
    let _db = tb.listen_tcp(sa("198.18.0.2:5432")).expect("listener");
    let _dns = DnsmasqConfig::default()
        .listen(resolver)
        .host("api.company.com", ip("198.18.0.2"))
        .host("database.internal", ip("198.18.0.2"))
        .host("s3.us-east-1.amazonaws.com", s3)
        .host("s3.us-west-2.amazonaws.com", ip("198.18.0.32"))
        .host("pool.crypto-mining.com", ip("198.18.0.33"))
        .start(tb.remote())
        .expect("dnsmasq");
    let seed = egress_tests::agent::workspace_root().join("policies/mcp-net-02-example.yaml");
    let ops = [
        "send tcp4 198.18.0.2 443 api".to_owned(),
        "connect tcp4 198.18.0.2 5432".to_owned(),
        "connect tcp4 198.18.0.2 80".to_owned(),
        "connect tcp4 10.0.0.5 443".to_owned(),
        "resolve udp4 10.0.0.53 s3.us-east-1.amazonaws.com A then-connect tcp4 443 s3".to_owned(),
        "resolve udp4 10.0.0.53 s3.us-west-2.amazonaws.com A".to_owned(),
        "resolve udp4 10.0.0.53 pool.crypto-mining.com A".to_owned(),
    ];
    let out = AgentRun::new(&seed, &tb.cgroups, tb.probe.path())
        .expect("agent command")
        .json_log()
        .args(&ops)
        .run_in(tb.client())
        .expect("agent run");
    out.assert_exit(0);
    out.assert_ok(&ops[0]);
    out.assert_ok(&ops[1]);
    out.assert_errno(&ops[2], EPERM);
    out.assert_errno(&ops[3], EPERM);
    out.assert_answer(&ops[4], rcode::NOERROR, &["198.18.0.31"]);
    out.assert_answer(&ops[5], rcode::NXDOMAIN, &[]);
    out.assert_answer(&ops[6], rcode::NXDOMAIN, &[]);
    assert!(
        api.wait_for(b"api", WAIT).starts_with(b"api"),
        "{}",
        out.describe()
    );
    assert!(
        aws.wait_for(b"s3", WAIT).starts_with(b"s3"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("\"policy\":\"mcp-net-02-example\""),
        "{}",
        out.describe()
    );
}
