//! The usual test world in one expression: a [`Testbed`], listeners in its remote namespace
//! (their addresses added first), and the upstream DNS server the policy's resolver names.
//!
//! ```text
//! let Some(tb) = Scenario::new(probe)
//!     .tcp("198.18.0.10:8443")
//!     .upstream(Dnsmasq::config().record("api.example.test", ip("198.18.0.10")))
//!     .build()
//! else {
//!     return;
//! };
//! let [api] = tb.listeners();
//! let out = tb.finished(&tb.json_agent(&policy).args(ops));
//! ```

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::path::{Path, PathBuf};

use crate::agent::AgentRun;
use crate::dnsmasq::{Dnsmasq, DnsmasqConfig};
use crate::netns::{REMOTE_V4, REMOTE_V6};
use crate::policy::PolicyYaml;
use crate::process::RunOutput;
use crate::server::{Listener, Proto};
use crate::testbed::Testbed;

/// The upstream resolver: dnsmasq on the remote end of the veth pair.
pub const UPSTREAM: &str = "198.18.0.2";

/// What a test needs around its agent runs, declared before anything is built.
#[derive(Debug)]
pub struct Scenario {
    probe: PathBuf,
    nets: Vec<ipnet::IpNet>,
    addrs: Vec<IpAddr>,
    listeners: Vec<(Proto, SocketAddr)>,
    upstream: Option<DnsmasqConfig>,
}

impl Scenario {
    /// A world for the probe at `probe` (`env!("CARGO_BIN_EXE_egress-probe")`).
    pub fn new(probe: &Path) -> Self {
        Self {
            probe: probe.to_path_buf(),
            nets: Vec::new(),
            addrs: Vec::new(),
            listeners: Vec::new(),
            upstream: None,
        }
    }

    /// A TCP listener on `addr` (`ip:port`) in the remote namespace.
    #[must_use]
    #[track_caller]
    pub fn tcp(mut self, addr: &str) -> Self {
        self.listeners.push((Proto::Tcp, parse(addr)));
        self
    }

    /// A UDP listener on `addr` in the remote namespace.
    #[must_use]
    #[track_caller]
    pub fn udp(mut self, addr: &str) -> Self {
        self.listeners.push((Proto::Udp, parse(addr)));
        self
    }

    /// `ip` added to the remote end of the veth pair and routed from the client namespace
    /// ([`Topology::add_remote_addr`](crate::netns::Topology::add_remote_addr)). A listener's
    /// address is added without being named here.
    #[must_use]
    #[track_caller]
    pub fn remote_addr(mut self, ip: &str) -> Self {
        self.addrs.push(parse(ip));
        self
    }

    /// Every address of `net` local to the remote namespace
    /// ([`Topology::add_remote_net`](crate::netns::Topology::add_remote_net)).
    #[must_use]
    #[track_caller]
    pub fn remote_net(mut self, net: &str) -> Self {
        self.nets.push(parse(net));
        self
    }

    /// dnsmasq on [`UPSTREAM`], serving what `config` holds.
    #[must_use]
    pub fn upstream(mut self, config: DnsmasqConfig) -> Self {
        self.upstream = Some(config);
        self
    }

    /// Builds the world: `None` (after a skip notice) where a privileged test cannot run, as
    /// [`Testbed::for_test`]; panics when a part cannot be set up.
    #[track_caller]
    pub fn build(self) -> Option<World> {
        let tb = Testbed::for_test(&self.probe)?;
        for net in &self.nets {
            tb.topo
                .add_remote_net(&net.to_string())
                .unwrap_or_else(|e| panic!("routing {net} to the remote namespace: {e:#}"));
        }
        // Addresses of the veth pair, unspecified ones and those of a local range need no
        // address of their own.
        let needed: BTreeSet<IpAddr> = self
            .addrs
            .iter()
            .copied()
            .chain(self.listeners.iter().map(|(_, a)| a.ip()))
            .filter(|ip| {
                !ip.is_unspecified()
                    && *ip != IpAddr::V4(REMOTE_V4)
                    && *ip != IpAddr::V6(REMOTE_V6)
                    && !self.nets.iter().any(|n| n.contains(ip))
            })
            .collect();
        for ip in needed {
            tb.topo
                .add_remote_addr(ip)
                .unwrap_or_else(|e| panic!("adding {ip} to the remote namespace: {e:#}"));
        }
        let listeners = self
            .listeners
            .iter()
            .map(|&(proto, addr)| {
                Listener::start(tb.remote(), proto, addr)
                    .unwrap_or_else(|e| panic!("starting a {proto:?} listener on {addr}: {e:#}"))
            })
            .collect();
        let upstream = self.upstream.map(|config| {
            config
                .listen(parse(UPSTREAM))
                .start(tb.remote())
                .unwrap_or_else(|e| panic!("starting the upstream dnsmasq: {e:#}"))
        });
        Some(World {
            listeners,
            upstream,
            tb,
        })
    }
}

/// A built [`Scenario`]: the testbed (through `Deref`), its listeners and its upstream DNS
/// server.
#[derive(Debug)]
pub struct World {
    // Fields drop in order: the listeners and the DNS server stop before the namespaces they
    // run in are deleted.
    listeners: Vec<Listener>,
    upstream: Option<Dnsmasq>,
    tb: Testbed,
}

impl Deref for World {
    type Target = Testbed;

    fn deref(&self) -> &Testbed {
        &self.tb
    }
}

impl World {
    /// The listeners, in the order the scenario declared them; `N` must be their number.
    #[track_caller]
    pub fn listeners<const N: usize>(&self) -> [&Listener; N] {
        assert_eq!(
            self.listeners.len(),
            N,
            "the scenario declared {} listeners",
            self.listeners.len()
        );
        std::array::from_fn(|i| &self.listeners[i])
    }

    /// The upstream DNS server; panics when the scenario has none.
    #[track_caller]
    pub fn upstream(&self) -> &Dnsmasq {
        self.upstream
            .as_ref()
            .unwrap_or_else(|| panic!("the scenario has no upstream DNS server"))
    }

    /// An `exec` run of the probe under `policy`, logging JSON (add ops with `.arg`/`.args`).
    #[track_caller]
    pub fn json_agent(&self, policy: &PolicyYaml) -> AgentRun {
        self.tb
            .agent(policy)
            .unwrap_or_else(|e| panic!("preparing the agent run: {e:#}"))
            .json_log()
    }

    /// Runs `run` in the client namespace and checks that it exited 0.
    #[track_caller]
    pub fn finished(&self, run: &AgentRun) -> RunOutput {
        let out = run
            .run_in(self.tb.client())
            .unwrap_or_else(|e| panic!("running the agent: {e:#}"));
        out.assert_exit(0);
        out
    }
}

#[track_caller]
fn parse<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .unwrap_or_else(|e| panic!("{s:?} does not parse: {e}"))
}
