//! Reading a policy file without trusting it.
//!
//! The policy is operator input, but a reload reads whatever the path names at that moment,
//! and the YAML parser's cost grows faster than the input with nesting. So before anything
//! parses it: the path must name a regular file (a FIFO with no writer, `/dev/zero` or a
//! directory is refused by its metadata, never read), at most [`MAX_POLICY_BYTES`] are read,
//! and one cheap pass over the YAML events refuses nesting deeper than
//! [`MAX_POLICY_DEPTH`] before the three full passes of `parse` run.

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read as _;
use std::mem::MaybeUninit;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::Path;

use unsafe_libyaml_norway as unsafe_yaml;

use super::error::PolicyError;

/// Largest policy file accepted, in bytes: room for a policy at the kernel maps' capacity
/// (131072 allowed entries, see `capacity`) written one entry per line in up to 128 bytes.
/// Parsing a file this size takes a few seconds, on a worker thread.
pub const MAX_POLICY_BYTES: u64 = 16 * 1024 * 1024;

/// Deepest nesting of YAML mappings and sequences accepted. A policy needs six levels
/// (`egress_policy` > `allowed_destinations` > entry > `restrictions` > `regions` > item);
/// the YAML parser's work per token grows with the depth, so a deep file is refused before
/// it is parsed.
pub const MAX_POLICY_DEPTH: usize = 32;

/// Reads the text of the policy file at `path`: a regular file of at most
/// [`MAX_POLICY_BYTES`] bytes of UTF-8.
pub fn read_policy_text(path: &Path) -> Result<String, PolicyError> {
    let io = |source| PolicyError::Io {
        path: path.to_path_buf(),
        source,
    };
    // By metadata first, so that a device or FIFO is never opened at all...
    screen(path, &std::fs::metadata(path).map_err(io)?)?;
    // ... and again on what was opened, in case the path was swapped in between. O_NONBLOCK:
    // a FIFO swapped in cannot block the open.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    screen(path, &file.metadata().map_err(io)?)?;
    let bytes = read_capped(file).map_err(io)?;
    if bytes.len() as u64 > MAX_POLICY_BYTES {
        return Err(too_large(path));
    }
    String::from_utf8(bytes).map_err(|e| PolicyError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })
}

/// At most one byte past the cap: enough to tell that the file is too large.
fn read_capped(file: File) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(MAX_POLICY_BYTES + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn screen(path: &Path, meta: &Metadata) -> Result<(), PolicyError> {
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(PolicyError::NotRegular {
            path: path.to_path_buf(),
            kind,
        });
    }
    if meta.len() > MAX_POLICY_BYTES {
        return Err(too_large(path));
    }
    Ok(())
}

fn too_large(path: &Path) -> PolicyError {
    PolicyError::TooLarge {
        path: path.to_path_buf(),
        limit: MAX_POLICY_BYTES,
    }
}

/// Refuses `text` when its mappings and sequences nest deeper than [`MAX_POLICY_DEPTH`].
/// Stops at the first event past the cap, so a hostile file costs little. Malformed YAML is
/// left to the full parse, which reports it with its position.
pub fn check_depth(text: &str, file: &Path) -> Result<(), PolicyError> {
    let mut parser = Parser::new(text);
    let mut depth = 0usize;
    while let Some(event) = parser.next_event() {
        match event.kind {
            unsafe_yaml::YAML_SEQUENCE_START_EVENT | unsafe_yaml::YAML_MAPPING_START_EVENT => {
                depth += 1;
                if depth > MAX_POLICY_DEPTH {
                    return Err(PolicyError::TooDeep {
                        file: file.to_path_buf(),
                        line: event.line,
                        column: event.column,
                        limit: MAX_POLICY_DEPTH,
                    });
                }
            }
            unsafe_yaml::YAML_SEQUENCE_END_EVENT | unsafe_yaml::YAML_MAPPING_END_EVENT => {
                depth = depth.saturating_sub(1);
            }
            unsafe_yaml::YAML_STREAM_END_EVENT => break,
            _ => {}
        }
    }
    Ok(())
}

/// The byte range of every sequence element, by the field path of its sequence (as
/// serde_path_to_error spells it: `egress_policy.allowed_destinations`). Element `i`'s range
/// runs from the end of element `i - 1` (or the sequence's start) to its own end, so it holds
/// the `- ` indicator of a block sequence. Empty when the text is not well-formed YAML.
pub fn element_spans(text: &str) -> std::collections::HashMap<String, Vec<(usize, usize)>> {
    enum Frame {
        Map {
            path: String,
            key: Option<String>,
            at_key: bool,
        },
        Seq {
            path: String,
            prev_end: usize,
        },
    }
    fn child_path(
        frames: &[Frame],
        spans: &std::collections::HashMap<String, Vec<(usize, usize)>>,
    ) -> String {
        match frames.last() {
            Some(Frame::Map { path, key, .. }) => {
                let key = key.as_deref().unwrap_or("?");
                if path.is_empty() {
                    key.to_owned()
                } else {
                    format!("{path}.{key}")
                }
            }
            Some(Frame::Seq { path, .. }) => {
                let i = spans.get(path).map_or(0, Vec::len);
                format!("{path}[{i}]")
            }
            None => String::new(),
        }
    }
    fn completed(
        frames: &mut [Frame],
        spans: &mut std::collections::HashMap<String, Vec<(usize, usize)>>,
        end: usize,
        scalar: Option<String>,
    ) {
        match frames.last_mut() {
            Some(Frame::Map { key, at_key, .. }) => {
                if *at_key {
                    *key = scalar;
                }
                *at_key = !*at_key;
            }
            Some(Frame::Seq { path, prev_end }) => {
                spans
                    .entry(path.clone())
                    .or_default()
                    .push((*prev_end, end));
                *prev_end = end;
            }
            None => {}
        }
    }
    let mut spans = std::collections::HashMap::new();
    let mut frames: Vec<Frame> = Vec::new();
    let mut parser = Parser::new(text);
    while let Some(event) = parser.next_event() {
        match event.kind {
            unsafe_yaml::YAML_MAPPING_START_EVENT => {
                let path = child_path(&frames, &spans);
                frames.push(Frame::Map {
                    path,
                    key: None,
                    at_key: true,
                });
            }
            unsafe_yaml::YAML_SEQUENCE_START_EVENT => {
                let path = child_path(&frames, &spans);
                spans.entry(path.clone()).or_default();
                frames.push(Frame::Seq {
                    path,
                    prev_end: event.start,
                });
            }
            unsafe_yaml::YAML_MAPPING_END_EVENT | unsafe_yaml::YAML_SEQUENCE_END_EVENT => {
                frames.pop();
                completed(&mut frames, &mut spans, event.end, None);
            }
            unsafe_yaml::YAML_SCALAR_EVENT | unsafe_yaml::YAML_ALIAS_EVENT => {
                completed(&mut frames, &mut spans, event.end, event.scalar);
            }
            unsafe_yaml::YAML_STREAM_END_EVENT => return spans,
            _ => {}
        }
    }
    // A syntax error: no recovery on a text that does not parse.
    std::collections::HashMap::new()
}

/// One parser event.
struct Event {
    kind: unsafe_yaml::yaml_event_type_t,
    /// 1-based position of its start.
    line: usize,
    column: usize,
    /// Byte offsets of its start and end.
    start: usize,
    end: usize,
    /// A scalar's value.
    scalar: Option<String>,
}

/// libyaml's event parser over borrowed text (the one serde_norway uses, driven directly
/// so that it can be stopped early).
struct Parser<'a> {
    /// Boxed: libyaml keeps pointers into its own state.
    sys: Box<MaybeUninit<unsafe_yaml::yaml_parser_t>>,
    /// `yaml_parser_initialize` succeeded: the parser owns buffers to free.
    initialized: bool,
    /// No error yet.
    live: bool,
    _text: std::marker::PhantomData<&'a str>,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        let mut sys = Box::new(MaybeUninit::<unsafe_yaml::yaml_parser_t>::uninit());
        let p = sys.as_mut_ptr();
        // SAFETY: `p` points to writable memory for a parser, which initialize fills in; the
        // input outlives the parser (the lifetime 'a).
        let initialized = unsafe {
            let ok = unsafe_yaml::yaml_parser_initialize(p).ok;
            if ok {
                unsafe_yaml::yaml_parser_set_encoding(p, unsafe_yaml::YAML_UTF8_ENCODING);
                unsafe_yaml::yaml_parser_set_input_string(p, text.as_ptr(), text.len() as u64);
            }
            ok
        };
        Parser {
            sys,
            initialized,
            live: initialized,
            _text: std::marker::PhantomData,
        }
    }

    /// The next event; `None` at an error (or when the parser could not be set up).
    fn next_event(&mut self) -> Option<Event> {
        if !self.live {
            return None;
        }
        let mut event = MaybeUninit::<unsafe_yaml::yaml_event_t>::uninit();
        // SAFETY: the parser was initialized (`live`); parse fills `event` when it succeeds;
        // the scalar union member is read only for a scalar event, within its length; the
        // event is deleted exactly once, after it was read.
        unsafe {
            if !unsafe_yaml::yaml_parser_parse(self.sys.as_mut_ptr(), event.as_mut_ptr()).ok {
                self.live = false;
                return None;
            }
            let e = event.as_mut_ptr();
            let kind = (*e).type_;
            let mark = (*e).start_mark;
            let end = (*e).end_mark;
            let scalar = (kind == unsafe_yaml::YAML_SCALAR_EVENT).then(|| {
                let s = (*e).data.scalar;
                let len = usize::try_from(s.length).unwrap_or(0);
                if s.value.is_null() {
                    String::new()
                } else {
                    String::from_utf8_lossy(std::slice::from_raw_parts(s.value, len)).into_owned()
                }
            });
            unsafe_yaml::yaml_event_delete(e);
            let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
            Some(Event {
                kind,
                line: n(mark.line).saturating_add(1),
                column: n(mark.column).saturating_add(1),
                start: n(mark.index),
                end: n(end.index),
                scalar,
            })
        }
    }
}

impl Drop for Parser<'_> {
    fn drop(&mut self) {
        if self.initialized {
            // SAFETY: initialized, and deleted only here.
            unsafe { unsafe_yaml::yaml_parser_delete(self.sys.as_mut_ptr()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    const GOOD: &str = "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    \
                        - cidr: 192.0.2.0/24\n      ports: [443]\n      protocols: [tcp]\n";

    fn refused(path: &Path) -> String {
        match super::super::load_file(path) {
            Ok(p) => panic!("{} accepted: {p:?}", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_regular_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.yaml");
        std::fs::write(&p, GOOD).unwrap();
        assert_eq!(read_policy_text(&p).unwrap(), GOOD);
        assert!(super::super::load_file(&p).is_ok());
    }

    #[test]
    fn directories_devices_and_fifos_are_refused_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let text = refused(dir.path());
        assert!(
            text.ends_with("it is a directory, not a regular file"),
            "{text}"
        );
        assert_eq!(
            refused(Path::new("/dev/zero")),
            "/dev/zero: cannot read the policy file: it is a character device, not a regular file"
        );
        // A FIFO with no writer: opening it for reading would block, and reading it would
        // wait for ever.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = Instant::now();
        let text = refused(&fifo);
        assert!(text.ends_with("it is a FIFO, not a regular file"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_file_over_the_size_cap_is_refused_naming_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.yaml");
        let mut text = GOOD.to_owned();
        let pad = usize::try_from(MAX_POLICY_BYTES).unwrap() + 1 - text.len();
        text.push_str(&"#".repeat(pad));
        std::fs::write(&p, &text).unwrap();
        let e = refused(&p);
        assert!(e.contains("larger than 16777216 bytes"), "{e}");
        assert!(e.contains("MAX_POLICY_BYTES"), "{e}");
        // One byte less is read (and parsed: the padding is a comment).
        text.pop();
        std::fs::write(&p, &text).unwrap();
        assert!(super::super::load_file(&p).is_ok());
    }

    #[test]
    fn unreadable_and_binary_files_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bin.yaml");
        std::fs::write(&p, b"egress_policy: \xff\xfe\n").unwrap();
        assert_eq!(
            refused(&p),
            format!(
                "{}: the policy file is not UTF-8 text (invalid byte at offset 15)",
                p.display()
            )
        );
    }

    fn nested(depth: usize, open: &str, close: &str) -> String {
        format!(
            "egress_policy: {}{}\n",
            open.repeat(depth),
            close.repeat(depth)
        )
    }

    #[test]
    fn nesting_at_the_cap_passes_the_depth_check_and_one_more_level_is_refused() {
        let f = Path::new("p.yaml");
        // The top-level mapping is one level.
        assert!(check_depth(&nested(MAX_POLICY_DEPTH - 1, "[", "]"), f).is_ok());
        let e = check_depth(&nested(MAX_POLICY_DEPTH, "[", "]"), f).unwrap_err();
        assert_eq!(
            e.to_string(),
            "p.yaml:1:47: mappings and sequences nest deeper than 32 levels, the most a policy \
             file may use (MAX_POLICY_DEPTH)"
        );
        assert_eq!(e.exit_code(), 78);
        // Block nesting counts the same.
        let mut block = String::from("egress_policy:\n");
        for i in 1..=MAX_POLICY_DEPTH {
            block.push_str(&" ".repeat(i * 2));
            block.push_str(&format!("k{i}:\n"));
        }
        block.push_str(&" ".repeat(MAX_POLICY_DEPTH * 2 + 2));
        block.push_str("x: 1\n");
        assert!(check_depth(&block, f).is_err());
        // A real policy is far from the cap.
        assert!(check_depth(GOOD, f).is_ok());
    }

    #[test]
    fn a_hostile_nested_file_is_refused_quickly() {
        let dir = tempfile::tempdir().unwrap();
        for (start, open, close) in [
            ("egress_policy: ", "[", "]"),
            ("egress_policy: ", "{a: ", "}"),
            ("egress_policy:\n  ", "- ", ""),
        ] {
            let p = dir.path().join("deep.yaml");
            let mut text = String::from(start);
            while text.len() < 200_000 {
                text.push_str(open);
            }
            while text.len() < 400_000 && !close.is_empty() {
                text.push_str(close);
            }
            std::fs::write(&p, &text).unwrap();
            let started = Instant::now();
            let e = refused(&p);
            let took = started.elapsed();
            assert!(e.contains("nest deeper than 32 levels"), "{open}: {e}");
            // Unbounded, such a file took tens of seconds of CPU; debug builds included.
            assert!(took < Duration::from_secs(2), "{open}: {took:?}");
        }
    }
}
