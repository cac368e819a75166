//! When to reload the policy: on SIGHUP, and when the policy file changes.
//!
//! Changes are detected by polling the file's identity (device, inode, size, modification
//! time) once per interval, which also catches editors that replace the file by renaming
//! and configuration systems that swap a symlink. A reload parses, validates and compiles
//! the new policy completely before any map is touched; a bad file leaves the old policy in
//! force (see `Enforcer::reload`).

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What identifies one version of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl Fingerprint {
    /// `None` when the file cannot be read (missing during an editor's rename, say).
    pub fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Fingerprint {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// Watches one policy file.
#[derive(Debug)]
pub struct Watcher {
    path: PathBuf,
    last: Option<Fingerprint>,
    /// A fixed schedule: waiting for the next tick is cancel-safe, so a busy event loop
    /// that keeps re-entering `changed` does not push the check back forever.
    interval: tokio::time::Interval,
}

impl Watcher {
    /// Must be called inside the runtime.
    pub fn new(path: &Path, every: Duration) -> Self {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Watcher {
            path: path.to_path_buf(),
            last: Fingerprint::of(path),
            interval,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits one interval and says whether the file changed since the last look. A file that
    /// vanished is not a change: the loaded policy stays until a readable file appears.
    pub async fn changed(&mut self) -> bool {
        self.interval.tick().await;
        self.poll()
    }

    /// Looks now.
    pub fn poll(&mut self) -> bool {
        match Fingerprint::of(&self.path) {
            Some(fp) if Some(fp) != self.last => {
                self.last = Some(fp);
                true
            }
            _ => false,
        }
    }

    /// Records the current version as seen (after a SIGHUP-triggered reload).
    pub fn mark_seen(&mut self) {
        self.last = Fingerprint::of(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notices_rewrite_and_replacement_but_not_removal() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("policy.yaml");
        std::fs::write(&p, "a").unwrap_or_else(|e| panic!("{e}"));
        let mut w = Watcher::new(&p, Duration::from_millis(1));
        assert!(!w.poll());
        std::fs::write(&p, "bb").unwrap_or_else(|e| panic!("{e}"));
        assert!(w.poll());
        assert!(!w.poll());
        // Replaced by rename, same size.
        let tmp = dir.path().join("new.yaml");
        std::fs::write(&tmp, "cc").unwrap_or_else(|e| panic!("{e}"));
        std::fs::rename(&tmp, &p).unwrap_or_else(|e| panic!("{e}"));
        assert!(w.poll());
        std::fs::remove_file(&p).unwrap_or_else(|e| panic!("{e}"));
        assert!(!w.poll());
    }
}
