//! Listeners inside a test namespace that record every byte they receive.
//!
//! A listener's thread enters the namespace (setns is per thread), binds, reports the bind
//! result, then accepts/receives until the listener is dropped. All waits are short polls,
//! so drop returns within a fraction of a second.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::netns::{Netns, NetnsHandle};
use crate::process::RunOutput;

const POLL: Duration = Duration::from_millis(20);
const BIND_WAIT: Duration = Duration::from_secs(5);
/// How long a negative check waits for bytes that should not come.
pub const SETTLE: Duration = Duration::from_millis(300);
/// How long a positive check waits for bytes to arrive.
pub const WAIT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Debug, Default)]
struct Received {
    /// One entry per accepted TCP connection or per UDP datagram, in arrival order.
    messages: Vec<Vec<u8>>,
}

/// A TCP or UDP listener in a namespace. Stops on drop.
#[derive(Debug)]
pub struct Listener {
    proto: Proto,
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    pub fn tcp(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        Self::start(ns, Proto::Tcp, addr)
    }

    pub fn udp(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        Self::start(ns, Proto::Udp, addr)
    }

    pub fn start(ns: &Netns, proto: Proto, addr: SocketAddr) -> Result<Self> {
        let received = Arc::new(Mutex::new(Received::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound_rx) = mpsc::channel::<Result<SocketAddr>>();
        let handle = ns.handle();
        let thread = {
            let received = Arc::clone(&received);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(format!("listen-{proto:?}-{addr}"))
                .spawn(move || serve(&handle, proto, addr, &received, &stop, &bound_tx))
                .context("spawning listener thread")?
        };
        let mut listener = Self {
            proto,
            addr,
            received,
            stop,
            thread: Some(thread),
        };
        match bound_rx.recv_timeout(BIND_WAIT) {
            Ok(Ok(local)) => {
                listener.addr = local;
                Ok(listener)
            }
            Ok(Err(e)) => Err(e.context(format!("{proto:?} listener on {addr} in {}", ns.name()))),
            Err(_) => Err(anyhow!(
                "{proto:?} listener on {addr} did not bind in {BIND_WAIT:?}"
            )),
        }
    }

    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// The bound address (with the real port if 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    fn lock(&self) -> MutexGuard<'_, Received> {
        self.received.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every byte received so far: TCP connections' streams, or UDP datagrams, concatenated
    /// in arrival order.
    pub fn received(&self) -> Vec<u8> {
        self.lock().messages.concat()
    }

    /// One entry per TCP connection or UDP datagram.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        self.lock().messages.clone()
    }

    /// Accepted TCP connections, or received UDP datagrams.
    pub fn connections(&self) -> usize {
        self.lock().messages.len()
    }

    /// Waits (bounded) until `expected` occurs in what was received; returns everything
    /// received.
    pub fn wait_for(&self, expected: &[u8], timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            if contains(&got, expected) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits [`SETTLE`] for stragglers, then returns what was received: for checks that
    /// nothing arrived.
    pub fn settled(&self) -> Vec<u8> {
        std::thread::sleep(SETTLE);
        self.received()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            eprintln!("egress-tests: listener thread on {} panicked", self.addr);
        }
    }
}

/// Panics unless `listener` received exactly `expected` (waiting up to [`WAIT`] for it).
#[track_caller]
pub fn assert_arrived(listener: &Listener, expected: &[u8], out: &RunOutput) {
    let got = listener.wait_for(expected, WAIT);
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(expected),
        "bytes at {:?} listener {}\n{}",
        listener.proto(),
        listener.addr(),
        out.describe()
    );
}

/// Panics if any of `listeners` saw a connection, a datagram or a byte (after letting
/// stragglers land).
#[track_caller]
pub fn assert_nothing_arrived(listeners: &[&Listener], out: &RunOutput) {
    std::thread::sleep(SETTLE);
    for l in listeners {
        assert!(
            l.connections() == 0 && l.received().is_empty(),
            "{:?} listener {} saw {} connection(s)/datagram(s) with {:?}\n{}",
            l.proto(),
            l.addr(),
            l.connections(),
            String::from_utf8_lossy(&l.received()),
            out.describe()
        );
    }
}

/// True when `needle` occurs in `haystack` (empty needles always do).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

fn serve(
    ns: &NetnsHandle,
    proto: Proto,
    addr: SocketAddr,
    received: &Arc<Mutex<Received>>,
    stop: &Arc<AtomicBool>,
    bound: &mpsc::Sender<Result<SocketAddr>>,
) {
    if let Err(e) = ns.enter_current_thread() {
        let _ = bound.send(Err(e));
        return;
    }
    match proto {
        Proto::Tcp => match bind_tcp(addr) {
            Ok(l) => {
                let _ = bound.send(l.local_addr().context("local_addr"));
                accept_loop(&l, received, stop);
            }
            Err(e) => {
                let _ = bound.send(Err(e));
            }
        },
        Proto::Udp => match bind_udp(addr) {
            Ok(s) => {
                let _ = bound.send(s.local_addr().context("local_addr"));
                recv_loop(&s, received, stop);
            }
            Err(e) => {
                let _ = bound.send(Err(e));
            }
        },
    }
}

fn bind_tcp(addr: SocketAddr) -> Result<TcpListener> {
    let l = TcpListener::bind(addr).with_context(|| format!("binding TCP {addr}"))?;
    l.set_nonblocking(true).context("set_nonblocking")?;
    Ok(l)
}

fn bind_udp(addr: SocketAddr) -> Result<UdpSocket> {
    let s = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
    s.set_read_timeout(Some(POLL)).context("set_read_timeout")?;
    Ok(s)
}

fn accept_loop(l: &TcpListener, received: &Arc<Mutex<Received>>, stop: &Arc<AtomicBool>) {
    let mut readers = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match l.accept() {
            Ok((stream, _peer)) => {
                let index = {
                    let mut r = received.lock().unwrap_or_else(PoisonError::into_inner);
                    r.messages.push(Vec::new());
                    r.messages.len() - 1
                };
                let received = Arc::clone(received);
                let stop = Arc::clone(stop);
                readers.push(std::thread::spawn(move || {
                    read_connection(stream, &received, index, &stop);
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
    for r in readers {
        let _ = r.join();
    }
}

fn read_connection(
    mut stream: TcpStream,
    received: &Arc<Mutex<Received>>,
    index: usize,
    stop: &AtomicBool,
) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut r = received.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(m) = r.messages.get_mut(index) {
                    m.extend_from_slice(&buf[..n]);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

fn recv_loop(s: &UdpSocket, received: &Arc<Mutex<Received>>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((n, _peer)) = s.recv_from(&mut buf) {
            let mut r = received.lock().unwrap_or_else(PoisonError::into_inner);
            r.messages.push(buf[..n].to_vec());
        }
    }
}
