//! The MCP-NET-02 egress policy: serde model, strict parsing and validation.
//!
//! The YAML format is the one in MCP-NET-02's "Required Evidence" section, under a top-level
//! `egress_policy:` key, plus a few documented egress extensions (`allow_loopback`,
//! `allow_other_socket_types`, `name`). Parsing is strict: unknown keys, malformed values and
//! contradictory entries are errors naming the file, line, column and field.

pub mod aws;
mod bounds;
mod collect;
mod error;
mod lines;
mod model;
mod parse;
mod support;

pub use bounds::{MAX_POLICY_BYTES, MAX_POLICY_DEPTH, read_policy_text};
pub use collect::{MAX_REPORTED, all_errors};
pub use error::PolicyError;
pub use lines::{EntryLines, entry_lines};
pub use model::*;
pub use parse::{load_file, parse_str};
pub use support::{Unsupported, unsupported_features};
