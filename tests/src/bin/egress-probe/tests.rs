use std::net::Ipv6Addr;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::dns::{Reply, dns_answered, dns_query, dns_query_typed, parse_reply};
use crate::dnsloop::squat_reply;
use crate::op::{Action, Cmsg, DnsMode, DnsProto, Family, Resolve, SockOption, Transport};
use crate::parse::{parse_ip, parse_op};
use crate::resolve::{first_addr, valid_query_name};

#[test]
fn v4_literal_on_family_6_is_mapped() {
    assert_eq!(
        parse_ip(Family::V6, "198.18.0.2"),
        Some(IpAddr::V6(
            "::ffff:198.18.0.2".parse::<Ipv6Addr>().expect("literal")
        ))
    );
    assert_eq!(parse_ip(Family::V4, "::1"), None);
}

#[test]
fn data_is_the_rest_of_the_op() {
    let op = parse_op("send tcp4 198.18.0.2 80 GET / HTTP/1.0").expect("valid op");
    match op.action {
        Action::Send(Transport::Tcp, Family::V4, addr, data) => {
            assert_eq!(addr, "198.18.0.2:80".parse().expect("literal"));
            assert_eq!(data, b"GET / HTTP/1.0");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn raw6_takes_an_address_and_the_whole_packet() {
    match parse_op("raw6 fd00:e9::2 6000000000003b40")
        .expect("valid op")
        .action
    {
        Action::Raw6(addr, bytes) => {
            assert_eq!(addr, "fd00:e9::2".parse::<Ipv6Addr>().expect("literal"));
            assert_eq!(bytes, [0x60, 0, 0, 0, 0, 0, 0x3b, 0x40]);
        }
        other => panic!("unexpected {other:?}"),
    }
    for bad in [
        "raw6 198.18.0.2 60",
        "raw6 fd00:e9::2 6",
        "raw6 fd00:e9::2",
        "raw6 ::1 zz",
    ] {
        assert!(parse_op(bad).is_err(), "{bad}");
    }
}

#[test]
fn malformed_ops_are_rejected() {
    for bad in [
        "",
        "connect tcp5 1.2.3.4 80",
        "connect tcp4 1.2.3.4",
        "connect tcp4 1.2.3.4 99999",
        "send udp4 1.2.3.4 80 x",
        "sendto tcp4 1.2.3.4 80 x",
        "sendto udp4 1.2.3.4 80",
        "socket foo4",
        "exit 300",
        "whoami now",
        "hammer 0 10 connect tcp4 1.2.3.4 80",
        "hammer 65 10 connect tcp4 1.2.3.4 80",
        "hammer 2 0 connect tcp4 1.2.3.4 80",
        "hammer 2 10 sleep 5",
        "hammer 2 10",
        "dns connect tcp4 1.2.3.4 53 a.test 3",
        "dns other udp4 1.2.3.4 53 a.test 3",
        "dns socket udp4 1.2.3.4 53 bad..name 3",
        "dns socket udp4 1.2.3.4 53 a.test 0",
        "resolve udp4 1.2.3.4 a.test",
        "resolve udp5 1.2.3.4 a.test A",
        "resolve tcp4-sendto 1.2.3.4 a.test A",
        "resolve udp4 ::1 a.test A",
        "resolve udp4 1.2.3.4 a..test A",
        "resolve udp4 1.2.3.4 a.test QQ",
        "resolve udp4 1.2.3.4 a.test A repeat 0",
        "resolve udp4 1.2.3.4 a.test A repeat 1001",
        "resolve udp4 1.2.3.4 a.test A repeat",
        "resolve udp4 1.2.3.4 a.test A then-connect udp4 80 x",
        "resolve udp4 1.2.3.4 a.test A then-connect tcp4 80",
        "resolve udp4 1.2.3.4 a.test A extra",
        "dnsraw udp4 1.2.3.4",
        "dnsraw udp4 1.2.3.4 abc",
        "dnsraw udp4 1.2.3.4 zz",
        "dnsraw udp4 1.2.3.4 00 11",
        "wait-file /tmp/x 120001",
        "wait-file /tmp/x",
        "touch",
        "resolve udp4 1.2.3.4 a.test A port",
        "resolve udp4 1.2.3.4 a.test A port 0",
        "resolve udp4 1.2.3.4 a.test A repeat 2 port 53",
        "dnsloop udp4 1.2.3.4 a.test 100",
        "dnsloop udp4 1.2.3.4 a.test 5 1000",
        "dnsloop udp4 1.2.3.4 a.test 100 120001",
        "dnsloop udp4 1.2.3.4 n{i}.test 100 1000",
        "dnsloop tcp4 1.2.3.4 a.test 100 1000 one-socket",
        "dnsloop udp4 1.2.3.4 a.test 100 1000 two-sockets",
        "dnsserve tcp4 127.0.0.1 61000 1.2.3.4 1000",
        "dnsserve udp4 127.0.0.1 61000 nope 1000",
        "dnsserve udp4 127.0.0.1 61000 1.2.3.4",
        "setsockopt udp4 bindtodevice",
        "setsockopt udp4 so_mark lo",
        "setsockopt mptcp4 bindtodevice lo",
        "setsockopt udp4 bindtodevice a/b",
        "setsockopt udp4 bindtodevice waytoolonginterfacename",
        "cmsg-sendto tcp4 127.0.0.1 9 tos=1 x",
        "cmsg-sendto udp4 127.0.0.1 9 tos=1",
        "cmsg-sendto udp4 127.0.0.1 9 tos=300 x",
        "cmsg-sendto udp4 127.0.0.1 9 ttl=1 x",
        "cmsg-send udp4 127.0.0.1 9 pktinfo= x",
        "sendto udp4 127.0.0.1%1 53 x",
        "sendto udp6 fe80::1%no-such-if0 53 x",
    ] {
        assert!(parse_op(bad).is_err(), "{bad:?} should be rejected");
    }
}

#[test]
fn hammer_and_dns_parse() {
    let op = parse_op("hammer 8 100 connect tcp4 198.18.0.2 8080").expect("valid op");
    match op.action {
        Action::Hammer(8, 100, inner) => {
            assert_eq!(inner.text, "connect tcp4 198.18.0.2 8080");
            assert!(matches!(inner.action, Action::Connect(Transport::Tcp, ..)));
        }
        other => panic!("unexpected {other:?}"),
    }
    let op = parse_op("dns socket udp6 ::ffff:198.18.0.2 53 api.company.test 5").expect("valid op");
    match op.action {
        Action::Dns(DnsMode::Socket, Family::V6, addr, name, 5) => {
            assert_eq!(addr, "[::ffff:198.18.0.2]:53".parse().expect("literal"));
            assert_eq!(name, "api.company.test");
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn resolve_op(text: &str) -> Resolve {
    match parse_op(text).expect("valid op").action {
        Action::Resolve(r) => *r,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn resolve_parses() {
    let r = resolve_op("resolve udp4 198.18.0.2 api.example.test A");
    assert_eq!(
        (
            r.proto,
            r.family,
            r.server,
            r.name.as_str(),
            r.qtype,
            r.repeat
        ),
        (
            DnsProto::UdpConnect,
            Family::V4,
            "198.18.0.2:53".parse().expect("literal"),
            "api.example.test",
            1,
            1
        )
    );
    assert!(r.then_connect.is_none());
    let r = resolve_op(
        "resolve udp6-sendto 198.18.0.2 n{i}.example.test. aaaa repeat 200 then-connect tcp6 8443 GET / HTTP/1.0",
    );
    assert_eq!(r.proto, DnsProto::UdpSendto);
    assert_eq!(
        r.server,
        "[::ffff:198.18.0.2]:53"
            .parse::<SocketAddr>()
            .expect("literal")
    );
    assert_eq!((r.qtype, r.repeat), (28, 200));
    assert_eq!(
        r.then_connect,
        Some((Family::V6, 8443, b"GET / HTTP/1.0".to_vec()))
    );
    let r = resolve_op("resolve tcp6 fd00:e9::2 x.test TXT then-connect tcp4 80 hi");
    assert_eq!(
        (r.proto, r.family, r.qtype),
        (DnsProto::Tcp, Family::V6, 16)
    );
    assert_eq!(r.then_connect, Some((Family::V4, 80, b"hi".to_vec())));
    assert_eq!(resolve_op("resolve udp4 1.2.3.4 x.test 65").qtype, 65);
}

#[test]
fn dnsraw_touch_and_wait_file_parse() {
    match parse_op("dnsraw tcp4 198.18.0.2 1234ABcd")
        .expect("valid")
        .action
    {
        Action::DnsRaw(DnsProto::Tcp, Family::V4, addr, bytes) => {
            assert_eq!(addr, "198.18.0.2:53".parse().expect("literal"));
            assert_eq!(bytes, [0x12, 0x34, 0xab, 0xcd]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        parse_op("touch /tmp/a").expect("valid").action,
        Action::Touch(_)
    ));
    assert!(matches!(
        parse_op("wait-file /tmp/a 5000").expect("valid").action,
        Action::WaitFile(_, d) if d == Duration::from_secs(5)
    ));
}

#[test]
fn listen_parses_with_and_without_bind() {
    match parse_op("listen tcp6 :: 8080 3000 /tmp/p hi")
        .expect("valid")
        .action
    {
        Action::Listen(l) => {
            assert_eq!(l.bind, Some("[::]:8080".parse().expect("literal")));
            assert_eq!((l.family, l.total), (Family::V6, Duration::from_secs(3)));
            assert_eq!(l.data, b"hi");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        parse_op("listen tcp4 - 0 3000 /tmp/p hi").expect("valid").action,
        Action::Listen(l) if l.bind.is_none()
    ));
    assert!(parse_op("listen tcp4 - 80 3000 /tmp/p hi").is_err());
    assert!(parse_op("listen udp4 0.0.0.0 80 3000 /tmp/p hi").is_err());
    assert!(parse_op("listen tcp4 0.0.0.0 80 999999 /tmp/p hi").is_err());
}

#[test]
fn hardening_ops_parse() {
    let r = resolve_op("resolve udp4-sendto 127.0.0.1 a.test A port 61003 repeat 3");
    assert_eq!(
        (r.server, r.repeat),
        ("127.0.0.1:61003".parse().expect("literal"), 3)
    );
    match parse_op("dnsloop tcp6 fd00:e9::2 a.test 100 8000")
        .expect("valid")
        .action
    {
        Action::DnsLoop(l) => {
            assert_eq!(
                (l.proto, l.family, l.server, l.name.as_str()),
                (
                    DnsProto::Tcp,
                    Family::V6,
                    "[fd00:e9::2]:53".parse().expect("literal"),
                    "a.test"
                )
            );
            assert_eq!(
                (l.every, l.total),
                (Duration::from_millis(100), Duration::from_secs(8))
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        parse_op("dnsloop udp4 198.18.0.2 a.test 100 8000 one-socket").expect("valid").action,
        Action::DnsLoop(l) if l.one_socket && l.proto == DnsProto::UdpConnect
    ));
    match parse_op("dnsserve udp4 127.0.0.1 61000 198.18.0.66 9000 /tmp/ready")
        .expect("valid")
        .action
    {
        Action::DnsServe(d) => {
            assert_eq!(d.addr, "127.0.0.1:61000".parse().expect("literal"));
            assert_eq!(d.answer, "198.18.0.66".parse::<IpAddr>().expect("literal"));
            assert_eq!(d.ready.as_deref(), Some(std::path::Path::new("/tmp/ready")));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        parse_op("setsockopt udp6 ipv6_2292pktoptions veth-c").expect("valid").action,
        Action::SetSockopt(
            Transport::Udp,
            Family::V6,
            SockOption::Ipv6Pktoptions2292,
            ref i
        ) if i == "veth-c"
    ));
    match parse_op("cmsg-send udp4 127.0.0.1 5300 pktinfo=veth-c leak me")
        .expect("valid")
        .action
    {
        Action::CmsgSend {
            connected,
            family,
            to,
            cmsg,
            data,
        } => {
            assert!(connected);
            assert_eq!(family, Family::V4);
            assert_eq!(to, "127.0.0.1:5300".parse().expect("literal"));
            assert_eq!(cmsg, Cmsg::Pktinfo("veth-c".into()));
            assert_eq!(data, b"leak me");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        parse_op("cmsg-sendto udp6 ::1 53 tos=16 x")
            .expect("valid")
            .action,
        Action::CmsgSend {
            connected: false,
            cmsg: Cmsg::Tos(16),
            ..
        }
    ));
    // A scope by number (a name is looked up in the probe's namespace when parsed).
    match parse_op("sendto udp6 fe80::1%7 53 x")
        .expect("valid")
        .action
    {
        Action::SendTo(Family::V6, SocketAddr::V6(a), _) => {
            assert_eq!((a.scope_id(), a.port()), (7, 53));
        }
        other => panic!("unexpected {other:?}"),
    }
    match parse_op("sendto udp6 fe80::1%lo 53 x")
        .expect("valid")
        .action
    {
        Action::SendTo(Family::V6, SocketAddr::V6(a), _) => assert_ne!(a.scope_id(), 0),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn the_squatter_answers_queries_only() {
    let q = dns_query(0x4242, "a.test");
    let reply = squat_reply(&q, "198.18.0.66".parse().expect("literal")).expect("a reply");
    assert_eq!(
        parse_reply(0x4242, &reply),
        Ok(Reply {
            rcode: 0,
            addrs: vec!["198.18.0.66".parse().expect("literal")]
        })
    );
    assert!(squat_reply(&reply, "198.18.0.66".parse().expect("literal")).is_none());
    assert!(squat_reply(&q[..11], "198.18.0.66".parse().expect("literal")).is_none());
}

#[test]
fn replies_are_read_with_compression_and_cnames() {
    // Query for w.test A, answered by a CNAME to x.test (pointer into the question for
    // the owner), an A and an AAAA record for x.test, and an unknown type.
    let mut m = dns_query_typed(7, "w.test", 1);
    m[2] |= 0x80;
    m[7] = 4;
    // CNAME: owner -> offset 12; rdata "x" + pointer to "test" at offset 14.
    m.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 4, 1, b'x', 0xc0, 14]);
    let x = u8::try_from(m.len() - 4).expect("offset");
    m.extend_from_slice(&[0xc0, x, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 0, 10]);
    m.extend_from_slice(&[0xc0, x, 0, 28, 0, 1, 0, 0, 0, 60, 0, 16]);
    m.extend_from_slice(&[0xfd, 0, 0, 0xe9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
    m.extend_from_slice(&[0xc0, x, 0, 99, 0, 1, 0, 0, 0, 60, 0, 1, 0]);
    assert_eq!(
        parse_reply(7, &m),
        Ok(Reply {
            rcode: 0,
            addrs: vec![
                "198.18.0.10".parse().expect("literal"),
                "fd00:e9::10".parse().expect("literal")
            ]
        })
    );
    assert!(parse_reply(8, &m).is_err(), "wrong id");
    let mut nx = dns_query_typed(9, "evil.test", 1);
    nx[2] |= 0x80;
    nx[3] = 3;
    assert_eq!(
        parse_reply(9, &nx),
        Ok(Reply {
            rcode: 3,
            addrs: vec![]
        })
    );
    // An answer count with no records behind it, and a pointer loop, are errors.
    nx[7] = 1;
    assert!(parse_reply(9, &nx).is_err());
    let mut looped = dns_query_typed(9, "a.test", 1);
    looped[2] |= 0x80;
    looped[7] = 1;
    let here = u8::try_from(looped.len()).expect("offset");
    looped.extend_from_slice(&[0x01, b'a', 0xc0, here]);
    assert!(parse_reply(9, &looped).is_err());
    assert!(parse_reply(9, &looped[..11]).is_err());
}

#[test]
fn then_connect_picks_the_first_address_of_its_family() {
    let addrs: Vec<IpAddr> = ["fd00:e9::10", "198.18.0.10", "198.18.0.11"]
        .iter()
        .map(|a| a.parse().expect("literal"))
        .collect();
    assert_eq!(first_addr(Family::V4, &addrs), Some(addrs[1]));
    assert_eq!(first_addr(Family::V6, &addrs), Some(addrs[0]));
    assert_eq!(first_addr(Family::V6, &addrs[1..]), Some(addrs[1]));
    assert_eq!(first_addr(Family::V4, &addrs[..1]), None);
    assert!(valid_query_name("n{i}.race.example.test"));
    assert!(valid_query_name("A.B.Example.Test."));
    assert!(!valid_query_name("."));
}

#[test]
fn dns_messages() {
    let q = dns_query(0x1234, "a.test");
    assert_eq!(
        q,
        [
            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 4, b't', b'e', b's', b't', 0, 0, 1,
            0, 1
        ]
    );
    let mut reply = q.clone();
    reply[2] |= 0x80;
    reply[7] = 1;
    assert!(dns_answered(0x1234, &reply));
    assert!(!dns_answered(0x1235, &reply));
    reply[3] = 3; // NXDOMAIN
    assert!(!dns_answered(0x1234, &reply));
}
