//! DNS messages: the query the client sends and what it reads from an answer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;
/// EDNS option code of an Extended DNS Error (RFC 8914).
pub const OPT_EDE: u16 = 15;
pub const EDNS_UDP_SIZE: u16 = 1232;

/// A query: RD set, one question, and with `edns` an OPT record (UDP size 1232, no options).
pub fn build_query(id: u16, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]);
    q.extend_from_slice(&1u16.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0]);
    q.extend_from_slice(&u16::from(edns).to_be_bytes());
    for label in name.split('.') {
        // Labels were checked to be 1..=63 bytes.
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    if edns {
        q.push(0);
        q.extend_from_slice(&TYPE_OPT.to_be_bytes());
        q.extend_from_slice(&EDNS_UDP_SIZE.to_be_bytes());
        q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    q
}

/// What the client reads from an answer.
#[derive(Debug, Default)]
pub struct Answer {
    pub id: u16,
    pub response: bool,
    pub rcode: u8,
    pub answer_count: u16,
    pub addresses: Vec<IpAddr>,
    pub cnames: usize,
    /// Extended DNS Error: (info code, extra text).
    pub ede: Option<(u16, String)>,
}

pub fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".to_owned(),
        1 => "FORMERR".to_owned(),
        2 => "SERVFAIL".to_owned(),
        3 => "NXDOMAIN".to_owned(),
        4 => "NOTIMP".to_owned(),
        5 => "REFUSED".to_owned(),
        n => format!("RCODE{n}"),
    }
}

/// Skips a (possibly compressed) name at `pos`; returns the position after it.
pub fn skip_name(msg: &[u8], mut pos: usize) -> Option<usize> {
    // A name has at most 127 labels; the bound also stops malformed input.
    for _ in 0..128 {
        let len = *msg.get(pos)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(pos + 1),
            0x00 => pos += 1 + usize::from(len),
            0xc0 => {
                msg.get(pos + 1)?;
                return Some(pos + 2);
            }
            _ => return None,
        }
    }
    None
}

pub fn u16_at(msg: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]))
}

/// Parses the header, the answer section's addresses and an EDNS Extended DNS Error. `None`
/// for a message too short or malformed to read.
pub fn parse_answer(msg: &[u8]) -> Option<Answer> {
    if msg.len() < 12 {
        return None;
    }
    let mut a = Answer {
        id: u16_at(msg, 0)?,
        response: msg[2] & 0x80 != 0,
        rcode: msg[3] & 0x0f,
        answer_count: u16_at(msg, 6)?,
        ..Answer::default()
    };
    let (qd, an, ns, ar) = (
        u16_at(msg, 4)?,
        a.answer_count,
        u16_at(msg, 8)?,
        u16_at(msg, 10)?,
    );
    let mut pos = 12;
    for _ in 0..qd {
        pos = skip_name(msg, pos)? + 4;
    }
    for i in 0..u32::from(an) + u32::from(ns) + u32::from(ar) {
        pos = skip_name(msg, pos)?;
        let rtype = u16_at(msg, pos)?;
        let rdlen = usize::from(u16_at(msg, pos + 8)?);
        let rdata = msg.get(pos + 10..pos + 10 + rdlen)?;
        pos += 10 + rdlen;
        let in_answer = i < u32::from(an);
        match rtype {
            TYPE_A if in_answer && rdlen == 4 => {
                let o: [u8; 4] = rdata.try_into().ok()?;
                a.addresses.push(IpAddr::V4(Ipv4Addr::from(o)));
            }
            TYPE_AAAA if in_answer && rdlen == 16 => {
                let o: [u8; 16] = rdata.try_into().ok()?;
                a.addresses.push(IpAddr::V6(Ipv6Addr::from(o)));
            }
            TYPE_CNAME if in_answer => a.cnames += 1,
            TYPE_OPT if !in_answer => {
                // The upper 8 bits of the extended rcode sit in the TTL field.
                let ext = msg.get(pos - rdlen - 6).copied().unwrap_or(0);
                a.rcode |= ext << 4;
                a.ede = a.ede.take().or_else(|| find_ede(rdata));
            }
            _ => {}
        }
    }
    Some(a)
}

/// The first Extended DNS Error option in an OPT record's data.
pub fn find_ede(mut options: &[u8]) -> Option<(u16, String)> {
    while options.len() >= 4 {
        let code = u16_at(options, 0)?;
        let len = usize::from(u16_at(options, 2)?);
        let data = options.get(4..4 + len)?;
        if code == OPT_EDE && len >= 2 {
            let info = u16_at(data, 0)?;
            return Some((info, String::from_utf8_lossy(&data[2..]).into_owned()));
        }
        options = &options[4 + len..];
    }
    None
}
