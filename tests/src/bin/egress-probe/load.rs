//! Load: `flood` (connects as fast as possible) and `hammer` (an op from many threads).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use egress_tests::probe::ProbeResult;

use crate::op::{Family, Op, REPEAT_DEADLINE};
use crate::run;
use crate::sock::sock_addr;

/// N blocking TCP connects as fast as possible; the time bound keeps a mistake from hanging.
pub fn flood(text: &str, family: Family, addr: SocketAddr, n: u64) -> ProbeResult {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let sa = sock_addr(family, addr);
    let domain = match family {
        Family::V4 => libc::AF_INET,
        Family::V6 => libc::AF_INET6,
    };
    let (mut attempts, mut eperm) = (0u64, 0u64);
    while attempts < n && (attempts % 4096 != 0 || std::time::Instant::now() < deadline) {
        // SAFETY: plain socket/connect/close on a descriptor this loop owns.
        let errno = unsafe {
            let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                *libc::__errno_location()
            } else {
                let r = libc::connect(fd, sa.ptr(), sa.socklen());
                let e = if r == 0 { 0 } else { *libc::__errno_location() };
                libc::close(fd);
                e
            }
        };
        attempts += 1;
        if errno == libc::EPERM {
            eperm += 1;
        }
    }
    ProbeResult {
        attempts: Some(attempts),
        eperm: Some(eperm),
        ..ProbeResult::ok(text)
    }
}

/// What one `hammer` thread saw.
#[derive(Default)]
pub struct Tally {
    pub attempts: u64,
    pub eperm: u64,
    pub ok: u64,
    /// The first failure other than EPERM.
    pub other: Option<String>,
}

/// `threads` threads, released together, each running `op` `n` times (bounded in time).
pub fn hammer(text: &str, threads: usize, n: u64, op: &Op) -> ProbeResult {
    let deadline = Instant::now() + REPEAT_DEADLINE;
    let start = std::sync::Barrier::new(threads);
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    let mut t = Tally::default();
                    while t.attempts < n && Instant::now() < deadline {
                        let r = run(op);
                        t.attempts += 1;
                        if r.ok {
                            t.ok += 1;
                        } else if r.errno == Some(libc::EPERM) {
                            t.eperm += 1;
                        } else if t.other.is_none() {
                            t.other = r.error;
                        }
                    }
                    t
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| Tally {
                    other: Some("thread panicked".to_owned()),
                    ..Tally::default()
                })
            })
            .collect()
    });
    ProbeResult {
        attempts: Some(tallies.iter().map(|t| t.attempts).sum()),
        eperm: Some(tallies.iter().map(|t| t.eperm).sum()),
        count: Some(tallies.iter().map(|t| t.ok).sum()),
        error: tallies.iter().find_map(|t| t.other.clone()),
        ..ProbeResult::ok(text)
    }
}
