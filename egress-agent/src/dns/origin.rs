//! Who sent a query that reached the proxy's second port, and where it was addressed.
//!
//! The kernel sends a query addressed to a resolver the slot does not authorize to the
//! proxy's second port, and records per socket cookie where it was going and which process
//! sent it (`EGRESS_DNS_ORIGIN`). The proxy sees only the workload socket's loopback address
//! and port; the socket-diagnostics netlink interface (`sock_diag(7)`, an exact lookup by
//! address and port) turns that into the socket's cookie. Used only on that second port, so
//! ordinary queries pay nothing for it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::Mutex;

use aya::maps::{HashMap, MapData};
use egress_common::maps::{DnsOrigin, MAP_DNS_ORIGIN};

use crate::kernel::loader::Programs;
use crate::kernel::maps::MapsError;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// Offset of `idiag_cookie` in `struct inet_diag_msg`.
const MSG_COOKIE_OFFSET: usize = 44;
const MSG_LEN: usize = 72;
const INET_DIAG_NOCOOKIE: u32 = u32::MAX;

/// A query's origin as the kernel recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryOrigin {
    /// The resolver the workload addressed.
    pub resolver: SocketAddr,
    pub pid: u32,
    pub uid: u32,
    pub comm: String,
}

impl QueryOrigin {
    pub fn from_record(o: &DnsOrigin) -> Option<Self> {
        let ip = match o.family {
            DnsOrigin::FAMILY_V4 => {
                IpAddr::V4(Ipv4Addr::new(o.addr[0], o.addr[1], o.addr[2], o.addr[3]))
            }
            DnsOrigin::FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(o.addr)).to_canonical(),
            _ => return None,
        };
        let end = o.comm.iter().position(|b| *b == 0).unwrap_or(o.comm.len());
        Some(QueryOrigin {
            resolver: SocketAddr::new(ip, u16::from_be(o.port_be)),
            pid: o.pid,
            uid: o.uid,
            comm: String::from_utf8_lossy(&o.comm[..end]).into_owned(),
        })
    }
}

/// The socket-diagnostics socket (opened in the workload's network namespace).
#[derive(Debug)]
pub struct Diag(OwnedFd);

impl Diag {
    /// Opens a `NETLINK_SOCK_DIAG` socket in the calling thread's network namespace, with a
    /// short receive timeout: a lookup never holds up the proxy for long.
    pub fn open() -> std::io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: setsockopt with a timeval of the right size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Diag(fd))
    }

    /// The cookie of the workload's socket at `workload` that sent to the proxy at `proxy`.
    ///
    /// The kernel's exact lookup finds the socket that would receive a packet: for TCP one
    /// from the request's `dst` to its `src`, for UDP one from its `src` to its `dst` ("src
    /// and dst are swapped for historical reasons", net/ipv4/udp_diag.c). Asked the other way
    /// round, UDP would find the proxy's own socket, so the order is fixed per protocol.
    fn cookie(&self, tcp: bool, workload: SocketAddr, proxy: SocketAddr) -> std::io::Result<u64> {
        if tcp {
            self.ask(&request(true, workload, proxy))
        } else {
            self.ask(&request(false, proxy, workload))
        }
    }

    fn ask(&self, req: &[u8]) -> std::io::Result<u64> {
        let fd = self.0.as_raw_fd();
        // SAFETY: sends the bytes of `req` on our socket (to the kernel: no address needed).
        let sent = unsafe { libc::send(fd, req.as_ptr().cast(), req.len(), 0) };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = [0u8; 512];
        // SAFETY: receives into our buffer of the given size.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        parse_reply(&buf[..usize::try_from(n).unwrap_or(0)])
    }
}

/// One `SOCK_DIAG_BY_FAMILY` exact-lookup request with `src` and `dst` as its socket id.
pub fn request(tcp: bool, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDR_LEN + REQ_LEN);
    let len = u32::try_from(NLMSG_HDR_LEN + REQ_LEN).unwrap_or(u32::MAX);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    let family = if src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    m.push(u8::try_from(family).unwrap_or(0));
    m.push(if tcp {
        libc::IPPROTO_TCP as u8
    } else {
        libc::IPPROTO_UDP as u8
    });
    m.push(0); // idiag_ext
    m.push(0);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(&src.port().to_be_bytes());
    m.extend_from_slice(&dst.port().to_be_bytes());
    m.extend_from_slice(&addr16(src.ip()));
    m.extend_from_slice(&addr16(dst.ip()));
    m.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    m.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    m.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    m
}

fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            a
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The cookie of the first `inet_diag_msg` in a reply, or the error it carries.
pub fn parse_reply(buf: &[u8]) -> std::io::Result<u64> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "short sock_diag reply");
    let hdr = buf.get(..NLMSG_HDR_LEN).ok_or_else(bad)?;
    let kind = u16::from_ne_bytes([hdr[4], hdr[5]]);
    if kind == NLMSG_ERROR {
        let code = buf.get(16..20).ok_or_else(bad)?;
        let errno = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
        return Err(std::io::Error::from_raw_os_error(errno.saturating_neg()));
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return Err(bad());
    }
    let msg = buf
        .get(NLMSG_HDR_LEN..NLMSG_HDR_LEN + MSG_LEN)
        .ok_or_else(bad)?;
    let c = &msg[MSG_COOKIE_OFFSET..MSG_COOKIE_OFFSET + 8];
    let lo = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    let hi = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
    Ok(u64::from(lo) | (u64::from(hi) << 32))
}

/// The kernel's record of where queries went, and the means to find a query's socket.
pub struct Origins {
    map: HashMap<MapData, u64, DnsOrigin>,
    diag: Mutex<Option<Diag>>,
}

impl Origins {
    pub fn take(programs: &mut Programs) -> Result<Self, MapsError> {
        let map = programs.take_map(MAP_DNS_ORIGIN)?;
        Ok(Origins {
            map: HashMap::try_from(map).map_err(|e| MapsError::Op {
                map: MAP_DNS_ORIGIN,
                op: "open",
                source: Box::new(e),
            })?,
            diag: Mutex::new(None),
        })
    }

    /// The diagnostics socket, opened in the workload's network namespace.
    pub fn set_diag(&self, diag: Diag) {
        *self
            .diag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(diag);
    }

    /// Where the query from the workload socket at `peer` (talking to the proxy at `local`)
    /// was addressed, and who sent it.
    pub fn lookup(
        &self,
        tcp: bool,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<QueryOrigin, String> {
        let cookie = {
            let diag = self
                .diag
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(diag) = diag.as_ref() else {
                return Err("no socket-diagnostics socket".into());
            };
            diag.cookie(tcp, canonical(peer), canonical(local))
                .map_err(|e| format!("finding the sending socket: {e}"))?
        };
        let record = self
            .map
            .get(&cookie, 0)
            .map_err(|e| format!("no record for socket {cookie}: {e}"))?;
        QueryOrigin::from_record(&record).ok_or_else(|| "an unreadable record".into())
    }
}

/// An IPv4-mapped address as IPv4 (the proxy's IPv4 sockets see mapped senders as IPv4).
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_names_family_protocol_and_both_ends() {
        let src: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "127.0.0.1:807".parse().unwrap();
        let m = request(false, src, dst);
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 72);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], libc::IPPROTO_UDP as u8);
        assert_eq!(&m[24..26], &40000u16.to_be_bytes());
        assert_eq!(&m[26..28], &807u16.to_be_bytes());
        assert_eq!(&m[28..32], &[127, 0, 0, 1]);
        assert_eq!(&m[64..72], &[0xff; 8]);
        let v6 = request(
            true,
            "[::1]:40000".parse().unwrap(),
            "[::1]:807".parse().unwrap(),
        );
        assert_eq!(v6[16], libc::AF_INET6 as u8);
        assert_eq!(v6[17], libc::IPPROTO_TCP as u8);
        assert_eq!(v6[43], 1);
    }

    #[test]
    fn replies_give_the_cookie_or_the_error() {
        let mut reply = vec![0u8; 16 + 72];
        reply[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        reply[16 + 44..16 + 48].copy_from_slice(&7u32.to_ne_bytes());
        reply[16 + 48..16 + 52].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(parse_reply(&reply).unwrap(), 7 | (1 << 32));
        let mut err = vec![0u8; 36];
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(
            parse_reply(&err).err().and_then(|e| e.raw_os_error()),
            Some(libc::ENOENT)
        );
        assert!(parse_reply(&reply[..20]).is_err());
    }

    #[test]
    fn records_decode_to_the_resolver_and_the_process() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[203, 0, 113, 9]);
        let mut comm = [0u8; 16];
        comm[..5].copy_from_slice(b"probe");
        let o = QueryOrigin::from_record(&DnsOrigin {
            addr,
            port_be: 53u16.to_be(),
            family: DnsOrigin::FAMILY_V4,
            _pad: 0,
            pid: 42,
            uid: 65534,
            comm,
        })
        .unwrap();
        assert_eq!(o.resolver, "203.0.113.9:53".parse().unwrap());
        assert_eq!((o.pid, o.uid, o.comm.as_str()), (42, 65534, "probe"));
    }
}
