use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::message::{
    CLASS_IN, EDNS_UDP_SIZE, OPT_EDE, TYPE_A, TYPE_AAAA, TYPE_CNAME, TYPE_OPT, build_query,
    parse_answer, rcode_name,
};
use crate::net::{Failure, Ids, judge};
use crate::{Step, parse_step};

fn answer_with(rcode: u8, records: &[(u16, Vec<u8>)], ede: Option<(u16, &str)>) -> Vec<u8> {
    let mut m = build_query(0x1234, "a.example.test", TYPE_A, false);
    m[2] |= 0x80;
    m[3] = rcode;
    m[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
    for (rtype, rdata) in records {
        m.extend_from_slice(&[0xc0, 12]);
        m.extend_from_slice(&rtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m.extend_from_slice(&300u32.to_be_bytes());
        m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        m.extend_from_slice(rdata);
    }
    if let Some((code, text)) = ede {
        m[10..12].copy_from_slice(&1u16.to_be_bytes());
        let mut opt = Vec::new();
        opt.extend_from_slice(&OPT_EDE.to_be_bytes());
        opt.extend_from_slice(&((2 + text.len()) as u16).to_be_bytes());
        opt.extend_from_slice(&code.to_be_bytes());
        opt.extend_from_slice(text.as_bytes());
        m.push(0);
        m.extend_from_slice(&TYPE_OPT.to_be_bytes());
        m.extend_from_slice(&EDNS_UDP_SIZE.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(&(opt.len() as u16).to_be_bytes());
        m.extend_from_slice(&opt);
    }
    m
}

#[test]
fn reads_addresses_and_rcodes() {
    let msg = answer_with(
        0,
        &[
            (TYPE_CNAME, vec![1, b'b', 0xc0, 12]),
            (TYPE_A, vec![198, 18, 0, 10]),
            (TYPE_AAAA, Ipv6Addr::LOCALHOST.octets().to_vec()),
        ],
        None,
    );
    let a = parse_answer(&msg).unwrap_or_else(|| panic!("unparsed"));
    assert_eq!(a.id, 0x1234);
    assert!(a.response);
    assert_eq!(a.rcode, 0);
    assert_eq!(a.cnames, 1);
    assert_eq!(
        a.addresses,
        vec![
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10)),
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        ]
    );
    assert!(judge(a).is_ok());
}

#[test]
fn reads_an_extended_dns_error() {
    let msg = answer_with(3, &[], Some((15, "Blocked")));
    let a = parse_answer(&msg).unwrap_or_else(|| panic!("unparsed"));
    assert_eq!(rcode_name(a.rcode), "NXDOMAIN");
    assert_eq!(a.ede, Some((15, "Blocked".to_owned())));
    assert!(matches!(judge(a), Err(Failure::Rcode(3))));
}

#[test]
fn refuses_truncated_and_looping_messages() {
    let msg = answer_with(0, &[(TYPE_A, vec![198, 18, 0, 10])], None);
    for cut in 0..msg.len() {
        // Short reads never panic; most are refused.
        let _ = parse_answer(&msg[..cut]);
    }
    assert!(parse_answer(&msg[..msg.len() - 1]).is_none());
    let mut looping = build_query(1, "x", TYPE_A, false);
    looping.truncate(12);
    looping.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    assert!(parse_answer(&looping).is_some_and(|a| a.addresses.is_empty()));
}

#[test]
fn parses_steps() {
    let s = parse_step("seq 198.18.0.2 a.example.test 10 2000").unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(s, Step::Seq { server, n: 2000, .. }
        if server == SocketAddr::from(([198, 18, 0, 2], 53))));
    assert!(parse_step("query udp [fd00:e9::2]:5353 a.test AAAA").is_ok());
    assert!(parse_step("query quic 198.18.0.2 a.test A").is_err());
    assert!(parse_step("par 198.18.0.2 a..test 4 10").is_err());
    assert!(parse_step("par 198.18.0.2 a.test 0 10").is_err());
}

#[test]
fn ids_do_not_repeat_within_a_window() {
    let mut ids = Ids::new(3);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..60_000 {
        assert!(seen.insert(ids.next()));
    }
}
