//! Every error `check` can find in one run, not only the first.
//!
//! The parser stops at the first error. When that error lies inside an element of a list
//! (`egress_policy.allowed_destinations[3].cidr`), the element is blanked out (spaces, its
//! line breaks kept, so later errors keep their line and column) and the text is parsed
//! again, up to [`MAX_REPORTED`] errors. An error outside any list element ends the search.
//! Blanking an element can only remove conflicts between entries, never add one; an error
//! about the list as a whole that blanking caused (a list left empty) is not reported.

use std::collections::HashMap;
use std::path::Path;

use super::bounds::element_spans;
use super::error::PolicyError;
use super::parse::parse_str;

/// Most errors reported for one file.
pub const MAX_REPORTED: usize = 20;

/// The errors of policy `text`, in the order found; empty when it parses.
pub fn all_errors(text: &str, file: &Path) -> Vec<PolicyError> {
    let spans = element_spans(text);
    // Of each list, the original indices still in the text: after element 1 is blanked, the
    // parser's `[3]` is the file's `[4]`.
    let mut remaining: HashMap<&str, Vec<usize>> = spans
        .iter()
        .map(|(k, v)| (k.as_str(), (0..v.len()).collect()))
        .collect();
    let mut bytes = text.as_bytes().to_vec();
    let mut errors = Vec::new();
    while errors.len() < MAX_REPORTED {
        let Ok(current) = std::str::from_utf8(&bytes) else {
            break;
        };
        let error = match parse_str(current, file) {
            Ok(_) => break,
            Err(e) => e,
        };
        let located = element_of(&error).and_then(|(list, index, rest)| {
            let original = *remaining.get(list)?.get(index)?;
            let span = *spans.get(list)?.get(original)?;
            Some((list.to_owned(), index, original, rest.to_owned(), span))
        });
        let Some((list, index, original, rest, (start, end))) = located else {
            if errors.is_empty() {
                errors.push(error);
            }
            break;
        };
        errors.push(renumbered(error, &format!("{list}[{original}]{rest}")));
        for b in bytes.get_mut(start..end).into_iter().flatten() {
            if *b != b'\n' {
                *b = b' ';
            }
        }
        if let Some(r) = remaining.get_mut(list.as_str()) {
            r.remove(index);
        }
    }
    errors
}

/// `(list path, index, rest of the path)` of an error inside a list element.
fn element_of(error: &PolicyError) -> Option<(&str, usize, &str)> {
    let PolicyError::Invalid { path, .. } = error else {
        return None;
    };
    let open = path.find('[')?;
    let close = open + path[open..].find(']')?;
    let index = path[open + 1..close].parse().ok()?;
    Some((&path[..open], index, &path[close + 1..]))
}

fn renumbered(error: PolicyError, new_path: &str) -> PolicyError {
    match error {
        PolicyError::Invalid {
            file,
            line,
            column,
            message,
            ..
        } => PolicyError::Invalid {
            file,
            line,
            column,
            path: new_path.to_owned(),
            message,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_in_several_entries_are_all_reported_with_their_own_positions() {
        let text = "egress_policy:
  default_action: DENY
  allowed_destinations:
    - cidr: 10.0.0.1/8
      ports: [443]
      protocols: [tcp]
    - cidr: 192.0.2.0/24
      ports: [443]
      protocols: [tcp]
    - host: api.example.com
      ports: [0]
      protocols: [tcp]
    - cidr: 198.51.100.0/24
      ports: [443]
      protocols: [smtp]
  denied_destinations:
    - cidr: 203.0.113.0/33
";
        let errors: Vec<String> = all_errors(text, Path::new("p.yaml"))
            .iter()
            .map(ToString::to_string)
            .collect();
        let heads: Vec<&str> = errors
            .iter()
            .map(|e| e.split_once(": invalid").map_or(e.as_str(), |(h, _)| h))
            .map(|e| e.split(' ').next().unwrap_or(e))
            .collect();
        assert_eq!(
            heads,
            [
                "p.yaml:4:13:",
                "p.yaml:11:15:",
                "p.yaml:15:19:",
                "p.yaml:17:13:",
            ],
            "{errors:#?}"
        );
        assert!(
            errors[0].contains("allowed_destinations[0].cidr"),
            "{errors:#?}"
        );
        assert!(
            errors[1].contains("allowed_destinations[2].ports"),
            "{errors:#?}"
        );
        assert!(
            errors[2].contains("allowed_destinations[3].protocols"),
            "{errors:#?}"
        );
        assert!(
            errors[3].contains("denied_destinations[0].cidr"),
            "{errors:#?}"
        );
    }

    #[test]
    fn a_valid_file_has_none_and_an_error_outside_entries_is_reported_once() {
        let good = include_str!("../../policies/mcp-net-02-example.yaml");
        assert!(all_errors(good, Path::new("p.yaml")).is_empty());
        let top = "egress_policy:\n  default_action: DENY\n  colour: blue\n";
        assert_eq!(all_errors(top, Path::new("p.yaml")).len(), 1);
        let syntax = "egress_policy: [\n";
        assert_eq!(all_errors(syntax, Path::new("p.yaml")).len(), 1);
    }
}
