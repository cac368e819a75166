//! The demo's world: the stand-in hosts and services in the remote namespace, and the DNS
//! server that answers their names.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context as _, Result};
use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::server::Listener;
use egress_tests::testbed::Testbed;

pub const API_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const API_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xe9, 0, 0, 0, 0, 0, 0x10);
const DATABASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
const EVIL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 66);
const PASTEBIN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 67);
pub const ROGUE_RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
/// The demo's own DNS server (dnsmasq in the remote namespace) at the policy's first
/// `allowed_resolvers` address, which the agent asks.
pub const DNS_SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 53);
/// A host inside the policy's denied range 10.0.0.0/8.
const DENIED_RANGE_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);

/// What the demo's DNS server answers, and nothing else.
const DNS_RECORDS: [(&str, IpAddr); 5] = [
    ("api.company.com", IpAddr::V4(API_V4)),
    ("api.company.com", IpAddr::V6(API_V6)),
    ("database.internal", IpAddr::V4(DATABASE)),
    ("evil.com", IpAddr::V4(EVIL)),
    ("pastebin.com", IpAddr::V4(PASTEBIN)),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// A listener in the remote namespace, standing in for a service.
pub struct Service {
    /// A host name the demo's DNS server answers with this address, or a description.
    pub name: &'static str,
    pub addr: SocketAddr,
    proto: Proto,
}

const fn service(name: &'static str, ip: IpAddr, port: u16, proto: Proto) -> Service {
    Service {
        name,
        addr: SocketAddr::new(ip, port),
        proto,
    }
}

impl Service {
    /// `api.company.com (198.18.0.10):443` for a name the DNS server answers with this
    /// address, else `rogue resolver 198.18.0.99:53`.
    pub fn dest(&self) -> String {
        let (ip, port) = (self.addr.ip(), self.addr.port());
        if DNS_RECORDS.contains(&(self.name, ip)) {
            format!("{} ({ip}):{port}", self.name)
        } else {
            format!("{} {}", self.name, self.addr)
        }
    }
}

pub const SERVICES: [Service; 12] = [
    service("api.company.com", IpAddr::V4(API_V4), 443, Proto::Tcp),
    service("api.company.com", IpAddr::V6(API_V6), 443, Proto::Tcp),
    service("api.company.com", IpAddr::V4(API_V4), 80, Proto::Tcp),
    service("api.company.com", IpAddr::V6(API_V6), 80, Proto::Tcp),
    service("database.internal", IpAddr::V4(DATABASE), 5432, Proto::Tcp),
    service("evil.com", IpAddr::V4(EVIL), 443, Proto::Tcp),
    service(
        "denied range",
        IpAddr::V4(DENIED_RANGE_HOST),
        443,
        Proto::Tcp,
    ),
    service("rogue resolver", IpAddr::V4(ROGUE_RESOLVER), 53, Proto::Udp),
    service("pastebin.com", IpAddr::V4(PASTEBIN), 443, Proto::Tcp),
    service("pastebin.com", IpAddr::V4(PASTEBIN), 80, Proto::Tcp),
    service("rogue resolver", IpAddr::V4(ROGUE_RESOLVER), 53, Proto::Tcp),
    service(
        "rogue resolver (DNS over TLS)",
        IpAddr::V4(ROGUE_RESOLVER),
        853,
        Proto::Tcp,
    ),
];
/// Indices into [`SERVICES`] of the rogue resolver's port-53 listeners.
pub const ROGUE_UDP: usize = 7;
pub const ROGUE_TCP: usize = 10;

/// Adds every stand-in address to the remote namespace and starts one listener per service,
/// in [`SERVICES`] order.
pub fn build_world(tb: &Testbed) -> Result<Vec<Listener>> {
    let mut addresses: Vec<IpAddr> = SERVICES.iter().map(|s| s.addr.ip()).collect();
    addresses.sort();
    addresses.dedup();
    for ip in addresses {
        tb.topo
            .add_remote_addr(ip)
            .with_context(|| format!("adding {ip} to the remote namespace"))?;
    }
    SERVICES
        .iter()
        .map(|s| {
            match s.proto {
                Proto::Tcp => tb.listen_tcp(s.addr),
                Proto::Udp => tb.listen_udp(s.addr),
            }
            .with_context(|| format!("starting the {} listener on {}", s.name, s.addr))
        })
        .collect()
}

/// Starts the demo's DNS server on an address of its own in the remote namespace.
pub fn start_dns(tb: &Testbed) -> Result<Dnsmasq> {
    let ip = IpAddr::V4(DNS_SERVER);
    tb.topo
        .add_remote_addr(ip)
        .with_context(|| format!("adding {ip} to the remote namespace"))?;
    Dnsmasq::start(tb.remote(), ip, &DNS_RECORDS)
        .with_context(|| format!("starting the demo's DNS server on {ip}"))
}

/// The resolv.conf the agent reads: the demo's DNS server only.
pub fn write_resolv_conf() -> Result<tempfile::NamedTempFile> {
    let mut file = tempfile::Builder::new()
        .prefix("egress-demo-resolv-")
        .suffix(".conf")
        .tempfile()
        .context("creating the demo's resolv.conf")?;
    writeln!(file, "nameserver {DNS_SERVER}").context("writing the demo's resolv.conf")?;
    Ok(file)
}

pub fn print_world(tb: &Testbed) {
    println!(
        "\nWorld: workload namespace {} --veth-- remote namespace {}",
        tb.client().name(),
        tb.remote().name()
    );
    println!(
        "Names are served by a local DNS server, dnsmasq at {DNS_SERVER}:53 in the remote \
         namespace, which answers only:"
    );
    for (name, ip) in &DNS_RECORDS {
        let kind = if ip.is_ipv4() { "A" } else { "AAAA" };
        println!("  {name:<18} {kind:<4} {ip}");
    }
    println!(
        "The agent resolves the policy's host names through it (dns_policy.allowed_resolvers), \
         and its DNS\nproxy answers the workload's own queries, forwarding allowed names to it \
         and no other server."
    );
    println!("Services (listeners in the remote namespace):");
    for s in &SERVICES {
        let proto = match s.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        println!("  {proto} {}", s.dest());
    }
    println!(
        "Workloads, as uid nobody (65534), standing in for an MCP server: egress-probe (connects \
         and sends\nby address) and egress-dns-client (DNS queries over UDP and TCP, as a stub \
         resolver sends them)"
    );
}
