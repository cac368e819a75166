//! Bounded reading of DNS wire format (RFC 1035 §4): a cursor that never reads past the end,
//! and name decoding that terminates on any input.
//!
//! Every packet read here may be written by an adversary: the workload (queries) or whatever
//! answers in the upstream's place. Reads are checked, never indexed; name decoding follows
//! compression pointers only strictly backwards and at most [`MAX_POINTER_HOPS`] times, and
//! stops at 255 octets of name.
//!
//! The fuzz crate (`fuzz/`) runs this crate's parsers on arbitrary bytes.

use std::fmt;

/// Length of the fixed header (RFC 1035 §4.1.1).
pub const HEADER_LEN: usize = 12;
/// Longest name on the wire, length octets and root label included (RFC 1035 §2.3.4).
pub const MAX_NAME_WIRE_LEN: usize = 255;
/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Compression pointers followed while decoding one name. Real encoders end a name with at most
/// one pointer, and the name it points to may itself end in one; a chain of a few is already
/// unusual. The bound keeps the work per name constant whatever the message holds.
pub const MAX_POINTER_HOPS: usize = 16;

/// Record types and classes this module names.
pub mod rtype {
    pub const A: u16 = 1;
    pub const CNAME: u16 = 5;
    pub const AAAA: u16 = 28;
    pub const OPT: u16 = 41;
    /// QTYPE `*`: any record type.
    pub const ANY: u16 = 255;
}

/// Class IN (RFC 1035 §3.2.4).
pub const CLASS_IN: u16 = 1;

/// Why a name could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name runs past the end of the message (at offset {at})")]
    Truncated { at: usize },
    #[error("label type 0x{bits:02x} at offset {at} is not a length or a pointer")]
    BadLabelType { bits: u8, at: usize },
    #[error(
        "compression pointer at offset {at} points to offset {target}, which is not before the \
         name it continues (or is inside the header)"
    )]
    PointerNotBackwards { at: usize, target: usize },
    #[error("more than {MAX_POINTER_HOPS} compression pointers in one name")]
    TooManyPointers,
    #[error("the name is longer than {MAX_NAME_WIRE_LEN} octets")]
    TooLong,
}

/// A decoded name in presentation form: labels joined by `.`, no trailing dot, the root as the
/// empty string. ASCII letters are lowercased; letters, digits, `-` and `_` are kept as they
/// are and every other octet is written `\DDD` (RFC 1035 §5.1), so a label that contains a `.`
/// can never read as two labels, and two names are equal exactly when their wire forms are
/// equal ignoring ASCII case.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// True when every label is letters, digits, `-` and `_` only (no escaped octet).
    pub fn is_plain(&self) -> bool {
        !self.0.contains('\\')
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str(".")
        } else {
            f.write_str(&self.0)
        }
    }
}

/// A cursor over one message. Every read is bounds-checked and returns `None` past the end.
#[derive(Clone, Copy, Debug)]
pub struct Reader<'a> {
    msg: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(msg: &'a [u8], pos: usize) -> Self {
        Reader { msg, pos }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.msg.len().saturating_sub(self.pos)
    }

    pub fn u8(&mut self) -> Option<u8> {
        let b = *self.msg.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    pub fn u16(&mut self) -> Option<u16> {
        let b = self.bytes(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Option<u32> {
        let b = self.bytes(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let b = self.msg.get(self.pos..end)?;
        self.pos = end;
        Some(b)
    }

    /// Decodes the name at the cursor and moves past it (past its first pointer, if any).
    pub fn name(&mut self) -> Result<Name, NameError> {
        let (name, end) = read_name(self.msg, self.pos)?;
        self.pos = end;
        Ok(name)
    }
}

/// Decodes the (possibly compressed) name that starts at `start`; returns it and the offset
/// just past its in-place encoding.
///
/// A pointer must lead strictly before the start of the run of labels it ends, and never into
/// the header: every jump therefore lands earlier than the last, which rules out loops on its
/// own; [`MAX_POINTER_HOPS`] bounds the work on top of that.
pub fn read_name(msg: &[u8], start: usize) -> Result<(Name, usize), NameError> {
    let mut text = String::new();
    let mut wire_len = 1usize; // the root label
    let mut pos = start;
    // Where the current run of labels began: pointers must lead before it.
    let mut run_start = start;
    let mut end = None;
    let mut hops = 0usize;
    let mut first = true;
    loop {
        let len = *msg.get(pos).ok_or(NameError::Truncated { at: pos })?;
        match len & 0xC0 {
            0x00 if len == 0 => {
                return Ok((Name(text), end.unwrap_or(pos + 1)));
            }
            0x00 => {
                let len = usize::from(len);
                wire_len += len + 1;
                if wire_len > MAX_NAME_WIRE_LEN {
                    return Err(NameError::TooLong);
                }
                let label = msg
                    .get(pos + 1..pos + 1 + len)
                    .ok_or(NameError::Truncated { at: pos + 1 })?;
                if !first {
                    text.push('.');
                }
                first = false;
                push_label(&mut text, label);
                pos += 1 + len;
            }
            0xC0 => {
                let low = *msg
                    .get(pos + 1)
                    .ok_or(NameError::Truncated { at: pos + 1 })?;
                let target = usize::from(u16::from_be_bytes([len & 0x3F, low]));
                if target < HEADER_LEN || target >= run_start {
                    return Err(NameError::PointerNotBackwards { at: pos, target });
                }
                hops += 1;
                if hops > MAX_POINTER_HOPS {
                    return Err(NameError::TooManyPointers);
                }
                if end.is_none() {
                    end = Some(pos + 2);
                }
                pos = target;
                run_start = target;
            }
            bits => return Err(NameError::BadLabelType { bits, at: pos }),
        }
    }
}

fn push_label(text: &mut String, label: &[u8]) {
    for &b in label {
        match b {
            b'A'..=b'Z' => text.push(char::from(b.to_ascii_lowercase())),
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => text.push(char::from(b)),
            _ => {
                text.push('\\');
                text.push(char::from(b'0' + b / 100));
                text.push(char::from(b'0' + b / 10 % 10));
                text.push(char::from(b'0' + b % 10));
            }
        }
    }
}

/// Appends `name` (presentation form as [`Name`] writes it, plain labels only) uncompressed.
/// Returns `None` when a label is empty or longer than 63 octets or the name is too long.
pub fn write_plain_name(out: &mut Vec<u8>, name: &str) -> Option<()> {
    let mut wire_len = 1usize;
    if !name.is_empty() {
        for label in name.split('.') {
            if label.is_empty() || label.len() > MAX_LABEL_LEN || label.contains('\\') {
                return None;
            }
            wire_len += label.len() + 1;
            if wire_len > MAX_NAME_WIRE_LEN {
                return None;
            }
            out.push(u8::try_from(label.len()).ok()?);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg_with(name_at_12: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; HEADER_LEN];
        m.extend_from_slice(name_at_12);
        m
    }

    fn read(m: &[u8], at: usize) -> Result<(String, usize), NameError> {
        read_name(m, at).map(|(n, end)| (n.into_string(), end))
    }

    #[test]
    fn plain_name_is_lowercased_and_ends_after_root() {
        let m = msg_with(b"\x03WwW\x07Example\x03COM\x00rest");
        assert_eq!(read(&m, 12), Ok(("www.example.com".into(), 12 + 17)));
    }

    #[test]
    fn root_is_empty() {
        let m = msg_with(b"\x00");
        assert_eq!(read(&m, 12), Ok((String::new(), 13)));
    }

    #[test]
    fn pointer_backwards_is_followed_and_end_is_after_pointer() {
        // 12: example.com ; 25: www + pointer to 12
        let m = msg_with(b"\x07example\x03com\x00\x03www\xC0\x0C");
        assert_eq!(read(&m, 25), Ok(("www.example.com".into(), 31)));
    }

    #[test]
    fn pointer_to_itself_forwards_or_into_header_is_refused() {
        let m = msg_with(b"\xC0\x0C");
        assert_eq!(
            read(&m, 12),
            Err(NameError::PointerNotBackwards { at: 12, target: 12 })
        );
        let m = msg_with(b"\xC0\x0E\x00");
        assert!(matches!(
            read(&m, 12),
            Err(NameError::PointerNotBackwards { .. })
        ));
        let m = msg_with(b"\xC0\x02");
        assert!(matches!(
            read(&m, 12),
            Err(NameError::PointerNotBackwards { target: 2, .. })
        ));
    }

    #[test]
    fn loop_through_a_label_is_refused() {
        // 12: "a" then pointer back to 12: a.a.a.a... if pointers may land after their run.
        let m = msg_with(b"\x01a\xC0\x0C");
        assert!(matches!(
            read(&m, 12),
            Err(NameError::PointerNotBackwards { .. })
        ));
        // Two names pointing at each other: 12 -> 16, 16 -> 12.
        let m = msg_with(b"\x01a\xC0\x10\x01b\xC0\x0C");
        assert!(matches!(
            read(&m, 16),
            Err(NameError::PointerNotBackwards { .. })
        ));
    }

    #[test]
    fn long_backward_pointer_chain_is_bounded() {
        // 12: root; then a chain of pointers each to the previous one.
        let mut m = msg_with(b"\x00");
        let mut prev = 12u16;
        for _ in 0..(MAX_POINTER_HOPS + 4) {
            let here = u16::try_from(m.len()).unwrap_or(u16::MAX);
            m.extend_from_slice(&(0xC000 | prev).to_be_bytes());
            prev = here;
        }
        assert_eq!(read(&m, usize::from(prev)), Err(NameError::TooManyPointers));
        // A chain within the bound decodes.
        let start = 13 + 2 * (MAX_POINTER_HOPS - 1);
        assert_eq!(read(&m, start), Ok((String::new(), start + 2)));
    }

    #[test]
    fn label_types_01_and_10_are_refused() {
        for bits in [0x40u8, 0x80] {
            let m = msg_with(&[bits | 1, b'a', 0]);
            assert_eq!(read(&m, 12), Err(NameError::BadLabelType { bits, at: 12 }));
        }
    }

    #[test]
    fn name_of_255_octets_decodes_and_256_does_not() {
        // 4 labels of 63 = 256 octets with length bytes, + root = 257: too long.
        let label = [b'a'; 63];
        let mut long = Vec::new();
        for _ in 0..4 {
            long.push(63);
            long.extend_from_slice(&label);
        }
        long.push(0);
        assert_eq!(read(&msg_with(&long), 12), Err(NameError::TooLong));
        // 3 x 63 + a 61-octet label: 3*64 + 62 + 1 = 255.
        let mut ok = Vec::new();
        for _ in 0..3 {
            ok.push(63);
            ok.extend_from_slice(&label);
        }
        ok.push(61);
        ok.extend_from_slice(&label[..61]);
        ok.push(0);
        assert_eq!(ok.len(), 255);
        assert!(read(&msg_with(&ok), 12).is_ok());
        // And 3 x 63 + 62: 256.
        ok[3 * 64] = 62;
        ok.insert(3 * 64 + 1, b'a');
        assert_eq!(read(&msg_with(&ok), 12), Err(NameError::TooLong));
    }

    #[test]
    fn too_long_through_pointers_is_refused() {
        // A 250-octet name at 12, then a name of two more 63-octet labels pointing to it.
        let mut m = msg_with(&[]);
        for _ in 0..3 {
            m.push(63);
            m.extend_from_slice(&[b'x'; 63]);
        }
        m.push(0);
        let second = m.len();
        m.push(63);
        m.extend_from_slice(&[b'y'; 63]);
        m.extend_from_slice(&0xC00Cu16.to_be_bytes());
        assert_eq!(read(&m, second), Err(NameError::TooLong));
    }

    #[test]
    fn truncation_anywhere_in_a_name_is_reported() {
        let full = msg_with(b"\x07example\x03com\x00\x03www\xC0\x0C");
        for cut in 12..full.len() {
            let at = if cut < 25 { 12 } else { 25 };
            if cut <= at {
                continue;
            }
            assert!(
                matches!(read(&full[..cut], at), Err(NameError::Truncated { .. })),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn odd_octets_are_escaped_so_a_dot_inside_a_label_stays_one_label() {
        let m = msg_with(b"\x0bapi.company\x03com\x00");
        let (name, _) = read_name(&m, 12).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(name.as_str(), "api\\046company.com");
        assert!(!name.is_plain());
        let m = msg_with(b"\x04_srv\x03x-y\x00");
        let (name, _) = read_name(&m, 12).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(name.as_str(), "_srv.x-y");
        assert!(name.is_plain());
    }

    #[test]
    fn write_plain_name_round_trips_and_refuses_bad_labels() {
        let mut out = vec![0u8; HEADER_LEN];
        assert_eq!(write_plain_name(&mut out, "www.example.com"), Some(()));
        assert_eq!(read(&out, 12), Ok(("www.example.com".into(), out.len())));
        let mut out = Vec::new();
        assert_eq!(write_plain_name(&mut out, ""), Some(()));
        assert_eq!(out, [0]);
        assert_eq!(write_plain_name(&mut Vec::new(), "a..b"), None);
        assert_eq!(write_plain_name(&mut Vec::new(), &"a".repeat(64)), None);
        assert_eq!(write_plain_name(&mut Vec::new(), "a\\046b"), None);
    }
}
