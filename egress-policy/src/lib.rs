//! The egress policy core, pure and without aya: the MCP-NET-02 policy model and its strict
//! parser, and the step from a policy (plus the addresses its names resolved to) to the exact
//! contents of the kernel's maps, with a reference decision read straight off the policy.
//!
//! The YAML format is the one in MCP-NET-02's "Required Evidence" section, under a top-level
//! `egress_policy:` key, plus a few documented egress extensions (`allow_loopback`,
//! `allow_other_socket_types`, `name`). Parsing is strict: unknown keys, malformed values and
//! contradictory entries are errors naming the file, line, column and field.
//!
//! - Model and parsing: `model` (re-exported here), `parse`, `bounds` (size and nesting caps),
//!   `collect` (every error of a file), `lines` (where each entry is written), `support`
//!   (what this version cannot enforce), `aws` (the `restrictions` endpoint forms), `names`
//!   (host patterns and the public-suffix check), `lint` (legal but suspicious policies).
//! - Data the policy refers to, passed in by the caller: `doh` (the known DNS-over-HTTPS
//!   resolvers), `ip_ranges` (AWS's published address ranges).
//! - Compile: `compile` (the allow/deny tables), `learned` (addresses learned from DNS
//!   answers), `limits` (connection budgets), `inbound` (the inbound rules), `capacity` (what
//!   fits in the maps).
//! - Reference: `reference` (the allowlist decision), `limits::reference` (the budgets),
//!   `inbound::decide`.

pub mod aws;
mod bounds;
pub mod capacity;
mod collect;
pub mod compile;
pub mod doh;
mod error;
pub mod inbound;
pub mod ip_ranges;
pub mod learned;
pub mod limits;
mod lines;
pub mod lint;
mod model;
pub mod names;
mod parse;
pub mod ports;
pub mod reference;
mod support;

pub use bounds::{MAX_POLICY_BYTES, MAX_POLICY_DEPTH, read_policy_text};
pub use collect::{MAX_REPORTED, all_errors};
pub use error::PolicyError;
pub use lines::{EntryLines, entry_lines};
pub use model::*;
pub use parse::{load_file, parse_str};
pub use support::{Unsupported, unsupported_features};

/// Exit code of a process refused a policy (sysexits `EX_CONFIG`).
pub const EXIT_CONFIG: u8 = 78;
