//! cgroup v2 for tests: where the hierarchy is mounted, and a test-owned parent cgroup that
//! is removed with everything below it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long Drop waits for killed processes to leave a cgroup.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long Drop retries rmdir on EBUSY (a cgroup is briefly busy after its last exit).
const RMDIR_WAIT: Duration = Duration::from_secs(2);

/// The cgroup v2 mount point, read from /proc/self/mountinfo (never assumed: it is
/// `/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` elsewhere).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    find_cgroup2(&text).context("no cgroup2 filesystem in /proc/self/mountinfo")
}

/// The first cgroup2 mount point in mountinfo text.
fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(oct) = bytes.get(i + 1..i + 4)
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(oct).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `<cgroup2 mount>/egress-test-<pid>-<n>`, created on `new`. On drop every process left
/// below it (only processes the test started can be there) is killed through `cgroup.kill`,
/// then every cgroup below it and itself are removed.
#[derive(Debug)]
pub struct TestCgroupParent {
    path: PathBuf,
}

impl TestCgroupParent {
    pub fn new() -> Result<Self> {
        let path = cgroup2_mount()?.join(crate::unique_name("egress-test"));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a child cgroup `name` (for tests that need a cgroup of their own).
    pub fn child(&self, name: &str) -> Result<PathBuf> {
        let path = self.path.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(path)
    }

    /// Every cgroup below this one, deepest first.
    pub fn descendants(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        collect_descendants(&self.path, &mut out);
        out
    }

    /// Pids of every process below this cgroup.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.path.clone())
            .chain(self.descendants())
            .flat_map(|cg| read_pids(&cg))
            .collect()
    }

    /// Kills every process in this cgroup's subtree and waits (bounded) until it is empty.
    pub fn kill_all(&self) -> Result<()> {
        kill_and_wait(&self.path)
    }
}

impl Drop for TestCgroupParent {
    fn drop(&mut self) {
        if let Err(e) = kill_and_wait(&self.path) {
            eprintln!("egress-tests: cleaning {}: {e:#}", self.path.display());
        }
        for cg in self.descendants().into_iter().chain([self.path.clone()]) {
            // A test that failed before `detach` leaves the agent's pins (links, maps) and
            // record behind: remove them with the cgroup they were for.
            if let Ok(loc) = egress_agent::instance::Location::of(&cg)
                && let Err(e) = loc.remove()
            {
                eprintln!(
                    "egress-tests: removing egress pins of {}: {e:#}",
                    cg.display()
                );
            }
            if let Err(e) = rmdir_retrying(&cg) {
                eprintln!("egress-tests: removing cgroup {}: {e:#}", cg.display());
            }
        }
    }
}

fn collect_descendants(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let path = entry.path();
            collect_descendants(&path, out);
            out.push(path);
        }
    }
}

fn read_pids(cgroup: &Path) -> Vec<u32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn populated(cgroup: &Path) -> Result<bool> {
    let events = std::fs::read_to_string(cgroup.join("cgroup.events"))
        .with_context(|| format!("reading {}/cgroup.events", cgroup.display()))?;
    Ok(events.lines().any(|l| l.trim() == "populated 1"))
}

fn kill_and_wait(cgroup: &Path) -> Result<()> {
    if !cgroup.exists() || !populated(cgroup)? {
        return Ok(());
    }
    std::fs::write(cgroup.join("cgroup.kill"), "1")
        .with_context(|| format!("writing {}/cgroup.kill", cgroup.display()))?;
    let deadline = Instant::now() + KILL_WAIT;
    while populated(cgroup)? {
        if Instant::now() > deadline {
            bail!(
                "{} still populated {KILL_WAIT:?} after cgroup.kill",
                cgroup.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn rmdir_retrying(cgroup: &Path) -> Result<()> {
    let deadline = Instant::now() + RMDIR_WAIT;
    loop {
        match std::fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", cgroup.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let text = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
41 35 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
42 35 0:39 / /sys/fs/cgroup/systemd rw,relatime shared:11 - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            find_cgroup2(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unescapes_mount_points() {
        let text = "41 35 0:38 / /mnt/a\\040b rw - cgroup2 none rw\n";
        assert_eq!(find_cgroup2(text), Some(PathBuf::from("/mnt/a b")));
        assert_eq!(find_cgroup2("1 2 0:1 / /x rw - ext4 /dev/sda rw\n"), None);
    }
}
