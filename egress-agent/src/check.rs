//! `egress-agent check`: validate a policy and say what it allows.

use std::path::Path;

use crate::session::{self, SessionError};

/// The text to print for a policy that this version can enforce.
pub fn check(path: &Path) -> Result<String, SessionError> {
    let policy = session::load_policy(path)?;
    let mut text = format!("{}: OK\n{}", path.display(), policy.summary());
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}
