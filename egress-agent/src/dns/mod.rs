//! DNS control, the pure parts: what the agent's DNS proxy reads, decides and answers.
//!
//! - `wire`: bounded reading of DNS wire format; name decoding that ends on any input.
//! - `message`: the workload's query (strict parse), the proxy's own answers (NXDOMAIN,
//!   REFUSED, SERVFAIL, FORMERR, NOTIMP, BADVERS) and TCP framing.
//! - `answer`: an upstream answer reduced to the CNAME chain and the addresses it gives the
//!   queried name, and the sanitised answer the workload receives.
//! - `names`: the policy's allowed and denied hosts (exact and `*.suffix`; deny wins), and the
//!   public-suffix check for wildcards.
//! - `rebind`: which answer addresses may enter the allow map.
//! - `ip_ranges`: AWS's published address ranges (a local ip-ranges.json), the address check
//!   of `restrictions`.
//! - `doh`: the known DNS-over-HTTPS resolvers (`egress-agent/data/doh-providers.yaml`).
//!
//! The proxy itself (sockets, rate limits, the allow-map updates) is not here.

pub mod answer;
pub mod doh;
pub mod install;
pub mod ip_ranges;
pub mod learn;
pub mod message;
pub mod names;
pub mod observed;
pub mod origin;
pub mod proxy;
pub mod rebind;
pub mod upstream;
pub mod wire;

#[cfg(test)]
mod robustness;
#[cfg(test)]
mod testutil;

/// The built-in DoH provider list, parsed once. `None` only if the embedded file does not
/// parse, which a unit test rules out; policy loading refuses `block_doh` in that case.
pub fn doh_list() -> Option<&'static doh::DohList> {
    static LIST: std::sync::OnceLock<Option<doh::DohList>> = std::sync::OnceLock::new();
    LIST.get_or_init(|| doh::DohList::builtin().ok()).as_ref()
}
