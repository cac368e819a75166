//! Self-tests of the harness, without the agent: namespaces, listeners, the probe as uid
//! nobody, cgroup clean-up. If these fail, the enforcement tests prove nothing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;

use egress_tests::cgroup::TestCgroupParent;
use egress_tests::netns::{Netns, REMOTE_V4, REMOTE_V6};
use egress_tests::server::{Listener, WAIT};
use egress_tests::{NOBODY_UID, require_root_or_skip};

use crate::{PROBE, testbed};

fn v4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(REMOTE_V4), port)
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(REMOTE_V6), port)
}

#[test]
fn probe_as_nobody_reaches_remote_listeners() {
    let Some(tb) = testbed() else { return };
    let extra: IpAddr = "198.18.1.5".parse().expect("literal");
    tb.topo.add_remote_addr(extra).expect("extra address");
    let tcp4 = tb.listen_tcp(v4(8080)).expect("tcp4 listener");
    let tcp6 = tb.listen_tcp(v6(8080)).expect("tcp6 listener");
    let udp4 = tb.listen_udp(v4(5300)).expect("udp4 listener");
    let udp6 = tb.listen_udp(v6(5300)).expect("udp6 listener");
    let tcp_extra = tb
        .listen_tcp(SocketAddr::new(extra, 8080))
        .expect("extra listener");

    let ops = [
        "whoami",
        "send tcp4 198.18.0.2 8080 hello-v4",
        "send tcp6 fd00:e9::2 8080 hello-v6",
        "send tcp6 ::ffff:198.18.0.2 8080 hello-mapped",
        "tfo tcp4 198.18.0.2 8080 hello-tfo",
        "sendto udp4 198.18.0.2 5300 dgram-v4",
        "sendto udp6 fd00:e9::2 5300 dgram-v6",
        "udpconnect-send udp4 198.18.0.2 5300 dgram-connected",
        "send tcp4 198.18.1.5 8080 hello-extra",
        "connect tcp4 198.18.0.2 9",
        "connect udp4 198.18.0.2 9",
    ];
    let out = tb.run_probe(&ops).expect("probe run");
    out.assert_exit(0);
    let who = out.assert_ok("whoami");
    assert_eq!(who.uid, Some(NOBODY_UID), "{}", out.describe());
    assert_eq!(who.euid, Some(NOBODY_UID), "{}", out.describe());
    for op in &ops[1..9] {
        out.assert_ok(op);
    }
    out.assert_errno("connect tcp4 198.18.0.2 9", libc::ECONNREFUSED);
    out.assert_ok("connect udp4 198.18.0.2 9");

    let got4 = tcp4.wait_for(b"hello-tfo", WAIT);
    for want in [&b"hello-v4"[..], b"hello-mapped", b"hello-tfo"] {
        assert!(
            egress_tests::server::contains(&got4, want),
            "tcp4 listener lacks {:?}: {:?}",
            String::from_utf8_lossy(want),
            String::from_utf8_lossy(&got4)
        );
    }
    assert_eq!(tcp4.connections(), 3);
    assert_eq!(tcp6.wait_for(b"hello-v6", WAIT), b"hello-v6");
    assert_eq!(tcp_extra.wait_for(b"hello-extra", WAIT), b"hello-extra");
    udp4.wait_for(b"dgram-connected", WAIT);
    assert_eq!(
        udp4.messages(),
        vec![b"dgram-v4".to_vec(), b"dgram-connected".to_vec()]
    );
    assert_eq!(udp6.wait_for(b"dgram-v6", WAIT), b"dgram-v6");
}

#[test]
fn loopback_listener_in_the_client_namespace() {
    let Some(tb) = testbed() else { return };
    let lo4 = Listener::tcp(
        tb.client(),
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7000),
    )
    .expect("lo4 listener");
    let lo6 =
        Listener::tcp(tb.client(), "[::1]:7000".parse().expect("literal")).expect("lo6 listener");
    let out = tb
        .run_probe(&[
            "send tcp4 127.0.0.1 7000 via-lo",
            "send tcp4 0.0.0.0 7000 via-any",
            "send tcp6 ::1 7000 via-lo6",
            "send tcp6 :: 7000 via-any6",
        ])
        .expect("probe run");
    for r in &out.results {
        assert!(r.ok, "{}", out.describe());
    }
    lo4.wait_for(b"via-any", WAIT);
    assert_eq!(
        lo4.messages(),
        vec![b"via-lo".to_vec(), b"via-any".to_vec()]
    );
    lo6.wait_for(b"via-any6", WAIT);
    assert_eq!(
        lo6.messages(),
        vec![b"via-lo6".to_vec(), b"via-any6".to_vec()]
    );
}

#[test]
fn socket_kinds_without_the_agent() {
    let Some(tb) = testbed() else { return };
    // Lets nobody create ping sockets, inside the test namespace only.
    tb.client()
        .sysctl("net.ipv4.ping_group_range", "0 2147483647")
        .expect("sysctl in client netns");
    let out = tb
        .run_probe(&[
            "socket tcp4",
            "socket udp4",
            "socket icmp4",
            "socket icmp6",
            "socket udplite4",
            "socket mptcp4",
            "socket raw4",
            "socket sctp4",
        ])
        .expect("probe run");
    for op in [
        "socket tcp4",
        "socket udp4",
        "socket icmp4",
        "socket icmp6",
        "socket udplite4",
        "socket mptcp4",
    ] {
        out.assert_ok(op);
    }
    // Raw sockets need CAP_NET_RAW, which nobody lacks.
    out.assert_errno("socket raw4", libc::EPERM);
    // sctp4 depends on the kernel; only print what it does.
    eprintln!("baseline: {:?}", out.result("socket sctp4"));
}

#[test]
fn namespace_sysctl_does_not_touch_the_root_namespace() {
    let Some(tb) = testbed() else { return };
    let root_before = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range")
        .expect("root ping_group_range");
    tb.client()
        .sysctl("net.ipv4.ping_group_range", "0 2147483647")
        .expect("sysctl");
    let root_after = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range")
        .expect("root ping_group_range");
    assert_eq!(root_before, root_after);
    assert!(tb.client().sysctl("kernel.pid_max", "1").is_err());
}

#[test]
fn tcp_fast_open_puts_the_data_in_the_syn() {
    let Some(tb) = testbed() else { return };
    tb.topo
        .enable_fast_open_without_cookies()
        .expect("tcp_fastopen sysctls");
    let l4 = tb.listen_tcp(v4(8080)).expect("listener");
    let l6 = tb.listen_tcp(v6(8080)).expect("listener");
    let out = tb
        .run_probe(&[
            "tfo tcp4 198.18.0.2 8080 syn-data-v4",
            "tfo tcp6 fd00:e9::2 8080 syn-data-v6",
        ])
        .expect("probe run");
    out.assert_ok("tfo tcp4 198.18.0.2 8080 syn-data-v4");
    out.assert_ok("tfo tcp6 fd00:e9::2 8080 syn-data-v6");
    assert_eq!(l4.wait_for(b"syn-data-v4", WAIT), b"syn-data-v4");
    assert_eq!(l6.wait_for(b"syn-data-v6", WAIT), b"syn-data-v6");
    let client = tb.client();
    assert_eq!(
        client
            .tcp_ext_counter("TCPFastOpenActive")
            .expect("netstat"),
        2
    );
    assert_eq!(
        tb.remote()
            .tcp_ext_counter("TCPFastOpenPassive")
            .expect("netstat"),
        2
    );
}

#[test]
fn netns_is_deleted_on_drop() {
    if !require_root_or_skip() {
        return;
    }
    let ns = Netns::new("x").expect("netns");
    let path = Path::new("/run/netns").join(ns.name());
    assert!(path.exists());
    drop(ns);
    assert!(!path.exists(), "{} still exists", path.display());
}

#[test]
fn cgroup_parent_kills_leftovers_and_removes_itself() {
    if !require_root_or_skip() {
        return;
    }
    let parent = TestCgroupParent::new().expect("cgroup parent");
    let child = parent.child("workload").expect("child cgroup");
    let nested = child.join("nested");
    std::fs::create_dir(&nested).expect("nested cgroup");
    let mut sleeper = Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep");
    std::fs::write(nested.join("cgroup.procs"), sleeper.id().to_string()).expect("move sleep");
    assert_eq!(parent.pids(), vec![sleeper.id()]);
    let parent_path = parent.path().to_path_buf();
    drop(parent);
    let status = sleeper
        .try_wait()
        .expect("try_wait")
        .expect("sleep was killed by the cgroup clean-up");
    assert!(!status.success());
    assert!(
        !parent_path.exists(),
        "{} still exists",
        parent_path.display()
    );
}

#[test]
fn probe_rejects_malformed_ops_with_64() {
    for args in [
        &[][..],
        &["connect tcp4 198.18.0.2"][..],
        &["bogus"][..],
        &["--ops-file"][..],
    ] {
        let status = Command::new(PROBE)
            .args(args)
            .output()
            .expect("run probe")
            .status;
        assert_eq!(status.code(), Some(64), "args {args:?}");
    }
}

#[test]
fn probe_reads_ops_file_and_exits_with_requested_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ops");
    std::fs::write(&file, "# comment\nsleep 1\n\nwhoami\nexit 7\nwhoami\n").expect("ops file");
    let out = Command::new(PROBE)
        .arg("--ops-file")
        .arg(&file)
        .output()
        .expect("run probe");
    assert_eq!(out.status.code(), Some(7));
    let (results, other) = egress_tests::probe::parse_output(&String::from_utf8_lossy(&out.stdout));
    assert!(other.is_empty(), "{other:?}");
    let ops: Vec<&str> = results.iter().map(|r| r.op.as_str()).collect();
    assert_eq!(ops, ["sleep 1", "whoami", "exit 7"]);
}
