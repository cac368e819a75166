//! DNS wire format, hardened: the parsers the agent's DNS proxy runs on what the workload sends
//! and what upstream answers, and the builders of its own answers. Every input is assumed
//! hostile: reads are bounded, name decoding terminates on any input.
//!
//! - `wire`: bounded reading of DNS wire format; name decoding that ends on any input.
//! - `message`: the workload's query (strict parse), the proxy's own answers (NXDOMAIN,
//!   REFUSED, SERVFAIL, FORMERR, NOTIMP, BADVERS) and TCP framing.
//! - `answer`: an upstream answer reduced to the CNAME chain and the addresses it gives the
//!   queried name, and the sanitised answer the workload receives.
//! - `craft`: hand-built messages, field by field, for tests and tools.

pub mod answer;
pub mod craft;
pub mod message;
pub mod wire;

#[cfg(test)]
mod robustness;
