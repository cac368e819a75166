use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{self as h, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name as HName, RData, Record, RecordType};

use super::*;
use crate::craft::{header, push_question, push_rr, query, response, wire_name};
use crate::message::{Transport, flag, parse_query};
use crate::wire::MAX_POINTER_HOPS;

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn q(name: &str, qtype: u16) -> Question {
    Question {
        qname: name.into(),
        qtype,
        qclass: CLASS_IN,
    }
}

fn v4(s: &str) -> Vec<u8> {
    s.parse::<Ipv4Addr>()
        .unwrap_or_else(|e| panic!("{e}"))
        .octets()
        .to_vec()
}

fn v6(s: &str) -> Vec<u8> {
    s.parse::<Ipv6Addr>()
        .unwrap_or_else(|e| panic!("{e}"))
        .octets()
        .to_vec()
}

fn addrs(a: &Answer) -> Vec<(IpAddr, u32)> {
    a.addresses.iter().map(|r| (r.addr, r.ttl)).collect()
}

fn parse(msg: &[u8], question: &Question) -> Answer {
    parse_answer(msg, 7, question).unwrap_or_else(|e| panic!("{e}"))
}

fn err(msg: &[u8], question: &Question) -> AnswerError {
    match parse_answer(msg, 7, question) {
        Ok(a) => panic!("accepted: {a:?}"),
        Err(e) => e,
    }
}

fn cname(target: &str) -> Vec<u8> {
    wire_name(target)
}

#[test]
fn a_records_of_the_queried_name_are_extracted() {
    let m = response(
        7,
        "api.company.com",
        rtype::A,
        &[
            ("api.company.com", rtype::A, 300, v4("192.0.2.1")),
            ("API.Company.com", rtype::A, 60, v4("192.0.2.2")),
        ],
    );
    let a = parse(&m, &q("api.company.com", rtype::A));
    assert_eq!(a.rcode, Rcode::NoError);
    assert!(a.chain.is_empty());
    assert_eq!(
        addrs(&a),
        vec![(ip("192.0.2.1"), 300), (ip("192.0.2.2"), 60)]
    );
    assert_eq!(a.min_ttl(), Some(60));
}

#[test]
fn cname_chain_is_followed_and_min_ttl_covers_every_link() {
    let m = response(
        7,
        "www.example.com",
        rtype::AAAA,
        &[
            ("www.example.com", rtype::CNAME, 3600, cname("edge.cdn.net")),
            ("edge.cdn.net", rtype::CNAME, 20, cname("pop1.cdn.net")),
            ("pop1.cdn.net", rtype::AAAA, 120, v6("2001:db8::1")),
            ("pop1.cdn.net", rtype::AAAA, 90, v6("2001:db8::2")),
        ],
    );
    let question = q("www.example.com", rtype::AAAA);
    let a = parse(&m, &question);
    assert_eq!(
        a.chain,
        vec![
            CnameLink {
                owner: "www.example.com".into(),
                target: "edge.cdn.net".into(),
                ttl: 3600
            },
            CnameLink {
                owner: "edge.cdn.net".into(),
                target: "pop1.cdn.net".into(),
                ttl: 20
            },
        ]
    );
    assert_eq!(a.canonical_name(&question), "pop1.cdn.net");
    assert_eq!(a.addresses.len(), 2);
    assert_eq!(a.min_ttl(), Some(20));
}

#[test]
fn min_ttl_is_none_without_addresses() {
    let m = response(
        7,
        "a.example.com",
        rtype::A,
        &[("a.example.com", rtype::CNAME, 5, cname("b.example.com"))],
    );
    let a = parse(&m, &q("a.example.com", rtype::A));
    assert_eq!(a.chain.len(), 1);
    assert!(a.addresses.is_empty());
    assert_eq!(a.min_ttl(), None);
}

#[test]
fn records_of_other_names_and_types_are_ignored() {
    let m = response(
        7,
        "api.company.com",
        rtype::A,
        &[
            ("evil.com", rtype::A, 300, v4("203.0.113.66")),
            ("api.company.com", rtype::AAAA, 300, v6("2001:db8::1")),
            ("api.company.com", 16, 300, b"\x05hello".to_vec()), // TXT
            ("api.company.com", rtype::A, 300, v4("192.0.2.1")),
        ],
    );
    let a = parse(&m, &q("api.company.com", rtype::A));
    assert_eq!(addrs(&a), vec![(ip("192.0.2.1"), 300)]);
    let m = response(
        7,
        "x.com",
        rtype::ANY,
        &[
            ("x.com", rtype::AAAA, 300, v6("2001:db8::1")),
            ("x.com", rtype::A, 300, v4("192.0.2.1")),
        ],
    );
    assert_eq!(parse(&m, &q("x.com", rtype::ANY)).addresses.len(), 2);
    // Records of class CH are not addresses.
    let mut m = header(7, flag::QR, [1, 1, 0, 0]);
    push_question(&mut m, "x.com", rtype::A);
    m.extend_from_slice(&wire_name("x.com"));
    m.extend_from_slice(&[0, 1, 0, 3, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
    assert!(parse(&m, &q("x.com", rtype::A)).addresses.is_empty());
}

#[test]
fn duplicate_addresses_are_kept_once_with_the_lower_ttl() {
    let m = response(
        7,
        "x.com",
        rtype::A,
        &[
            ("x.com", rtype::A, 300, v4("192.0.2.1")),
            ("x.com", rtype::A, 30, v4("192.0.2.1")),
        ],
    );
    assert_eq!(
        addrs(&parse(&m, &q("x.com", rtype::A))),
        vec![(ip("192.0.2.1"), 30)]
    );
}

#[test]
fn ttl_with_the_top_bit_set_counts_as_zero() {
    let m = response(
        7,
        "x.com",
        rtype::A,
        &[("x.com", rtype::A, 0x8000_0001, v4("192.0.2.1"))],
    );
    assert_eq!(parse(&m, &q("x.com", rtype::A)).min_ttl(), Some(0));
}

#[test]
fn nxdomain_and_servfail_give_no_addresses() {
    let mut m = response(
        7,
        "x.com",
        rtype::A,
        &[("x.com", rtype::A, 60, v4("192.0.2.1"))],
    );
    m[3] = (m[3] & 0xF0) | 3;
    let a = parse(&m, &q("x.com", rtype::A));
    assert_eq!(a.rcode, Rcode::NxDomain);
    assert!(a.addresses.is_empty());
    m[3] = (m[3] & 0xF0) | 2;
    assert_eq!(parse(&m, &q("x.com", rtype::A)).rcode, Rcode::ServFail);
}

#[test]
fn cname_loops_are_refused() {
    let m = response(
        7,
        "a.com",
        rtype::A,
        &[
            ("a.com", rtype::CNAME, 60, cname("b.com")),
            ("b.com", rtype::CNAME, 60, cname("a.com")),
            ("a.com", rtype::A, 60, v4("192.0.2.1")),
        ],
    );
    // a.com has a CNAME and an address: refused before the loop is even reached.
    assert!(matches!(
        err(&m, &q("a.com", rtype::A)),
        AnswerError::ConflictingCname { .. }
    ));
    let m = response(
        7,
        "a.com",
        rtype::A,
        &[
            ("a.com", rtype::CNAME, 60, cname("b.com")),
            ("b.com", rtype::CNAME, 60, cname("c.com")),
            ("c.com", rtype::CNAME, 60, cname("b.com")),
        ],
    );
    assert_eq!(
        err(&m, &q("a.com", rtype::A)),
        AnswerError::CnameLoop {
            name: "b.com".into()
        }
    );
    let m = response(
        7,
        "a.com",
        rtype::A,
        &[("a.com", rtype::CNAME, 60, cname("A.COM"))],
    );
    assert!(matches!(
        err(&m, &q("a.com", rtype::A)),
        AnswerError::CnameLoop { .. }
    ));
}

fn chain_of(links: usize) -> Vec<u8> {
    let mut answers = Vec::new();
    for i in 0..links {
        answers.push((
            format!("n{i}.com"),
            rtype::CNAME,
            60,
            cname(&format!("n{}.com", i + 1)),
        ));
    }
    answers.push((format!("n{links}.com"), rtype::A, 60, v4("192.0.2.1")));
    let borrowed: Vec<(&str, u16, u32, Vec<u8>)> = answers
        .iter()
        .map(|(o, t, ttl, d)| (o.as_str(), *t, *ttl, d.clone()))
        .collect();
    response(7, "n0.com", rtype::A, &borrowed)
}

#[test]
fn cname_chain_length_is_bounded() {
    let a = parse(&chain_of(MAX_CNAME_CHAIN), &q("n0.com", rtype::A));
    assert_eq!(a.chain.len(), MAX_CNAME_CHAIN);
    assert_eq!(a.addresses.len(), 1);
    assert_eq!(
        err(&chain_of(MAX_CNAME_CHAIN + 1), &q("n0.com", rtype::A)),
        AnswerError::CnameChainTooLong
    );
}

#[test]
fn conflicting_cnames_are_refused_and_repeated_ones_accepted() {
    let m = response(
        7,
        "a.com",
        rtype::A,
        &[
            ("a.com", rtype::CNAME, 60, cname("b.com")),
            ("a.com", rtype::CNAME, 60, cname("c.com")),
        ],
    );
    assert!(matches!(
        err(&m, &q("a.com", rtype::A)),
        AnswerError::ConflictingCname { .. }
    ));
    let m = response(
        7,
        "a.com",
        rtype::A,
        &[
            ("a.com", rtype::CNAME, 60, cname("b.com")),
            ("a.com", rtype::CNAME, 10, cname("B.com")),
            ("b.com", rtype::A, 60, v4("192.0.2.1")),
        ],
    );
    let a = parse(&m, &q("a.com", rtype::A));
    assert_eq!(a.chain.len(), 1);
    assert_eq!(a.min_ttl(), Some(10));
}

#[test]
fn cname_target_with_odd_octets_is_refused() {
    let m = response(
        7,
        "a.com",
        rtype::A,
        &[("a.com", rtype::CNAME, 60, cname("b\0.com"))],
    );
    assert!(matches!(
        err(&m, &q("a.com", rtype::A)),
        AnswerError::CnameTargetOctet { .. }
    ));
}

#[test]
fn the_answer_must_be_to_the_question_asked() {
    let good = response(
        7,
        "x.com",
        rtype::A,
        &[("x.com", rtype::A, 60, v4("192.0.2.1"))],
    );
    assert_eq!(
        parse_answer(&good, 8, &q("x.com", rtype::A)).err(),
        Some(AnswerError::IdMismatch {
            expected: 8,
            got: 7
        })
    );
    assert_eq!(
        err(&good, &q("y.com", rtype::A)),
        AnswerError::QuestionMismatch
    );
    assert_eq!(
        err(&good, &q("x.com", rtype::AAAA)),
        AnswerError::QuestionMismatch
    );
    let mut not_response = good.clone();
    not_response[2] &= 0x7F;
    assert_eq!(
        err(&not_response, &q("x.com", rtype::A)),
        AnswerError::NotAResponse
    );
    let mut truncated = good.clone();
    truncated[2] |= 0x02;
    assert_eq!(
        err(&truncated, &q("x.com", rtype::A)),
        AnswerError::Truncated
    );
    let mut no_question = header(7, flag::QR, [0, 0, 0, 0]);
    assert_eq!(
        err(&no_question, &q("x.com", rtype::A)),
        AnswerError::QuestionCount(0)
    );
    no_question.truncate(5);
    assert!(matches!(
        err(&no_question, &q("x.com", rtype::A)),
        AnswerError::TooShort { len: 5 }
    ));
    let mut update = good;
    update[2] |= 5 << 3;
    assert_eq!(err(&update, &q("x.com", rtype::A)), AnswerError::Opcode(5));
}

#[test]
fn every_truncation_of_a_valid_answer_is_an_error() {
    let full = chain_of(3);
    let question = q("n0.com", rtype::A);
    assert!(parse_answer(&full, 7, &question).is_ok());
    for cut in 0..full.len() {
        assert!(
            parse_answer(&full[..cut], 7, &question).is_err(),
            "cut at {cut}"
        );
    }
}

#[test]
fn bad_record_data_and_trailing_bytes_are_refused() {
    let m = response(7, "x.com", rtype::A, &[("x.com", rtype::A, 60, vec![1; 5])]);
    assert_eq!(
        err(&m, &q("x.com", rtype::A)),
        AnswerError::BadRdata {
            rtype: rtype::A,
            len: 5
        }
    );
    let m = response(
        7,
        "x.com",
        rtype::AAAA,
        &[("x.com", rtype::AAAA, 60, vec![1; 4])],
    );
    assert!(matches!(
        err(&m, &q("x.com", rtype::AAAA)),
        AnswerError::BadRdata { .. }
    ));
    let mut data = cname("y.com");
    data.push(0);
    let m = response(7, "x.com", rtype::A, &[("x.com", rtype::CNAME, 60, data)]);
    assert!(matches!(
        err(&m, &q("x.com", rtype::A)),
        AnswerError::BadRdata { .. }
    ));
    let mut m = response(
        7,
        "x.com",
        rtype::A,
        &[("x.com", rtype::A, 60, v4("192.0.2.1"))],
    );
    m.push(0);
    assert_eq!(
        err(&m, &q("x.com", rtype::A)),
        AnswerError::TrailingBytes(1)
    );
    // The header promises a record that is not there.
    let mut m = response(7, "x.com", rtype::A, &[]);
    m[7] = 1;
    assert!(matches!(
        err(&m, &q("x.com", rtype::A)),
        AnswerError::Name { .. }
    ));
}

#[test]
fn pointer_loops_and_long_chains_in_records_are_refused() {
    // Owner pointing at itself.
    let mut m = header(7, flag::QR, [1, 1, 0, 0]);
    push_question(&mut m, "x.com", rtype::A);
    let at = m.len();
    push_rr(
        &mut m,
        &(0xC000u16 | at as u16).to_be_bytes(),
        rtype::A,
        60,
        &v4("192.0.2.1"),
    );
    assert!(matches!(
        err(&m, &q("x.com", rtype::A)),
        AnswerError::Name {
            source: NameError::PointerNotBackwards { .. },
            ..
        }
    ));
    // CNAME data pointing at itself.
    let mut m = header(7, flag::QR, [1, 1, 0, 0]);
    push_question(&mut m, "x.com", rtype::A);
    let rdata_at = m.len() + 2 + 10;
    push_rr(
        &mut m,
        &[0xC0, 12],
        rtype::CNAME,
        60,
        &(0xC000u16 | rdata_at as u16).to_be_bytes(),
    );
    assert!(matches!(
        err(&m, &q("x.com", rtype::A)),
        AnswerError::Name {
            source: NameError::PointerNotBackwards { .. },
            ..
        }
    ));
    // A chain of pointers longer than the bound: built inside the data of one authority
    // record (each pointer to the one before, the first to the question name), and used as the
    // owner of the next.
    let mut m = header(7, flag::QR, [1, 0, 2, 0]);
    push_question(&mut m, "x.com", rtype::A);
    let data_at = m.len() + 2 + 10; // owner (pointer, 2) + fixed fields (10)
    let mut data = Vec::new();
    let mut prev = 12usize;
    for _ in 0..=MAX_POINTER_HOPS {
        let here = data_at + data.len();
        data.extend_from_slice(&(0xC000u16 | prev as u16).to_be_bytes());
        prev = here;
    }
    push_rr(&mut m, &[0xC0, 12], 16, 60, &data);
    push_rr(
        &mut m,
        &(0xC000u16 | prev as u16).to_be_bytes(),
        16,
        60,
        b"",
    );
    assert!(matches!(
        err(&m, &q("x.com", rtype::A)),
        AnswerError::Name {
            source: NameError::TooManyPointers,
            ..
        }
    ));
}

#[test]
fn authority_and_additional_sections_are_walked() {
    let mut m = header(7, flag::QR | flag::RD | flag::RA, [1, 1, 1, 2]);
    push_question(&mut m, "x.com", rtype::A);
    push_rr(&mut m, &[0xC0, 12], rtype::A, 60, &v4("192.0.2.1"));
    push_rr(&mut m, &[0xC0, 12], 2, 60, &wire_name("ns1.x.com")); // NS
    push_rr(
        &mut m,
        &wire_name("ns1.x.com"),
        rtype::A,
        60,
        &v4("192.0.2.53"),
    );
    m.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]); // OPT
    let a = parse(&m, &q("x.com", rtype::A));
    assert_eq!(addrs(&a), vec![(ip("192.0.2.1"), 60)]);
}

fn hickory_name(s: &str) -> HName {
    HName::from_ascii(s).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn compressed_answer_encoded_by_hickory_parses() {
    let mut msg = Message::new(7, MessageType::Response, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.metadata.recursion_available = true;
    msg.add_query(h::Query::query(
        hickory_name("www.example.com."),
        RecordType::A,
    ));
    msg.add_answer(Record::from_rdata(
        hickory_name("www.example.com."),
        300,
        RData::CNAME(CNAME(hickory_name("edge.example.com."))),
    ));
    msg.add_answer(Record::from_rdata(
        hickory_name("edge.example.com."),
        60,
        RData::A(A(Ipv4Addr::new(192, 0, 2, 10))),
    ));
    msg.add_answer(Record::from_rdata(
        hickory_name("edge.example.com."),
        45,
        RData::A(A(Ipv4Addr::new(192, 0, 2, 11))),
    ));
    msg.add_additional(Record::from_rdata(
        hickory_name("edge.example.com."),
        60,
        RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
    ));
    let bytes = msg.to_vec().unwrap_or_else(|e| panic!("{e}"));
    // hickory compresses: the message is shorter than its names written out.
    assert!(bytes.windows(1).filter(|w| w[0] & 0xC0 == 0xC0).count() >= 3);
    let a = parse(&bytes, &q("www.example.com", rtype::A));
    assert_eq!(a.chain.len(), 1);
    assert_eq!(
        addrs(&a),
        vec![(ip("192.0.2.10"), 60), (ip("192.0.2.11"), 45)]
    );
    assert_eq!(a.min_ttl(), Some(45));
}

#[test]
fn address_response_carries_the_chain_and_the_installed_addresses() {
    let query_bytes = query(0x5151, "WWW.example.com", rtype::A);
    let query = parse_query(&query_bytes, Transport::Udp).unwrap_or_else(|e| panic!("{e}"));
    let chain = vec![CnameLink {
        owner: "www.example.com".into(),
        target: "edge.cdn.net".into(),
        ttl: 30,
    }];
    let addresses = vec![
        AddressRecord {
            addr: ip("192.0.2.1"),
            ttl: 20,
        },
        AddressRecord {
            addr: ip("2001:db8::1"),
            ttl: 20,
        },
    ];
    let resp = address_response(&query, &chain, &addresses, 512);
    let d = Message::from_vec(&resp).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.metadata.id, 0x5151);
    assert_eq!(d.metadata.response_code, ResponseCode::NoError);
    assert!(!d.metadata.truncation);
    assert_eq!(d.queries[0].name().to_ascii(), "WWW.example.com.");
    assert_eq!(d.answers.len(), 3);
    assert_eq!(d.answers[0].record_type(), RecordType::CNAME);
    assert_eq!(d.answers[0].name.to_ascii(), "www.example.com.");
    assert_eq!(d.answers[1].name.to_ascii(), "edge.cdn.net.");
    assert_eq!(d.answers[1].ttl, 20);
    // Our own parser reads it back, as a client would.
    let back = parse_answer(&resp, 0x5151, &query.question).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back.chain, chain);
    assert_eq!(addrs(&back), vec![(ip("192.0.2.1"), 20)]);

    // Too large for the client's limit: TC and no records.
    let many: Vec<AddressRecord> = (0..40u8)
        .map(|i| AddressRecord {
            addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)),
            ttl: 5,
        })
        .collect();
    let resp = address_response(&query, &[], &many, 512);
    let d = Message::from_vec(&resp).unwrap_or_else(|e| panic!("{e}"));
    assert!(d.metadata.truncation);
    assert!(d.answers.is_empty());
    let resp = address_response(&query, &[], &many, 65535);
    assert_eq!(
        Message::from_vec(&resp)
            .unwrap_or_else(|e| panic!("{e}"))
            .answers
            .len(),
        40
    );
}
