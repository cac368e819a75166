//! No inbound channel: a workload that listens (with or without bind) gets no connection from
//! another host unless an `inbound` rule allows that peer on that port; loopback clients still
//! connect; every refused packet is an event and a counter.

use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use egress_tests::log::{self, verdict_count_of};
use egress_tests::netns::{CLIENT_V4, CLIENT_V6, Netns, REMOTE_V4, REMOTE_V6};
use egress_tests::policy::PolicyYaml;
use egress_tests::process::RunOutput;
use egress_tests::sockaddr::CSockAddr;
use egress_tests::testbed::Testbed;
use serde_json::Value;

use crate::testbed;
/// How long the workload accepts connections.
const LISTEN_MS: u64 = 6000;
/// How long the workload may take to start listening under the agent.
const READY_WAIT: Duration = Duration::from_secs(20);
/// A refused peer's SYN is dropped: its connect gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
const READ_TIMEOUT: Duration = Duration::from_secs(2);
const PORT: u16 = 8080;
const GREETING: &str = "hello-from-the-workload";
const SECOND_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const SECOND_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xe9, 0, 0, 0, 0, 0, 3);

/// A TCP connection from `src` (or the namespace's own choice) to `dst`, from inside `ns`:
/// the bytes read until EOF, or the error of connect or read.
fn connect_from(ns: &Netns, src: Option<IpAddr>, dst: SocketAddr) -> Result<Vec<u8>, String> {
    let handle = ns.handle();
    std::thread::spawn(move || {
        handle.enter_current_thread().map_err(|e| e.to_string())?;
        let family = if dst.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        // A blocking connect gives up after SO_SNDTIMEO.
        let tv = libc::timeval {
            tv_sec: CONNECT_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: CONNECT_TIMEOUT.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: tv outlives the call; the length is its size.
        unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if let Some(src) = src {
            let sa = CSockAddr::new(SocketAddr::new(src, 0));
            // SAFETY: sa is a valid sockaddr of the length it gives.
            if unsafe { libc::bind(raw, sa.ptr(), sa.socklen()) } != 0 {
                return Err(format!("bind {src}: {}", std::io::Error::last_os_error()));
            }
        }
        let sa = CSockAddr::new(dst);
        // SAFETY: as above.
        if unsafe { libc::connect(raw, sa.ptr(), sa.socklen()) } != 0 {
            return Err(format!("connect: {}", std::io::Error::last_os_error()));
        }
        let mut stream = TcpStream::from(fd);
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        stream
            .read_to_end(&mut got)
            .map_err(|e| format!("read: {e}"))?;
        Ok(got)
    })
    .join()
    .expect("client thread")
}

/// Runs the workload with `listen LISTEN` under `policy` in the client namespace; once it
/// listens, `clients(port)` runs; then the workload's run is awaited.
fn serve<T>(
    tb: &Testbed,
    policy: &PolicyYaml,
    listen: &str,
    clients: impl FnOnce(u16) -> T,
) -> (RunOutput, String, T) {
    let sync = tb.sync_dir().expect("sync dir");
    let ready = sync.path().join("port");
    let op = format!("listen {listen} {LISTEN_MS} {} {GREETING}", ready.display());
    let run = tb
        .agent(policy)
        .expect("agent run")
        .json_log()
        .arg(&op)
        .timeout(Duration::from_secs(60));
    let (out, got) = std::thread::scope(|s| {
        let agent = s.spawn(|| run.run_in(tb.client()).expect("running the agent"));
        let port = wait_port(&ready);
        let got = port.map(clients);
        let out = agent.join().expect("agent thread");
        (out, got)
    });
    let got = got.unwrap_or_else(|| panic!("the workload never listened\n{}", out.describe()));
    (out, op, got)
}

/// The port the workload wrote once it listened, within [`READY_WAIT`].
fn wait_port(path: &Path) -> Option<u16> {
    let deadline = Instant::now() + READY_WAIT;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(port) = text.trim().parse()
        {
            return Some(port);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The agent's `egress_blocked` log lines.
fn blocked(stderr: &str) -> Vec<Value> {
    log::events(stderr, "egress_blocked")
}

/// The exit-time `verdict count` of (reason, tcp).
fn tcp_count(stderr: &str, reason: &str) -> u64 {
    verdict_count_of(stderr, reason, "tcp")
}

/// Asserts an `inbound_refused` event for `peer` at `port`, naming the listener's owner.
#[track_caller]
fn assert_refused_event(out: &RunOutput, peer: IpAddr, port: u16, rule: Option<&str>) {
    let events = blocked(&out.stderr);
    let e = events
        .iter()
        .find(|e| e["dst.ip"] == peer.to_string() && e["dst.port"] == port)
        .unwrap_or_else(|| panic!("no event for {peer} port {port}\n{}", out.stderr));
    assert_eq!(e["reason"], "inbound_refused", "{e}");
    assert_eq!(e["hook"], "skb_ingress", "{e}");
    assert_eq!(e["protocol"], "tcp", "{e}");
    assert_eq!(
        e["family"],
        if peer.is_ipv4() { "ipv4" } else { "ipv6" },
        "{e}"
    );
    assert_eq!(e["uid"], 65534, "the listener's owner: {e}");
    assert!(e["cgroup.id"].as_u64().unwrap_or(0) > 0, "{e}");
    assert!(e.get("pid").is_none(), "no process is named: {e}");
    match rule {
        Some(target) => assert_eq!(e["rule.target"], target, "{e}"),
        None => assert!(e.get("rule.target").is_none(), "{e}"),
    }
}

fn peers(out: &RunOutput, op: &str) -> Vec<IpAddr> {
    let r = out.assert_ok(op);
    r.addrs.clone().unwrap_or_default()
}

/// (a), (b), (d): with no `inbound` rule, a listener bound to 0.0.0.0:P and one that listen()
/// bound by itself get no connection from the remote host (its SYN is dropped, its connect
/// times out), while a loopback client still connects and reads.
#[test]
fn a_listener_gets_no_connection_from_another_host_by_default() {
    let Some(tb) = testbed() else { return };
    for listen in [format!("tcp4 0.0.0.0 {PORT}"), "tcp4 - 0".to_owned()] {
        let (out, op, (remote, local, port)) = serve(&tb, &PolicyYaml::new(), &listen, |port| {
            let remote = connect_from(
                tb.remote(),
                None,
                SocketAddr::new(IpAddr::V4(CLIENT_V4), port),
            );
            let local = connect_from(
                tb.client(),
                None,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            );
            (remote, local, port)
        });
        assert!(
            remote.is_err(),
            "{listen}: the remote host connected: {remote:?}"
        );
        assert_eq!(
            local.as_deref(),
            Ok(GREETING.as_bytes()),
            "{listen}: loopback client\n{}",
            out.describe()
        );
        assert_eq!(
            peers(&out, &op),
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            "{listen}: the workload accepted only the loopback client\n{}",
            out.describe()
        );
        assert_refused_event(&out, IpAddr::V4(REMOTE_V4), port, None);
        assert!(
            tcp_count(&out.stderr, "inbound_refused") >= 1,
            "{listen}: counter\n{}",
            out.stderr
        );
        assert_eq!(
            tcp_count(&out.stderr, "inbound_allowed"),
            0,
            "{}",
            out.stderr
        );
    }
}

/// (c): `inbound: [{port: P, from: [peer/32]}]` lets that peer connect and read, and no other
/// address of the same host.
#[test]
fn an_inbound_rule_admits_its_peers_and_no_others() {
    let Some(tb) = testbed() else { return };
    tb.topo.add_remote_addr(IpAddr::V4(SECOND_V4)).unwrap();
    let policy = PolicyYaml::new().inbound(PORT, &["198.18.0.2/32"]);
    let (out, op, (allowed, other)) =
        serve(&tb, &policy, &format!("tcp4 0.0.0.0 {PORT}"), |port| {
            let dst = SocketAddr::new(IpAddr::V4(CLIENT_V4), port);
            (
                connect_from(tb.remote(), Some(IpAddr::V4(REMOTE_V4)), dst),
                connect_from(tb.remote(), Some(IpAddr::V4(SECOND_V4)), dst),
            )
        });
    assert_eq!(
        allowed.as_deref(),
        Ok(GREETING.as_bytes()),
        "allowed peer\n{}",
        out.describe()
    );
    assert!(
        other.is_err(),
        "the peer outside `from` connected: {other:?}"
    );
    assert_eq!(
        peers(&out, &op),
        vec![IpAddr::V4(REMOTE_V4)],
        "{}",
        out.describe()
    );
    assert_refused_event(
        &out,
        IpAddr::V4(SECOND_V4),
        PORT,
        Some("inbound[0] tcp/8080"),
    );
    assert!(
        tcp_count(&out.stderr, "inbound_allowed") >= 1,
        "{}",
        out.stderr
    );
    assert!(
        tcp_count(&out.stderr, "inbound_refused") >= 1,
        "{}",
        out.stderr
    );
}

/// (e): IPv6 peers are judged by their IPv6 address; an IPv4 peer of a dual-stack listener by
/// its IPv4 address (an IPv6 `from` does not cover it).
#[test]
fn ipv6_peers_and_a_dual_stack_listener() {
    let Some(tb) = testbed() else { return };
    tb.topo.add_remote_addr(IpAddr::V6(SECOND_V6)).unwrap();
    let policy = PolicyYaml::new().inbound(PORT, &["fd00:e9::2/128"]);
    let (out, op, (allowed, other, v4)) = serve(&tb, &policy, &format!("tcp6 :: {PORT}"), |port| {
        let dst = SocketAddr::new(IpAddr::V6(CLIENT_V6), port);
        (
            connect_from(tb.remote(), Some(IpAddr::V6(REMOTE_V6)), dst),
            connect_from(tb.remote(), Some(IpAddr::V6(SECOND_V6)), dst),
            connect_from(
                tb.remote(),
                None,
                SocketAddr::new(IpAddr::V4(CLIENT_V4), port),
            ),
        )
    });
    assert_eq!(
        allowed.as_deref(),
        Ok(GREETING.as_bytes()),
        "allowed IPv6 peer\n{}",
        out.describe()
    );
    assert!(
        other.is_err(),
        "IPv6 peer outside `from` connected: {other:?}"
    );
    assert!(
        v4.is_err(),
        "IPv4 peer of the dual-stack listener connected: {v4:?}"
    );
    assert_eq!(
        peers(&out, &op),
        vec![IpAddr::V6(REMOTE_V6)],
        "{}",
        out.describe()
    );
    assert_refused_event(
        &out,
        IpAddr::V6(SECOND_V6),
        PORT,
        Some("inbound[0] tcp/8080"),
    );
    assert_refused_event(
        &out,
        IpAddr::V4(REMOTE_V4),
        PORT,
        Some("inbound[0] tcp/8080"),
    );
}

/// Runs the workload's `listen` in `cgroup` (programs attached through the library, no agent)
/// for `ms`, connects from the remote host once it listens, and returns what the peer read.
fn connect_to_library_workload(tb: &Testbed, cgroup: &Path, ms: u64) -> Result<Vec<u8>, String> {
    let sync = tb.sync_dir().expect("sync dir");
    let ready = sync.path().join("port");
    let op = format!(
        "listen tcp4 0.0.0.0 {PORT} {ms} {} {GREETING}",
        ready.display()
    );
    std::thread::scope(|s| {
        let workload = s.spawn(|| tb.run_in_cgroup(cgroup, &[op.as_str()]));
        let Some(port) = wait_port(&ready) else {
            let out = workload.join().expect("workload thread");
            panic!("the workload never listened\n{}", out.describe());
        };
        let got = connect_from(
            tb.remote(),
            None,
            SocketAddr::new(IpAddr::V4(CLIENT_V4), port),
        );
        let out = workload.join().expect("workload thread");
        out.assert_ok(&op);
        got
    })
}

/// A reload puts new `inbound` rules in force with the new policy id, and takes them away
/// again the same way.
#[test]
fn a_reload_switches_the_inbound_rules_in_place() {
    use egress_agent::compile::{Deadlines, Resolved};
    use egress_agent::enforcer::Enforcer;
    let Some(tb) = testbed() else { return };
    let cgroup = tb.cgroups.child("inbound-reload").unwrap();
    let parse = |p: PolicyYaml| {
        egress_agent::policy::parse_str(&p.render(), Path::new("inbound.yaml")).unwrap()
    };
    let closed = || parse(PolicyYaml::new());
    let open = || parse(PolicyYaml::new().inbound(PORT, &["198.18.0.2/32"]));
    let mut enforcer = Enforcer::start(closed(), Resolved::new(), 0).unwrap();
    enforcer.attach(&cgroup).unwrap();
    let got = connect_to_library_workload(&tb, &cgroup, 3000);
    assert!(got.is_err(), "before the reload: {got:?}");

    enforcer
        .reload(open(), (Resolved::new(), Deadlines::new()))
        .unwrap();
    let got = connect_to_library_workload(&tb, &cgroup, 3000);
    assert_eq!(got.as_deref(), Ok(GREETING.as_bytes()), "after the reload");

    enforcer
        .reload(closed(), (Resolved::new(), Deadlines::new()))
        .unwrap();
    let got = connect_to_library_workload(&tb, &cgroup, 3000);
    assert!(
        got.is_err(),
        "after reloading the policy without the rule: {got:?}"
    );
}

/// UDP is not judged on the way in: a datagram from another host reaches the workload, and its
/// reply is a send the egress rules judge (here: refused, the peer is not allowed).
#[test]
fn a_udp_reply_to_a_peer_not_allowed_is_refused() {
    let Some(tb) = testbed() else { return };
    let sync = tb.sync_dir().expect("sync dir");
    let ready = sync.path().join("bound");
    let op = format!(
        "dnsserve udp4 0.0.0.0 5300 198.18.0.77 4000 {}",
        ready.display()
    );
    let run = tb
        .agent(&PolicyYaml::new())
        .expect("agent run")
        .json_log()
        .arg(&op)
        .timeout(Duration::from_secs(60));
    // A type-A query for a.test.
    let query: &[u8] =
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x04test\x00\x00\x01\x00\x01";
    let out = std::thread::scope(|s| {
        let agent = s.spawn(|| run.run_in(tb.client()).expect("running the agent"));
        let deadline = Instant::now() + READY_WAIT;
        while !ready.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let handle = tb.remote().handle();
        std::thread::spawn(move || {
            handle.enter_current_thread().unwrap();
            let sock = std::net::UdpSocket::bind((REMOTE_V4, 0)).unwrap();
            for _ in 0..3 {
                sock.send_to(query, (CLIENT_V4, 5300)).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .join()
        .unwrap();
        agent.join().expect("agent thread")
    });
    let r = out.assert_ok(&op);
    let samples = r.samples.clone().unwrap_or_default();
    assert!(
        !samples.is_empty(),
        "the datagrams reached the workload\n{}",
        out.describe()
    );
    assert!(
        samples.iter().all(|s| !s.ok),
        "a reply left\n{}",
        out.describe()
    );
    let refused = blocked(&out.stderr)
        .into_iter()
        .filter(|e| e["hook"] == "sendmsg4" && e["dst.ip"] == REMOTE_V4.to_string())
        .count();
    assert!(refused >= 1, "no refused reply in the log\n{}", out.stderr);
}
