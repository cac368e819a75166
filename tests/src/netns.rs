//! Network namespaces for tests, and the two-namespace topology the enforcement tests use.
//!
//! Nothing here touches the root network namespace: veth pairs are created from inside the
//! client namespace with the peer placed directly into the remote one, and every `ip`
//! command names its namespace with `-n`.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// Client side of the veth pair (where the workload runs).
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Remote side of the veth pair (where the listeners run).
pub const REMOTE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xe9, 0, 0, 0, 0, 0, 1);
pub const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xe9, 0, 0, 0, 0, 0, 2);
/// Interface names inside the namespaces.
pub const CLIENT_IF: &str = "veth-c";
pub const REMOTE_IF: &str = "veth-r";

const LINK_UP_WAIT: Duration = Duration::from_secs(5);

/// A network namespace `egt-<pid>-<n>-<label>`, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    fd: Arc<OwnedFd>,
}

impl Netns {
    /// `ip netns add`, then loopback up inside.
    pub fn new(label: &str) -> Result<Self> {
        let name = format!("{}-{label}", crate::unique_name("egt"));
        run_ip(&["netns", "add", &name])?;
        let path = PathBuf::from("/run/netns").join(&name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = run_ip(&["netns", "del", &name]);
                return Err(e).with_context(|| format!("opening {}", path.display()));
            }
        };
        let ns = Self {
            name,
            fd: Arc::new(OwnedFd::from(file)),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file `ip netns add` created (what `egress-agent --netns` takes).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Adds `ip` (v4 /32 or v6 /128, inside the test ranges) to this namespace's loopback
    /// device: an address local to this namespace only, like a pod's own address.
    pub fn add_local_addr(&self, ip: IpAddr) -> Result<()> {
        let prefix = test_prefix_len(ip)?;
        self.ip(&["addr", "add", &format!("{ip}/{prefix}"), "dev", "lo"])
            .map(drop)
    }

    /// Whether this namespace has a default route (IPv4 or IPv6). The test namespaces have
    /// none, so traffic to an address outside them cannot leave even if enforcement failed.
    pub fn has_default_route(&self) -> Result<bool> {
        let v4 = self.ip(&["route", "show", "default"])?;
        let v6 = self.ip(&["-6", "route", "show", "default"])?;
        Ok(!v4.trim().is_empty() || !v6.trim().is_empty())
    }

    /// Whether the namespace has any route to `ip` (`ip route get` succeeds).
    pub fn has_route_to(&self, ip: IpAddr) -> bool {
        self.ip(&["route", "get", &ip.to_string()]).is_ok()
    }

    /// `ip -n <this> <args>`; the error carries ip's stderr.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// Makes `cmd` run inside this namespace: the child calls setns(CLONE_NEWNET) before
    /// exec. Unlike `ip netns exec` this keeps the mount namespace, so cgroup2 and bpffs stay
    /// visible.
    pub fn run_in<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        let fd = Arc::clone(&self.fd);
        // SAFETY: the closure only calls setns, which is async-signal-safe, on a descriptor
        // kept open by the Arc the closure owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }

    /// Like [`run_in`](Self::run_in), and also drops to `uid`/`gid` with no supplementary
    /// groups (std's own `uid()` would drop before our setns, which then fails).
    pub fn run_in_as<'a>(&self, cmd: &'a mut Command, uid: u32, gid: u32) -> &'a mut Command {
        let fd = Arc::clone(&self.fd);
        // SAFETY: setns, setgroups, setgid and setuid are async-signal-safe; the descriptor
        // is kept open by the Arc the closure owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0
                    || libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }

    /// Moves the calling thread into this namespace (setns is per thread). Only for threads
    /// the harness spawned for that purpose.
    pub fn enter_current_thread(&self) -> Result<()> {
        self.handle().enter_current_thread()
    }

    /// A handle that can enter this namespace from another thread.
    pub fn handle(&self) -> NetnsHandle {
        NetnsHandle {
            name: self.name.clone(),
            fd: Arc::clone(&self.fd),
        }
    }

    /// Sets a per-namespace `net.*` sysctl inside this namespace (never the root one): a
    /// short-lived thread enters the namespace and writes /proc/sys.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        ensure!(
            key.starts_with("net.") && !key.contains(['/', ' ']),
            "only net.* sysctls can be set inside a test namespace, not {key:?}"
        );
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let handle = self.handle();
        let value = value.to_owned();
        std::thread::spawn(move || -> Result<()> {
            handle.enter_current_thread()?;
            std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("sysctl thread panicked"))?
        .with_context(|| format!("sysctl {key} in {}", self.name))
    }
}

impl Netns {
    /// A `TcpExt` counter from this namespace's /proc/net/netstat (e.g. `TCPFastOpenActive`).
    pub fn tcp_ext_counter(&self, name: &str) -> Result<u64> {
        let handle = self.handle();
        let text = std::thread::spawn(move || -> Result<String> {
            handle.enter_current_thread()?;
            // thread-self: /proc/self/net would show the main thread's namespace.
            std::fs::read_to_string("/proc/thread-self/net/netstat")
                .context("reading /proc/thread-self/net/netstat")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netstat thread panicked"))??;
        parse_netstat(&text, "TcpExt", name)
            .with_context(|| format!("no TcpExt counter {name} in {}", self.name))
    }
}

/// The value of `prefix: name` in /proc/net/netstat's header/value line pairs.
fn parse_netstat(text: &str, prefix: &str, name: &str) -> Option<u64> {
    let lines: Vec<&str> = text.lines().collect();
    lines.chunks(2).find_map(|pair| {
        let [header, values] = pair else { return None };
        let names = header.strip_prefix(prefix)?.strip_prefix(':')?;
        let values = values.strip_prefix(prefix)?.strip_prefix(':')?;
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.parse().ok())
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_ip(&["netns", "del", &self.name]) {
            eprintln!("egress-tests: deleting netns {}: {e:#}", self.name);
        }
    }
}

/// Lets a thread enter a [`Netns`]; keeps the namespace file open, not the namespace name.
#[derive(Clone, Debug)]
pub struct NetnsHandle {
    name: String,
    fd: Arc<OwnedFd>,
}

impl NetnsHandle {
    pub fn enter_current_thread(&self) -> Result<()> {
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("setns into {}", self.name));
        }
        Ok(())
    }
}

fn run_ip(args: &[&str]) -> Result<String> {
    let ip = crate::find_tool("ip").context("the `ip` tool (iproute2) is not installed")?;
    let out = Command::new(&ip)
        .args(args)
        .output()
        .with_context(|| format!("running {}", ip.display()))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A "client" namespace (the workload's) and a "remote" namespace (the listeners') joined by
/// a veth pair: 198.18.0.1/24 + fd00:e9::1/64 on the client side, 198.18.0.2/24 +
/// fd00:e9::2/64 on the remote side.
#[derive(Debug)]
pub struct Topology {
    pub client: Netns,
    pub remote: Netns,
}

impl Topology {
    pub fn new() -> Result<Self> {
        let client = Netns::new("c")?;
        let remote = Netns::new("r")?;
        client.ip(&[
            "link",
            "add",
            CLIENT_IF,
            "type",
            "veth",
            "peer",
            "name",
            REMOTE_IF,
            "netns",
            remote.name(),
        ])?;
        for (ns, ifname, v4, v6) in [
            (&client, CLIENT_IF, CLIENT_V4, CLIENT_V6),
            (&remote, REMOTE_IF, REMOTE_V4, REMOTE_V6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", ifname])?;
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                ifname,
                "nodad",
            ])?;
            ns.ip(&["link", "set", ifname, "up"])?;
        }
        let topo = Self { client, remote };
        topo.wait_link_up()?;
        Ok(topo)
    }

    fn wait_link_up(&self) -> Result<()> {
        let deadline = Instant::now() + LINK_UP_WAIT;
        loop {
            let c = self.client.ip(&["-o", "link", "show", CLIENT_IF])?;
            let r = self.remote.ip(&["-o", "link", "show", REMOTE_IF])?;
            if c.contains("state UP") && r.contains("state UP") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("veth pair not up after {LINK_UP_WAIT:?}: {c} / {r}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// TCP Fast Open with data in the SYN and no cookie: client side sends it (tcp_fastopen
    /// 0x1|0x4), remote listeners accept it without TCP_FASTOPEN setsockopt
    /// (0x2|0x200|0x400). Both sysctls are per namespace; the root namespace is untouched.
    pub fn enable_fast_open_without_cookies(&self) -> Result<()> {
        self.client.sysctl("net.ipv4.tcp_fastopen", "5")?;
        self.remote.sysctl("net.ipv4.tcp_fastopen", "1538")
    }

    /// Adds `ip` (v4 /32 or v6 /128) to the remote veth and an on-link route to it in the
    /// client namespace. Only addresses in 198.18.0.0/16 or fd00:e9::/32 are accepted.
    pub fn add_remote_addr(&self, ip: IpAddr) -> Result<()> {
        let prefix = test_prefix_len(ip)?;
        self.add_remote_host(ip, prefix)
    }

    /// The cloud metadata address 169.254.169.254, played by the remote namespace, so that a
    /// test can show the workload cannot reach it through a name that resolves to it. Like
    /// every test address, it exists only inside the test's namespaces.
    pub fn add_remote_metadata_addr(&self) -> Result<IpAddr> {
        let ip = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));
        self.add_remote_host(ip, 32)?;
        Ok(ip)
    }

    fn add_remote_host(&self, ip: IpAddr, prefix: u8) -> Result<()> {
        let cidr = format!("{ip}/{prefix}");
        let mut add = vec!["addr", "add", cidr.as_str(), "dev", REMOTE_IF];
        if ip.is_ipv6() {
            add.push("nodad");
        }
        self.remote.ip(&add)?;
        self.client
            .ip(&["route", "replace", &cidr, "dev", CLIENT_IF])?;
        Ok(())
    }

    /// Makes every address of `net` local to the remote namespace (a `local` route on its
    /// loopback, "AnyIP") and routes `net` from the client namespace through the remote end
    /// of the veth pair: a listener on 0.0.0.0 / :: in the remote namespace then answers on
    /// each of them, without one `ip addr add` per address. `net` must lie in
    /// 198.18.0.0/16 or fd00:e9::/32 and must not contain the veth addresses.
    pub fn add_remote_net(&self, net: &str) -> Result<()> {
        let parsed: ipnet::IpNet = net
            .parse()
            .with_context(|| format!("{net:?} is not an address/prefix"))?;
        let net = parsed.trunc();
        test_prefix_len(net.network())?;
        let (min_prefix, family, gateway) = match net {
            ipnet::IpNet::V4(_) => (16, "-4", IpAddr::V4(REMOTE_V4)),
            ipnet::IpNet::V6(_) => (32, "-6", IpAddr::V6(REMOTE_V6)),
        };
        ensure!(
            net.prefix_len() >= min_prefix,
            "{net} is wider than the test range"
        );
        for veth in [
            IpAddr::V4(CLIENT_V4),
            IpAddr::V4(REMOTE_V4),
            IpAddr::V6(CLIENT_V6),
            IpAddr::V6(REMOTE_V6),
        ] {
            ensure!(
                !net.contains(&veth),
                "{net} contains the veth address {veth}"
            );
        }
        let cidr = net.to_string();
        self.remote
            .ip(&[family, "route", "add", "local", &cidr, "dev", "lo"])?;
        self.client.ip(&[
            family,
            "route",
            "replace",
            &cidr,
            "via",
            &gateway.to_string(),
            "dev",
            CLIENT_IF,
        ])?;
        Ok(())
    }
}

/// The host prefix length for `ip` (32 or 128), or an error when `ip` lies outside the
/// test ranges 198.18.0.0/16, 10.0.0.0/24 (the addresses MCP-NET-02's example policy names:
/// its resolvers 10.0.0.53 and 10.0.0.54 and its denied range, played inside the test's own
/// namespaces) and fd00:e9::/32.
fn test_prefix_len(ip: IpAddr) -> Result<u8> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            ensure!(
                o[..2] == [198, 18] || o[..3] == [10, 0, 0],
                "test addresses must be in 198.18.0.0/16 or 10.0.0.0/24, not {v4}"
            );
            Ok(32)
        }
        IpAddr::V6(v6) => {
            ensure!(
                v6.segments()[..2] == [0xfd00, 0xe9],
                "test addresses must be in fd00:e9::/32, not {v6}"
            );
            Ok(128)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_netstat;

    #[test]
    fn reads_tcp_ext_counters() {
        let text =
            "TcpExt: SyncookiesSent TCPFastOpenActive\nTcpExt: 0 3\nIpExt: InNoRoutes\nIpExt: 9\n";
        assert_eq!(parse_netstat(text, "TcpExt", "TCPFastOpenActive"), Some(3));
        assert_eq!(parse_netstat(text, "IpExt", "InNoRoutes"), Some(9));
        assert_eq!(parse_netstat(text, "TcpExt", "Nope"), None);
    }
}
