//! Whether this process may load and attach the eBPF programs, said before anything is tried:
//! without it the first failure would be a bare `Operation not permitted` from deep inside.

use std::fmt;

/// The capabilities `exec` and `run` use: loading programs and maps (CAP_BPF), attaching to
/// cgroups and the per-packet check (CAP_NET_ADMIN), mounting bpffs, entering network
/// namespaces and creating cgroups (CAP_SYS_ADMIN).
pub const NEEDED: [(u32, &str); 3] = [
    (39, "CAP_BPF"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

#[derive(Debug, thiserror::Error)]
pub struct PrivilegeError {
    command: &'static str,
    missing: Vec<&'static str>,
}

impl fmt::Display for PrivilegeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`egress-agent {}` must run as root (or with the capabilities {}); this process \
             lacks {} (try sudo)",
            self.command,
            NEEDED.map(|(_, n)| n).join(", "),
            self.missing.join(", ")
        )
    }
}

/// Fails when the effective capability set lacks any of [`NEEDED`].
pub fn require(command: &'static str) -> Result<(), PrivilegeError> {
    // When the status cannot be read, the operations themselves will say what failed.
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Ok(());
    };
    let Some(effective) = effective_caps(&status) else {
        return Ok(());
    };
    let missing = missing(effective);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError { command, missing })
    }
}

/// The `CapEff:` mask of a /proc/PID/status text.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn missing(effective: u64) -> Vec<&'static str> {
    NEEDED
        .iter()
        .filter(|(bit, _)| effective & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing() {
        let root = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(root).map(missing), Some(vec![]));
        let user = "CapInh:\t0\nCapEff:\t0000000000000000\n";
        let none = effective_caps(user).map(missing).unwrap_or_default();
        assert_eq!(none, vec!["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]);
        // CAP_NET_ADMIN and CAP_SYS_ADMIN only.
        let partial = format!("CapEff:\t{:016x}\n", (1u64 << 12) | (1u64 << 21));
        assert_eq!(effective_caps(&partial).map(missing), Some(vec!["CAP_BPF"]));
        let e = PrivilegeError {
            command: "exec",
            missing: vec!["CAP_BPF"],
        };
        assert_eq!(
            e.to_string(),
            "`egress-agent exec` must run as root (or with the capabilities CAP_BPF, \
             CAP_NET_ADMIN, CAP_SYS_ADMIN); this process lacks CAP_BPF (try sudo)"
        );
    }
}
