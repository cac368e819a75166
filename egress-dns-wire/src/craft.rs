//! Hand-built DNS messages: every field spelled out, nothing validated, so that a test or a
//! tool can build exactly the (possibly malformed) packet it means.

use super::message::flag;
use super::wire::{CLASS_IN, rtype};

pub fn header(id: u16, flags: u16, counts: [u16; 4]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    for c in counts {
        m.extend_from_slice(&c.to_be_bytes());
    }
    m
}

/// `name` uncompressed, labels taken as raw bytes (`""` is the root).
pub fn push_name(m: &mut Vec<u8>, name: &str) {
    if !name.is_empty() {
        for label in name.split('.') {
            m.push(u8::try_from(label.len()).unwrap_or(u8::MAX));
            m.extend_from_slice(label.as_bytes());
        }
    }
    m.push(0);
}

pub fn push_question(m: &mut Vec<u8>, name: &str, qtype: u16) {
    push_name(m, name);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
}

/// A standard query: RD set, one question, no EDNS.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = header(id, flag::RD, [1, 0, 0, 0]);
    push_question(&mut m, name, qtype);
    m
}

/// An OPT record (root owner) with `options` as (code, data).
pub fn push_opt(m: &mut Vec<u8>, udp: u16, version: u8, dnssec_ok: bool, options: &[(u16, &[u8])]) {
    m.push(0);
    m.extend_from_slice(&rtype::OPT.to_be_bytes());
    m.extend_from_slice(&udp.to_be_bytes());
    m.push(0);
    m.push(version);
    m.extend_from_slice(&(if dnssec_ok { 0x8000u16 } else { 0 }).to_be_bytes());
    let len: usize = options.iter().map(|(_, d)| 4 + d.len()).sum();
    m.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    for (code, data) in options {
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(&u16::try_from(data.len()).unwrap_or(u16::MAX).to_be_bytes());
        m.extend_from_slice(data);
    }
}

/// A query with EDNS (4096, DO clear) and a cookie option.
pub fn query_with_edns(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = header(id, flag::RD, [1, 0, 0, 1]);
    push_question(&mut m, name, qtype);
    push_opt(&mut m, 4096, 0, false, &[(10, &[1, 2, 3, 4, 5, 6, 7, 8])]);
    m
}

/// A resource record; `owner` is already in wire form (so it may be a pointer).
pub fn push_rr(m: &mut Vec<u8>, owner: &[u8], rrtype: u16, ttl: u32, rdata: &[u8]) {
    m.extend_from_slice(owner);
    m.extend_from_slice(&rrtype.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    m.extend_from_slice(&ttl.to_be_bytes());
    m.extend_from_slice(&u16::try_from(rdata.len()).unwrap_or(u16::MAX).to_be_bytes());
    m.extend_from_slice(rdata);
}

/// `name` in wire form.
pub fn wire_name(name: &str) -> Vec<u8> {
    let mut m = Vec::new();
    push_name(&mut m, name);
    m
}

/// A response to `query(id, qname, qtype)` (RD, RA, NOERROR) with the given answer records,
/// each (owner, type, ttl, rdata) with owners uncompressed.
pub fn response(
    id: u16,
    qname: &str,
    qtype: u16,
    answers: &[(&str, u16, u32, Vec<u8>)],
) -> Vec<u8> {
    let count = u16::try_from(answers.len()).unwrap_or(u16::MAX);
    let mut m = header(id, flag::QR | flag::RD | flag::RA, [1, count, 0, 0]);
    push_question(&mut m, qname, qtype);
    for (owner, t, ttl, data) in answers {
        push_rr(&mut m, &wire_name(owner), *t, *ttl, data);
    }
    m
}
