//! The measuring steps: one query, a sequential run with latencies, parallel throughput.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::message::{TYPE_A, build_query, parse_answer, rcode_name};
use crate::net::{
    Failure, Ids, connected_udp, exchange_connected, judge, query_tcp, query_udp_connected,
    query_udp_sendto,
};
use crate::{MAX_CONSECUTIVE_FAILURES, Opts, STEP_DEADLINE, Transport};

pub fn query_step(
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

/// Latencies and failures of a run of sequential queries.
#[derive(Default)]
pub struct Tally {
    pub rtts_ns: Vec<u64>,
    pub failures: std::collections::BTreeMap<String, u64>,
    pub stopped: Option<String>,
}

impl Tally {
    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// `n` sequential queries on one connected socket, after `warmup` unrecorded ones.
pub fn run_sequential(
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

pub fn quantile_us(sorted_ns: &[u64], q: f64) -> Option<f64> {
    if sorted_ns.is_empty() {
        return None;
    }
    let pos = q * (sorted_ns.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let (a, b) = (sorted_ns[lo] as f64, sorted_ns[hi] as f64);
    Some((a + (b - a) * (pos - lo as f64)) / 1e3)
}

pub fn latency_json(rtts_ns: &mut [u64]) -> Value {
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

pub fn seq_step(
    text: &str,
    server: SocketAddr,
    name: &str,
    warmup: u64,
    n: u64,
    opts: &Opts,
) -> Value {
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

pub fn par_step(
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
pub enum Gate {
    Wait,
    Go,
    Cancel,
}

pub type Shared = (Mutex<Gate>, Condvar);

pub fn wait_at(gate: &Shared) -> Gate {
    let (state, cv) = gate;
    let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
    // Bounded: the step opens the gate right after spawning, whatever happened.
    while *s == Gate::Wait {
        s = cv.wait(s).unwrap_or_else(PoisonError::into_inner);
    }
    *s
}

pub fn open(gate: &Shared, to: Gate) {
    let (state, cv) = gate;
    *state.lock().unwrap_or_else(PoisonError::into_inner) = to;
    cv.notify_all();
}

/// Pins the calling thread to one CPU and restores its previous affinity on drop.
pub struct PinnedThread {
    pub previous: Option<libc::cpu_set_t>,
    pub cpu: Option<usize>,
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
