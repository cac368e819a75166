//! Random and mutated packets through both parsers, in plain `cargo test` (the libFuzzer target
//! in `fuzz/` goes further but needs nightly). A fixed seed and a fixed count: the test is
//! reproducible and bounded; a hang would show as a test that never ends.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::answer::{MAX_CNAME_CHAIN, parse_answer};
use super::craft::{header, push_rr, query, query_with_edns, response, wire_name};
use super::message::{Query, QueryError, Transport, parse_query, tcp_unframe};
use super::wire::{CLASS_IN, rtype};
use crate::message::flag;

const ITERATIONS: usize = 100_000;

fn seeds_queries() -> Vec<Vec<u8>> {
    vec![
        query(1, "example.com", rtype::A),
        query_with_edns(2, "a.b.c.example.com", rtype::AAAA),
        query(3, "", 2),
        query(4, &vec!["a".repeat(63); 3].join("."), rtype::A),
    ]
}

fn seeds_answers() -> Vec<Vec<u8>> {
    let mut compressed = header(7, flag::QR | flag::RD | flag::RA, [1, 3, 0, 0]);
    compressed.extend_from_slice(&wire_name("www.example.com"));
    compressed.extend_from_slice(&[0, 1, 0, 1]);
    // www -> pointer into the question; target edge.example.com compressed against it.
    let mut target = vec![4];
    target.extend_from_slice(b"edge");
    target.extend_from_slice(&[0xC0, 16]);
    push_rr(&mut compressed, &[0xC0, 12], rtype::CNAME, 300, &target);
    let edge = compressed.len() - target.len();
    push_rr(
        &mut compressed,
        &(0xC000u16 | u16::try_from(edge).unwrap_or(0)).to_be_bytes(),
        rtype::A,
        60,
        &[192, 0, 2, 1],
    );
    push_rr(
        &mut compressed,
        &(0xC000u16 | u16::try_from(edge).unwrap_or(0)).to_be_bytes(),
        rtype::A,
        60,
        &[192, 0, 2, 2],
    );
    vec![
        response(
            7,
            "x.com",
            rtype::A,
            &[("x.com", rtype::A, 60, vec![192, 0, 2, 1])],
        ),
        response(
            7,
            "www.example.com",
            rtype::A,
            &[
                (
                    "www.example.com",
                    rtype::CNAME,
                    60,
                    wire_name("a.example.net"),
                ),
                (
                    "a.example.net",
                    rtype::CNAME,
                    60,
                    wire_name("b.example.net"),
                ),
                ("b.example.net", rtype::A, 60, vec![192, 0, 2, 1]),
            ],
        ),
        compressed,
    ]
}

/// One random edit: flip, overwrite with a pointer, change a count, cut, extend or splice.
fn mutate(rng: &mut StdRng, packet: &mut Vec<u8>, other: &[u8]) {
    let edits = rng.random_range(1..=4);
    for _ in 0..edits {
        let len = packet.len();
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                packet[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 1 => {
                let i = rng.random_range(0..len - 1);
                let target: u16 = rng.random_range(0..u16::try_from(len + 8).unwrap_or(u16::MAX));
                packet[i..i + 2].copy_from_slice(&(0xC000 | (target & 0x3FFF)).to_be_bytes());
            }
            2 if len >= 12 => {
                let field = 4 + 2 * rng.random_range(0..4);
                let value: u16 = if rng.random_bool(0.5) {
                    rng.random_range(0..4)
                } else {
                    rng.random()
                };
                packet[field..field + 2].copy_from_slice(&value.to_be_bytes());
            }
            3 if len > 0 => packet.truncate(rng.random_range(0..len)),
            4 => {
                let extra = rng.random_range(1..64);
                packet.extend((0..extra).map(|_| rng.random::<u8>()));
            }
            5 if !other.is_empty() && len > 0 => {
                let at = rng.random_range(0..len);
                let from = rng.random_range(0..other.len());
                let n = rng.random_range(0..=other.len() - from);
                packet.splice(at..at, other[from..from + n].iter().copied());
            }
            _ => {
                let i = rng.random_range(0..=len);
                packet.insert(i, rng.random());
            }
        }
    }
}

fn random_packet(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.random_range(0..600);
    (0..len).map(|_| rng.random()).collect()
}

fn check_query(msg: &[u8], transport: Transport, stats: &mut [usize; 3]) {
    match parse_query(msg, transport) {
        Ok(q) => {
            stats[0] += 1;
            check_responses(&q);
        }
        Err(e @ QueryError::Reject { .. }) => {
            stats[1] += 1;
            let resp = e.response().unwrap_or_default();
            assert!(resp.len() >= 12 && resp.len() <= 64, "{e}");
        }
        Err(QueryError::Drop(_)) => stats[2] += 1,
    }
}

fn check_responses(q: &Query) {
    assert!(q.question.qname.len() <= 253);
    for resp in [q.nxdomain(), q.refused(), q.servfail()] {
        assert!(resp.len() <= 512 + 64);
        // The proxy's own answers are well-formed responses to the question.
        let a = parse_answer(&resp, q.id, &q.question);
        assert!(a.is_ok(), "{a:?}");
    }
}

#[test]
fn random_and_mutated_queries_never_panic() {
    let mut rng = StdRng::seed_from_u64(0x00E6_7E55);
    let seeds = seeds_queries();
    let mut stats = [0usize; 3];
    for i in 0..ITERATIONS {
        let packet = if i % 4 == 0 {
            random_packet(&mut rng)
        } else {
            let mut p = seeds[i % seeds.len()].clone();
            let other = &seeds[(i / 7) % seeds.len()];
            mutate(&mut rng, &mut p, other);
            p
        };
        check_query(&packet, Transport::Udp, &mut stats);
        check_query(&packet, Transport::Tcp, &mut stats);
        let _ = tcp_unframe(&packet);
    }
    // The mutations reach every outcome, not only the first check.
    assert!(stats.iter().all(|&n| n > 100), "{stats:?}");
}

#[test]
fn random_and_mutated_answers_never_panic() {
    let mut rng = StdRng::seed_from_u64(0x0A45_7E55);
    let seeds = seeds_answers();
    let questions = [
        ("x.com", rtype::A),
        ("www.example.com", rtype::A),
        ("www.example.com", rtype::A),
    ];
    let mut accepted = 0usize;
    for i in 0..ITERATIONS {
        let k = i % seeds.len();
        let packet = if i % 4 == 0 {
            let mut p = random_packet(&mut rng);
            if p.len() >= 4 && rng.random_bool(0.5) {
                p[..4].copy_from_slice(&[0, 7, 0x81, 0x80]);
            }
            p
        } else {
            let mut p = seeds[k].clone();
            mutate(&mut rng, &mut p, &seeds[(k + 1) % seeds.len()]);
            p
        };
        let (qname, qtype) = questions[k];
        let question = super::message::Question {
            qname: qname.into(),
            qtype,
            qclass: CLASS_IN,
        };
        if let Ok(a) = parse_answer(&packet, 7, &question) {
            accepted += 1;
            assert!(a.chain.len() <= MAX_CNAME_CHAIN);
            assert!(a.addresses.len() <= packet.len() / 4);
        }
    }
    assert!(accepted > 100, "{accepted}");
}
