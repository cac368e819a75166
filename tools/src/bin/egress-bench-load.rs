//! egress-bench-load: the workload `egress-bench` times. It runs as uid nobody, in the cgroup
//! and network namespace of the scenario being measured, and does one thing per step in a
//! tight loop, reporting each step as one JSON line on stdout.
//!
//! Steps (one argument each, fields separated by spaces):
//!
//! ```text
//! tcp    DEST BATCHES OPS MS           per op: socket, connect, close (SO_LINGER 0: RST, no
//!                                      TIME_WAIT left behind)
//! udp    DEST BATCHES OPS MS           one unconnected socket; per op: one 16-byte sendto
//! rr     DEST BATCHES OPS MS           one TCP connection to an echo server (TCP_NODELAY); per
//!                                      op: write one byte, read it back (one packet received)
//! proxy  PROXY DEST BATCHES OPS MS     per op: connect to the proxy, CONNECT DEST, read the
//!                                      200 answer, close
//! flood  DEST N THREADS                N connects (expected to be denied) split over THREADS
//!                                      threads; reports attempts, EPERMs and the time taken
//! mark   NAME                          prints {"mark": NAME} (phase markers for the driver)
//! sleep  MS
//! ```
//!
//! DEST and PROXY are socket addresses (`198.18.0.2:8000`, `[fd00:e9::2]:8000`). A measuring
//! step runs one warm-up batch and then BATCHES batches, each ending after OPS operations or
//! MS milliseconds, whichever comes first, and reports the mean time per operation of each
//! batch. It stops at the first failed operation and reports it: a benchmark of failing
//! operations would measure the wrong thing.

use std::io::Write as _;
use std::mem::size_of;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use egress_tests::sockaddr::CSockAddr;
use serde_json::json;

/// Bounds so that a mistake in the driver cannot run away.
const MAX_BATCHES: u64 = 100;
const MAX_BATCH_MS: u64 = 5_000;
const MAX_FLOOD: u64 = 10_000_000;
const MAX_THREADS: u64 = 16;
const MAX_SLEEP_MS: u64 = 60_000;
/// A flood stops after this long whatever N says.
const FLOOD_DEADLINE: Duration = Duration::from_secs(120);
const PROXY_IO_TIMEOUT: Duration = Duration::from_secs(5);
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let steps: Vec<String> = std::env::args().skip(1).collect();
    if steps.is_empty() {
        eprintln!("usage: egress-bench-load STEP...   (see the module documentation)");
        return ExitCode::from(EX_USAGE);
    }
    for step in &steps {
        match run_step(step) {
            Ok(report) => emit(&report),
            Err(Usage(why)) => {
                eprintln!("egress-bench-load: {step:?}: {why}");
                return ExitCode::from(EX_USAGE);
            }
        }
    }
    ExitCode::SUCCESS
}

struct Usage(String);

fn emit(report: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout only loses the report; the driver notices the missing line.
    let _ = writeln!(out, "{report}");
    let _ = out.flush();
}

fn run_step(step: &str) -> Result<serde_json::Value, Usage> {
    let f: Vec<&str> = step.split_whitespace().collect();
    let bad = |why: &str| Usage(why.to_owned());
    let num = |i: usize, max: u64| -> Result<u64, Usage> {
        let v: u64 = f
            .get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(&format!("field {i} must be a number")))?;
        if v == 0 || v > max {
            return Err(bad(&format!("field {i} must be 1..={max}")));
        }
        Ok(v)
    };
    let addr = |i: usize| -> Result<SocketAddr, Usage> {
        f.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(&format!("field {i} must be a socket address")))
    };
    let exact = |n: usize| {
        if f.len() == n {
            Ok(())
        } else {
            Err(bad(&format!("expected {n} fields")))
        }
    };
    // BATCHES OPS MS from field `i` on.
    let plan = |i: usize| -> Result<Plan, Usage> {
        Ok(Plan {
            batches: num(i, MAX_BATCHES)?,
            ops: num(i + 1, u64::MAX)?,
            ms: num(i + 2, MAX_BATCH_MS)?,
        })
    };
    match f.first().copied() {
        Some("tcp") => {
            exact(5)?;
            let (dest, plan) = (addr(1)?, plan(2)?);
            Ok(measure(step, plan, |_| tcp_connect(dest)))
        }
        Some("udp") => {
            exact(5)?;
            let (dest, plan) = (addr(1)?, plan(2)?);
            match Socket::new(dest, libc::SOCK_DGRAM) {
                Ok(sock) => {
                    let sa = CSockAddr::from(dest);
                    Ok(measure(step, plan, |_| sock.send_to(&sa)))
                }
                Err(e) => Ok(json!({"step": step, "error": format!("socket: {e}")})),
            }
        }
        Some("rr") => {
            exact(5)?;
            let (dest, plan) = (addr(1)?, plan(2)?);
            match std::net::TcpStream::connect_timeout(&dest, PROXY_IO_TIMEOUT).and_then(|c| {
                c.set_nodelay(true)?;
                c.set_read_timeout(Some(PROXY_IO_TIMEOUT))?;
                Ok(c)
            }) {
                Ok(mut conn) => Ok(measure(step, plan, |_| {
                    use std::io::Read as _;
                    let mut b = [0u8; 1];
                    conn.write_all(b"x")?;
                    conn.read_exact(&mut b)
                })),
                Err(e) => Ok(json!({"step": step, "error": format!("connect: {e}")})),
            }
        }
        Some("proxy") => {
            exact(6)?;
            let (proxy, dest, plan) = (addr(1)?, addr(2)?, plan(3)?);
            let request = format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n");
            Ok(measure(step, plan, |_| {
                through_proxy(proxy, request.as_bytes())
            }))
        }
        Some("flood") => {
            exact(4)?;
            Ok(flood(
                step,
                addr(1)?,
                num(2, MAX_FLOOD)?,
                num(3, MAX_THREADS)?,
            ))
        }
        Some("mark") => {
            exact(2)?;
            Ok(json!({"mark": f[1]}))
        }
        Some("sleep") => {
            exact(2)?;
            std::thread::sleep(Duration::from_millis(num(1, MAX_SLEEP_MS)?));
            Ok(json!({"step": step}))
        }
        _ => Err(bad("unknown step")),
    }
}

#[derive(Clone, Copy)]
struct Plan {
    batches: u64,
    ops: u64,
    ms: u64,
}

/// How often a timed batch reads the clock: about this often, so that cheap operations do
/// not pay for the clock and slow ones do not overrun their batch.
const CLOCK_EVERY: Duration = Duration::from_micros(20);

/// One warm-up batch (which reads the clock after every operation and so learns how long
/// one takes), then `plan.batches` timed ones.
fn measure(
    step: &str,
    plan: Plan,
    mut op: impl FnMut(u64) -> std::io::Result<()>,
) -> serde_json::Value {
    let budget = Duration::from_millis(plan.ms);
    let mut ns_per_op = Vec::new();
    let mut ops_done = Vec::new();
    let mut check_every = 1;
    for batch in 0..=plan.batches {
        let start = Instant::now();
        let mut n = 0u64;
        while n < plan.ops {
            if let Err(e) = op(n) {
                return json!({"step": step, "error": format!("operation {n} of batch {batch}: {e}")});
            }
            n += 1;
            if n.is_multiple_of(check_every) && start.elapsed() >= budget {
                break;
            }
        }
        let elapsed = start.elapsed();
        let per_op = elapsed.as_nanos() as f64 / n as f64;
        if batch == 0 {
            check_every = ((CLOCK_EVERY.as_nanos() as f64 / per_op) as u64).clamp(1, 64);
        } else {
            ns_per_op.push(per_op);
            ops_done.push(n);
        }
    }
    json!({"step": step, "ns_per_op": ns_per_op, "ops": ops_done})
}

/// N connects that the policy denies, as fast as THREADS threads can make them.
fn flood(step: &str, dest: SocketAddr, n: u64, threads: u64) -> serde_json::Value {
    let start = Instant::now();
    let deadline = start + FLOOD_DEADLINE;
    let per_thread = n / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let count = per_thread + u64::from(t < n % threads);
            std::thread::spawn(move || {
                let sa = CSockAddr::from(dest);
                let (mut attempts, mut eperm) = (0u64, 0u64);
                while attempts < count && (attempts % 4096 != 0 || Instant::now() < deadline) {
                    match Socket::new(dest, libc::SOCK_STREAM).and_then(|s| s.connect(&sa)) {
                        Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                        _ => {}
                    }
                    attempts += 1;
                }
                (attempts, eperm)
            })
        })
        .collect();
    let (mut attempts, mut eperm) = (0u64, 0u64);
    for h in handles {
        if let Ok((a, e)) = h.join() {
            attempts += a;
            eperm += e;
        }
    }
    let ns = start.elapsed().as_nanos() as u64;
    json!({"step": step, "attempts": attempts, "eperm": eperm, "ns": ns})
}

fn tcp_connect(dest: SocketAddr) -> std::io::Result<()> {
    let sock = Socket::new(dest, libc::SOCK_STREAM)?;
    sock.linger_zero()?;
    sock.connect(&CSockAddr::from(dest))
}

fn through_proxy(proxy: SocketAddr, request: &[u8]) -> std::io::Result<()> {
    let sock = Socket::new(proxy, libc::SOCK_STREAM)?;
    sock.linger_zero()?;
    sock.timeouts(PROXY_IO_TIMEOUT)?;
    sock.connect(&CSockAddr::from(proxy))?;
    sock.write_all(request)?;
    let mut answer = [0u8; 256];
    let mut got = 0;
    while !answer[..got].windows(4).any(|w| w == b"\r\n\r\n") {
        if got == answer.len() {
            return Err(std::io::Error::other("proxy answer too long"));
        }
        let n = sock.read(&mut answer[got..])?;
        if n == 0 {
            return Err(std::io::Error::other("proxy closed before answering"));
        }
        got += n;
    }
    if answer.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "proxy refused: {}",
            String::from_utf8_lossy(&answer[..got])
                .lines()
                .next()
                .unwrap_or("")
        )))
    }
}

/// A socket descriptor closed on drop; raw system calls, so that the loop measures the
/// kernel and not a library.
struct Socket(libc::c_int);

impl Socket {
    fn new(dest: SocketAddr, kind: libc::c_int) -> std::io::Result<Self> {
        let domain = if dest.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain system call; the descriptor is owned by the returned value.
        let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Socket(fd))
    }

    fn linger_zero(&self) -> std::io::Result<()> {
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        self.setsockopt(libc::SO_LINGER, &l)
    }

    fn timeouts(&self, t: Duration) -> std::io::Result<()> {
        let tv = libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        self.setsockopt(libc::SO_RCVTIMEO, &tv)?;
        self.setsockopt(libc::SO_SNDTIMEO, &tv)
    }

    fn setsockopt<T>(&self, name: libc::c_int, value: &T) -> std::io::Result<()> {
        // SAFETY: `value` is a valid T for the option and outlives the call.
        let r = unsafe {
            libc::setsockopt(
                self.0,
                libc::SOL_SOCKET,
                name,
                std::ptr::from_ref(value).cast(),
                size_of::<T>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn connect(&self, sa: &CSockAddr) -> std::io::Result<()> {
        // SAFETY: `sa` holds a valid sockaddr of the length it gives.
        if unsafe { libc::connect(self.0, sa.ptr(), sa.socklen()) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn send_to(&self, sa: &CSockAddr) -> std::io::Result<()> {
        const PAYLOAD: [u8; 16] = *b"egress-bench-udp";
        // SAFETY: the buffer and address are valid for the call.
        let n = unsafe {
            libc::sendto(
                self.0,
                PAYLOAD.as_ptr().cast(),
                PAYLOAD.len(),
                0,
                sa.ptr(),
                sa.socklen(),
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn write_all(&self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            // SAFETY: the buffer is valid for its length.
            let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            buf = &buf[n as usize..];
        }
        Ok(())
    }

    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned by this value and closed once.
        unsafe { libc::close(self.0) };
    }
}
