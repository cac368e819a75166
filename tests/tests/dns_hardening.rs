//! Regression tests for the escapes an independent review found around the DNS proxy, on the
//! real kernel:
//!
//! 1. socket options that bind a socket to an interface (and so could put even a loopback
//!    destination, the proxy's included, onto the wire) are refused at setsockopt;
//! 2. an interface named per message (IP_PKTINFO / IPV6_PKTINFO ancillary data, or the scope
//!    of a link-local address) cannot take a loopback or redirected DNS send onto the wire;
//! 3. workloads sharing a network namespace cannot use each other's DNS proxy;
//! 4. once a `run` agent is gone, DNS is denied within seconds, so that whatever binds the
//!    dead proxy's port is never believed; a restarted agent serves DNS again;
//! 5. an allowed name that is an alias (CNAME) of a denied name is refused like that name.
//!
//! Each test asserts what a user would check: the errno the workload got, the frames that did
//! or did not cross the veth pair (an AF_PACKET capture on its remote end), the answers, what
//! the upstream server and the other agent saw, and the agents' JSON logs. Where the point is
//! that the kernel would otherwise allow something, a control run without the agent shows it
//! does. Traffic only goes to loopback or to addresses of the test's own namespaces.
#![expect(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failure is a test failure"
)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use egress_tests::agent::agent_bin;
use egress_tests::dnsmasq::{Dnsmasq, DnsmasqConfig};
use egress_tests::netns::{CLIENT_IF, Netns, REMOTE_IF};
use egress_tests::policy::PolicyYaml;
use egress_tests::probe::{DnsSample, ProbeResult, boot_time_ms, errno_name, rcode};
use egress_tests::process::RunOutput;
use egress_tests::server::{Listener, SETTLE, contains};
use egress_tests::testbed::{Testbed, run_probe_as_nobody, run_probe_in_cgroup};
use libc::{EINVAL, EPERM};
use nix::sys::signal::Signal;
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
/// The upstream resolver: dnsmasq on the remote end of the veth pair.
const UPSTREAM: &str = "198.18.0.2";
/// How long a positive check waits for bytes to arrive.
const WAIT: Duration = Duration::from_secs(3);
/// Deadline of one workload run inside a `run` agent's cgroup.
const WORKLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// The log message that gives the proxy's port.
const PROXY_LISTENING: &str = "DNS proxy listening on 127.0.0.1 and ::1";

fn testbed() -> Option<Testbed> {
    Testbed::for_test(Path::new(PROBE))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP literal")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

/// dnsmasq on the upstream address, serving what `config` holds.
fn upstream(tb: &Testbed, config: DnsmasqConfig) -> Dnsmasq {
    config
        .listen(ip(UPSTREAM))
        .start(tb.remote())
        .expect("starting the upstream dnsmasq")
}

/// A policy whose DNS goes to the test's dnsmasq.
fn policy() -> PolicyYaml {
    PolicyYaml::new().allowed_resolvers(&[UPSTREAM])
}

/// Runs `egress-agent exec` around the probe in the client namespace; checks it exited 0.
fn finished(tb: &Testbed, policy: &PolicyYaml, ops: &[String]) -> RunOutput {
    finished_with(tb, policy, &[], ops)
}

/// As [`finished`], with extra agent arguments.
fn finished_with(
    tb: &Testbed,
    policy: &PolicyYaml,
    agent_args: &[&str],
    ops: &[String],
) -> RunOutput {
    let mut run = tb.agent(policy).expect("agent command").json_log();
    for a in agent_args {
        run = run.agent_arg(a);
    }
    let out = run.args(ops).run_in(tb.client()).expect("agent run");
    out.assert_exit(0);
    out
}

/// TCP listeners in the remote namespace on `addrs`, each address added to the remote end of
/// the veth pair first unless it is the veth's own.
fn remote_listeners<const N: usize>(tb: &Testbed, addrs: [&str; N]) -> [Listener; N] {
    let addrs = addrs.map(sa);
    let new: BTreeSet<IpAddr> = addrs
        .iter()
        .map(SocketAddr::ip)
        .filter(|a| *a != ip(UPSTREAM))
        .collect();
    for a in new {
        tb.topo.add_remote_addr(a).expect("remote address");
    }
    addrs.map(|a| tb.listen_tcp(a).expect("listener"))
}

// --- Logs -----------------------------------------------------------------------------------

/// JSON log lines of `text`.
fn log_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// `egress_blocked` lines with `reason`.
fn blocked(text: &str, reason: &str) -> Vec<Value> {
    log_lines(text)
        .into_iter()
        .filter(|v| v["event"] == "egress_blocked" && v["reason"] == reason)
        .collect()
}

/// The exact count of kernel verdicts with `reason` from the agent's `verdict count` lines
/// (logged when it stops; unlike the event log, never collapsed).
fn verdict_count(text: &str, reason: &str) -> u64 {
    log_lines(text)
        .iter()
        .filter(|v| v["message"] == "verdict count" && v["reason"] == reason)
        .filter_map(|v| v["count"].as_u64())
        .sum()
}

/// The proxy's refusal lines for `name` (case-insensitive): `egress_blocked` from hook
/// `dns_proxy` for a name the policy refuses, `dns_refused` for other refusals.
fn refused(text: &str, name: &str) -> Vec<Value> {
    log_lines(text)
        .into_iter()
        .filter(|v| {
            let by_policy = v["event"] == "egress_blocked" && v["hook"] == "dns_proxy";
            let field = if by_policy { "dns.name" } else { "name" };
            (by_policy || v["event"] == "dns_refused")
                && v[field]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .collect()
}

/// Panics unless `op` got a reply with `rcode` and exactly the addresses `addrs`.
#[track_caller]
fn assert_answer(out: &RunOutput, op: &str, rcode: u8, addrs: &[&str]) {
    let r = out.assert_ok(op);
    let want: Vec<IpAddr> = addrs.iter().map(|a| ip(a)).collect();
    assert_eq!(
        (r.rcode, r.addrs.as_deref()),
        (Some(rcode), Some(&want[..])),
        "`{op}`: (rcode, addresses)\n{}",
        out.describe()
    );
}

// --- Frames on the wire ---------------------------------------------------------------------

/// Every frame that reaches the remote end of the veth pair while the capture runs: an
/// AF_PACKET socket (root, inside the remote namespace) bound to that device. Stops on drop.
struct Capture {
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Bound of one capture, whatever the test does.
const CAPTURE_MAX: Duration = Duration::from_secs(120);

impl Capture {
    fn start(ns: &Netns, ifname: &'static str) -> Self {
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
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("capture on {ifname}: {e}"),
            Err(_) => panic!("capture on {ifname} did not start"),
        }
        Self {
            frames,
            stop,
            thread: Some(thread),
        }
    }

    /// The frames so far (after letting stragglers land).
    fn settled(&self) -> Vec<Vec<u8>> {
        std::thread::sleep(SETTLE);
        self.frames
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits (bounded) until a frame carries `payload`; whether one did.
    fn wait_for(&self, payload: &[u8]) -> bool {
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
fn describe_frame(f: &[u8]) -> String {
    let udp_port = |at: usize| {
        f.get(at..at + 2)
            .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]))
    };
    match f.get(12..14) {
        Some([0x86, 0xdd]) if f.len() >= 58 => {
            let addr = |at: usize| {
                IpAddr::from(<[u8; 16]>::try_from(&f[at..at + 16]).unwrap()).to_string()
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
            let addr =
                |at: usize| IpAddr::from(<[u8; 4]>::try_from(&f[at..at + 4]).unwrap()).to_string();
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

/// The link-local address of `ifname` in `ns`, once duplicate address detection is done
/// (a tentative address can neither send nor receive).
fn link_local(ns: &Netns, ifname: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = ns
            .ip(&["-6", "-o", "addr", "show", "dev", ifname, "scope", "link"])
            .expect("ip addr show");
        if !text.contains("tentative")
            && let Some(addr) = text
                .split_whitespace()
                .skip_while(|w| *w != "inet6")
                .nth(1)
                .and_then(|a| a.split('/').next())
        {
            return addr.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no usable link-local address on {ifname}: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// --- `run` agents -----------------------------------------------------------------------------

/// An `egress-agent run` in the background, its JSON log in a file. Killed (by pid) on drop.
struct RunAgent {
    child: Child,
    log: PathBuf,
}

impl RunAgent {
    fn start(ns: &Netns, policy: &Path, cgroup: &Path, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(agent_bin().unwrap());
        cmd.args(["--log-format", "json", "run", "--policy"])
            .arg(policy)
            .arg("--cgroup")
            .arg(cgroup)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        ns.run_in(&mut cmd);
        let child = cmd.spawn().unwrap();
        let mut agent = RunAgent { child, log };
        agent.wait_for("\"enforcing\"");
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) for a log line containing `needle`.
    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "agent exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent did not log {needle:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port its DNS proxy listens on, from its log; in the proxies' range.
    fn proxy_port(&self) -> u16 {
        let port = log_lines(&self.log())
            .iter()
            .find(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(PROXY_LISTENING))
            })
            .and_then(|v| v["port"].as_u64())
            .unwrap_or_else(|| panic!("no proxy port in the log:\n{}", self.log()));
        assert!(
            (700..=799).contains(&port),
            "proxy port {port} outside 700..=799"
        );
        u16::try_from(port).unwrap()
    }

    /// Sends `sig` by pid and waits (bounded) for the agent to exit.
    fn signal(&mut self, sig: Signal) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            sig,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RunAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the probe with `ops` as nobody inside `cgroup` (a `run` agent's) in the client
/// namespace; bounded.
fn in_cgroup(tb: &Testbed, cgroup: &Path, ops: &[String]) -> RunOutput {
    let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
    let out = run_probe_in_cgroup(tb.client(), cgroup, tb.probe.path(), &ops, WORKLOAD_TIMEOUT)
        .expect("workload run");
    assert!(!out.timed_out, "workload timed out\n{}", out.describe());
    out
}

/// Waits (bounded) until `path` exists.
fn wait_file(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

// --- 1. Socket options that bind to an interface ----------------------------------------------

/// SO_BINDTODEVICE, SO_BINDTOIFINDEX, IP_UNICAST_IF, IPV6_UNICAST_IF, IPV6_2292PKTOPTIONS and
/// the sticky IPV6_PKTINFO would send even a loopback destination (the proxy's included) out
/// of the named device: from the workload each fails with EPERM and is logged as
/// `socket_option_refused` with its level and name. The control run shows the kernel accepts
/// every one of them from an unprivileged process. Sends without such options still work.
#[test]
fn socket_options_that_bind_to_an_interface_are_refused() {
    let Some(tb) = testbed() else { return };
    let remote = tb.listen_udp(sa("198.18.0.2:5300")).expect("listener");
    // (op, level, name)
    let options = [
        ("setsockopt udp4 bindtodevice veth-c", 1, 25),
        ("setsockopt tcp6 bindtodevice veth-c", 1, 25),
        ("setsockopt udp4 bindtoifindex veth-c", 1, 62),
        ("setsockopt udp4 ip_unicast_if veth-c", 0, 50),
        ("setsockopt udp6 ipv6_unicast_if veth-c", 41, 76),
        ("setsockopt udp6 ipv6_2292pktoptions veth-c", 41, 6),
        ("setsockopt udp6 ipv6_pktinfo veth-c", 41, 50),
    ];
    let ops: Vec<String> = options.iter().map(|(op, ..)| (*op).to_owned()).collect();

    // Control: the kernel itself lets uid nobody set each of them.
    let control = tb
        .run_probe(&ops.iter().map(String::as_str).collect::<Vec<_>>())
        .expect("probe run");
    for op in &ops {
        control.assert_ok(op);
    }

    let plain = "sendto udp4 198.18.0.2 5300 still-works".to_owned();
    let policy = policy().allow_cidr("198.18.0.2/32", &[5300], &["udp"]);
    let out = finished(&tb, &policy, &[ops.clone(), vec![plain.clone()]].concat());
    for op in &ops {
        out.assert_errno(op, EPERM);
    }
    out.assert_ok(&plain);
    assert_eq!(
        String::from_utf8_lossy(&remote.wait_for(b"still-works", WAIT)),
        "still-works"
    );
    let lines: Vec<Value> = blocked(&out.stderr, "socket_option_refused")
        .into_iter()
        .filter(|v| v["hook"] == "setsockopt")
        .collect();
    for (op, level, name) in options {
        assert!(
            lines
                .iter()
                .any(|v| v["option.level"] == level && v["option.name"] == name),
            "no socket_option_refused line for `{op}` (level {level}, name {name}): {lines:#?}\n{}",
            out.describe()
        );
    }
    assert_eq!(
        verdict_count(&out.stderr, "socket_option_refused"),
        options.len() as u64,
        "{}",
        out.describe()
    );
}

// --- 2. An interface named per message --------------------------------------------------------

/// Ancillary data naming the client's veth (IP_PKTINFO / IPV6_PKTINFO) on a send to loopback,
/// or to port 53 (which the kernel redirects to the proxy on loopback), and the scope of a
/// link-local address on a DNS send, would take the datagram out of that device. With the
/// agent each such send fails with EINVAL and no frame carrying it crosses the veth pair, on
/// unconnected sockets and on sockets connected to loopback alike; a connected socket still
/// sends to an allowed remote destination with ancillary data (IP_TOS), and loopback and DNS
/// without an interface still work.
///
/// The client namespace gets a default route through a gateway, the remote end of the veth
/// pair (the only place it leads), as a real host has one: the control run without the agent
/// shows the loopback datagrams then do leave on the wire, addressed to the gateway's MAC. (A
/// `default dev veth-c` route without a gateway is not enough for that: the kernel accepts
/// the send but asks ARP/NDP for 127.0.0.1 or ::1 itself, which nobody answers, so only the
/// neighbour solicitations leave.)
#[test]
fn an_interface_named_per_message_cannot_take_loopback_traffic_onto_the_wire() {
    let Some(tb) = testbed() else { return };
    let client = tb.client();
    client
        .ip(&["route", "add", "default", "via", UPSTREAM, "dev", CLIENT_IF])
        .expect("default route");
    client
        .ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:e9::2",
            "dev",
            CLIENT_IF,
        ])
        .expect("default route");
    link_local(client, CLIENT_IF);
    let remote_ll = link_local(tb.remote(), REMOTE_IF);
    let lo4 = Listener::udp(client, sa("127.0.0.1:0")).expect("loopback listener");
    let lo6 = Listener::udp(client, sa("[::1]:0")).expect("loopback listener");
    let (p4, p6) = (lo4.port(), lo6.port());
    let remote = tb.listen_udp(sa("198.18.0.2:5301")).expect("listener");
    let _dns = upstream(
        &tb,
        Dnsmasq::config().record("api.example.test", ip("198.18.0.10")),
    );

    let lo_v4 = format!("cmsg-sendto udp4 127.0.0.1 {p4} pktinfo=veth-c leak-lo4");
    let lo_v6 = format!("cmsg-sendto udp6 ::1 {p6} pktinfo=veth-c leak-lo6");
    let conn_v4 = format!("cmsg-send udp4 127.0.0.1 {p4} pktinfo=veth-c leak-conn4");
    let conn_v6 = format!("cmsg-send udp6 ::1 {p6} pktinfo=veth-c leak-conn6");
    let link_dns = format!("sendto udp6 {remote_ll}%veth-c 53 leak-ll-dns");
    let leaks = [&lo_v4, &lo_v6, &conn_v4, &conn_v6, &link_dns].map(String::clone);

    // Control: the kernel accepts each, and each leaves through the veth.
    let control_capture = Capture::start(tb.remote(), REMOTE_IF);
    let control = tb
        .run_probe(&leaks.iter().map(String::as_str).collect::<Vec<_>>())
        .expect("probe run");
    for op in &leaks {
        control.assert_ok(op);
        let payload = op.rsplit(' ').next().unwrap();
        assert!(
            control_capture.wait_for(payload.as_bytes()),
            "control: no frame with {payload:?} left through the veth, so this test would prove \
             nothing\n{}",
            control.describe()
        );
    }
    drop(control_capture);

    let dns_v4 = "cmsg-sendto udp4 198.18.0.2 53 pktinfo=veth-c leak-dns4".to_owned();
    let stub_v4 = "cmsg-sendto udp4 127.0.0.53 53 pktinfo=veth-c leak-stub4".to_owned();
    let dns_v6 = "cmsg-sendto udp6 fd00:e9::2 53 pktinfo=veth-c leak-dns6".to_owned();
    // By default: IPv4 gets a loopback source the kernel will not route off loopback (EINVAL);
    // IPv6 has no such rule, so the hooks refuse what they can see (EPERM): a link-local DNS
    // server given without connecting, and ancillary data on a socket connected to loopback.
    // An unconnected IPv6 send to ::1 naming an interface is left to `--packet-check always`.
    let refused_ops: Vec<(String, i32)> = vec![
        (lo_v4.clone(), EINVAL),
        (conn_v4.clone(), EINVAL),
        (dns_v4.clone(), EINVAL),
        (stub_v4.clone(), EINVAL),
        (conn_v6.clone(), EPERM),
        (link_dns.clone(), EPERM),
    ];
    let tos_connected = "cmsg-send udp4 198.18.0.2 5301 tos=16 tos-connected".to_owned();
    let tos_unconnected = "cmsg-sendto udp4 198.18.0.2 5301 tos=16 tos-unconnected".to_owned();
    let lo_named = format!("cmsg-sendto udp4 127.0.0.1 {p4} pktinfo=lo via-lo");
    let plain_lo = format!("sendto udp4 127.0.0.1 {p4} plain-lo4");
    let plain_lo6 = format!("sendto udp6 ::1 {p6} plain-lo6");
    let resolve = "resolve udp4 198.18.0.2 api.example.test A".to_owned();
    let working = [
        tos_connected.clone(),
        tos_unconnected.clone(),
        lo_named.clone(),
        plain_lo.clone(),
        plain_lo6.clone(),
        resolve.clone(),
    ];
    let policy = policy()
        .allow_cidr("198.18.0.2/32", &[5301], &["udp"])
        .allow_wildcard("example.test", &[8443], &["tcp"]);
    let capture = Capture::start(tb.remote(), REMOTE_IF);
    let ops: Vec<String> = refused_ops.iter().map(|(op, _)| op.clone()).collect();
    let out = finished(&tb, &policy, &[ops, working.to_vec()].concat());
    // The capture works: the allowed remote datagrams are on it.
    for payload in ["tos-connected", "tos-unconnected"] {
        assert!(
            capture.wait_for(payload.as_bytes()),
            "no frame with {payload:?}: the capture sees nothing?\n{}",
            out.describe()
        );
    }
    let frames = capture.settled();
    // Every refused send, judged on both counts, so one failure lists them all.
    let mut escapes = Vec::new();
    for (op, errno) in &refused_ops {
        let r = out.result(op).expect("ran");
        if !r.failed_with(*errno) {
            escapes.push(format!(
                "`{op}`: {} instead of {}",
                if r.ok {
                    "success".to_owned()
                } else {
                    r.error.clone().unwrap_or_default()
                },
                errno_name(*errno)
            ));
        }
        let payload = op.rsplit(' ').next().unwrap();
        let seen = frames
            .iter()
            .filter(|f| contains(f, payload.as_bytes()))
            .count();
        if seen > 0 {
            let what: Vec<String> = frames
                .iter()
                .filter(|f| contains(f, payload.as_bytes()))
                .map(|f| describe_frame(f))
                .collect();
            escapes.push(format!(
                "`{op}`: {seen} frame(s) with {payload:?} crossed the veth: {}",
                what.join("; ")
            ));
        }
    }
    assert!(
        escapes.is_empty(),
        "sends naming an interface escaped:\n  {}\n{}",
        escapes.join("\n  "),
        out.describe()
    );
    for op in [
        &tos_connected,
        &tos_unconnected,
        &lo_named,
        &plain_lo,
        &plain_lo6,
    ] {
        out.assert_ok(op);
    }
    assert_answer(&out, &resolve, rcode::NOERROR, &["198.18.0.10"]);
    assert_eq!(
        String::from_utf8_lossy(&remote.wait_for(b"tos-unconnected", WAIT)),
        "tos-connectedtos-unconnected",
        "{}",
        out.describe()
    );
    std::thread::sleep(SETTLE);
    assert_eq!(
        (lo4.messages(), lo6.messages()),
        (
            vec![b"via-lo".to_vec(), b"plain-lo4".to_vec()],
            vec![b"plain-lo6".to_vec()]
        ),
        "what reached the loopback listeners\n{}",
        out.describe()
    );
    for reason in ["loopback_ancillary_refused", "dns_link_local_refused"] {
        assert_eq!(
            verdict_count(&out.stderr, reason),
            1,
            "{reason}\n{}",
            out.stderr
        );
    }

    // With the per-packet check, the IPv6 sends naming an interface are dropped too.
    let v6_ops = vec![lo_v6.clone(), dns_v6.clone(), plain_lo6.clone()];
    let capture = Capture::start(tb.remote(), REMOTE_IF);
    let out = finished_with(&tb, &policy, &["--packet-check", "always"], &v6_ops);
    out.assert_errno(&lo_v6, EPERM);
    out.assert_errno(&dns_v6, EPERM);
    out.assert_ok(&plain_lo6);
    let frames = capture.settled();
    for payload in ["leak-lo6", "leak-dns6"] {
        assert!(
            !frames.iter().any(|f| contains(f, payload.as_bytes())),
            "a frame with {payload:?} crossed the veth\n{}",
            out.describe()
        );
    }
    assert_eq!(
        verdict_count(&out.stderr, "loopback_off_device_dropped"),
        2,
        "{}",
        out.stderr
    );
}

// --- 3. Another workload's proxy --------------------------------------------------------------

/// Two `run` agents protect two cgroups in one network namespace. A workload reaches its own
/// proxy on its port directly (UDP, TCP, IPv6) and gets answers; every way to the other
/// proxy's port (UDP sendto and connect, TCP, ::1, the mapped form, a plain connect or
/// datagram) fails with EPERM, reason `dns_proxy_of_another_workload`, and nothing reaches
/// the other proxy: it logs nothing about those names and the upstream server is not asked.
#[test]
fn a_workload_cannot_use_another_workloads_dns_proxy() {
    let Some(tb) = testbed() else { return };
    let [la, lb] = remote_listeners(&tb, ["198.18.0.10:8443", "198.18.0.11:8443"]);
    let dns = upstream(
        &tb,
        Dnsmasq::config()
            .record("a.example.test", ip("198.18.0.10"))
            .record("b.example.test", ip("198.18.0.11")),
    );
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str, wildcard: &str| {
        let cg = tb.cgroups.child(name).unwrap();
        let path = tb
            .write_policy(
                &policy()
                    .name(&format!("proxy-{name}"))
                    .allow_wildcard(wildcard, &[8443], &["tcp"])
                    .render(),
            )
            .unwrap();
        let agent = RunAgent::start(tb.client(), &path, &cg, dir.path().join(name));
        (cg, agent)
    };
    let (cg_a, mut agent_a) = start("a", "a.example.test");
    let (cg_b, mut agent_b) = start("b", "b.example.test");
    let (pa, pb) = (agent_a.proxy_port(), agent_b.proxy_port());
    assert_ne!(pa, pb);

    let own = |me: &str, port: u16| {
        vec![
            format!("resolve udp4-sendto 127.0.0.1 x.{me}.example.test A port {port}"),
            format!("resolve tcp4 127.0.0.1 x.{me}.example.test A port {port}"),
            format!("resolve udp6 ::1 x.{me}.example.test A port {port}"),
            format!("resolve udp4 198.18.0.2 x.{me}.example.test A then-connect tcp4 8443 {me}"),
        ]
    };
    // Names the other proxy would forward (allowed by its policy) or refuse (logging them).
    let foreign = |peer: &str, port: u16| {
        vec![
            format!("resolve udp4-sendto 127.0.0.1 stolen.{peer}.example.test A port {port}"),
            format!("resolve udp4 127.0.0.1 stolen.{peer}.example.test A port {port}"),
            format!("resolve tcp4 127.0.0.1 stolen.{peer}.example.test A port {port}"),
            format!("resolve udp6 ::1 stolen.{peer}.example.test A port {port}"),
            format!("resolve tcp6 ::ffff:127.0.0.1 stolen.{peer}.example.test A port {port}"),
            format!("resolve udp4-sendto 127.0.0.1 stolen-{peer}.evil.test A port {port}"),
            format!("connect tcp4 127.0.0.1 {port}"),
            format!("sendto udp4 127.0.0.1 {port} raw-to-{peer}"),
        ]
    };
    let (own_a, foreign_a) = (own("a", pa), foreign("b", pb));
    let (own_b, foreign_b) = (own("b", pb), foreign("a", pa));
    let out_a = in_cgroup(&tb, &cg_a, &[own_a.clone(), foreign_a.clone()].concat());
    let out_b = in_cgroup(&tb, &cg_b, &[own_b.clone(), foreign_b.clone()].concat());
    assert!(agent_a.signal(Signal::SIGTERM).success());
    assert!(agent_b.signal(Signal::SIGTERM).success());
    let (log_a, log_b) = (agent_a.log(), agent_b.log());

    for (out, own, foreign, addr, port, log, other_log, peer) in [
        (
            &out_a,
            &own_a,
            &foreign_a,
            "198.18.0.10",
            pb,
            &log_a,
            &log_b,
            "b",
        ),
        (
            &out_b,
            &own_b,
            &foreign_b,
            "198.18.0.11",
            pa,
            &log_b,
            &log_a,
            "a",
        ),
    ] {
        for op in own {
            assert_answer(out, op, rcode::NOERROR, &[addr]);
        }
        for op in foreign {
            out.assert_errno(op, EPERM);
        }
        // The two connected-UDP resolves (`udp4`, `udp6`) are refused at their connect, which
        // sends nothing: counted as udp_connect_refused with this refusal as the cause.
        assert_eq!(
            verdict_count(log, "dns_proxy_of_another_workload"),
            foreign.len() as u64 - 2,
            "{log}"
        );
        assert_eq!(verdict_count(log, "udp_connect_refused"), 2, "{log}");
        let lines = blocked(log, "dns_proxy_of_another_workload");
        let no_data: Vec<Value> = log_lines(log)
            .into_iter()
            .filter(|v| {
                v["event"] == "egress_refused_no_data"
                    && v["cause"] == "dns_proxy_of_another_workload"
            })
            .collect();
        for (dst, lines) in [
            ("127.0.0.1", &lines),
            ("127.0.0.1", &no_data),
            ("::1", &no_data),
        ] {
            assert!(
                lines
                    .iter()
                    .any(|v| v["dst.ip"] == dst && v["dst.port"] == port),
                "no dns_proxy_of_another_workload line for {dst}:{port}: {lines:#?}\n{log}"
            );
        }
        let stolen = format!("stolen.{peer}.example.test");
        let evil = format!("stolen-{peer}.evil.test");
        assert!(
            !other_log.contains(&stolen) && !other_log.contains(&evil),
            "the other proxy saw {stolen} or {evil}:\n{other_log}"
        );
        assert!(refused(other_log, &evil).is_empty());
        assert!(
            dns.queries_for(&stolen).is_empty(),
            "the upstream server was asked for {stolen}: {:?}",
            dns.queried()
        );
    }
    assert_eq!(
        String::from_utf8_lossy(&la.wait_for(b"a", WAIT)),
        "a",
        "{}",
        out_a.describe()
    );
    assert_eq!(
        String::from_utf8_lossy(&lb.wait_for(b"b", WAIT)),
        "b",
        "{}",
        out_b.describe()
    );
}

// --- 4. Liveness ------------------------------------------------------------------------------

/// How long the workload queries before the agent is stopped, and after.
const BEFORE_STOP: Duration = Duration::from_secs(1);
const AFTER_STOP: Duration = Duration::from_secs(8);
/// The squatter's answer: an address no real answer gives.
const SQUATTER_ANSWER: &str = "198.18.0.66";

/// What one stop of an agent under DNS load showed.
struct Stopped {
    /// CLOCK_BOOTTIME (ms) at the signal.
    at_ms: u64,
    workload: RunOutput,
    squatter: RunOutput,
}

impl Stopped {
    fn samples(&self) -> &[DnsSample] {
        let r = self
            .workload
            .results
            .iter()
            .find(|r| r.op.starts_with("dnsloop"));
        r.and_then(|r| r.samples.as_deref())
            .unwrap_or_else(|| panic!("no dnsloop samples\n{}", self.workload.describe()))
    }

    fn squatted(&self) -> &[DnsSample] {
        let r: Option<&ProbeResult> = self.squatter.results.first();
        match r {
            Some(r) if r.ok => r.samples.as_deref().unwrap_or_default(),
            _ => panic!("the squatter did not run\n{}", self.squatter.describe()),
        }
    }

    /// The samples relative to the signal, runs of the same outcome on one line.
    fn describe(&self) -> String {
        let rel = |s: &DnsSample| s.at_ms as i64 - self.at_ms as i64;
        let outcome = |s: &DnsSample| {
            if s.ok {
                format!("rcode {:?} {:?}", s.rcode, s.addrs)
            } else {
                format!("errno {:?}", s.errno.map(errno_name))
            }
        };
        let mut runs: Vec<(i64, i64, usize, String)> = Vec::new();
        for s in self.samples() {
            match runs.last_mut() {
                Some(run) if run.3 == outcome(s) => {
                    run.1 = rel(s);
                    run.2 += 1;
                }
                _ => runs.push((rel(s), rel(s), 1, outcome(s))),
            }
        }
        let squatted: Vec<i64> = self.squatted().iter().map(rel).collect();
        format!(
            "signal at {} ms (CLOCK_BOOTTIME); the workload's queries, sent at:\n  {}\nthe \
             squatter answered {} queries, at {:?} ms",
            self.at_ms,
            runs.iter()
                .map(|(from, to, n, what)| format!("{from:+} .. {to:+} ms ({n}x): {what}"))
                .collect::<Vec<_>>()
                .join("\n  "),
            squatted.len(),
            squatted
        )
    }

    /// The first query refused with EPERM.
    fn first_eperm(&self) -> &DnsSample {
        self.samples()
            .iter()
            .find(|s| s.errno == Some(EPERM))
            .unwrap_or_else(|| panic!("DNS was never denied\n{}", self.describe()))
    }

    /// Queries sent well before the signal were answered by the real proxy; the first
    /// refusal came at most `limit` after the signal and every query after it was refused
    /// too; no answer of the squatter was received after that.
    #[track_caller]
    fn assert_denied_within(&self, limit: Duration, agent_log: &str) {
        let limit_ms = u64::try_from(limit.as_millis()).unwrap();
        let samples = self.samples();
        let before: Vec<&DnsSample> = samples
            .iter()
            .filter(|s| s.at_ms + 500 < self.at_ms)
            .collect();
        assert!(
            !before.is_empty()
                && before.iter().all(|s| s.ok
                    && s.rcode == Some(rcode::NOERROR)
                    && s.addrs == [ip("198.18.0.10")]),
            "DNS did not work before the signal\n{}\n{agent_log}",
            self.describe()
        );
        let first = self.first_eperm();
        assert!(
            first.at_ms <= self.at_ms + limit_ms,
            "the first refusal came {} ms after the signal, not within {limit_ms} ms\n{}",
            first.at_ms.saturating_sub(self.at_ms),
            self.describe()
        );
        let after: Vec<&DnsSample> = samples.iter().filter(|s| s.at_ms >= first.at_ms).collect();
        assert!(
            after.len() > 10 && after.iter().all(|s| s.errno == Some(EPERM)),
            "once refused, every later query must be refused\n{}",
            self.describe()
        );
        assert!(
            self.squatted().iter().all(|s| s.at_ms < first.at_ms),
            "the squatter got queries after DNS was denied\n{}",
            self.describe()
        );
    }

    fn eperms(&self) -> u64 {
        self.samples()
            .iter()
            .filter(|s| s.errno == Some(EPERM))
            .count() as u64
    }
}

/// How the workload of [`stop_under_dns_load`] sends its queries.
#[derive(Clone, Copy, Debug)]
enum Load {
    /// A fresh unconnected socket per query, sendto 198.18.0.2:53.
    FreshSockets,
    /// One UDP socket, connected to 198.18.0.2:53 (so to the proxy) once, then send per query.
    OneConnectedSocket,
}

/// Stops `agent` with `sig` while a workload in `cgroup` sends a DNS query every 100 ms;
/// once the agent is gone, a squatter (uid nobody, outside the cgroup) binds the dead proxy's
/// `port` on 127.0.0.1 and answers every query with [`SQUATTER_ANSWER`].
fn stop_under_dns_load(
    tb: &Testbed,
    cgroup: &Path,
    agent: &mut RunAgent,
    sig: Signal,
    load: Load,
    port: u16,
    sync: &Path,
) -> Stopped {
    let tag = format!("{sig:?}-{load:?}");
    let (proto, mode) = match load {
        Load::FreshSockets => ("udp4-sendto", ""),
        Load::OneConnectedSocket => ("udp4", " one-socket"),
    };
    let started = sync.join(format!("{tag}-started"));
    let squatting = sync.join(format!("{tag}-squatting"));
    let total = BEFORE_STOP + AFTER_STOP;
    let ops = vec![
        format!("touch {}", started.display()),
        format!(
            "dnsloop {proto} 198.18.0.2 api.example.test 100 {}{mode}",
            total.as_millis()
        ),
    ];
    let squat = format!(
        "dnsserve udp4 127.0.0.1 {port} {SQUATTER_ANSWER} {} {}",
        AFTER_STOP.as_millis(),
        squatting.display()
    );
    std::thread::scope(|s| {
        let load = s.spawn(|| in_cgroup(tb, cgroup, &ops));
        assert!(
            wait_file(&started, Duration::from_secs(15)),
            "the workload did not start"
        );
        std::thread::sleep(BEFORE_STOP);
        let at_ms = boot_time_ms();
        let status = agent.signal(sig);
        if sig == Signal::SIGTERM {
            assert!(status.success(), "{status}\n{}", agent.log());
        }
        let squatter =
            s.spawn(|| run_probe_as_nobody(tb.client(), tb.probe.path(), &[&squat]).unwrap());
        let bound = wait_file(&squatting, Duration::from_secs(5));
        let squatter = squatter.join().expect("squatter thread");
        assert!(bound, "the squatter did not bind\n{}", squatter.describe());
        Stopped {
            at_ms,
            workload: load.join().expect("workload thread"),
            squatter,
        }
    })
}

/// What the liveness tests share: the upstream server answering `api.example.test` with
/// 198.18.0.10, a cgroup for `run` agents, a policy allowing `*.example.test`, a place for the
/// agents' logs and a directory to sync with the workloads.
struct LivenessBed {
    _dns: Dnsmasq,
    cgroup: PathBuf,
    dir: tempfile::TempDir,
    sync: tempfile::TempDir,
    policy: PathBuf,
}

impl LivenessBed {
    fn new(tb: &Testbed, name: &str) -> Self {
        // The proxies' ports are privileged: with the default only root could squat one. Many
        // container namespaces let anyone bind them, and so does this test's, so that an
        // unprivileged squatter can try.
        tb.client()
            .sysctl("net.ipv4.ip_unprivileged_port_start", "0")
            .unwrap();
        let policy = tb
            .write_policy(
                &policy()
                    .name(name)
                    .allow_wildcard("example.test", &[8443], &["tcp"])
                    .render(),
            )
            .unwrap();
        Self {
            _dns: upstream(
                tb,
                Dnsmasq::config().record("api.example.test", ip("198.18.0.10")),
            ),
            cgroup: tb.cgroups.child(name).unwrap(),
            dir: tempfile::tempdir().unwrap(),
            sync: tb.sync_dir().expect("sync dir"),
            policy,
        }
    }
}

/// A `run` agent serves a workload that queries DNS every 100 ms. After SIGTERM the workload's
/// queries get EPERM within 1 s; after SIGKILL within 5 s (plus 1 s of slack for the
/// sampling); in both cases a process of uid nobody outside the cgroup that binds the dead
/// proxy's port and answers is never believed once DNS is denied (after SIGTERM it never
/// even gets a query). A restarted agent adopts the pinned state and serves DNS again, and
/// counted every refusal as `dns_proxy_down`.
#[test]
fn dns_is_denied_once_the_proxys_agent_is_gone_and_a_squatter_is_never_believed() {
    let Some(tb) = testbed() else { return };
    let [api] = remote_listeners(&tb, ["198.18.0.10:8443"]);
    let bed = LivenessBed::new(&tb, "alive");
    let (cg, dir, sync, path) = (&bed.cgroup, &bed.dir, &bed.sync, &bed.policy);
    let serves = |n: usize| {
        let op =
            format!("resolve udp4 198.18.0.2 api.example.test A then-connect tcp4 8443 served-{n}");
        let out = in_cgroup(&tb, cg, std::slice::from_ref(&op));
        assert_answer(&out, &op, rcode::NOERROR, &["198.18.0.10"]);
    };

    let mut first = RunAgent::start(tb.client(), path, cg, dir.path().join("first"));
    let port = first.proxy_port();
    serves(1);
    let term = stop_under_dns_load(
        &tb,
        cg,
        &mut first,
        Signal::SIGTERM,
        Load::FreshSockets,
        port,
        sync.path(),
    );
    term.assert_denied_within(Duration::from_secs(1), &first.log());
    eprintln!(
        "after SIGTERM: first refusal {} ms after the signal",
        term.first_eperm().at_ms.saturating_sub(term.at_ms)
    );
    assert!(
        term.squatted().is_empty(),
        "after SIGTERM the squatter must never get a query\n{}",
        term.describe()
    );

    let mut second = RunAgent::start(tb.client(), path, cg, dir.path().join("second"));
    assert!(
        second.log().contains("adopted pinned enforcement"),
        "{}",
        second.log()
    );
    let port = second.proxy_port();
    serves(2);
    let kill = stop_under_dns_load(
        &tb,
        cg,
        &mut second,
        Signal::SIGKILL,
        Load::FreshSockets,
        port,
        sync.path(),
    );
    kill.assert_denied_within(Duration::from_secs(6), &second.log());
    eprintln!(
        "after SIGKILL: first refusal {} ms after the signal; {} answer(s) of the squatter \
         believed before it",
        kill.first_eperm().at_ms.saturating_sub(kill.at_ms),
        kill.samples()
            .iter()
            .filter(|s| s.addrs.contains(&ip(SQUATTER_ANSWER)))
            .count()
    );

    let mut third = RunAgent::start(tb.client(), path, cg, dir.path().join("third"));
    serves(3);
    assert!(third.signal(Signal::SIGTERM).success());
    let log = third.log();
    assert_eq!(
        verdict_count(&log, "dns_proxy_down"),
        term.eperms() + kill.eperms(),
        "every refused query is counted as dns_proxy_down\n{log}"
    );
    std::thread::sleep(SETTLE);
    let served: Vec<Vec<u8>> = api.messages();
    assert_eq!(
        served,
        [
            b"served-1".to_vec(),
            b"served-2".to_vec(),
            b"served-3".to_vec()
        ],
        "connections to the answered address"
    );
}

// --- 5. An alias of a denied name -------------------------------------------------------------

/// `alias.example.test` is allowed by `*.example.test`, but the upstream answer makes it a
/// CNAME of `x.evil.test`, which `*.evil.test` denies: the workload gets NXDOMAIN over UDP and
/// TCP, the target's address stays closed, and the refusal is logged with result `denied`.
/// An alias of an allowed name still resolves and connects.
#[test]
fn an_alias_of_a_denied_name_is_refused_like_that_name() {
    let Some(tb) = testbed() else { return };
    let [evil, good] = remote_listeners(&tb, ["198.18.0.30:8443", "198.18.0.31:8443"]);
    let _dns = upstream(
        &tb,
        Dnsmasq::config()
            .host("x.evil.test", ip("198.18.0.30"))
            .cname("alias.example.test", "x.evil.test")
            .host("y.example.test", ip("198.18.0.31"))
            .cname("fine.example.test", "y.example.test"),
    );
    let policy = policy()
        .allow_wildcard("example.test", &[8443], &["tcp"])
        .deny_host("*.evil.test");
    let udp = "resolve udp4 198.18.0.2 alias.example.test A".to_owned();
    let tcp = "resolve tcp4 198.18.0.2 alias.example.test A".to_owned();
    let connect = "connect tcp4 198.18.0.30 8443".to_owned();
    let fine = "resolve udp4 198.18.0.2 fine.example.test A then-connect tcp4 8443 fine".to_owned();
    let out = finished(
        &tb,
        &policy,
        &[udp.clone(), tcp.clone(), connect.clone(), fine.clone()],
    );
    for op in [&udp, &tcp] {
        let r = out.assert_ok(op);
        assert!(
            r.rcode == Some(rcode::NXDOMAIN)
                || (r.rcode == Some(rcode::NOERROR) && r.addrs.as_deref() == Some(&[])),
            "`{op}`: NXDOMAIN or no address expected, got rcode {:?} {:?}\n{}",
            r.rcode,
            r.addrs,
            out.describe()
        );
        assert!(
            !r.addrs
                .as_deref()
                .unwrap_or_default()
                .contains(&ip("198.18.0.30")),
            "{}",
            out.describe()
        );
    }
    out.assert_errno(&connect, EPERM);
    assert_answer(&out, &fine, rcode::NOERROR, &["198.18.0.31"]);
    assert_eq!(
        String::from_utf8_lossy(&good.wait_for(b"fine", WAIT)),
        "fine"
    );
    std::thread::sleep(SETTLE);
    assert_eq!(evil.connections(), 0, "{}", out.describe());
    let lines = refused(&out.stderr, "alias.example.test");
    assert!(
        lines.iter().any(|l| l["result"] == "denied"),
        "no dns_refused line with result denied for alias.example.test: {lines:#?}\n{}",
        out.stderr
    );
}

/// A resolver that keeps one UDP socket connected to its server (here 198.18.0.2:53, so in the
/// kernel to the proxy) sends each query with send(), which names no address and runs no hook:
/// after SIGTERM of the `run` agent such sends still go to the dead proxy's port, where a
/// squatter able to bind it (see [`LivenessBed::new`]) reads them (docs/dns.md says so). What
/// the kernel guarantees is that its answers no longer appear to come from the server the
/// resolver asked, so a resolver that checks (glibc, musl) drops them.
#[test]
fn a_socket_connected_to_the_proxy_is_not_answered_by_a_squatter_after_its_agent_stops() {
    let Some(tb) = testbed() else { return };
    let bed = LivenessBed::new(&tb, "connected");
    let (cg, dir, sync, path) = (&bed.cgroup, &bed.dir, &bed.sync, &bed.policy);
    let mut agent = RunAgent::start(tb.client(), path, cg, dir.path().join("agent"));
    let port = agent.proxy_port();
    let stopped = stop_under_dns_load(
        &tb,
        cg,
        &mut agent,
        Signal::SIGTERM,
        Load::OneConnectedSocket,
        port,
        sync.path(),
    );
    let server: std::net::SocketAddr = "198.18.0.2:53".parse().unwrap();
    let samples = stopped.samples();
    let before: Vec<&DnsSample> = samples
        .iter()
        .filter(|s| s.at_ms + 500 < stopped.at_ms)
        .collect();
    assert!(
        !before.is_empty()
            && before
                .iter()
                .all(|s| s.ok && s.addrs == [ip("198.18.0.10")] && s.from == Some(server)),
        "DNS did not work before the signal (answers from the server asked)\n{}",
        stopped.describe()
    );
    // SIGTERM clears the liveness at once; 1 s covers the agent's exit.
    let believable: Vec<&DnsSample> = samples
        .iter()
        .filter(|s| s.at_ms > stopped.at_ms + 1000 && s.ok && s.from == Some(server))
        .collect();
    assert!(
        believable.is_empty(),
        "{} answers after the agent stopped still appear to come from {server}\n{}",
        believable.len(),
        stopped.describe()
    );
    assert!(
        samples
            .iter()
            .filter(|s| s.at_ms > stopped.at_ms + 1000 && s.addrs.contains(&ip(SQUATTER_ANSWER)))
            .all(|s| s.from == Some(format!("127.0.0.1:{port}").parse().unwrap())),
        "the squatter's answers show where they come from\n{}",
        stopped.describe()
    );
}
