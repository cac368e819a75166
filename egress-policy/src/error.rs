//! Why a policy file was refused. Every variant names the file; syntax and validation errors
//! also carry the line and column (1-based) and, for validation errors, the field path such as
//! `egress_policy.allowed_destinations[2].cidr`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy file could not be read (missing, unreadable).
    #[error("{}: cannot read the policy file: {}", path.display(), os_reason(source))]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The file is not well-formed YAML (or holds more than one document).
    #[error("{}", Located { file, line: *line, column: *column, path: None, message })]
    Syntax {
        file: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },

    /// The file holds no value: nothing but comments and whitespace, or a bare `null`.
    #[error(
        "{}: the file is empty; a policy file is a YAML mapping with the single top-level key \
         `egress_policy:` holding `default_action` and `allowed_destinations`",
        file.display()
    )]
    Empty { file: PathBuf },

    /// Well-formed YAML that is not a valid policy: unknown or duplicate key, wrong type,
    /// out-of-range number, malformed host or CIDR, contradictory entry.
    #[error("{}", Located { file, line: *line, column: *column, path: Some(path), message })]
    Invalid {
        file: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        /// Field path, e.g. `egress_policy.allowed_destinations[2].cidr`; `.` for the document.
        path: String,
        /// What is wrong and what would be valid.
        message: String,
    },

    /// The path names a directory, FIFO, device or socket: refused by its metadata, before
    /// anything is read from it.
    #[error("{}: cannot read the policy file: it is {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },

    /// Larger than `policy::MAX_POLICY_BYTES`.
    #[error(
        "{}: the policy file is larger than {limit} bytes, the most a policy file may hold \
         (MAX_POLICY_BYTES)",
        path.display()
    )]
    TooLarge { path: PathBuf, limit: u64 },

    /// Not valid UTF-8.
    #[error("{}: the policy file is not UTF-8 text (invalid byte at offset {offset})", path.display())]
    NotUtf8 { path: PathBuf, offset: usize },

    /// Mappings and sequences nested deeper than `policy::MAX_POLICY_DEPTH`.
    #[error(
        "{}: mappings and sequences nest deeper than {limit} levels, the most a policy file \
         may use (MAX_POLICY_DEPTH)",
        Position { file, line: *line, column: *column }
    )]
    TooDeep {
        file: PathBuf,
        line: usize,
        column: usize,
        limit: usize,
    },
}

/// The OS's reason without Rust's `(os error N)` suffix, which says nothing more to a reader.
fn os_reason(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_owned(),
        _ => text,
    }
}

/// `{file}:{line}:{column}`.
struct Position<'a> {
    file: &'a Path,
    line: usize,
    column: usize,
}

impl fmt::Display for Position<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

impl PolicyError {
    /// Process exit code for this error: 78 (`EX_CONFIG`) for every variant, since each means
    /// the policy given to the agent cannot be used.
    pub fn exit_code(&self) -> u8 {
        crate::EXIT_CONFIG
    }

    /// The policy file the error is about.
    pub fn file(&self) -> &Path {
        match self {
            PolicyError::Io { path, .. }
            | PolicyError::NotRegular { path, .. }
            | PolicyError::TooLarge { path, .. }
            | PolicyError::NotUtf8 { path, .. } => path,
            PolicyError::Syntax { file, .. }
            | PolicyError::Empty { file }
            | PolicyError::Invalid { file, .. }
            | PolicyError::TooDeep { file, .. } => file,
        }
    }
}

/// `{file}:{line}:{column}: {path}: {message}`, leaving out what is unknown.
struct Located<'a> {
    file: &'a Path,
    line: Option<usize>,
    column: Option<usize>,
    path: Option<&'a str>,
    message: &'a str,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if let Some(path) = self.path
            && !path.is_empty()
            && path != "."
        {
            write!(f, "{path}: ")?;
        }
        f.write_str(self.message)
    }
}
