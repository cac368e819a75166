//! The benchmark's world: one "remote" namespace holding the destinations, and one client
//! namespace per filter (rules of iptables and nftables apply to a whole namespace), each
//! joined to the remote one by its own veth pair. The destinations 198.18.0.2 and
//! fd00:e9::2 live on the remote namespace's loopback and are routed from every client
//! namespace over its veth, so every scenario reaches the same addresses by the same path.
//!
//! Nothing here touches the root network namespace: veth pairs are created inside the client
//! namespace with the peer placed straight into the remote one, addresses and routes are set
//! with `ip -n`, and firewall tools run inside the client namespace only.

use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd as _, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use egress_tests::cgroup::TestCgroupParent;
use egress_tests::netns::Netns;
use egress_tests::process::run_captured;
use egress_tests::{NOBODY_GID, NOBODY_UID, StagedBinary, copy_for_nobody, find_tool};
use serde_json::Value;

/// The destinations every scenario connects to and sends to.
pub const DEST4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const DEST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xe9, 0, 0, 0, 0, 0, 2);
/// TCP listener and UDP sink port on both destinations.
pub const DEST_PORT: u16 = 8000;
/// What the event flood connects to: denied by every benchmark policy (no entry allows port 9,
/// and the address is kept out of the generated lists). Denied in the kernel, it never
/// leaves; were it allowed, no route leads to it.
pub const FLOOD_TARGET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 66);
pub const FLOOD_PORT: u16 = 9;

/// Deadline for one workload run.
const WORKLOAD_TIMEOUT: Duration = Duration::from_secs(120);
const LINK_UP_WAIT: Duration = Duration::from_secs(5);

pub fn dest(v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(DEST6.into(), DEST_PORT)
    } else {
        SocketAddr::new(DEST4.into(), DEST_PORT)
    }
}

/// A client namespace and its link.
pub struct Client {
    pub label: String,
    pub ns: Netns,
}

pub struct World {
    // Field order is drop order: workloads die with the cgroups, sinks stop, then the
    // namespaces go.
    pub cgroups: TestCgroupParent,
    _sinks: Sinks,
    pub clients: Vec<Client>,
    pub remote: Netns,
    workload: StagedBinary,
}

impl World {
    /// The remote namespace with the destinations and their listeners, a cgroup parent, and
    /// the workload staged for uid nobody.
    pub fn new(workload: &Path) -> Result<Self> {
        let remote = Netns::new("bench-remote")?;
        // Per namespace: the root namespace's value is untouched.
        remote.sysctl("net.core.somaxconn", &ACCEPT_BACKLOG.to_string())?;
        remote.ip(&["addr", "add", &format!("{DEST4}/32"), "dev", "lo"])?;
        remote.ip(&["-6", "addr", "add", &format!("{DEST6}/128"), "dev", "lo"])?;
        let sinks = Sinks::start(&remote, &[dest(false), dest(true)])?;
        Ok(World {
            cgroups: TestCgroupParent::new()?,
            _sinks: sinks,
            clients: Vec::new(),
            remote,
            workload: stage(workload)?,
        })
    }

    /// A new client namespace linked to the remote one; returns its index.
    pub fn add_client(&mut self, label: &str) -> Result<usize> {
        let i = self.clients.len();
        ensure!(i < 50, "too many client namespaces");
        let ns = Netns::new(&format!("bench-{label}"))?;
        let (cif, rif) = (format!("bc{i}"), format!("br{i}"));
        ns.ip(&[
            "link",
            "add",
            &cif,
            "type",
            "veth",
            "peer",
            "name",
            &rif,
            "netns",
            self.remote.name(),
        ])?;
        let subnet = 200 + i;
        let (c4, r4) = (format!("198.18.{subnet}.1"), format!("198.18.{subnet}.2"));
        let (c6, r6) = (
            format!("fd00:e9:0:{subnet}::1"),
            format!("fd00:e9:0:{subnet}::2"),
        );
        ns.ip(&["addr", "add", &format!("{c4}/24"), "dev", &cif])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{c6}/64"),
            "dev",
            &cif,
            "nodad",
        ])?;
        ns.ip(&["link", "set", &cif, "up"])?;
        self.remote
            .ip(&["addr", "add", &format!("{r4}/24"), "dev", &rif])?;
        self.remote.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{r6}/64"),
            "dev",
            &rif,
            "nodad",
        ])?;
        self.remote.ip(&["link", "set", &rif, "up"])?;
        wait_up(&ns, &cif)?;
        wait_up(&self.remote, &rif)?;
        ns.ip(&[
            "route",
            "add",
            &format!("{DEST4}/32"),
            "via",
            &r4,
            "dev",
            &cif,
        ])?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{DEST6}/128"),
            "via",
            &r6,
            "dev",
            &cif,
        ])?;
        self.clients.push(Client {
            label: label.to_owned(),
            ns,
        });
        Ok(i)
    }

    pub fn client(&self, label: &str) -> Result<&Client> {
        self.clients
            .iter()
            .find(|c| c.label == label)
            .with_context(|| format!("no client namespace {label}"))
    }

    pub fn workload_path(&self) -> &Path {
        self.workload.path()
    }

    /// The batches of one measuring `step` of the workload, in ns per operation.
    pub fn batches(&self, client: &Client, cgroup: &Path, step: String) -> Result<Vec<f64>> {
        let lines = self.run_workload(client, cgroup, &[step])?;
        let batches: Vec<f64> = lines[0]["ns_per_op"]
            .as_array()
            .context("no ns_per_op in the workload's report")?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        ensure!(!batches.is_empty(), "the workload measured nothing");
        Ok(batches)
    }

    /// Runs the workload with `steps` as uid nobody, inside `client`'s namespace and the
    /// cgroup `cgroup` (joined before exec), pinned to the last CPU; returns its JSON lines.
    pub fn run_workload(
        &self,
        client: &Client,
        cgroup: &Path,
        steps: &[String],
    ) -> Result<Vec<Value>> {
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
        let cpu = last_cpu();
        let mut cmd = Command::new(self.workload.path());
        cmd.args(steps).current_dir("/");
        // SAFETY: write(2) and sched_setaffinity(2) only, on a descriptor opened before fork
        // and a CPU set on the stack: async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let mut f = &procs;
                f.write_all(b"0")?;
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                // Best effort: an affinity the kernel refuses leaves the workload unpinned.
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                Ok(())
            });
        }
        client.ns.run_in_as(&mut cmd, NOBODY_UID, NOBODY_GID);
        let out = run_captured(&mut cmd, WORKLOAD_TIMEOUT, || {})?;
        ensure!(
            out.status.success() && !out.timed_out,
            "the workload failed in {}: {}",
            client.label,
            out.describe()
        );
        let lines: Vec<Value> = out
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        ensure!(
            lines.len() == steps.len(),
            "the workload reported {} of {} steps: {}",
            lines.len(),
            steps.len(),
            out.describe()
        );
        if let Some(err) = lines.iter().find_map(|l| l["error"].as_str()) {
            bail!("workload in {}: {err}", client.label);
        }
        Ok(lines)
    }
}

fn wait_up(ns: &Netns, ifname: &str) -> Result<()> {
    let deadline = Instant::now() + LINK_UP_WAIT;
    loop {
        let state = ns.ip(&["-o", "link", "show", ifname])?;
        if state.contains("state UP") {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{ifname} not up: {state}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The highest CPU this process may run on.
fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get() - 1)
}

/// Runs `tool args` inside `ns` with `input` on stdin; returns how long it took.
pub fn run_tool_in(ns: &Netns, tool: &str, args: &[&str], input: &str) -> Result<Duration> {
    let path = find_tool(tool).with_context(|| {
        format!("`{tool}` is not installed (Debian packages iptables, nftables; scripts/bootstrap.sh installs them)")
    })?;
    let mut cmd = Command::new(&path);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    ns.run_in(&mut cmd);
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {tool}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .with_context(|| format!("writing {tool}'s input"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {tool}"))?;
    let took = start.elapsed();
    ensure!(
        out.status.success(),
        "`{tool} {}` in {} failed ({}): {}",
        args.join(" "),
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(took)
}

/// `binary` copied for uid nobody under its own file name (the name events show).
pub fn stage(binary: &Path) -> Result<StagedBinary> {
    let name = binary
        .file_name()
        .and_then(|n| n.to_str())
        .context("workload path has no file name")?;
    copy_for_nobody(binary, name)
}

/// The TCP sinks' accept queue (the remote namespace's net.core.somaxconn is raised to it).
const ACCEPT_BACKLOG: i32 = 65_535;
/// How many accepted connections a TCP sink holds before closing the oldest.
const HELD_CONNECTIONS: usize = 256;
const BIND_WAIT: Duration = Duration::from_secs(5);

/// A TCP listener in a namespace, served by a thread that lives in that namespace, so that
/// sockets the handler creates are made there too, never in the root namespace. Stops on
/// drop.
pub struct Server {
    fd: RawFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        backlog: i32,
        mut on_connection: impl FnMut(TcpStream) + Send + 'static,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = ns.handle();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(format!("server-{addr}"))
                .spawn(move || {
                    let listener = match handle
                        .enter_current_thread()
                        .and_then(|()| TcpListener::bind(addr).map_err(anyhow::Error::from))
                    {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = bound_tx.send(Err(e));
                            return;
                        }
                    };
                    // SAFETY: listen(2) again on a listening socket only changes its backlog.
                    unsafe { libc::listen(listener.as_raw_fd(), backlog) };
                    let _ = bound_tx.send(Ok(listener.as_raw_fd()));
                    while !stop.load(Ordering::SeqCst) {
                        // Blocking accept: shutdown() in Drop wakes it.
                        if let Ok((stream, _)) = listener.accept() {
                            on_connection(stream);
                        }
                    }
                })
                .context("spawning a server thread")?
        };
        let fd = bound_rx
            .recv_timeout(BIND_WAIT)
            .with_context(|| format!("the server on {addr} did not start"))?
            .with_context(|| format!("binding TCP {addr}"))?;
        Ok(Server {
            fd,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: the listener is open until its thread, joined next, returns.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The destinations' receivers. TCP: accept every connection and close it only much later
/// (by then the client has reset it, so closing sends nothing; closing at once could reset
/// the connection before the client's connect() returned), with a deep accept queue (were it
/// to fill while the thread waits for a CPU, SYNs would be dropped and connects would stall
/// for a second). UDP: a socket that is never read (once its buffer is full, datagrams are
/// dropped on arrival: the cheapest receiver, the same for every scenario).
struct Sinks {
    _tcp: Vec<Server>,
    _udp: Vec<UdpSocket>,
}

impl Sinks {
    fn start(ns: &Netns, addrs: &[SocketAddr]) -> Result<Self> {
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for &addr in addrs {
            let mut held = std::collections::VecDeque::with_capacity(HELD_CONNECTIONS);
            tcp.push(Server::start(ns, addr, ACCEPT_BACKLOG, move |stream| {
                if held.len() == HELD_CONNECTIONS {
                    held.pop_front();
                }
                held.push_back(stream);
            })?);
            udp.push(
                in_namespace(ns, move || UdpSocket::bind(addr))
                    .with_context(|| format!("binding UDP {addr}"))?,
            );
        }
        Ok(Sinks {
            _tcp: tcp,
            _udp: udp,
        })
    }
}

/// Closing with SO_LINGER 0 resets the connection: no FIN exchange, no TIME_WAIT.
pub fn set_linger_zero(fd: RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid option value for SO_LINGER on an open socket.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Runs `f` on a short-lived thread inside `ns` (sockets keep the namespace they were created
/// in).
pub fn in_namespace<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let handle = ns.handle();
    std::thread::spawn(move || -> Result<T> {
        handle.enter_current_thread()?;
        Ok(f()?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}
