//! Sockets: one query over connected UDP, unconnected UDP or TCP, and what can go wrong.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use egress_tests::probe::errno_name;

use crate::message::{Answer, parse_answer, rcode_name};

pub fn unspecified(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// A UDP socket connected to `server` (the connect is what the kernel judges and, under the
/// agent, redirects), with `timeout` on receive.
pub fn connected_udp(server: SocketAddr, timeout: Duration) -> std::io::Result<UdpSocket> {
    let sock = UdpSocket::bind(unspecified(server))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.connect(server)?;
    Ok(sock)
}

/// Why a query was not answered.
#[derive(Debug)]
pub enum Failure {
    Timeout,
    Rcode(u8),
    NoRecords,
    Io(std::io::Error),
}

impl Failure {
    pub fn kind(&self) -> String {
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

pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// One query on a connected socket: send, then read until the answer with this ID arrives
/// (a late answer to an earlier, timed-out query is skipped) or the timeout passes.
pub fn exchange_connected(
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
pub fn judge(a: Answer) -> Result<Answer, Failure> {
    if a.rcode != 0 {
        Err(Failure::Rcode(a.rcode))
    } else if a.answer_count == 0 {
        Err(Failure::NoRecords)
    } else {
        Ok(a)
    }
}

/// Query IDs that do not repeat within a step's window and differ from run to run.
pub struct Ids(u32);

impl Ids {
    pub fn new(seed: u64) -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Ids(t ^ std::process::id() ^ (seed as u32).wrapping_mul(0x9e37_79b9))
    }

    pub fn next(&mut self) -> u16 {
        self.0 = self.0.wrapping_add(1);
        // An odd multiplier permutes the 16-bit space: consecutive IDs look unrelated.
        (self.0.wrapping_mul(40_503) & 0xffff) as u16
    }
}

pub type Received = (Vec<u8>, Option<SocketAddr>);

pub fn query_udp_connected(
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

pub fn query_udp_sendto(
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

pub fn query_tcp(server: SocketAddr, query: &[u8], timeout: Duration) -> Result<Received, Failure> {
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
