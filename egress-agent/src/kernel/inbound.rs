//! Writes the compiled `inbound` rules (egress_policy::inbound) to the kernel's inbound trie.

use aya::maps::{LpmTrie, MapData, MapError, lpm_trie::Key};
use egress_common::inbound::{InboundKey, InboundValue};
use egress_policy::inbound::CompiledInbound;

/// Moves the kernel's inbound map from `old` to `new`: new and changed entries first, then
/// the ones `new` no longer has.
pub fn apply(
    map: &mut LpmTrie<MapData, InboundKey, InboundValue>,
    old: &CompiledInbound,
    new: &CompiledInbound,
) -> Result<(usize, usize), MapError> {
    let (mut written, mut removed) = (0, 0);
    for (k, v) in &new.entries {
        if old.entries.get(k) != Some(v) {
            map.insert(&Key::new(k.prefix_len, k.data), v, 0)?;
            written += 1;
        }
    }
    for k in old.entries.keys() {
        if !new.entries.contains_key(k) {
            missing_ok(map.remove(&Key::new(k.prefix_len, k.data)))?;
            removed += 1;
        }
    }
    Ok((written, removed))
}

/// Removes every entry whose policy id is not `keep`.
pub fn retain_policy(
    map: &mut LpmTrie<MapData, InboundKey, InboundValue>,
    keep: u32,
) -> Result<usize, MapError> {
    let stale: Vec<Key<InboundKey>> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| u32::from_be_bytes(k.data().policy_id) != keep)
        .collect();
    for k in &stale {
        missing_ok(map.remove(k))?;
    }
    Ok(stale.len())
}

fn missing_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}
