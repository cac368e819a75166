//! An error and its causes as one line, each reason said once.
//!
//! Many errors put their cause in their own message and also return it as `source()`, so
//! walking the chain naively prints an OS error twice.

use std::error::Error;

/// `error: cause: cause...`, leaving out a cause whose text the line already holds.
pub fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(without_os_code(&said)) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// `No such file or directory (os error 2)` -> `No such file or directory`.
pub fn without_os_code(text: &str) -> &str {
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => &text[..i],
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading /x: {0}")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("starting")]
    struct Bare(#[source] std::io::Error);

    #[test]
    fn a_reason_already_in_the_message_is_not_repeated() {
        let e = Outer(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            chain(&e),
            "reading /x: No such file or directory (os error 2)"
        );
        let e = Bare(std::io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(chain(&e), "starting: Permission denied (os error 13)");
    }
}
