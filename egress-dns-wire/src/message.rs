//! The workload's DNS query: a strict parser, the answers the proxy gives without asking
//! upstream (NXDOMAIN, REFUSED, SERVFAIL, FORMERR, NOTIMP, BADVERS), and TCP framing.
//!
//! A query is accepted only in the shape stub resolvers send: opcode QUERY, exactly one
//! question whose name is letters, digits, `-` and `_`, no answer or authority records, and at
//! most one additional record, which must be a well-formed OPT (EDNS). Anything else is either
//! answered FORMERR/NOTIMP/BADVERS (the header could be read, so the sender can be told) or
//! dropped (too short to hold a header, oversized, or itself a response: answering those
//! would only feed reflection loops).

use std::fmt;

use super::wire::{CLASS_IN, HEADER_LEN, NameError, Reader, rtype};

/// Largest query accepted over UDP (RFC 1035 §4.2.1). Queries are small; EDNS raises only
/// the size of the *response* a client accepts.
pub const MAX_UDP_QUERY_LEN: usize = 512;
/// Largest message over TCP: the 2-octet length prefix (RFC 1035 §4.2.2).
pub const MAX_TCP_MESSAGE_LEN: usize = 65535;
/// EDNS options accepted in one query. Stub resolvers send a handful (cookie, padding,
/// client subnet); the bound caps the work and the memory per query.
pub const MAX_EDNS_OPTIONS: usize = 16;
/// UDP payload size the proxy advertises in its own OPT records (the DNS Flag Day 2020 value,
/// which avoids IP fragmentation).
pub const PROXY_EDNS_UDP_SIZE: u16 = 1232;
/// Extended DNS Error "Blocked" (RFC 8914 §4.16): the name is refused by a policy of the
/// server the client talks to.
pub const EDE_BLOCKED: u16 = 15;
const EDE_TEXT: &[u8] = b"blocked by egress policy";
/// EDNS option code of Extended DNS Errors (RFC 8914 §2).
const OPTION_EDE: u16 = 15;

/// Header flag bits (RFC 1035 §4.1.1, RFC 4035 §3.2 for AD and CD).
pub mod flag {
    pub const QR: u16 = 0x8000;
    pub const AA: u16 = 0x0400;
    pub const TC: u16 = 0x0200;
    pub const RD: u16 = 0x0100;
    pub const RA: u16 = 0x0080;
    pub const AD: u16 = 0x0020;
    pub const CD: u16 = 0x0010;
    pub const OPCODE_MASK: u16 = 0x7800;
    pub const RCODE_MASK: u16 = 0x000F;
}

/// Which transport a message came over: it sets the size limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    /// The message without its 2-octet length prefix (see [`tcp_unframe`]).
    Tcp,
}

impl Transport {
    pub fn max_query_len(self) -> usize {
        match self {
            Transport::Udp => MAX_UDP_QUERY_LEN,
            Transport::Tcp => MAX_TCP_MESSAGE_LEN,
        }
    }
}

/// The fixed 12-octet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    /// The header of `msg`, if it is long enough to hold one.
    pub fn parse(msg: &[u8]) -> Option<Header> {
        let mut r = Reader::new(msg, 0);
        Some(Header {
            id: r.u16()?,
            flags: r.u16()?,
            qdcount: r.u16()?,
            ancount: r.u16()?,
            nscount: r.u16()?,
            arcount: r.u16()?,
        })
    }

    pub fn is_response(&self) -> bool {
        self.flags & flag::QR != 0
    }

    pub fn opcode(&self) -> u8 {
        // Four bits: always fits.
        ((self.flags & flag::OPCODE_MASK) >> 11) as u8
    }

    pub fn truncated(&self) -> bool {
        self.flags & flag::TC != 0
    }

    /// The 4-bit RCODE of the header (extended RCODEs live in the OPT record).
    pub fn rcode(&self) -> u8 {
        (self.flags & flag::RCODE_MASK) as u8
    }
}

/// Response codes the proxy sends or reads (RFC 1035 §4.1.1, RFC 6891 §9 for BADVERS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rcode {
    NoError,
    FormErr,
    ServFail,
    NxDomain,
    NotImp,
    Refused,
    /// Extended RCODE 16: the query's EDNS version is not supported.
    BadVers,
    /// Any other 4-bit RCODE read from an upstream answer.
    Other(u8),
}

impl Rcode {
    /// The 12-bit code: low 4 bits in the header, high 8 in the OPT record.
    pub fn code(self) -> u16 {
        match self {
            Rcode::NoError => 0,
            Rcode::FormErr => 1,
            Rcode::ServFail => 2,
            Rcode::NxDomain => 3,
            Rcode::NotImp => 4,
            Rcode::Refused => 5,
            Rcode::BadVers => 16,
            Rcode::Other(c) => u16::from(c),
        }
    }

    /// The RCODE in a header's low four bits.
    pub fn from_header(bits: u8) -> Rcode {
        match bits & 0x0F {
            0 => Rcode::NoError,
            1 => Rcode::FormErr,
            2 => Rcode::ServFail,
            3 => Rcode::NxDomain,
            4 => Rcode::NotImp,
            5 => Rcode::Refused,
            other => Rcode::Other(other),
        }
    }
}

impl fmt::Display for Rcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rcode::NoError => f.write_str("NOERROR"),
            Rcode::FormErr => f.write_str("FORMERR"),
            Rcode::ServFail => f.write_str("SERVFAIL"),
            Rcode::NxDomain => f.write_str("NXDOMAIN"),
            Rcode::NotImp => f.write_str("NOTIMP"),
            Rcode::Refused => f.write_str("REFUSED"),
            Rcode::BadVers => f.write_str("BADVERS"),
            Rcode::Other(c) => write!(f, "RCODE{c}"),
        }
    }
}

/// The one question of a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// Lowercased, without trailing dot; the root is the empty string. Only letters, digits,
    /// `-`, `_` and `.`.
    pub qname: String,
    pub qtype: u16,
    pub qclass: u16,
}

impl Question {
    /// Whether the answer to this question can carry addresses (A, AAAA or `*` in class IN).
    pub fn asks_for_addresses(&self) -> bool {
        self.qclass == CLASS_IN && matches!(self.qtype, rtype::A | rtype::AAAA | rtype::ANY)
    }
}

/// The query's OPT record (RFC 6891 §6.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edns {
    /// As sent; values below 512 mean 512 (RFC 6891 §6.2.5).
    pub udp_payload_size: u16,
    pub version: u8,
    /// The DO bit (RFC 3225): copied into the response's OPT.
    pub dnssec_ok: bool,
    /// Option codes present, in order (e.g. 10 cookie, 12 padding, 8 client subnet).
    pub options: Vec<u16>,
}

/// A query that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// The header flags as sent.
    pub flags: u16,
    pub question: Question,
    pub edns: Option<Edns>,
    /// The question section exactly as received (never compressed: nothing precedes it to
    /// point at), echoed in responses so that a client's 0x20 case randomisation matches.
    question_wire: Vec<u8>,
}

impl Query {
    pub fn recursion_desired(&self) -> bool {
        self.flags & flag::RD != 0
    }

    pub fn checking_disabled(&self) -> bool {
        self.flags & flag::CD != 0
    }

    /// Largest UDP response the client accepts: 512 without EDNS, else its advertised size
    /// capped at what the proxy advertises.
    pub fn max_udp_response_len(&self) -> usize {
        match &self.edns {
            None => MAX_UDP_QUERY_LEN,
            Some(e) => usize::from(e.udp_payload_size.clamp(512, PROXY_EDNS_UDP_SIZE)),
        }
    }

    /// NXDOMAIN for a name the policy does not allow. With EDNS, the OPT carries Extended DNS
    /// Error 15 "Blocked" so that a person debugging sees why.
    pub fn nxdomain(&self) -> Vec<u8> {
        self.respond(Rcode::NxDomain, true)
    }

    /// REFUSED for a name the policy does not allow (the alternative to NXDOMAIN), with EDE 15
    /// like [`Query::nxdomain`].
    pub fn refused(&self) -> Vec<u8> {
        self.respond(Rcode::Refused, true)
    }

    /// A response with `rcode` and no records (for an upstream's NXDOMAIN, say).
    pub fn with_rcode(&self, rcode: Rcode) -> Vec<u8> {
        self.respond(rcode, false)
    }

    /// NOERROR with no records: the name exists, the proxy gives nothing of this type.
    pub fn nodata(&self) -> Vec<u8> {
        self.respond(Rcode::NoError, false)
    }

    /// SERVFAIL: the upstream failed or answered something unusable.
    pub fn servfail(&self) -> Vec<u8> {
        self.respond(Rcode::ServFail, false)
    }

    fn respond(&self, rcode: Rcode, blocked: bool) -> Vec<u8> {
        let opt = self.edns.as_ref().map(|e| OptReply {
            dnssec_ok: e.dnssec_ok,
            ede: blocked.then_some(EDE_BLOCKED),
        });
        build_response(
            self.id,
            self.flags & !flag::TC,
            rcode,
            Some(&self.question_wire),
            NO_RECORDS,
            opt,
        )
    }

    /// A response carrying `records` (`count` resource records, already encoded) in the answer
    /// section, with TC set when `truncated`. For builders of positive answers.
    pub(super) fn respond_with(&self, records: &[u8], count: u16, truncated: bool) -> Vec<u8> {
        let opt = self.edns.as_ref().map(|e| OptReply {
            dnssec_ok: e.dnssec_ok,
            ede: None,
        });
        let flags = if truncated {
            self.flags | flag::TC
        } else {
            self.flags & !flag::TC
        };
        build_response(
            self.id,
            flags,
            Rcode::NoError,
            Some(&self.question_wire),
            (records, count),
            opt,
        )
    }

    /// Size of [`Query::respond_with`]'s output for no records.
    pub(super) fn empty_response_len(&self) -> usize {
        HEADER_LEN + self.question_wire.len() + if self.edns.is_some() { OPT_LEN } else { 0 }
    }

    /// The question section as received, for responses built elsewhere (e.g. address answers).
    pub fn question_wire(&self) -> &[u8] {
        &self.question_wire
    }
}

/// Why a packet is dropped without an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("{len} octets cannot hold a DNS header ({HEADER_LEN})")]
    TooShort { len: usize },
    #[error("{len} octets is more than the {max} a query may have on this transport")]
    TooLong { len: usize, max: usize },
    #[error("the packet is a response (QR set), not a query")]
    NotAQuery,
}

/// Why a query with a readable header is answered with an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("opcode {0} is not QUERY (0)")]
    Opcode(u8),
    #[error("{0} questions; a query has exactly one")]
    QuestionCount(u16),
    #[error("a query carries no answer or authority records ({answers} and {authorities} sent)")]
    RecordsInQuery { answers: u16, authorities: u16 },
    #[error("{0} additional records; a query may carry one (its OPT)")]
    AdditionalCount(u16),
    #[error("question name: {0}")]
    Name(NameError),
    #[error("the question name has octets other than letters, digits, `-` and `_`")]
    NameOctet,
    #[error("OPT is not a question type")]
    OptQuestion,
    #[error("the message ends inside the {0}")]
    Truncated(&'static str),
    #[error("additional record of type {0}; only OPT is accepted")]
    NotOpt(u16),
    #[error("the OPT record's owner is not the root name")]
    OptOwner,
    #[error("the OPT record's options do not fill its data exactly")]
    OptOptions,
    #[error("more than {MAX_EDNS_OPTIONS} EDNS options")]
    TooManyOptions,
    #[error("EDNS version {0}; only version 0 is supported")]
    EdnsVersion(u8),
    #[error("{0} octets after the last record")]
    TrailingBytes(usize),
}

impl Malformed {
    /// The RCODE that answers it.
    pub fn rcode(self) -> Rcode {
        match self {
            Malformed::Opcode(_) => Rcode::NotImp,
            Malformed::EdnsVersion(_) => Rcode::BadVers,
            _ => Rcode::FormErr,
        }
    }
}

/// A query the proxy does not serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Not answered at all.
    #[error("dropped: {0}")]
    Drop(DropReason),
    /// Answered with [`Malformed::rcode`]; [`QueryError::response`] builds the answer.
    #[error("answered {}: {reason}", reason.rcode())]
    Reject { header: Header, reason: Malformed },
}

impl QueryError {
    /// The error response to send, or `None` when the packet is to be dropped. It echoes the
    /// ID, opcode, RD and CD, carries no question (the question may be what is malformed), and
    /// an OPT only for BADVERS (RFC 6891 §6.1.3 puts the extended RCODE there).
    pub fn response(&self) -> Option<Vec<u8>> {
        match self {
            QueryError::Drop(_) => None,
            QueryError::Reject { header, reason } => {
                let opt = (reason.rcode() == Rcode::BadVers).then_some(OptReply {
                    dnssec_ok: false,
                    ede: None,
                });
                Some(build_response(
                    header.id,
                    header.flags & !flag::TC,
                    reason.rcode(),
                    None,
                    NO_RECORDS,
                    opt,
                ))
            }
        }
    }
}

/// Parses a query from the workload; see the module documentation for what is accepted.
pub fn parse_query(msg: &[u8], transport: Transport) -> Result<Query, QueryError> {
    let max = transport.max_query_len();
    if msg.len() > max {
        return Err(QueryError::Drop(DropReason::TooLong {
            len: msg.len(),
            max,
        }));
    }
    let header =
        Header::parse(msg).ok_or(QueryError::Drop(DropReason::TooShort { len: msg.len() }))?;
    if header.is_response() {
        return Err(QueryError::Drop(DropReason::NotAQuery));
    }
    let reject = |reason| QueryError::Reject { header, reason };
    if header.opcode() != 0 {
        return Err(reject(Malformed::Opcode(header.opcode())));
    }
    if header.qdcount != 1 {
        return Err(reject(Malformed::QuestionCount(header.qdcount)));
    }
    if header.ancount != 0 || header.nscount != 0 {
        return Err(reject(Malformed::RecordsInQuery {
            answers: header.ancount,
            authorities: header.nscount,
        }));
    }
    if header.arcount > 1 {
        return Err(reject(Malformed::AdditionalCount(header.arcount)));
    }

    let mut r = Reader::new(msg, HEADER_LEN);
    let qname = r.name().map_err(|e| reject(Malformed::Name(e)))?;
    if !qname.is_plain() {
        return Err(reject(Malformed::NameOctet));
    }
    let qtype = r.u16().ok_or(reject(Malformed::Truncated("question")))?;
    let qclass = r.u16().ok_or(reject(Malformed::Truncated("question")))?;
    if qtype == rtype::OPT {
        return Err(reject(Malformed::OptQuestion));
    }
    let question_wire = msg
        .get(HEADER_LEN..r.pos())
        .ok_or(reject(Malformed::Truncated("question")))?
        .to_vec();

    let edns = if header.arcount == 1 {
        Some(read_opt(&mut r).map_err(reject)?)
    } else {
        None
    };
    if r.remaining() != 0 {
        return Err(reject(Malformed::TrailingBytes(r.remaining())));
    }
    if let Some(e) = &edns
        && e.version != 0
    {
        return Err(reject(Malformed::EdnsVersion(e.version)));
    }
    Ok(Query {
        id: header.id,
        flags: header.flags,
        question: Question {
            qname: qname.into_string(),
            qtype,
            qclass,
        },
        edns,
        question_wire,
    })
}

fn read_opt(r: &mut Reader<'_>) -> Result<Edns, Malformed> {
    let cut = Malformed::Truncated("OPT record");
    let owner = r.name().map_err(|e| match e {
        NameError::Truncated { .. } => cut,
        _ => Malformed::OptOwner,
    })?;
    let rrtype = r.u16().ok_or(cut)?;
    if rrtype != rtype::OPT {
        return Err(Malformed::NotOpt(rrtype));
    }
    if !owner.as_str().is_empty() {
        return Err(Malformed::OptOwner);
    }
    let udp_payload_size = r.u16().ok_or(cut)?;
    let _extended_rcode = r.u8().ok_or(cut)?;
    let version = r.u8().ok_or(cut)?;
    let flags = r.u16().ok_or(cut)?;
    let rdlen = r.u16().ok_or(cut)?;
    let rdata = r.bytes(usize::from(rdlen)).ok_or(cut)?;
    let mut options = Vec::new();
    let mut o = Reader::new(rdata, 0);
    while o.remaining() > 0 {
        if options.len() == MAX_EDNS_OPTIONS {
            return Err(Malformed::TooManyOptions);
        }
        let code = o.u16().ok_or(Malformed::OptOptions)?;
        let len = o.u16().ok_or(Malformed::OptOptions)?;
        o.bytes(usize::from(len)).ok_or(Malformed::OptOptions)?;
        options.push(code);
    }
    Ok(Edns {
        udp_payload_size,
        version,
        dnssec_ok: flags & 0x8000 != 0,
        options,
    })
}

const NO_RECORDS: (&[u8], u16) = (&[], 0);
/// Size of the proxy's OPT record without options.
const OPT_LEN: usize = 11;

/// The proxy's OPT record in a response.
#[derive(Clone, Copy, Debug)]
struct OptReply {
    dnssec_ok: bool,
    ede: Option<u16>,
}

/// A response header and question, plus an OPT when the query had one.
///
/// Flags (RFC 1035 §4.1.1, RFC 4035 §3.2.2, RFC 6840 §5.7-5.8): QR set; opcode, RD and CD
/// copied from the query; RA set (the proxy offers recursion); AA, Z and AD clear (the proxy
/// is not authoritative and validates nothing); TC as given in `flags` by the caller (a query's
/// own TC bit never reaches here: callers pass it only for a response that did not fit).
fn build_response(
    id: u16,
    flags: u16,
    rcode: Rcode,
    question: Option<&[u8]>,
    (answers, ancount): (&[u8], u16),
    opt: Option<OptReply>,
) -> Vec<u8> {
    let code = rcode.code();
    let flags = flag::QR
        | (flags & (flag::OPCODE_MASK | flag::RD | flag::CD | flag::TC))
        | flag::RA
        | (code & flag::RCODE_MASK);
    let mut out =
        Vec::with_capacity(HEADER_LEN + question.map_or(0, <[u8]>::len) + answers.len() + 64);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&u16::from(question.is_some()).to_be_bytes());
    out.extend_from_slice(&ancount.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&u16::from(opt.is_some()).to_be_bytes());
    if let Some(q) = question {
        out.extend_from_slice(q);
    }
    out.extend_from_slice(answers);
    if let Some(opt) = opt {
        write_opt(&mut out, code, opt);
    }
    out
}

fn write_opt(out: &mut Vec<u8>, code: u16, opt: OptReply) {
    out.push(0); // owner: root
    out.extend_from_slice(&rtype::OPT.to_be_bytes());
    out.extend_from_slice(&PROXY_EDNS_UDP_SIZE.to_be_bytes());
    // TTL: extended RCODE (high 8 bits of the 12), version 0, DO, Z.
    out.push(((code >> 4) & 0xFF) as u8);
    out.push(0);
    let do_bit: u16 = if opt.dnssec_ok { 0x8000 } else { 0 };
    out.extend_from_slice(&do_bit.to_be_bytes());
    match opt.ede {
        None => out.extend_from_slice(&0u16.to_be_bytes()),
        Some(info_code) => {
            // EDE option: INFO-CODE (2) + EXTRA-TEXT.
            let option_len = 2 + EDE_TEXT.len() as u16;
            out.extend_from_slice(&(4 + option_len).to_be_bytes());
            out.extend_from_slice(&OPTION_EDE.to_be_bytes());
            out.extend_from_slice(&option_len.to_be_bytes());
            out.extend_from_slice(&info_code.to_be_bytes());
            out.extend_from_slice(EDE_TEXT);
        }
    }
}

/// TCP framing errors: the connection is to be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a {len}-octet message does not fit the 2-octet TCP length prefix")]
    TooLong { len: usize },
    #[error("the TCP length prefix announces {len} octets, fewer than a DNS header")]
    TooShort { len: usize },
}

/// `msg` with its 2-octet length prefix (RFC 1035 §4.2.2).
pub fn tcp_frame(msg: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = u16::try_from(msg.len()).map_err(|_| FrameError::TooLong { len: msg.len() })?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    Ok(out)
}

/// The first complete message in `buf` (bytes read so far from a TCP stream) and how many
/// bytes it used, prefix included; `None` until the whole message has arrived. A prefix that
/// announces less than a header is an error: the stream is not DNS.
pub fn tcp_unframe(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(prefix) = buf.get(..2) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
    if len < HEADER_LEN {
        return Err(FrameError::TooShort { len });
    }
    Ok(buf.get(2..2 + len).map(|msg| (msg, 2 + len)))
}

#[cfg(test)]
#[path = "message_tests.rs"]
mod tests;
