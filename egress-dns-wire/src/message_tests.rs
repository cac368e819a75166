use hickory_proto::op::{self as h, Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{Name as HName, RecordType};

use super::*;
use crate::craft::{header, push_name, push_opt, push_question, query, query_with_edns};

fn ok(msg: &[u8]) -> Query {
    parse_query(msg, Transport::Udp).unwrap_or_else(|e| panic!("{e}"))
}

fn rejected(msg: &[u8]) -> Malformed {
    match parse_query(msg, Transport::Udp) {
        Err(QueryError::Reject { reason, .. }) => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn dropped(msg: &[u8], transport: Transport) -> DropReason {
    match parse_query(msg, transport) {
        Err(QueryError::Drop(reason)) => reason,
        other => panic!("expected a drop, got {other:?}"),
    }
}

fn decode(msg: &[u8]) -> Message {
    Message::from_vec(msg).unwrap_or_else(|e| panic!("hickory cannot decode our response: {e}"))
}

#[test]
fn plain_query_parses_to_lowercase_name_without_dot() {
    let q = ok(&query(0x1234, "WWW.Example.COM", rtype::AAAA));
    assert_eq!(q.id, 0x1234);
    assert!(q.recursion_desired());
    assert!(!q.checking_disabled());
    assert_eq!(q.question.qname, "www.example.com");
    assert_eq!(q.question.qtype, rtype::AAAA);
    assert_eq!(q.question.qclass, CLASS_IN);
    assert!(q.question.asks_for_addresses());
    assert_eq!(q.edns, None);
    assert_eq!(q.max_udp_response_len(), 512);
}

#[test]
fn root_and_underscore_names_parse() {
    assert_eq!(ok(&query(1, "", 2)).question.qname, "");
    assert_eq!(
        ok(&query(1, "_sip._tcp.example.com", 33)).question.qname,
        "_sip._tcp.example.com"
    );
}

#[test]
fn edns_is_read_with_its_options() {
    let mut m = header(7, flag::RD | flag::CD, [1, 0, 0, 1]);
    push_question(&mut m, "example.com", rtype::A);
    push_opt(&mut m, 1400, 0, true, &[(10, &[0; 8]), (12, &[0; 20])]);
    let q = ok(&m);
    assert!(q.checking_disabled());
    assert_eq!(
        q.edns,
        Some(Edns0 {
            udp_payload_size: 1400,
            version: 0,
            dnssec_ok: true,
            options: vec![10, 12],
        })
    );
    assert_eq!(q.max_udp_response_len(), 1232);
}

type Edns0 = super::Edns;

#[test]
fn query_encoded_by_hickory_parses() {
    let mut msg = Message::new(0xBEEF, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    let name = HName::from_ascii("Api.Company.com.").unwrap_or_else(|e| panic!("{e}"));
    msg.add_query(h::Query::query(name, RecordType::A));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    msg.set_edns(edns);
    let bytes = msg.to_vec().unwrap_or_else(|e| panic!("{e}"));
    let q = ok(&bytes);
    assert_eq!(q.id, 0xBEEF);
    assert_eq!(q.question.qname, "api.company.com");
    assert_eq!(q.edns.map(|e| e.udp_payload_size), Some(1232));
}

#[test]
fn every_truncation_of_a_valid_query_is_refused_never_accepted() {
    let full = query_with_edns(9, "a.b.example.com", rtype::A);
    assert!(parse_query(&full, Transport::Udp).is_ok());
    for cut in 0..full.len() {
        match parse_query(&full[..cut], Transport::Udp) {
            Err(QueryError::Drop(DropReason::TooShort { .. })) => assert!(cut < HEADER_LEN),
            Err(QueryError::Reject { reason, .. }) => {
                assert!(cut >= HEADER_LEN);
                assert_eq!(reason.rcode(), Rcode::FormErr, "cut {cut}: {reason}");
            }
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

#[test]
fn oversize_is_dropped_on_udp_and_judged_on_tcp() {
    let mut m = header(1, 0, [1, 0, 0, 1]);
    push_question(&mut m, "example.com", rtype::A);
    push_opt(&mut m, 512, 0, false, &[(12, &[0; 500])]);
    assert!(m.len() > MAX_UDP_QUERY_LEN);
    assert_eq!(
        dropped(&m, Transport::Udp),
        DropReason::TooLong {
            len: m.len(),
            max: 512
        }
    );
    assert!(parse_query(&m, Transport::Tcp).is_ok());
    let huge = vec![0u8; MAX_TCP_MESSAGE_LEN + 1];
    assert!(matches!(
        dropped(&huge, Transport::Tcp),
        DropReason::TooLong { .. }
    ));
}

#[test]
fn responses_and_runts_are_dropped() {
    let mut m = query(1, "example.com", rtype::A);
    m[2] |= 0x80; // QR
    assert_eq!(dropped(&m, Transport::Udp), DropReason::NotAQuery);
    assert_eq!(
        dropped(&m[..11], Transport::Udp),
        DropReason::TooShort { len: 11 }
    );
    assert_eq!(
        dropped(&[], Transport::Udp),
        DropReason::TooShort { len: 0 }
    );
}

#[test]
fn zero_or_two_questions_get_formerr() {
    let m = header(5, flag::RD, [0, 0, 0, 0]);
    assert_eq!(rejected(&m), Malformed::QuestionCount(0));
    let mut m = header(5, flag::RD, [2, 0, 0, 0]);
    push_question(&mut m, "a.example.com", rtype::A);
    push_question(&mut m, "b.example.com", rtype::A);
    assert_eq!(rejected(&m), Malformed::QuestionCount(2));
}

#[test]
fn records_in_a_query_get_formerr() {
    let mut m = header(5, 0, [1, 1, 0, 0]);
    push_question(&mut m, "example.com", rtype::A);
    assert!(matches!(rejected(&m), Malformed::RecordsInQuery { .. }));
    let mut m = header(5, 0, [1, 0, 1, 0]);
    push_question(&mut m, "example.com", rtype::A);
    assert!(matches!(rejected(&m), Malformed::RecordsInQuery { .. }));
    let mut m = header(5, 0, [1, 0, 0, 2]);
    push_question(&mut m, "example.com", rtype::A);
    push_opt(&mut m, 512, 0, false, &[]);
    push_opt(&mut m, 512, 0, false, &[]);
    assert_eq!(rejected(&m), Malformed::AdditionalCount(2));
}

#[test]
fn bad_names_get_formerr() {
    // Label length 64 has the 0x40 bit: not a length.
    let mut m = header(1, 0, [1, 0, 0, 0]);
    m.push(64);
    m.extend_from_slice(&[b'a'; 64]);
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    assert!(matches!(
        rejected(&m),
        Malformed::Name(NameError::BadLabelType { bits: 0x40, .. })
    ));
    // 5 labels of 60: 306 octets.
    let long = vec!["a".repeat(60); 5].join(".");
    assert_eq!(
        rejected(&query(1, &long, rtype::A)),
        Malformed::Name(NameError::TooLong)
    );
    // A pointer in the question can only point into the header or forwards.
    let mut m = header(1, 0, [1, 0, 0, 0]);
    m.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
    assert!(matches!(
        rejected(&m),
        Malformed::Name(NameError::PointerNotBackwards { .. })
    ));
    let mut m = header(1, 0, [1, 0, 0, 0]);
    m.extend_from_slice(&[1, b'a', 0xC0, 2, 0, 1, 0, 1]);
    assert!(matches!(
        rejected(&m),
        Malformed::Name(NameError::PointerNotBackwards { .. })
    ));
    // Octets outside letters, digits, `-`, `_`.
    for name in [
        "api.company\0.com",
        "a b.com",
        "*.example.com",
        "caf\u{e9}.com",
    ] {
        assert_eq!(
            rejected(&query(1, name, rtype::A)),
            Malformed::NameOctet,
            "{name}"
        );
    }
    // A label that holds a dot.
    let mut m = header(1, 0, [1, 0, 0, 0]);
    m.push(11);
    m.extend_from_slice(b"api.company");
    push_name(&mut m, "com");
    m.extend_from_slice(&[0, 1, 0, 1]);
    assert_eq!(rejected(&m), Malformed::NameOctet);
}

#[test]
fn additional_records_other_than_a_good_opt_get_formerr() {
    // TSIG-like record.
    let mut m = header(1, 0, [1, 0, 0, 1]);
    push_question(&mut m, "example.com", rtype::A);
    push_name(&mut m, "key.example.com");
    m.extend_from_slice(&250u16.to_be_bytes());
    m.extend_from_slice(&[0, 255, 0, 0, 0, 0, 0, 0]);
    assert_eq!(rejected(&m), Malformed::NotOpt(250));
    // OPT with a non-root owner.
    let mut m = header(1, 0, [1, 0, 0, 1]);
    push_question(&mut m, "example.com", rtype::A);
    let mut opt = Vec::new();
    push_opt(&mut opt, 512, 0, false, &[]);
    m.extend_from_slice(&[1, b'x']);
    m.extend_from_slice(&opt);
    assert_eq!(rejected(&m), Malformed::OptOwner);
    // Option length overruns the OPT data.
    let mut m = header(1, 0, [1, 0, 0, 1]);
    push_question(&mut m, "example.com", rtype::A);
    m.extend_from_slice(&[0, 0, 41, 2, 0, 0, 0, 0, 0, 0, 6, 0, 10, 0, 8, 1, 2]);
    assert_eq!(rejected(&m), Malformed::OptOptions);
    // Too many options.
    let mut m = header(1, 0, [1, 0, 0, 1]);
    push_question(&mut m, "example.com", rtype::A);
    let many: Vec<(u16, &[u8])> = (0..=MAX_EDNS_OPTIONS as u16)
        .map(|c| (c, &[][..]))
        .collect();
    push_opt(&mut m, 512, 0, false, &many);
    assert_eq!(rejected(&m), Malformed::TooManyOptions);
    // Trailing bytes.
    let mut m = query(1, "example.com", rtype::A);
    m.push(0);
    assert_eq!(rejected(&m), Malformed::TrailingBytes(1));
    // OPT as a question type.
    assert_eq!(
        rejected(&query(1, "example.com", rtype::OPT)),
        Malformed::OptQuestion
    );
}

#[test]
fn unknown_opcode_gets_notimp_echoing_the_header() {
    let mut m = query(0x4242, "example.com", rtype::A);
    m[2] |= 5 << 3; // UPDATE
    let err = parse_query(&m, Transport::Udp).err();
    let Some(err @ QueryError::Reject { reason, .. }) = err else {
        panic!("{err:?}");
    };
    assert_eq!(reason, Malformed::Opcode(5));
    let resp = err.response().unwrap_or_else(|| panic!("no response"));
    let d = decode(&resp);
    assert_eq!(d.metadata.id, 0x4242);
    assert_eq!(d.metadata.message_type, MessageType::Response);
    assert_eq!(d.metadata.op_code, OpCode::Update);
    assert_eq!(d.metadata.response_code, ResponseCode::NotImp);
    assert!(d.queries.is_empty());
}

#[test]
fn formerr_response_echoes_id_rd_cd_and_no_question() {
    let mut m = header(0x0102, flag::RD | flag::CD | flag::TC, [2, 0, 0, 0]);
    push_question(&mut m, "a.example.com", rtype::A);
    push_question(&mut m, "b.example.com", rtype::A);
    let resp = parse_query(&m, Transport::Udp)
        .err()
        .and_then(|e| e.response())
        .unwrap_or_else(|| panic!("no FORMERR"));
    let d = decode(&resp);
    assert_eq!(d.metadata.id, 0x0102);
    assert_eq!(d.metadata.response_code, ResponseCode::FormErr);
    assert!(d.metadata.recursion_desired);
    assert!(d.metadata.checking_disabled);
    assert!(!d.metadata.truncation);
    assert!(d.queries.is_empty());
    assert!(d.edns.is_none());
    // Dropped packets get nothing.
    assert_eq!(QueryError::Drop(DropReason::NotAQuery).response(), None);
}

#[test]
fn edns_version_1_gets_badvers_in_the_opt() {
    let mut m = header(3, 0, [1, 0, 0, 1]);
    push_question(&mut m, "example.com", rtype::A);
    push_opt(&mut m, 1232, 1, false, &[]);
    assert_eq!(rejected(&m), Malformed::EdnsVersion(1));
    let resp = parse_query(&m, Transport::Udp)
        .err()
        .and_then(|e| e.response())
        .unwrap_or_else(|| panic!("no BADVERS"));
    let d = decode(&resp);
    // 16 is BADVERS in an OPT (hickory names the code after its TSIG meaning, BADSIG).
    assert_eq!(u16::from(d.metadata.response_code), 16);
    assert_eq!(d.edns.map(|e| e.version()), Some(0));
}

#[test]
fn nxdomain_and_refused_echo_the_question_as_sent() {
    let mut m = header(0xABCD, flag::RD | flag::CD, [1, 0, 0, 0]);
    push_question(&mut m, "EviL.Com", rtype::A);
    let q = ok(&m);
    for (resp, code) in [
        (q.nxdomain(), ResponseCode::NXDomain),
        (q.refused(), ResponseCode::Refused),
        (q.servfail(), ResponseCode::ServFail),
    ] {
        // The question section is byte-for-byte the query's (0x20 case kept).
        assert_eq!(&resp[HEADER_LEN..], &m[HEADER_LEN..]);
        let d = decode(&resp);
        assert_eq!(d.metadata.id, 0xABCD);
        assert_eq!(d.metadata.message_type, MessageType::Response);
        assert_eq!(d.metadata.response_code, code);
        assert!(d.metadata.recursion_desired);
        assert!(d.metadata.recursion_available);
        assert!(d.metadata.checking_disabled);
        assert!(!d.metadata.authoritative);
        assert!(!d.metadata.authentic_data);
        assert!(!d.metadata.truncation);
        assert_eq!(d.queries.len(), 1);
        assert_eq!(d.queries[0].name().to_ascii(), "EviL.Com.");
        assert!(d.answers.is_empty());
        assert!(d.edns.is_none(), "no OPT without one in the query");
    }
}

#[test]
fn blocked_answers_carry_ede_blocked_when_the_query_has_edns() {
    let mut m = header(1, flag::RD, [1, 0, 0, 1]);
    push_question(&mut m, "evil.com", rtype::A);
    push_opt(&mut m, 4096, 0, true, &[]);
    let q = ok(&m);
    let resp = q.nxdomain();
    let d = decode(&resp);
    assert_eq!(d.metadata.response_code, ResponseCode::NXDomain);
    let edns = d.edns.unwrap_or_else(|| panic!("no OPT"));
    assert_eq!(edns.max_payload(), PROXY_EDNS_UDP_SIZE);
    assert!(edns.flags().dnssec_ok, "DO copied");
    // EDE option 15 with INFO-CODE 15.
    let tail = &resp[resp.len() - EDE_TEXT.len() - 6..];
    assert_eq!(&tail[..6], &[0, 15, 0, 2 + EDE_TEXT.len() as u8, 0, 15]);
    // SERVFAIL carries an OPT but no EDE.
    let d = decode(&q.servfail());
    assert!(d.edns.is_some_and(|e| e.options().as_ref().is_empty()));
}

#[test]
fn responses_fit_the_clients_limit() {
    let q = ok(&query_with_edns(
        1,
        &vec!["a".repeat(63); 3].join("."),
        rtype::A,
    ));
    assert!(q.nxdomain().len() <= q.max_udp_response_len());
    let q = ok(&query(1, &vec!["a".repeat(63); 3].join("."), rtype::A));
    assert!(q.nxdomain().len() <= 512);
}

#[test]
fn tcp_framing_round_trips_and_waits_for_whole_messages() {
    let msg = query(1, "example.com", rtype::A);
    let framed = tcp_frame(&msg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&framed[..2], &(msg.len() as u16).to_be_bytes());
    for cut in 0..framed.len() {
        assert_eq!(tcp_unframe(&framed[..cut]), Ok(None), "cut {cut}");
    }
    let mut two = framed.clone();
    two.extend_from_slice(&framed);
    assert_eq!(tcp_unframe(&two), Ok(Some((&msg[..], framed.len()))));
    assert_eq!(
        tcp_unframe(&[0, 5, 1, 2, 3, 4, 5]),
        Err(FrameError::TooShort { len: 5 })
    );
    assert_eq!(
        tcp_frame(&vec![0; 65536]),
        Err(FrameError::TooLong { len: 65536 })
    );
    assert!(tcp_frame(&vec![0; 65535]).is_ok());
}
