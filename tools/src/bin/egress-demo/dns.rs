//! The DNS queries the workload sends (`egress-dns-client`), by MCP-NET-02 case, and how each
//! one is judged from what the client got, the rogue resolver saw and the DNS server logged.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use egress_tests::process::RunOutput;
use egress_tests::server::{Listener, contains};
use egress_tests::testbed::{Testbed, run_probe_as_nobody};
use serde_json::Value;

use crate::output::{LogObject, json_text, log_objects};
use crate::world::{API_V4, DNS_SERVER, ROGUE_RESOLVER, ROGUE_TCP, ROGUE_UDP};
use crate::{ARRIVAL_WAIT, CONTROL_DNS_TIMEOUT_MS, EXFIL_NAME};

/// What a DNS query of the workload should get.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DnsExpect {
    /// NOERROR with this address among the answers, appearing to come from the server asked.
    Resolves(IpAddr),
    /// NXDOMAIN, and the demo's DNS server never sees the name.
    NxDomain,
}

/// One DNS query of the `egress-dns-client` workload.
pub struct DnsAttempt {
    pub case: u8,
    /// `udp` (connected socket), `udp-sendto` or `tcp`.
    transport: &'static str,
    server: Ipv4Addr,
    name: &'static str,
    expect: DnsExpect,
}

const fn dns_attempt(
    case: u8,
    transport: &'static str,
    server: Ipv4Addr,
    name: &'static str,
    expect: DnsExpect,
) -> DnsAttempt {
    DnsAttempt {
        case,
        transport,
        server,
        name,
        expect,
    }
}

pub const DNS_ATTEMPTS: [DnsAttempt; 7] = [
    dns_attempt(
        1,
        "udp",
        DNS_SERVER,
        "api.company.com",
        DnsExpect::Resolves(IpAddr::V4(API_V4)),
    ),
    dns_attempt(2, "udp", DNS_SERVER, "evil.com", DnsExpect::NxDomain),
    dns_attempt(
        3,
        "udp",
        ROGUE_RESOLVER,
        "api.company.com",
        DnsExpect::Resolves(IpAddr::V4(API_V4)),
    ),
    dns_attempt(
        3,
        "udp-sendto",
        ROGUE_RESOLVER,
        "api.company.com",
        DnsExpect::Resolves(IpAddr::V4(API_V4)),
    ),
    dns_attempt(
        3,
        "tcp",
        ROGUE_RESOLVER,
        "api.company.com",
        DnsExpect::Resolves(IpAddr::V4(API_V4)),
    ),
    dns_attempt(3, "udp", ROGUE_RESOLVER, EXFIL_NAME, DnsExpect::NxDomain),
    dns_attempt(5, "udp", DNS_SERVER, "pastebin.com", DnsExpect::NxDomain),
];

impl DnsAttempt {
    /// The client's step.
    pub fn step(&self) -> String {
        format!("query {} {} {} A", self.transport, self.server, self.name)
    }

    fn rogue(&self) -> bool {
        self.server == ROGUE_RESOLVER
    }

    /// `A? pastebin.com -> allowed resolver 10.0.0.53:53`, for messages.
    fn describe(&self) -> String {
        format!("A? {} -> {} {}:53", self.name, self.role(), self.server)
    }

    fn role(&self) -> &'static str {
        if self.rogue() {
            "rogue resolver"
        } else {
            "allowed resolver"
        }
    }

    /// `udp-sendto to 198.18.0.99:53`
    fn how(&self) -> String {
        format!("{} to {}:53", self.transport, self.server)
    }

    /// The rogue resolver's listener this query would reach.
    fn rogue_listener(&self) -> usize {
        if self.transport == "tcp" {
            ROGUE_TCP
        } else {
            ROGUE_UDP
        }
    }
}

pub fn print_case3_explanation() {
    println!(
        "  With dns_policy, the kernel hands every DNS query of the workload (UDP and TCP port 53, \
         to any\n  address) to the agent's DNS proxy. The proxy resolves only names the policy \
         allows, and only\n  through dns_policy.allowed_resolvers ({DNS_SERVER}); any other name \
         gets NXDOMAIN without a query\n  leaving the machine. So a resolver the workload picks \
         itself receives nothing, the workload\n  gets the proxy's answer (which appears to come \
         from the address it asked), a secret encoded in\n  a query name goes nowhere, and DNS \
         over TLS (port 853) is refused (block_dot)."
    );
}

/// What the DNS run produced, for the per-attempt reports.
pub struct DnsSeen<'a> {
    pub run: &'a RunOutput,
    /// The client's JSON lines.
    pub results: &'a [Value],
    /// Datagrams and connections that reached the rogue resolver's port-53 listeners during
    /// the run.
    pub rogue_new: usize,
    /// The demo DNS server's query log lines written during the run.
    pub upstream: &'a [String],
}

/// The DNS client's JSON lines from a run's stdout.
pub fn client_results(run: &RunOutput) -> Vec<Value> {
    run.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("step").is_some())
        .collect()
}

fn client_result<'a>(results: &'a [Value], step: &str) -> Option<&'a Value> {
    results.iter().find(|v| v["step"].as_str() == Some(step))
}

/// True when one of the DNS server's query log lines asks for `name`.
fn upstream_asked(upstream: &[String], name: &str) -> bool {
    let needle = format!("] {} ", name.to_ascii_lowercase());
    upstream
        .iter()
        .any(|l| l.to_ascii_lowercase().contains(&needle))
}

/// `NOERROR 198.18.0.10` / `NXDOMAIN (EDE 15 Blocked)` / `timeout`.
fn describe_answer(v: Option<&Value>) -> String {
    let Some(v) = v else {
        return "did not run".to_owned();
    };
    if v["ok"] != Value::Bool(true) {
        return v["error"].as_str().unwrap_or("failed").to_owned();
    }
    let mut out = v["rcode"].as_str().unwrap_or("?").to_owned();
    if let Some(addrs) = v["addresses"].as_array().filter(|a| !a.is_empty()) {
        let list: Vec<&str> = addrs.iter().filter_map(Value::as_str).collect();
        let _ = write!(out, " {}", list.join(","));
    }
    if let Some(code) = v["ede"]["code"].as_u64() {
        let _ = write!(
            out,
            " (EDE {code}{}{})",
            if v["ede"]["text"].as_str().is_some_and(|t| !t.is_empty()) {
                " "
            } else {
                ""
            },
            v["ede"]["text"].as_str().unwrap_or_default()
        );
    }
    out
}

/// Prints one DNS attempt under the agent and returns whether it behaved as expected. Every
/// verdict comes from what was observed: the client's answer, the rogue resolver's listeners
/// and the DNS server's log.
pub fn report_dns_attempt(attempt: &DnsAttempt, seen: &DnsSeen<'_>) -> bool {
    let result = client_result(seen.results, &attempt.step());
    let answered = result.is_some_and(|v| v["ok"] == Value::Bool(true));
    let rcode = result.and_then(|v| v["rcode"].as_str()).unwrap_or_default();
    let from = result.and_then(|v| v["from"].as_str()).unwrap_or_default();
    let asked = format!("{}:53", attempt.server);
    let rogue_quiet = !attempt.rogue() || seen.rogue_new == 0;
    let upstream_saw = upstream_asked(seen.upstream, attempt.name);
    // A query to a rogue resolver is a blocked attempt: the agent must log it as one.
    let logged = !attempt.rogue() || unauthorized_line(seen.run, attempt).is_some();
    let (passed, expected) = match attempt.expect {
        DnsExpect::Resolves(ip) => {
            let has_ip = result
                .and_then(|v| v["addresses"].as_array())
                .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(&ip.to_string())));
            (
                answered && rcode == "NOERROR" && has_ip && from == asked && rogue_quiet && logged,
                format!("answer {ip}"),
            )
        }
        DnsExpect::NxDomain => (
            answered && rcode == "NXDOMAIN" && !upstream_saw && rogue_quiet && logged,
            "NXDOMAIN".to_owned(),
        ),
    };
    println!(
        "  {}  {:<38} {:<26} expect {expected:<19} got: {}{}",
        if passed { "PASS" } else { "FAIL" },
        format!("A? {}", attempt.name),
        attempt.how(),
        describe_answer(result),
        if answered && !from.is_empty() {
            format!(", from {from}")
        } else {
            String::new()
        }
    );
    if attempt.rogue() {
        println!(
            "        {} is a rogue resolver: {} during the DNS run",
            attempt.server,
            if seen.rogue_new == 0 {
                "nothing arrived there (0 datagrams, 0 connections)".to_owned()
            } else {
                format!("{} datagrams/connections arrived there", seen.rogue_new)
            }
        );
        match unauthorized_line(seen.run, attempt) {
            Some(line) => {
                let field = |key: &str| line.get(key).map(json_text).unwrap_or_default();
                println!(
                    "        logged: event={} reason={} dst={}:{} dns.name={} pid={} comm={}",
                    field("event"),
                    field("reason"),
                    field("dst.ip"),
                    field("dst.port"),
                    field("dns.name"),
                    field("pid"),
                    field("comm")
                );
            }
            None => println!(
                "        logged: no dns_unauthorized_resolver line for {} via {}",
                attempt.name, attempt.server
            ),
        }
    }
    match attempt.expect {
        DnsExpect::Resolves(_) if !attempt.rogue() => {
            let needle = format!("] {} ", attempt.name);
            let n = seen.upstream.iter().filter(|l| l.contains(&needle)).count();
            println!(
                "        {} is the allowed resolver: asked for {} {n} times during the DNS run \
                 (the agent's own lookups and its proxy's forwards)",
                attempt.server, attempt.name
            );
        }
        DnsExpect::Resolves(_) => {}
        DnsExpect::NxDomain => {
            println!(
                "        demo DNS server: {}",
                if upstream_saw {
                    format!("ASKED for {} (the name left the machine)", attempt.name)
                } else {
                    format!("no query for {} (never forwarded)", attempt.name)
                }
            );
            print_refusal(seen.run, attempt.name);
        }
    }
    if !passed && let Some(v) = result {
        println!("        client: {v}");
    }
    passed
}

/// The agent's blocked-attempt line for a query sent to a rogue resolver.
fn unauthorized_line(run: &RunOutput, attempt: &DnsAttempt) -> Option<LogObject> {
    let field = |f: &LogObject, key: &str| f.get(key).map(json_text);
    log_objects(run).find(|f| {
        field(f, "event").as_deref() == Some("egress_blocked")
            && field(f, "reason").as_deref() == Some("dns_unauthorized_resolver")
            && field(f, "dst.ip") == Some(attempt.server.to_string())
            && field(f, "dns.name")
                .is_some_and(|n| n.trim_end_matches('.').eq_ignore_ascii_case(attempt.name))
    })
}

/// Under a refused query: the agent's blocked-attempt line for its name. Informational.
fn print_refusal(run: &RunOutput, name: &str) {
    let field = |f: &LogObject, key: &str| f.get(key).map(json_text);
    let line = log_objects(run).find(|f| {
        field(f, "event").as_deref() == Some("egress_blocked")
            && field(f, "hook").as_deref() == Some("dns_proxy")
            && field(f, "reason").is_some_and(|r| r.starts_with("dns_name_"))
            && field(f, "dns.name")
                .is_some_and(|n| n.trim_end_matches('.').eq_ignore_ascii_case(name))
    });
    let Some(line) = line else {
        println!("        logged: no egress_blocked line for the name {name}");
        return;
    };
    let mut out = String::from("        logged:");
    for key in ["event", "reason", "result", "dns.qtype", "policy"] {
        if let Some(v) = field(&line, key) {
            let _ = write!(out, " {key}={v}");
        }
    }
    println!("{out}");
}

/// Every DNS attempt without the agent: the rogue resolver receives each query sent to it,
/// and the demo's DNS server answers every name, the refused ones included. Otherwise a
/// block under the agent would prove nothing.
pub fn dns_control_run(tb: &Testbed, client: &Path, listeners: &[Listener]) -> Result<()> {
    let mut args = vec![
        "--timeout-ms".to_owned(),
        CONTROL_DNS_TIMEOUT_MS.to_string(),
    ];
    args.extend(DNS_ATTEMPTS.iter().map(DnsAttempt::step));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let before: Vec<usize> = listeners.iter().map(|l| l.received().len()).collect();
    let out =
        run_probe_as_nobody(tb.client(), client, &refs).context("control run of the DNS client")?;
    let results = client_results(&out);
    let mut problems = Vec::new();
    let mut resolved = Vec::new();
    for attempt in &DNS_ATTEMPTS {
        if attempt.rogue() {
            let l = attempt.rogue_listener();
            let got = listeners[l].wait_for(&wire_name(attempt.name), ARRIVAL_WAIT);
            if !contains(&got[before[l].min(got.len())..], &wire_name(attempt.name)) {
                problems.push(format!(
                    "{} ({}): the rogue resolver did not receive it",
                    attempt.describe(),
                    attempt.transport
                ));
            }
        } else {
            let v = client_result(&results, &attempt.step());
            match v {
                Some(v)
                    if v["rcode"] == "NOERROR"
                        && v["addresses"].as_array().is_some_and(|a| !a.is_empty()) =>
                {
                    resolved.push(format!("{} -> {}", attempt.name, describe_answer(Some(v))));
                }
                _ => problems.push(format!(
                    "{}: not answered ({})",
                    attempt.describe(),
                    describe_answer(v)
                )),
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "control run of the DNS client without the agent failed, so the demo world is broken: \
             {}\n{}",
            problems.join("; "),
            out.describe()
        );
    }
    println!(
        "Control run WITHOUT the agent, DNS: the rogue resolver received all {} queries sent to \
         it, and the demo's DNS server answered {}.",
        DNS_ATTEMPTS.iter().filter(|a| a.rogue()).count(),
        resolved.join(", ")
    );
    Ok(())
}

/// `name` in DNS wire format (length-prefixed labels), as it appears inside a query.
fn wire_name(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.split('.') {
        out.push(u8::try_from(label.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}
