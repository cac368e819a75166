//! egress-dns-client: a small DNS stub client for the benchmark and the demo. It runs as an
//! unprivileged workload (uid nobody), with or without the agent around it, and reports each
//! step as one JSON line on stdout.
//!
//! ```text
//! egress-dns-client [--timeout-ms MS] [--pin-cpu N] STEP...
//!
//! query udp|udp-sendto|tcp SERVER NAME A|AAAA
//!     one query (with an EDNS OPT record); reports the rcode, the answer's addresses, an
//!     Extended DNS Error if any, the address the answer came from and the round trip.
//!     udp: a connected socket (connect + send + recv, as glibc does); udp-sendto: one
//!     unconnected socket, sendto + recvfrom; tcp: connect, two-byte length + query.
//! seq SERVER NAME WARMUP N
//!     WARMUP unrecorded then N recorded A queries, one after the other, on one connected
//!     UDP socket; each waits for its answer; reports count, failures and the round-trip
//!     median / p90 / p99 in microseconds, and the queries per second.
//! par SERVER NAME THREADS N
//!     THREADS threads started together, each with its own connected UDP socket doing N
//!     sequential A queries; reports the queries per second over the whole step.
//! sleep MS
//!     waits (at most a minute), e.g. so that a driver can read the agent's metrics.
//! ```
//!
//! SERVER is an IP address (port 53) or a socket address. A query counts as answered when the
//! answer carries its ID, is a response, has rcode NOERROR and at least one answer record;
//! anything else (a timeout, another rcode, an error from a system call) is a failure, counted
//! by kind. Every loop is bounded: by its count, by STEP_DEADLINE, and by at most
//! MAX_CONSECUTIVE_FAILURES failures in a row. `--pin-cpu N` pins the thread that runs `seq`
//! to CPU N for that step (the driver's choice, to keep scheduling noise out of the
//! latencies); `par` threads are never pinned. Exit status: 0, or 64 for malformed arguments.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const EX_USAGE: u8 = 64;
const DNS_PORT: u16 = 53;
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1000);
const MAX_TIMEOUT_MS: u64 = 10_000;
/// A measuring step stops after this long whatever its count says.
const STEP_DEADLINE: Duration = Duration::from_secs(120);
const MAX_QUERIES: u64 = 1_000_000;
const MAX_THREADS: u64 = 64;
const MAX_SLEEP_MS: u64 = 60_000;
/// A step gives up after this many failed queries in a row: the path is broken, and
/// timing it further would only take long.
const MAX_CONSECUTIVE_FAILURES: u64 = 20;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_CNAME: u16 = 5;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// EDNS option code of an Extended DNS Error (RFC 8914).
const OPT_EDE: u16 = 15;
const EDNS_UDP_SIZE: u16 = 1232;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (opts, steps) = match parse_args(&args) {
        Ok(v) => v,
        Err(why) => {
            eprintln!("egress-dns-client: {why}\nsee the module documentation for the steps");
            return ExitCode::from(EX_USAGE);
        }
    };
    for step in &steps {
        let report = match step {
            Step::Query {
                text,
                transport,
                server,
                name,
                qtype,
            } => query_step(text, *transport, *server, name, *qtype, opts.timeout),
            Step::Seq {
                text,
                server,
                name,
                warmup,
                n,
            } => seq_step(text, *server, name, *warmup, *n, &opts),
            Step::Par {
                text,
                server,
                name,
                threads,
                n,
            } => par_step(text, *server, name, *threads, *n, opts.timeout),
            Step::Sleep { text, ms } => {
                std::thread::sleep(Duration::from_millis(*ms));
                json!({"step": text, "ok": true})
            }
        };
        let mut out = std::io::stdout().lock();
        // A closed stdout only loses the report; the driver notices the missing line.
        let _ = writeln!(out, "{report}");
        let _ = out.flush();
    }
    ExitCode::SUCCESS
}

struct Opts {
    timeout: Duration,
    pin_cpu: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Udp,
    UdpSendto,
    Tcp,
}

enum Step {
    Query {
        text: String,
        transport: Transport,
        server: SocketAddr,
        name: String,
        qtype: u16,
    },
    Seq {
        text: String,
        server: SocketAddr,
        name: String,
        warmup: u64,
        n: u64,
    },
    Par {
        text: String,
        server: SocketAddr,
        name: String,
        threads: u64,
        n: u64,
    },
    Sleep {
        text: String,
        ms: u64,
    },
}

fn parse_args(args: &[String]) -> Result<(Opts, Vec<Step>), String> {
    let mut opts = Opts {
        timeout: DEFAULT_TIMEOUT,
        pin_cpu: None,
    };
    let mut it = args.iter();
    let mut steps = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--timeout-ms" => {
                let ms: u64 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|ms| (1..=MAX_TIMEOUT_MS).contains(ms))
                    .ok_or(format!("--timeout-ms needs 1..={MAX_TIMEOUT_MS}"))?;
                opts.timeout = Duration::from_millis(ms);
            }
            "--pin-cpu" => {
                opts.pin_cpu = Some(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .filter(|&c: &usize| c < libc::CPU_SETSIZE as usize)
                        .ok_or("--pin-cpu needs a CPU number")?,
                );
            }
            step => steps.push(parse_step(step)?),
        }
    }
    if steps.is_empty() {
        return Err("no step given".to_owned());
    }
    Ok((opts, steps))
}

fn parse_step(text: &str) -> Result<Step, String> {
    let f: Vec<&str> = text.split_whitespace().collect();
    let bad = |why: &str| format!("{text:?}: {why}");
    let exact = |n: usize| {
        if f.len() == n {
            Ok(())
        } else {
            Err(bad(&format!("expected {n} fields")))
        }
    };
    let num = |i: usize, min: u64, max: u64| -> Result<u64, String> {
        f.get(i)
            .and_then(|s| s.parse().ok())
            .filter(|v| (min..=max).contains(v))
            .ok_or_else(|| bad(&format!("field {i} must be {min}..={max}")))
    };
    let server = |i: usize| -> Result<SocketAddr, String> {
        let s = f.get(i).copied().unwrap_or_default();
        s.parse::<SocketAddr>()
            .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, DNS_PORT)))
            .map_err(|_| bad("SERVER must be an IP address or a socket address"))
    };
    let name = |i: usize| -> Result<String, String> {
        let n = f.get(i).copied().unwrap_or_default().trim_end_matches('.');
        if n.is_empty() || n.len() > 253 || n.split('.').any(|l| l.is_empty() || l.len() > 63) {
            return Err(bad("NAME must be a DNS name"));
        }
        Ok(n.to_owned())
    };
    match f.first().copied() {
        Some("query") => {
            exact(5)?;
            let transport = match f[1] {
                "udp" => Transport::Udp,
                "udp-sendto" => Transport::UdpSendto,
                "tcp" => Transport::Tcp,
                _ => return Err(bad("transport must be udp, udp-sendto or tcp")),
            };
            let qtype = match f[4] {
                "A" => TYPE_A,
                "AAAA" => TYPE_AAAA,
                _ => return Err(bad("type must be A or AAAA")),
            };
            Ok(Step::Query {
                text: text.to_owned(),
                transport,
                server: server(2)?,
                name: name(3)?,
                qtype,
            })
        }
        Some("seq") => {
            exact(5)?;
            Ok(Step::Seq {
                text: text.to_owned(),
                server: server(1)?,
                name: name(2)?,
                warmup: num(3, 0, MAX_QUERIES)?,
                n: num(4, 1, MAX_QUERIES)?,
            })
        }
        Some("par") => {
            exact(5)?;
            Ok(Step::Par {
                text: text.to_owned(),
                server: server(1)?,
                name: name(2)?,
                threads: num(3, 1, MAX_THREADS)?,
                n: num(4, 1, MAX_QUERIES)?,
            })
        }
        Some("sleep") => {
            exact(2)?;
            Ok(Step::Sleep {
                text: text.to_owned(),
                ms: num(1, 0, MAX_SLEEP_MS)?,
            })
        }
        _ => Err(bad("unknown step (query, seq, par or sleep)")),
    }
}

// --- DNS messages ---------------------------------------------------------------------------

/// A query: RD set, one question, and with `edns` an OPT record (UDP size 1232, no options).
fn build_query(id: u16, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]);
    q.extend_from_slice(&1u16.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0]);
    q.extend_from_slice(&u16::from(edns).to_be_bytes());
    for label in name.split('.') {
        // Labels were checked to be 1..=63 bytes.
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    if edns {
        q.push(0);
        q.extend_from_slice(&TYPE_OPT.to_be_bytes());
        q.extend_from_slice(&EDNS_UDP_SIZE.to_be_bytes());
        q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    q
}

/// What the client reads from an answer.
#[derive(Debug, Default)]
struct Answer {
    id: u16,
    response: bool,
    rcode: u8,
    answer_count: u16,
    addresses: Vec<IpAddr>,
    cnames: usize,
    /// Extended DNS Error: (info code, extra text).
    ede: Option<(u16, String)>,
}

fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".to_owned(),
        1 => "FORMERR".to_owned(),
        2 => "SERVFAIL".to_owned(),
        3 => "NXDOMAIN".to_owned(),
        4 => "NOTIMP".to_owned(),
        5 => "REFUSED".to_owned(),
        n => format!("RCODE{n}"),
    }
}

/// Skips a (possibly compressed) name at `pos`; returns the position after it.
fn skip_name(msg: &[u8], mut pos: usize) -> Option<usize> {
    // A name has at most 127 labels; the bound also stops malformed input.
    for _ in 0..128 {
        let len = *msg.get(pos)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(pos + 1),
            0x00 => pos += 1 + usize::from(len),
            0xc0 => {
                msg.get(pos + 1)?;
                return Some(pos + 2);
            }
            _ => return None,
        }
    }
    None
}

fn u16_at(msg: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]))
}

/// Parses the header, the answer section's addresses and an EDNS Extended DNS Error. `None`
/// for a message too short or malformed to read.
fn parse_answer(msg: &[u8]) -> Option<Answer> {
    if msg.len() < 12 {
        return None;
    }
    let mut a = Answer {
        id: u16_at(msg, 0)?,
        response: msg[2] & 0x80 != 0,
        rcode: msg[3] & 0x0f,
        answer_count: u16_at(msg, 6)?,
        ..Answer::default()
    };
    let (qd, an, ns, ar) = (
        u16_at(msg, 4)?,
        a.answer_count,
        u16_at(msg, 8)?,
        u16_at(msg, 10)?,
    );
    let mut pos = 12;
    for _ in 0..qd {
        pos = skip_name(msg, pos)? + 4;
    }
    for i in 0..u32::from(an) + u32::from(ns) + u32::from(ar) {
        pos = skip_name(msg, pos)?;
        let rtype = u16_at(msg, pos)?;
        let rdlen = usize::from(u16_at(msg, pos + 8)?);
        let rdata = msg.get(pos + 10..pos + 10 + rdlen)?;
        pos += 10 + rdlen;
        let in_answer = i < u32::from(an);
        match rtype {
            TYPE_A if in_answer && rdlen == 4 => {
                let o: [u8; 4] = rdata.try_into().ok()?;
                a.addresses.push(IpAddr::V4(Ipv4Addr::from(o)));
            }
            TYPE_AAAA if in_answer && rdlen == 16 => {
                let o: [u8; 16] = rdata.try_into().ok()?;
                a.addresses.push(IpAddr::V6(Ipv6Addr::from(o)));
            }
            TYPE_CNAME if in_answer => a.cnames += 1,
            TYPE_OPT if !in_answer => {
                // The upper 8 bits of the extended rcode sit in the TTL field.
                let ext = msg.get(pos - rdlen - 6).copied().unwrap_or(0);
                a.rcode |= ext << 4;
                a.ede = a.ede.take().or_else(|| find_ede(rdata));
            }
            _ => {}
        }
    }
    Some(a)
}

/// The first Extended DNS Error option in an OPT record's data.
fn find_ede(mut options: &[u8]) -> Option<(u16, String)> {
    while options.len() >= 4 {
        let code = u16_at(options, 0)?;
        let len = usize::from(u16_at(options, 2)?);
        let data = options.get(4..4 + len)?;
        if code == OPT_EDE && len >= 2 {
            let info = u16_at(data, 0)?;
            return Some((info, String::from_utf8_lossy(&data[2..]).into_owned()));
        }
        options = &options[4 + len..];
    }
    None
}

// --- transports -----------------------------------------------------------------------------

fn unspecified(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// A UDP socket connected to `server` (the connect is what the kernel judges and, under the
/// agent, redirects), with `timeout` on receive.
fn connected_udp(server: SocketAddr, timeout: Duration) -> std::io::Result<UdpSocket> {
    let sock = UdpSocket::bind(unspecified(server))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.connect(server)?;
    Ok(sock)
}

/// Why a query was not answered.
#[derive(Debug)]
enum Failure {
    Timeout,
    Rcode(u8),
    NoRecords,
    Io(std::io::Error),
}

impl Failure {
    fn kind(&self) -> String {
        match self {
            Failure::Timeout => "timeout".to_owned(),
            Failure::Rcode(r) => rcode_name(*r),
            Failure::NoRecords => "no_records".to_owned(),
            Failure::Io(e) => e
                .raw_os_error()
                .map_or_else(|| e.kind().to_string(), errno_name),
        }
    }
}

fn errno_name(errno: i32) -> String {
    let e = nix::errno::Errno::from_raw(errno);
    if e == nix::errno::Errno::UnknownErrno {
        format!("errno {errno}")
    } else {
        format!("{e:?}")
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// One query on a connected socket: send, then read until the answer with this ID arrives
/// (a late answer to an earlier, timed-out query is skipped) or the timeout passes.
fn exchange_connected(
    sock: &UdpSocket,
    query: &[u8],
    id: u16,
    timeout: Duration,
    buf: &mut [u8],
) -> Result<Answer, Failure> {
    sock.send(query).map_err(Failure::Io)?;
    let deadline = Instant::now() + timeout;
    loop {
        let n = match sock.recv(buf) {
            Ok(n) => n,
            Err(e) if is_timeout(&e) => return Err(Failure::Timeout),
            Err(e) => return Err(Failure::Io(e)),
        };
        if let Some(a) = parse_answer(&buf[..n]).filter(|a| a.id == id && a.response) {
            return Ok(a);
        }
        if Instant::now() >= deadline {
            return Err(Failure::Timeout);
        }
    }
}

/// NOERROR with at least one record: an answered query.
fn judge(a: Answer) -> Result<Answer, Failure> {
    if a.rcode != 0 {
        Err(Failure::Rcode(a.rcode))
    } else if a.answer_count == 0 {
        Err(Failure::NoRecords)
    } else {
        Ok(a)
    }
}

/// Query IDs that do not repeat within a step's window and differ from run to run.
struct Ids(u32);

impl Ids {
    fn new(seed: u64) -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Ids(t ^ std::process::id() ^ (seed as u32).wrapping_mul(0x9e37_79b9))
    }

    fn next(&mut self) -> u16 {
        self.0 = self.0.wrapping_add(1);
        // An odd multiplier permutes the 16-bit space: consecutive IDs look unrelated.
        (self.0.wrapping_mul(40_503) & 0xffff) as u16
    }
}

// --- steps ----------------------------------------------------------------------------------

fn query_step(
    text: &str,
    transport: Transport,
    server: SocketAddr,
    name: &str,
    qtype: u16,
    timeout: Duration,
) -> Value {
    let id = Ids::new(0).next();
    let query = build_query(id, name, qtype, true);
    let start = Instant::now();
    let outcome = match transport {
        Transport::Udp => query_udp_connected(server, &query, timeout),
        Transport::UdpSendto => query_udp_sendto(server, &query, id, timeout),
        Transport::Tcp => query_tcp(server, &query, timeout),
    };
    let rtt_us = start.elapsed().as_secs_f64() * 1e6;
    match outcome {
        Ok((msg, from)) => match parse_answer(&msg) {
            Some(a) if a.id == id && a.response => {
                let mut v = json!({
                    "step": text,
                    "ok": true,
                    "rcode": rcode_name(a.rcode),
                    "answers": a.answer_count,
                    "addresses": a.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "cnames": a.cnames,
                    "from": from.map(|f| f.to_string()),
                    "rtt_us": rtt_us.round(),
                });
                if let Some((code, extra)) = a.ede {
                    v["ede"] = json!({"code": code, "text": extra});
                }
                v
            }
            _ => json!({
                "step": text,
                "ok": false,
                "error": format!("not an answer to query {id} ({} bytes)", msg.len()),
                "rtt_us": rtt_us.round(),
            }),
        },
        Err(f) => json!({
            "step": text,
            "ok": false,
            "error": f.kind(),
            "rtt_us": rtt_us.round(),
        }),
    }
}

type Received = (Vec<u8>, Option<SocketAddr>);

fn query_udp_connected(
    server: SocketAddr,
    query: &[u8],
    timeout: Duration,
) -> Result<Received, Failure> {
    let sock = connected_udp(server, timeout).map_err(Failure::Io)?;
    sock.send(query).map_err(Failure::Io)?;
    let mut buf = vec![0u8; 65_535];
    let n = sock.recv(&mut buf).map_err(|e| {
        if is_timeout(&e) {
            Failure::Timeout
        } else {
            Failure::Io(e)
        }
    })?;
    buf.truncate(n);
    // For a connected socket, the peer is what getpeername reports.
    Ok((buf, sock.peer_addr().ok()))
}

fn query_udp_sendto(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    timeout: Duration,
) -> Result<Received, Failure> {
    let sock = UdpSocket::bind(unspecified(server)).map_err(Failure::Io)?;
    sock.set_read_timeout(Some(timeout)).map_err(Failure::Io)?;
    sock.send_to(query, server).map_err(Failure::Io)?;
    let mut buf = vec![0u8; 65_535];
    let deadline = Instant::now() + timeout;
    loop {
        let (n, from) = sock.recv_from(&mut buf).map_err(|e| {
            if is_timeout(&e) {
                Failure::Timeout
            } else {
                Failure::Io(e)
            }
        })?;
        if parse_answer(&buf[..n]).is_some_and(|a| a.id == id) {
            buf.truncate(n);
            return Ok((buf, Some(from)));
        }
        if Instant::now() >= deadline {
            return Err(Failure::Timeout);
        }
    }
}

fn query_tcp(server: SocketAddr, query: &[u8], timeout: Duration) -> Result<Received, Failure> {
    let io = |e: std::io::Error| {
        if is_timeout(&e) {
            Failure::Timeout
        } else {
            Failure::Io(e)
        }
    };
    let mut stream = TcpStream::connect_timeout(&server, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let len = u16::try_from(query.len()).map_err(|_| Failure::NoRecords)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).map_err(io)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).map_err(io)?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg).map_err(io)?;
    Ok((msg, stream.peer_addr().ok()))
}

/// Latencies and failures of a run of sequential queries.
#[derive(Default)]
struct Tally {
    rtts_ns: Vec<u64>,
    failures: std::collections::BTreeMap<String, u64>,
    stopped: Option<String>,
}

impl Tally {
    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// `n` sequential queries on one connected socket, after `warmup` unrecorded ones.
fn run_sequential(
    server: SocketAddr,
    name: &str,
    warmup: u64,
    n: u64,
    timeout: Duration,
    seed: u64,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally {
        rtts_ns: Vec::with_capacity(usize::try_from(n).unwrap_or(0)),
        ..Tally::default()
    };
    let sock = match connected_udp(server, timeout) {
        Ok(s) => s,
        Err(e) => {
            let kind = Failure::Io(e).kind();
            tally.stopped = Some(format!("socket/connect: {kind}"));
            *tally.failures.entry(kind).or_default() += 1;
            return tally;
        }
    };
    let mut ids = Ids::new(seed);
    let mut buf = vec![0u8; 4096];
    // The question is the same for every query: only the ID changes.
    let mut query = build_query(0, name, TYPE_A, false);
    let mut in_a_row = 0;
    for i in 0..warmup + n {
        if Instant::now() > deadline {
            tally.stopped = Some(format!("deadline after {i} queries"));
            break;
        }
        let id = ids.next();
        query[..2].copy_from_slice(&id.to_be_bytes());
        let start = Instant::now();
        let outcome = exchange_connected(&sock, &query, id, timeout, &mut buf).and_then(judge);
        let rtt = start.elapsed();
        if i < warmup {
            continue;
        }
        match outcome {
            Ok(_) => {
                in_a_row = 0;
                tally
                    .rtts_ns
                    .push(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX));
            }
            Err(f) => {
                *tally.failures.entry(f.kind()).or_default() += 1;
                in_a_row += 1;
                if in_a_row >= MAX_CONSECUTIVE_FAILURES {
                    tally.stopped =
                        Some(format!("{in_a_row} failures in a row (last: {})", f.kind()));
                    break;
                }
            }
        }
    }
    tally
}

fn quantile_us(sorted_ns: &[u64], q: f64) -> Option<f64> {
    if sorted_ns.is_empty() {
        return None;
    }
    let pos = q * (sorted_ns.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let (a, b) = (sorted_ns[lo] as f64, sorted_ns[hi] as f64);
    Some((a + (b - a) * (pos - lo as f64)) / 1e3)
}

fn latency_json(rtts_ns: &mut [u64]) -> Value {
    rtts_ns.sort_unstable();
    let mean = if rtts_ns.is_empty() {
        None
    } else {
        Some(rtts_ns.iter().map(|&x| x as f64).sum::<f64>() / rtts_ns.len() as f64 / 1e3)
    };
    json!({
        "median_us": quantile_us(rtts_ns, 0.5),
        "p90_us": quantile_us(rtts_ns, 0.9),
        "p99_us": quantile_us(rtts_ns, 0.99),
        "min_us": rtts_ns.first().map(|&x| x as f64 / 1e3),
        "max_us": rtts_ns.last().map(|&x| x as f64 / 1e3),
        "mean_us": mean,
    })
}

fn seq_step(text: &str, server: SocketAddr, name: &str, warmup: u64, n: u64, opts: &Opts) -> Value {
    let pinned = opts.pin_cpu.map(PinnedThread::new);
    let start = Instant::now();
    let mut tally = run_sequential(
        server,
        name,
        warmup,
        n,
        opts.timeout,
        0,
        start + STEP_DEADLINE,
    );
    let secs = start.elapsed().as_secs_f64();
    let pinned_to = pinned.and_then(|p| p.cpu());
    let answered = tally.rtts_ns.len() as u64;
    // The recorded queries' own time: the warm-up is left out of the rate.
    let busy_secs = tally.rtts_ns.iter().sum::<u64>() as f64 / 1e9;
    let mut v = json!({
        "step": text,
        "count": n,
        "answered": answered,
        "failures": tally.failed(),
        "failure_kinds": tally.failures,
        "stopped": tally.stopped,
        "secs": secs,
        "qps": if busy_secs > 0.0 { answered as f64 / busy_secs } else { 0.0 },
        "pinned_cpu": pinned_to,
    });
    if let (Value::Object(m), Value::Object(l)) = (&mut v, latency_json(&mut tally.rtts_ns)) {
        m.extend(l);
    }
    v
}

fn par_step(
    text: &str,
    server: SocketAddr,
    name: &str,
    threads: u64,
    n: u64,
    timeout: Duration,
) -> Value {
    // The threads wait for one signal so that they start together; a failed spawn cancels
    // the step (and releases the threads already waiting).
    let gate = Arc::new((Mutex::new(Gate::Wait), Condvar::new()));
    let deadline = Instant::now() + STEP_DEADLINE;
    let mut handles = Vec::new();
    let mut spawn_error = None;
    for t in 0..threads {
        let gate = Arc::clone(&gate);
        let name = name.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("dns-{t}"))
            .spawn(move || {
                if wait_at(&gate) == Gate::Cancel {
                    return None;
                }
                let tally = run_sequential(server, &name, 0, n, timeout, t + 1, deadline);
                Some((tally, Instant::now()))
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                spawn_error = Some(format!("spawning thread {t}: {e}"));
                break;
            }
        }
    }
    let start = Instant::now();
    open(
        &gate,
        if spawn_error.is_some() {
            Gate::Cancel
        } else {
            Gate::Go
        },
    );
    let mut all = Tally::default();
    let mut end = start;
    for h in handles {
        match h.join() {
            Ok(Some((tally, finished))) => {
                end = end.max(finished);
                all.rtts_ns.extend(tally.rtts_ns);
                for (k, c) in tally.failures {
                    *all.failures.entry(k).or_default() += c;
                }
                if all.stopped.is_none() {
                    all.stopped = tally.stopped;
                }
            }
            Ok(None) => {}
            Err(_) => {
                *all.failures
                    .entry("thread_panicked".to_owned())
                    .or_default() += 1;
            }
        }
    }
    if let Some(error) = spawn_error {
        return json!({"step": text, "error": error});
    }
    let secs = end.duration_since(start).as_secs_f64();
    let answered = all.rtts_ns.len() as u64;
    let mut v = json!({
        "step": text,
        "threads": threads,
        "count": threads * n,
        "answered": answered,
        "failures": all.failed(),
        "failure_kinds": all.failures,
        "stopped": all.stopped,
        "secs": secs,
        "qps": if secs > 0.0 { answered as f64 / secs } else { 0.0 },
    });
    if let (Value::Object(m), Value::Object(l)) = (&mut v, latency_json(&mut all.rtts_ns)) {
        m.extend(l);
    }
    v
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    Wait,
    Go,
    Cancel,
}

type Shared = (Mutex<Gate>, Condvar);

fn wait_at(gate: &Shared) -> Gate {
    let (state, cv) = gate;
    let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
    // Bounded: the step opens the gate right after spawning, whatever happened.
    while *s == Gate::Wait {
        s = cv.wait(s).unwrap_or_else(PoisonError::into_inner);
    }
    *s
}

fn open(gate: &Shared, to: Gate) {
    let (state, cv) = gate;
    *state.lock().unwrap_or_else(PoisonError::into_inner) = to;
    cv.notify_all();
}

/// Pins the calling thread to one CPU and restores its previous affinity on drop.
struct PinnedThread {
    previous: Option<libc::cpu_set_t>,
    cpu: Option<usize>,
}

impl PinnedThread {
    fn new(cpu: usize) -> Self {
        // SAFETY: cpu_set_t is plain data; an all-zero value is a valid empty set.
        let mut previous: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: pid 0 is the calling thread; the set is valid for `size` bytes.
        let have = unsafe { libc::sched_getaffinity(0, size, &mut previous) } == 0;
        // SAFETY: as above; `cpu` is below CPU_SETSIZE (checked when the flag was parsed).
        let set = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            set
        };
        // SAFETY: as above. Best effort: a CPU the kernel refuses leaves the thread unpinned.
        let pinned = unsafe { libc::sched_setaffinity(0, size, &set) } == 0;
        PinnedThread {
            previous: have.then_some(previous),
            cpu: pinned.then_some(cpu),
        }
    }

    fn cpu(&self) -> Option<usize> {
        self.cpu
    }
}

impl Drop for PinnedThread {
    fn drop(&mut self) {
        if let (Some(prev), Some(_)) = (&self.previous, self.cpu) {
            // SAFETY: restores the set read in `new`, for the calling thread.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), prev) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_with(rcode: u8, records: &[(u16, Vec<u8>)], ede: Option<(u16, &str)>) -> Vec<u8> {
        let mut m = build_query(0x1234, "a.example.test", TYPE_A, false);
        m[2] |= 0x80;
        m[3] = rcode;
        m[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        for (rtype, rdata) in records {
            m.extend_from_slice(&[0xc0, 12]);
            m.extend_from_slice(&rtype.to_be_bytes());
            m.extend_from_slice(&CLASS_IN.to_be_bytes());
            m.extend_from_slice(&300u32.to_be_bytes());
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend_from_slice(rdata);
        }
        if let Some((code, text)) = ede {
            m[10..12].copy_from_slice(&1u16.to_be_bytes());
            let mut opt = Vec::new();
            opt.extend_from_slice(&OPT_EDE.to_be_bytes());
            opt.extend_from_slice(&((2 + text.len()) as u16).to_be_bytes());
            opt.extend_from_slice(&code.to_be_bytes());
            opt.extend_from_slice(text.as_bytes());
            m.push(0);
            m.extend_from_slice(&TYPE_OPT.to_be_bytes());
            m.extend_from_slice(&EDNS_UDP_SIZE.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0, 0]);
            m.extend_from_slice(&(opt.len() as u16).to_be_bytes());
            m.extend_from_slice(&opt);
        }
        m
    }

    #[test]
    fn reads_addresses_and_rcodes() {
        let msg = answer_with(
            0,
            &[
                (TYPE_CNAME, vec![1, b'b', 0xc0, 12]),
                (TYPE_A, vec![198, 18, 0, 10]),
                (TYPE_AAAA, Ipv6Addr::LOCALHOST.octets().to_vec()),
            ],
            None,
        );
        let a = parse_answer(&msg).unwrap_or_else(|| panic!("unparsed"));
        assert_eq!(a.id, 0x1234);
        assert!(a.response);
        assert_eq!(a.rcode, 0);
        assert_eq!(a.cnames, 1);
        assert_eq!(
            a.addresses,
            vec![
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10)),
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            ]
        );
        assert!(judge(a).is_ok());
    }

    #[test]
    fn reads_an_extended_dns_error() {
        let msg = answer_with(3, &[], Some((15, "Blocked")));
        let a = parse_answer(&msg).unwrap_or_else(|| panic!("unparsed"));
        assert_eq!(rcode_name(a.rcode), "NXDOMAIN");
        assert_eq!(a.ede, Some((15, "Blocked".to_owned())));
        assert!(matches!(judge(a), Err(Failure::Rcode(3))));
    }

    #[test]
    fn refuses_truncated_and_looping_messages() {
        let msg = answer_with(0, &[(TYPE_A, vec![198, 18, 0, 10])], None);
        for cut in 0..msg.len() {
            // Short reads never panic; most are refused.
            let _ = parse_answer(&msg[..cut]);
        }
        assert!(parse_answer(&msg[..msg.len() - 1]).is_none());
        let mut looping = build_query(1, "x", TYPE_A, false);
        looping.truncate(12);
        looping.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(parse_answer(&looping).is_some_and(|a| a.addresses.is_empty()));
    }

    #[test]
    fn parses_steps() {
        let s =
            parse_step("seq 198.18.0.2 a.example.test 10 2000").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(s, Step::Seq { server, n: 2000, .. }
            if server == SocketAddr::from(([198, 18, 0, 2], 53))));
        assert!(parse_step("query udp [fd00:e9::2]:5353 a.test AAAA").is_ok());
        assert!(parse_step("query quic 198.18.0.2 a.test A").is_err());
        assert!(parse_step("par 198.18.0.2 a..test 4 10").is_err());
        assert!(parse_step("par 198.18.0.2 a.test 0 10").is_err());
    }

    #[test]
    fn ids_do_not_repeat_within_a_window() {
        let mut ids = Ids::new(3);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..60_000 {
            assert!(seen.insert(ids.next()));
        }
    }
}
