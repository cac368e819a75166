//! Where each entry of `allowed_destinations` and `denied_destinations` starts in the policy
//! text, so that `check --explain` can name the deciding rule by file and line.
//!
//! The policy model carries no positions (serde's derive keeps none), and the text has
//! already been parsed strictly when this runs, so a scan of block-style sequences is enough:
//! an entry is a `- ` item at the sequence's own indentation below the key. Anything the scan
//! does not understand (flow style `[...]`, anchors) yields no lines rather than wrong ones:
//! the result is used only when its count matches the parsed policy's.

/// 1-based line numbers of the entries, in the order written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntryLines {
    pub allowed: Vec<usize>,
    pub denied: Vec<usize>,
}

impl EntryLines {
    /// The line of `allowed_destinations[index]`, when the scan found every entry.
    pub fn allowed_line(&self, index: usize, expected: usize) -> Option<usize> {
        line_of(&self.allowed, index, expected)
    }

    /// The line of `denied_destinations[index]`, when the scan found every entry.
    pub fn denied_line(&self, index: usize, expected: usize) -> Option<usize> {
        line_of(&self.denied, index, expected)
    }
}

fn line_of(lines: &[usize], index: usize, expected: usize) -> Option<usize> {
    if lines.len() != expected {
        return None;
    }
    lines.get(index).copied()
}

/// Scans `text` (a policy that parsed) for the entry lines of both lists.
pub fn entry_lines(text: &str) -> EntryLines {
    EntryLines {
        allowed: sequence_items(text, "allowed_destinations"),
        denied: sequence_items(text, "denied_destinations"),
    }
}

/// The lines of the items of the block sequence under the (first) mapping key `key`.
fn sequence_items(text: &str, key: &str) -> Vec<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let Some((key_line, key_indent)) = lines.iter().enumerate().find_map(|(i, l)| {
        let content = strip_comment(l);
        let trimmed = content.trim_start();
        let rest = trimmed
            .strip_prefix(key)
            .or_else(|| quoted_key(trimmed, key))?;
        let rest = rest.trim_start().strip_prefix(':')?;
        if !rest.trim().is_empty() {
            // `key: [...]` (flow style) or `key: []`: no block items to find.
            return None;
        }
        Some((i, indent(l)))
    }) else {
        return Vec::new();
    };
    let mut items = Vec::new();
    let mut item_indent = None;
    for (i, line) in lines.iter().enumerate().skip(key_line + 1) {
        let content = strip_comment(line);
        if content.trim().is_empty() {
            continue;
        }
        let ind = indent(line);
        let trimmed = content.trim_start();
        let is_item = trimmed == "-" || trimmed.starts_with("- ");
        match item_indent {
            None if is_item && ind >= key_indent => {
                item_indent = Some(ind);
                items.push(i + 1);
            }
            None => break,
            Some(at) if is_item && ind == at => items.push(i + 1),
            Some(at) if ind > at => {}
            Some(_) => break,
        }
    }
    items
}

fn quoted_key<'a>(trimmed: &'a str, key: &str) -> Option<&'a str> {
    for q in ['"', '\''] {
        if let Some(rest) = trimmed.strip_prefix(q)
            && let Some(rest) = rest.strip_prefix(key)
            && let Some(rest) = rest.strip_prefix(q)
        {
            return Some(rest);
        }
    }
    None
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// The line without a trailing `# comment` (a `#` after whitespace, outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev_space => return &line[..i],
            _ => {}
        }
        prev_space = c == ' ' || c == '\t';
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_the_seed_policy() {
        let text = include_str!("../../policies/mcp-net-02-example.yaml");
        let lines = entry_lines(text);
        assert_eq!(lines.allowed, vec![4, 9, 17]);
        assert_eq!(lines.denied, vec![23, 24, 25]);
    }

    #[test]
    fn items_at_the_key_indentation_comments_and_nested_lists() {
        let text = "egress_policy:\n  default_action: DENY\n  # allowed_destinations: no\n  \
                    allowed_destinations:\n  - host: a.example.com  # first\n    ports:\n    \
                    - 443\n    protocols: [tcp]\n\n  - cidr: 10.0.0.0/8\n    ports: [1]\n    \
                    protocols: [udp]\n  denied_destinations: []\n";
        let lines = entry_lines(text);
        assert_eq!(lines.allowed, vec![5, 10]);
        assert!(lines.denied.is_empty());
        assert_eq!(lines.allowed_line(1, 2), Some(10));
        assert_eq!(
            lines.allowed_line(1, 3),
            None,
            "a count mismatch gives no line"
        );
    }
}
