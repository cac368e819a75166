//! Frames on the wire: every frame that reaches one device of a test namespace, captured
//! with an AF_PACKET socket, for tests that show a packet did or did not leave.

use std::net::IpAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::netns::Netns;
use crate::server::{SETTLE, WAIT, contains};

/// Every frame that reaches one device while the capture runs (for instance the remote end
/// of the veth pair): an AF_PACKET socket, inside the device's namespace, bound to it. Stops
/// on drop.
pub struct Capture {
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Bound of one capture, whatever the test does.
const CAPTURE_MAX: Duration = Duration::from_secs(120);

impl Capture {
    pub fn start(ns: &Netns, ifname: &'static str) -> Result<Self> {
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let handle = ns.handle();
        let thread = {
            let frames = Arc::clone(&frames);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let sock = match handle
                    .enter_current_thread()
                    .map_err(|e| format!("{e:#}"))
                    .and_then(|()| packet_socket(ifname))
                {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let started = Instant::now();
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::SeqCst) && started.elapsed() < CAPTURE_MAX {
                    // SAFETY: buf is valid for writes of its length.
                    let n = unsafe {
                        libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    if n > 0 {
                        frames
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(buf[..n.unsigned_abs()].to_vec());
                    }
                }
            })
        };
        let capture = Self {
            frames,
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(capture),
            Ok(Err(e)) => bail!("capture on {ifname}: {e}"),
            Err(_) => bail!("capture on {ifname} did not start"),
        }
    }

    /// The frames so far (after letting stragglers land).
    pub fn settled(&self) -> Vec<Vec<u8>> {
        std::thread::sleep(SETTLE);
        self.frames
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits (bounded) until a frame carries `payload`; whether one did.
    pub fn wait_for(&self, payload: &[u8]) -> bool {
        let deadline = Instant::now() + WAIT;
        loop {
            if self
                .frames
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|f| contains(f, payload))
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// socket(AF_PACKET, SOCK_RAW, ETH_P_ALL) bound to `ifname`, with a short receive timeout so
/// the capture loop sees its stop flag.
fn packet_socket(ifname: &str) -> Result<OwnedFd, String> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain syscall; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) };
    if fd < 0 {
        return Err(format!(
            "socket(AF_PACKET): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd is fresh and owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).map_err(|e| e.to_string())?;
    // SAFETY: name is NUL-terminated.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(format!("no interface {ifname}"));
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = proto;
    ll.sll_ifindex = index as i32;
    // SAFETY: ll is a valid sockaddr_ll of the length given.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            std::ptr::from_ref(&ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(format!(
            "bind(AF_PACKET, {ifname}): {}",
            std::io::Error::last_os_error()
        ));
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: tv outlives the call and the length matches its type.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(format!("SO_RCVTIMEO: {}", std::io::Error::last_os_error()));
    }
    Ok(sock)
}

/// An Ethernet frame as `src -> dst` of its IP header and UDP port, for failure messages.
pub fn describe_frame(f: &[u8]) -> String {
    let udp_port = |at: usize| {
        f.get(at..at + 2)
            .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]))
    };
    match f.get(12..14) {
        Some([0x86, 0xdd]) if f.len() >= 58 => {
            let addr = |at: usize| {
                <[u8; 16]>::try_from(&f[at..at + 16])
                    .map_or_else(|_| "?".to_owned(), |a| IpAddr::from(a).to_string())
            };
            format!(
                "IPv6 {} -> {} next header {} port {}",
                addr(22),
                addr(38),
                f[20],
                udp_port(56)
            )
        }
        Some([0x08, 0x00]) if f.len() >= 34 => {
            let addr = |at: usize| {
                <[u8; 4]>::try_from(&f[at..at + 4])
                    .map_or_else(|_| "?".to_owned(), |a| IpAddr::from(a).to_string())
            };
            let ihl = usize::from(f[14] & 0x0f) * 4;
            format!(
                "IPv4 {} -> {} protocol {} port {}",
                addr(26),
                addr(30),
                f[23],
                udp_port(14 + ihl + 2)
            )
        }
        _ => format!("{} bytes, not IP", f.len()),
    }
}
