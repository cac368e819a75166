//! The DNS proxy's parsers (egress-dns-wire) on arbitrary bytes: the workload's queries (UDP
//! and TCP) and upstream answers. Any panic, hang or out-of-bounds access is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;

use egress_dns_wire::answer::{MAX_CNAME_CHAIN, address_response, parse_answer};
use egress_dns_wire::message::{Header, Question, Transport, parse_query, tcp_unframe};
use egress_dns_wire::wire::{HEADER_LEN, Reader};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, msg)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => query(msg, Transport::Udp),
        1 => {
            query(msg, Transport::Tcp);
            if let Ok(Some((framed, used))) = tcp_unframe(msg) {
                assert!(used == framed.len() + 2 && used <= msg.len());
                query(framed, Transport::Tcp);
            }
        }
        _ => answer(msg),
    }
});

fn query(msg: &[u8], transport: Transport) {
    match parse_query(msg, transport) {
        Ok(q) => {
            // The proxy's own answers must read back as answers to the question.
            for resp in [q.nxdomain(), q.refused(), q.servfail()] {
                assert!(resp.len() <= transport.max_query_len() + 64);
                assert!(parse_answer(&resp, q.id, &q.question).is_ok());
            }
            let resp = address_response(&q, &[], &[], q.max_udp_response_len());
            assert!(parse_answer(&resp, q.id, &q.question).is_ok());
        }
        Err(e) => {
            if let Some(resp) = e.response() {
                assert!(resp.len() >= HEADER_LEN && resp.len() <= 64);
            }
        }
    }
}

/// Parses `msg` as the answer to its own question (so the fuzzer gets past the question check).
fn answer(msg: &[u8]) {
    let Some(header) = Header::parse(msg) else {
        let _ = parse_answer(
            msg,
            0,
            &Question {
                qname: String::new(),
                qtype: 1,
                qclass: 1,
            },
        );
        return;
    };
    let mut r = Reader::new(msg, HEADER_LEN);
    let question = match (r.name(), r.u16(), r.u16()) {
        (Ok(name), Some(qtype), Some(qclass)) => Question {
            qname: name.into_string(),
            qtype,
            qclass,
        },
        _ => Question {
            qname: "example.com".into(),
            qtype: 1,
            qclass: 1,
        },
    };
    if let Ok(a) = parse_answer(msg, header.id, &question) {
        assert!(a.chain.len() <= MAX_CNAME_CHAIN);
        assert!(a.addresses.len() <= msg.len() / 4);
        let _ = a.min_ttl();
    }
}
