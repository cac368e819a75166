//! DNS control, the pure parts: what the agent's DNS proxy reads, decides and answers.
//!
//! - `wire`: bounded reading of DNS wire format; name decoding that ends on any input.
//! - `message`: the workload's query (strict parse), the proxy's own answers (NXDOMAIN,
//!   REFUSED, SERVFAIL, FORMERR, NOTIMP, BADVERS) and TCP framing.
//! - `answer`: an upstream answer reduced to the CNAME chain and the addresses it gives the
//!   queried name, and the sanitised answer the workload receives.
//! - `rebind`: which answer addresses may enter the allow map.
//!
//! The proxy itself (sockets, rate limits, the allow-map updates) is not here.

pub mod answer;
pub mod install;
pub mod message;
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

/// The built-in DoH provider list (`egress-policy/data/doh-providers.yaml`), parsed once. Empty
/// only if the embedded file does not parse, which a unit test rules out; policy loading then
/// refuses `block_doh` as unenforceable.
pub fn doh_list() -> &'static egress_policy::doh::DohList {
    static LIST: std::sync::OnceLock<egress_policy::doh::DohList> = std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        egress_policy::doh::DohList::builtin()
            .unwrap_or_else(|_| egress_policy::doh::DohList::empty())
    })
}
