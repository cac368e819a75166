//! An upstream resolver's answer to a question the proxy forwarded: checked against that
//! question and reduced to what the proxy acts on: the CNAME chain from the queried name, the
//! addresses at its end, and their TTLs. Plus the builder of the answer the workload gets,
//! which carries only that chain and the addresses the proxy installed.
//!
//! The upstream is not trusted more than the workload: the same bounded name decoding, every
//! record length checked, the whole message accounted for. CNAMEs are followed only inside the
//! answer section, at most [`MAX_CNAME_CHAIN`] links, never twice through the same name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::message::{Header, Query, Question, Rcode};
use super::wire::{CLASS_IN, HEADER_LEN, Name, NameError, Reader, rtype, write_plain_name};

/// Largest upstream answer read (the TCP limit; UDP answers are bounded by the buffer).
pub const MAX_ANSWER_LEN: usize = 65535;
/// CNAME links followed from the queried name. Resolvers stop well before: Unbound after 11
/// restarts, BIND after 16; real chains (CDNs) have two or three links.
pub const MAX_CNAME_CHAIN: usize = 8;

/// One CNAME link of the chain: `owner` is an alias for `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CnameLink {
    pub owner: String,
    pub target: String,
    pub ttl: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressRecord {
    pub addr: IpAddr,
    pub ttl: u32,
}

/// What an upstream answer says about the question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub rcode: Rcode,
    /// From the queried name to the name that holds the addresses, in order; empty when the
    /// queried name has no CNAME.
    pub chain: Vec<CnameLink>,
    /// The A/AAAA records (as the question asks) at the end of the chain, each address once
    /// with its lowest TTL. Empty unless `rcode` is NOERROR.
    pub addresses: Vec<AddressRecord>,
}

impl Answer {
    /// The name the addresses belong to: the end of the chain.
    pub fn canonical_name<'a>(&'a self, question: &'a Question) -> &'a str {
        self.chain
            .last()
            .map_or(question.qname.as_str(), |l| l.target.as_str())
    }

    /// The lowest TTL along the chain and over the addresses: how long the answer as a whole
    /// may be trusted. `None` when there are no addresses.
    pub fn min_ttl(&self) -> Option<u32> {
        let addresses = self.addresses.iter().map(|a| a.ttl).min()?;
        Some(self.chain.iter().map(|l| l.ttl).fold(addresses, u32::min))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("{len} octets cannot hold a DNS header")]
    TooShort { len: usize },
    #[error("{len} octets is more than a DNS message may have ({MAX_ANSWER_LEN})")]
    TooLong { len: usize },
    #[error("not a response (QR clear)")]
    NotAResponse,
    #[error("response ID {got} does not match the query's {expected}")]
    IdMismatch { expected: u16, got: u16 },
    #[error("response opcode {0} is not QUERY")]
    Opcode(u8),
    #[error("the response is truncated (TC): ask again over TCP")]
    Truncated,
    #[error("{0} questions in the response; expected the one asked")]
    QuestionCount(u16),
    #[error("the response's question is not the one asked")]
    QuestionMismatch,
    #[error("{section}: {source}")]
    Name {
        section: &'static str,
        #[source]
        source: NameError,
    },
    #[error("the message ends inside the {0}")]
    Cut(&'static str),
    #[error("{0} octets after the last record")]
    TrailingBytes(usize),
    #[error("a type {rtype} record has {len} octets of data, which is not valid for its type")]
    BadRdata { rtype: u16, len: usize },
    #[error("`{owner}` has a CNAME and other data, or two different CNAMEs")]
    ConflictingCname { owner: String },
    #[error("the CNAME chain returns to `{name}`")]
    CnameLoop { name: String },
    #[error("the CNAME chain is longer than {MAX_CNAME_CHAIN} links")]
    CnameChainTooLong,
    #[error("the CNAME target `{name}` has octets other than letters, digits, `-` and `_`")]
    CnameTargetOctet { name: String },
}

/// One record of the answer section that matters here.
struct Rr {
    owner: Name,
    ttl: u32,
    data: RrData,
}

enum RrData {
    Addr(IpAddr),
    Cname(Name),
}

/// Parses `msg`, the upstream's answer to `question` sent with ID `id`.
pub fn parse_answer(msg: &[u8], id: u16, question: &Question) -> Result<Answer, AnswerError> {
    if msg.len() > MAX_ANSWER_LEN {
        return Err(AnswerError::TooLong { len: msg.len() });
    }
    let header = Header::parse(msg).ok_or(AnswerError::TooShort { len: msg.len() })?;
    if !header.is_response() {
        return Err(AnswerError::NotAResponse);
    }
    if header.id != id {
        return Err(AnswerError::IdMismatch {
            expected: id,
            got: header.id,
        });
    }
    if header.opcode() != 0 {
        return Err(AnswerError::Opcode(header.opcode()));
    }
    if header.truncated() {
        return Err(AnswerError::Truncated);
    }
    if header.qdcount != 1 {
        return Err(AnswerError::QuestionCount(header.qdcount));
    }
    let mut r = Reader::new(msg, HEADER_LEN);
    let qname = r.name().map_err(|source| AnswerError::Name {
        section: "question",
        source,
    })?;
    let qtype = r.u16().ok_or(AnswerError::Cut("question"))?;
    let qclass = r.u16().ok_or(AnswerError::Cut("question"))?;
    if qname.as_str() != question.qname || qtype != question.qtype || qclass != question.qclass {
        return Err(AnswerError::QuestionMismatch);
    }

    let mut records = Vec::new();
    for _ in 0..header.ancount {
        if let Some(rr) = read_record(&mut r, msg, "answer")? {
            records.push(rr);
        }
    }
    for _ in 0..u32::from(header.nscount) + u32::from(header.arcount) {
        skip_record(&mut r)?;
    }
    if r.remaining() != 0 {
        return Err(AnswerError::TrailingBytes(r.remaining()));
    }

    let rcode = Rcode::from_header(header.rcode());
    let chain = follow_chain(&records, &question.qname)?;
    let mut addresses: Vec<AddressRecord> = Vec::new();
    if rcode == Rcode::NoError {
        let end = chain.last().map_or(question.qname.as_str(), |l| &l.target);
        for rr in &records {
            if let RrData::Addr(addr) = rr.data
                && rr.owner.as_str() == end
                && wanted(question.qtype, addr)
            {
                match addresses.iter_mut().find(|a| a.addr == addr) {
                    Some(seen) => seen.ttl = seen.ttl.min(rr.ttl),
                    None => addresses.push(AddressRecord { addr, ttl: rr.ttl }),
                }
            }
        }
    }
    Ok(Answer {
        rcode,
        chain,
        addresses,
    })
}

fn wanted(qtype: u16, addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(_) => matches!(qtype, rtype::A | rtype::ANY),
        IpAddr::V6(_) => matches!(qtype, rtype::AAAA | rtype::ANY),
    }
}

/// TTLs with the top bit set count as zero (RFC 2181 §8).
fn ttl(raw: u32) -> u32 {
    if raw > i32::MAX as u32 { 0 } else { raw }
}

/// Reads one answer record; returns the A, AAAA and CNAME records of class IN.
fn read_record(
    r: &mut Reader<'_>,
    msg: &[u8],
    section: &'static str,
) -> Result<Option<Rr>, AnswerError> {
    let owner = r
        .name()
        .map_err(|source| AnswerError::Name { section, source })?;
    let rrtype = r.u16().ok_or(AnswerError::Cut(section))?;
    let class = r.u16().ok_or(AnswerError::Cut(section))?;
    let raw_ttl = r.u32().ok_or(AnswerError::Cut(section))?;
    let rdlen = usize::from(r.u16().ok_or(AnswerError::Cut(section))?);
    let rdata_start = r.pos();
    let rdata = r.bytes(rdlen).ok_or(AnswerError::Cut(section))?;
    if class != CLASS_IN {
        return Ok(None);
    }
    let bad = AnswerError::BadRdata {
        rtype: rrtype,
        len: rdlen,
    };
    let data = match rrtype {
        rtype::A => {
            let octets: [u8; 4] = rdata.try_into().map_err(|_| bad)?;
            RrData::Addr(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        rtype::AAAA => {
            let octets: [u8; 16] = rdata.try_into().map_err(|_| bad)?;
            RrData::Addr(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        rtype::CNAME => {
            let (target, end) =
                super::wire::read_name(msg, rdata_start).map_err(|source| AnswerError::Name {
                    section: "CNAME data",
                    source,
                })?;
            if end != rdata_start + rdlen {
                return Err(bad);
            }
            RrData::Cname(target)
        }
        _ => return Ok(None),
    };
    Ok(Some(Rr {
        owner,
        ttl: ttl(raw_ttl),
        data,
    }))
}

/// Checks the framing of an authority or additional record and moves past it.
fn skip_record(r: &mut Reader<'_>) -> Result<(), AnswerError> {
    let section = "authority or additional section";
    r.name()
        .map_err(|source| AnswerError::Name { section, source })?;
    r.bytes(8).ok_or(AnswerError::Cut(section))?; // type, class, TTL
    let rdlen = usize::from(r.u16().ok_or(AnswerError::Cut(section))?);
    r.bytes(rdlen).ok_or(AnswerError::Cut(section))?;
    Ok(())
}

fn follow_chain(records: &[Rr], qname: &str) -> Result<Vec<CnameLink>, AnswerError> {
    let mut chain: Vec<CnameLink> = Vec::new();
    let mut current = qname.to_owned();
    loop {
        let mut next: Option<(&Name, u32)> = None;
        let mut has_address = false;
        for rr in records.iter().filter(|rr| rr.owner.as_str() == current) {
            match &rr.data {
                RrData::Addr(_) => has_address = true,
                RrData::Cname(target) => match next {
                    Some((seen, ttl)) if seen == target => next = Some((seen, ttl.min(rr.ttl))),
                    Some(_) => {
                        return Err(AnswerError::ConflictingCname { owner: current });
                    }
                    None => next = Some((target, rr.ttl)),
                },
            }
        }
        let Some((target, ttl)) = next else {
            return Ok(chain);
        };
        if has_address {
            return Err(AnswerError::ConflictingCname { owner: current });
        }
        if !target.is_plain() {
            return Err(AnswerError::CnameTargetOctet {
                name: target.to_string(),
            });
        }
        let target = target.as_str();
        if target == qname || chain.iter().any(|l| l.target == target) {
            return Err(AnswerError::CnameLoop {
                name: target.to_owned(),
            });
        }
        if chain.len() == MAX_CNAME_CHAIN {
            return Err(AnswerError::CnameChainTooLong);
        }
        chain.push(CnameLink {
            owner: std::mem::replace(&mut current, target.to_owned()),
            target: target.to_owned(),
            ttl,
        });
    }
}

/// The NOERROR answer the workload gets: `chain` as CNAME records, then `addresses` as A/AAAA
/// records of the chain's last name, with the TTLs given (the caller keeps them within how long
/// the addresses stay in the allow map, so the workload asks again before they leave it).
///
/// When the answer would not fit `max_len` (the client's UDP limit), the response carries no
/// records and sets TC, and the client asks again over TCP (RFC 2181 §9). A name that cannot
/// be written plainly (the parsers never produce one) gives SERVFAIL.
pub fn address_response(
    query: &Query,
    chain: &[CnameLink],
    addresses: &[AddressRecord],
    max_len: usize,
) -> Vec<u8> {
    let mut records = Vec::new();
    let mut count: u16 = 0;
    let mut owner = query.question.qname.as_str();
    let mut written = true;
    for link in chain {
        let mut target = Vec::new();
        written &= write_plain_name(&mut target, &link.target).is_some();
        written &= push_record(&mut records, owner, rtype::CNAME, link.ttl, &target);
        owner = &link.target;
        count = count.saturating_add(1);
    }
    for a in addresses {
        let (t, data): (u16, Vec<u8>) = match a.addr {
            IpAddr::V4(v4) => (rtype::A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (rtype::AAAA, v6.octets().to_vec()),
        };
        written &= push_record(&mut records, owner, t, a.ttl, &data);
        count = count.saturating_add(1);
    }
    if !written {
        return query.servfail();
    }
    if count == u16::MAX || query.empty_response_len() + records.len() > max_len {
        return query.respond_with(&[], 0, true);
    }
    query.respond_with(&records, count, false)
}

/// Appends one record with an uncompressed owner; false when the owner cannot be written.
fn push_record(out: &mut Vec<u8>, owner: &str, rrtype: u16, ttl: u32, data: &[u8]) -> bool {
    if write_plain_name(out, owner).is_none() {
        return false;
    }
    let Ok(rdlen) = u16::try_from(data.len()) else {
        return false;
    };
    out.extend_from_slice(&rrtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.min(i32::MAX as u32).to_be_bytes());
    out.extend_from_slice(&rdlen.to_be_bytes());
    out.extend_from_slice(data);
    true
}

#[cfg(test)]
#[path = "answer_tests.rs"]
mod tests;
