//! Interfaces named by the workload: socket options that bind a socket to one, and one named
//! per message (ancillary data, a link-local address's scope). Neither may take loopback or
//! redirected DNS traffic onto the wire.

use std::time::{Duration, Instant};

use egress_tests::capture::{Capture, describe_frame};
use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::log::{blocked, verdict_count};
use egress_tests::netns::{CLIENT_IF, Netns, REMOTE_IF};
use egress_tests::probe::{errno_name, rcode};
use egress_tests::scenario::UPSTREAM;
use egress_tests::server::{Listener, SETTLE, WAIT, contains};
use libc::{EINVAL, EPERM};
use serde_json::Value;

use super::{finished, finished_with, policy};
use crate::{ip, sa, scenario};

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

// --- 1. Socket options that bind to an interface ----------------------------------------------

/// SO_BINDTODEVICE, SO_BINDTOIFINDEX, IP_UNICAST_IF, IPV6_UNICAST_IF, IPV6_2292PKTOPTIONS and
/// the sticky IPV6_PKTINFO would send even a loopback destination (the proxy's included) out
/// of the named device: from the workload each fails with EPERM and is logged as
/// `socket_option_refused` with its level and name. The control run shows the kernel accepts
/// every one of them from an unprivileged process. Sends without such options still work.
#[test]
fn socket_options_that_bind_to_an_interface_are_refused() {
    let Some(tb) = scenario().udp("198.18.0.2:5300").build() else {
        return;
    };
    let [remote] = tb.listeners();
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
    let Some(tb) = scenario()
        .udp("198.18.0.2:5301")
        .upstream(Dnsmasq::config().record("api.example.test", ip("198.18.0.10")))
        .build()
    else {
        return;
    };
    let [remote] = tb.listeners();
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

    let lo_v4 = format!("cmsg-sendto udp4 127.0.0.1 {p4} pktinfo=veth-c leak-lo4");
    let lo_v6 = format!("cmsg-sendto udp6 ::1 {p6} pktinfo=veth-c leak-lo6");
    let conn_v4 = format!("cmsg-send udp4 127.0.0.1 {p4} pktinfo=veth-c leak-conn4");
    let conn_v6 = format!("cmsg-send udp6 ::1 {p6} pktinfo=veth-c leak-conn6");
    let link_dns = format!("sendto udp6 {remote_ll}%veth-c 53 leak-ll-dns");
    let leaks = [&lo_v4, &lo_v6, &conn_v4, &conn_v6, &link_dns].map(String::clone);

    // Control: the kernel accepts each, and each leaves through the veth.
    let control_capture = Capture::start(tb.remote(), REMOTE_IF).expect("capture");
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
    let capture = Capture::start(tb.remote(), REMOTE_IF).expect("capture");
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
    out.assert_answer(&resolve, rcode::NOERROR, &["198.18.0.10"]);
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
    let capture = Capture::start(tb.remote(), REMOTE_IF).expect("capture");
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
