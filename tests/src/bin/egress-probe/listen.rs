//! `listen`: a TCP listener that greets every connection.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use egress_tests::probe::ProbeResult;

use crate::Failure;
use crate::bypass::setsockopt_bytes;
use crate::op::{Listen, Transport};
use crate::sock::{IO_TIMEOUT, check, sock_addr, transport_socket};

/// A TCP listener (bound, or autobound by listen() itself) that writes its port to the ready
/// path, then for the given time accepts every connection, writes DATA to it and closes it.
/// `count` = connections accepted, `addrs` = their peers, `from` = the listening address.
pub fn listen(text: &str, l: &Listen) -> ProbeResult {
    use std::io::Write as _;
    let fail = |f: Failure| ProbeResult::failed(text, f.errno, f.error);
    let io_fail = |e: std::io::Error| ProbeResult::failed(text, e.raw_os_error(), e.to_string());
    let sock = match transport_socket(Transport::Tcp, l.family) {
        Ok(s) => s,
        Err(f) => return fail(f),
    };
    let fd = sock.as_raw_fd();
    if let Some(bind) = l.bind {
        // As servers do: connections of an earlier listener on the port may be in TIME_WAIT.
        if let Err(f) = setsockopt_bytes(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &1i32.to_ne_bytes(),
        ) {
            return fail(f);
        }
        let addr = sock_addr(l.family, bind);
        // SAFETY: addr points to a valid sockaddr of addr.len bytes.
        if let Err(f) = check(unsafe { libc::bind(fd, addr.ptr(), addr.socklen()) }) {
            return fail(f);
        }
    }
    // SAFETY: listen(2) on a socket this function owns.
    if let Err(f) = check(unsafe { libc::listen(fd, 16) }) {
        return fail(f);
    }
    let listener = std::net::TcpListener::from(sock);
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => return io_fail(e),
    };
    if let Err(e) = listener.set_nonblocking(true) {
        return io_fail(e);
    }
    let tmp = l.ready.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, local.port().to_string())
        .and_then(|()| std::fs::rename(&tmp, &l.ready))
    {
        return io_fail(e);
    }
    let start = Instant::now();
    let mut peers = Vec::new();
    while start.elapsed() < l.total {
        match listener.accept() {
            Ok((mut conn, peer)) => {
                peers.push(peer.ip().to_canonical());
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
                let _ = conn.write_all(&l.data);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return io_fail(e),
        }
    }
    ProbeResult {
        count: Some(peers.len() as u64),
        addrs: Some(peers),
        from: Some(local),
        ..ProbeResult::ok(text)
    }
}
