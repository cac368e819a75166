//! A destination as the policy core sees it: canonical family, address, port and protocol.

/// Address family after canonicalisation. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are
/// always [`Family::V4`]: the kernel routes them as IPv4, so they are judged as IPv4.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4 = 4,
    V6 = 6,
}

/// Transport protocol of the socket, as far as rules can name it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp = 6,
    Udp = 17,
    /// Anything else (SCTP, ICMP, UDP-Lite, ...): no rule can allow it.
    Other = 255,
}

impl Proto {
    /// Maps the socket's `sk_protocol` to the protocol rules speak of. MPTCP is TCP to the
    /// policy: it is a TCP connection with extra subflows to the same destination.
    #[inline(always)]
    pub const fn from_ip_proto(proto: u32) -> Self {
        match proto {
            IPPROTO_TCP | IPPROTO_MPTCP => Proto::Tcp,
            IPPROTO_UDP => Proto::Udp,
            _ => Proto::Other,
        }
    }

    /// Index into the protocol dimension of the counters.
    #[inline(always)]
    pub const fn counter_index(self) -> u32 {
        match self {
            Proto::Tcp => 0,
            Proto::Udp => 1,
            Proto::Other => 2,
        }
    }
}

pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
pub const IPPROTO_MPTCP: u32 = 262;

/// A destination to judge. For IPv4 the address sits in the first four bytes of `addr`
/// (network order) and the rest is zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dest {
    pub family: Family,
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub proto: Proto,
}

impl Dest {
    /// An IPv4 destination from its four address bytes in network order.
    #[inline(always)]
    pub const fn v4(octets: [u8; 4], port: u16, proto: Proto) -> Self {
        let mut addr = [0u8; 16];
        addr[0] = octets[0];
        addr[1] = octets[1];
        addr[2] = octets[2];
        addr[3] = octets[3];
        Dest {
            family: Family::V4,
            addr,
            port,
            proto,
        }
    }

    /// An IPv6 destination, canonicalised: an IPv4-mapped address becomes IPv4.
    #[inline(always)]
    pub const fn v6(octets: [u8; 16], port: u16, proto: Proto) -> Self {
        if is_v4_mapped(&octets) {
            return Dest::v4(
                [octets[12], octets[13], octets[14], octets[15]],
                port,
                proto,
            );
        }
        Dest {
            family: Family::V6,
            addr: octets,
            port,
            proto,
        }
    }

    /// IPv6 link-local (fe80::/10).
    #[inline(always)]
    pub const fn is_link_local(&self) -> bool {
        matches!(self.family, Family::V6) && self.addr[0] == 0xfe && self.addr[1] & 0xc0 == 0x80
    }

    /// Exactly `::1`.
    #[inline(always)]
    pub const fn is_ipv6_localhost(&self) -> bool {
        if !matches!(self.family, Family::V6) {
            return false;
        }
        let mut i = 0;
        while i < 15 {
            if self.addr[i] != 0 {
                return false;
            }
            i += 1;
        }
        self.addr[15] == 1
    }

    /// Whether this destination reaches the local host through loopback: 127.0.0.0/8, ::1,
    /// and the unspecified addresses 0.0.0.0 and ::, which Linux connects to loopback.
    #[inline(always)]
    pub const fn is_loopback(&self) -> bool {
        match self.family {
            Family::V4 => {
                self.addr[0] == 127
                    || (self.addr[0] == 0
                        && self.addr[1] == 0
                        && self.addr[2] == 0
                        && self.addr[3] == 0)
            }
            Family::V6 => {
                let mut i = 0;
                while i < 15 {
                    if self.addr[i] != 0 {
                        return false;
                    }
                    i += 1;
                }
                self.addr[15] == 0 || self.addr[15] == 1
            }
        }
    }
}

#[inline(always)]
const fn is_v4_mapped(a: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    a[10] == 0xff && a[11] == 0xff
}
