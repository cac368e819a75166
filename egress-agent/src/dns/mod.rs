//! DNS control: the agent's DNS proxy. The wire format (parsers and builders) is the
//! `egress-dns-wire` crate; the policy's names, the DoH list and the learned-address
//! bookkeeping are in `egress-policy`.
//!
//! - `proxy`: the sockets and the per-query path; `upstream`: forwarding.
//! - `rebind`: which answer addresses may enter the allow map.
//! - `install`: answers into the learned-address map; `origin`: who sent a query.

pub mod install;
pub mod observed;
pub mod origin;
pub mod proxy;
pub mod rebind;
pub mod upstream;

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
