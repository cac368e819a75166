//! A minimal HTTP CONNECT proxy with an allowlist: the userspace alternative to filtering in
//! the kernel. It listens on loopback in its client namespace; the workload connects to it,
//! asks `CONNECT dest`, and the proxy checks the destination against its allowlist (a hash
//! set), connects, answers 200 and relays until either side closes.
//!
//! One thread per listener handles one connection at a time, with no allocation in the relay
//! loop: a lower bound for what a real proxy (threads, event loops, logging) costs.

use std::collections::HashSet;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use egress_tests::netns::Netns;

use crate::world::{Server, set_linger_zero};

pub const PROXY_PORT: u16 = 3128;
const BACKLOG: i32 = 128;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

pub fn proxy_addr(v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), PROXY_PORT)
    } else {
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), PROXY_PORT)
    }
}

/// The proxy's listeners; they stop on drop.
pub struct Proxy {
    _servers: Vec<Server>,
}

impl Proxy {
    /// Starts listeners on 127.0.0.1 and ::1 inside `ns`.
    pub fn start(ns: &Netns, allow: HashSet<IpAddr>) -> Result<Self> {
        let allow = Arc::new(allow);
        let mut servers = Vec::new();
        for v6 in [false, true] {
            let allow = Arc::clone(&allow);
            servers.push(Server::start(ns, proxy_addr(v6), BACKLOG, move |client| {
                // A failed tunnel only fails the workload's operation, which reports it.
                let _ = serve(client, &allow);
            })?);
        }
        Ok(Proxy { _servers: servers })
    }
}

fn serve(mut client: TcpStream, allow: &HashSet<IpAddr>) -> std::io::Result<()> {
    set_linger_zero(client.as_raw_fd());
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    client.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; 4096];
    let mut got = 0;
    while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
        if got == buf.len() {
            return client.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n");
        }
        let n = client.read(&mut buf[got..])?;
        if n == 0 {
            return Ok(());
        }
        got += n;
    }
    let Some(dest) = parse_connect(&buf[..got]) else {
        return client.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    };
    if !allow.contains(&dest.ip()) {
        return client.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n");
    }
    let Ok(upstream) = TcpStream::connect_timeout(&dest, UPSTREAM_TIMEOUT) else {
        return client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
    };
    set_linger_zero(upstream.as_raw_fd());
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    relay(&client, &upstream, &mut buf);
    let _ = upstream.shutdown(Shutdown::Both);
    Ok(())
}

/// `CONNECT host:port HTTP/1.1` with an IP-literal host.
fn parse_connect(request: &[u8]) -> Option<SocketAddr> {
    let line = request.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split(' ');
    (words.next()? == "CONNECT").then_some(())?;
    words.next()?.parse().ok()
}

/// Copies both ways until either side closes or fails (or stays silent for IO_TIMEOUT).
fn relay(a: &TcpStream, b: &TcpStream, buf: &mut [u8]) {
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let timeout = i32::try_from(IO_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n <= 0 {
            return;
        }
        for (from, to, i) in [(a, b, 0), (b, a, 1)] {
            if fds[i].revents == 0 {
                continue;
            }
            match (&*from).read(buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if (&*to).write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn parses_connect_lines() {
        assert_eq!(
            parse_connect(b"CONNECT 198.18.0.2:8000 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some("198.18.0.2:8000".parse().unwrap_or_else(|_| unreachable!()))
        );
        assert_eq!(
            parse_connect(b"CONNECT [fd00:e9::2]:8000 HTTP/1.1\r\n\r\n"),
            Some(
                "[fd00:e9::2]:8000"
                    .parse()
                    .unwrap_or_else(|_| unreachable!())
            )
        );
        assert_eq!(parse_connect(b"GET / HTTP/1.1\r\n\r\n"), None);
    }
}
