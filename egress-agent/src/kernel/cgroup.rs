//! cgroup v2: finding the hierarchy, creating and removing the workload's cgroup.

use std::fs;
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(#[source] std::io::Error),
    #[error(
        "no cgroup v2 hierarchy is mounted (no cgroup2 entry in /proc/self/mountinfo); egress needs cgroup v2"
    )]
    NoCgroup2,
    #[error("{path} is not inside the cgroup v2 hierarchy mounted at {mount}")]
    Outside { path: PathBuf, mount: PathBuf },
    #[error("{path} is not a cgroup v2 directory (no cgroup.procs)")]
    NotCgroup { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("processes in {path} did not exit within {waited:?} after cgroup.kill")]
    StillPopulated { path: PathBuf, waited: Duration },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Mount point of the cgroup v2 hierarchy, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    parse_mountinfo(&info).ok_or(CgroupError::NoCgroup2)
}

/// The mount point of the first cgroup2 entry of `/proc/self/mountinfo` text.
pub fn parse_mountinfo(info: &str) -> Option<PathBuf> {
    crate::kernel::mountinfo::find(info, "cgroup2")
}

/// Checks that `path` is a cgroup directory inside the v2 hierarchy and returns it absolute
/// and free of `..`.
pub fn validate(path: &Path, mount: &Path) -> Result<PathBuf, CgroupError> {
    let abs = fs::canonicalize(path).map_err(io("resolving", path))?;
    if !abs.starts_with(mount) || abs.components().any(|c| c == Component::ParentDir) {
        return Err(CgroupError::Outside {
            path: abs,
            mount: mount.into(),
        });
    }
    if !abs.join("cgroup.procs").exists() {
        return Err(CgroupError::NotCgroup { path: abs });
    }
    Ok(abs)
}

/// A cgroup this agent created for one workload; removed (with anything left in it) on
/// [`WorkloadCgroup::remove`].
#[derive(Debug)]
pub struct WorkloadCgroup {
    path: PathBuf,
}

impl WorkloadCgroup {
    /// Creates `<parent>/<name>`; `parent` is created when missing.
    pub fn create(parent: &Path, name: &str, mount: &Path) -> Result<Self, CgroupError> {
        if !parent.starts_with(mount) {
            return Err(CgroupError::Outside {
                path: parent.into(),
                mount: mount.into(),
            });
        }
        fs::create_dir_all(parent).map_err(io("creating", parent))?;
        let parent = validate(parent, mount)?;
        let path = parent.join(name);
        fs::create_dir(&path).map_err(io("creating", &path))?;
        Ok(WorkloadCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `cgroup.procs`, opened for the child to write its own pid into before it execs.
    pub fn open_procs(&self) -> Result<fs::File, CgroupError> {
        let p = self.path.join("cgroup.procs");
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io("opening", &p))
    }

    /// Kills whatever still runs in the cgroup (processes the workload left behind must not
    /// outlive its enforcement), waits for it to empty, and removes it.
    pub fn remove(self, wait: Duration) -> Result<(), CgroupError> {
        remove_path(&self.path, wait)
    }

    /// SIGKILL to every process in the cgroup (`cgroup.kill`), without waiting.
    pub fn kill(&self) -> Result<(), CgroupError> {
        let kill = self.path.join("cgroup.kill");
        fs::write(&kill, b"1").map_err(io("writing", &kill))
    }
}

/// Kills everything in the cgroup at `path`, waits (bounded) for it to empty, removes it.
pub fn remove_path(path: &Path, wait: Duration) -> Result<(), CgroupError> {
    let this = WorkloadCgroup {
        path: path.to_path_buf(),
    };
    this.kill_and_rmdir(wait)
}

impl WorkloadCgroup {
    fn kill_and_rmdir(&self, wait: Duration) -> Result<(), CgroupError> {
        if populated(&self.path)? {
            let kill = self.path.join("cgroup.kill");
            let mut f = fs::OpenOptions::new()
                .write(true)
                .open(&kill)
                .map_err(io("opening", &kill))?;
            f.write_all(b"1").map_err(io("writing", &kill))?;
            let start = Instant::now();
            while populated(&self.path)? {
                if start.elapsed() > wait {
                    return Err(CgroupError::StillPopulated {
                        path: self.path.clone(),
                        waited: wait,
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        fs::remove_dir(&self.path).map_err(io("removing", &self.path))
    }
}

fn populated(path: &Path) -> Result<bool, CgroupError> {
    let events = path.join("cgroup.events");
    let text = fs::read_to_string(&events).map_err(io("reading", &events))?;
    Ok(text.lines().any(|l| l.trim() == "populated 1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let info = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
40 31 0:37 / /sys/fs/cgroup/memory rw shared:16 - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_mountinfo(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_cgroup2_with_optional_fields_and_escapes() {
        let info = "41 31 0:38 / /mnt/cg\\040two rw shared:9 master:1 - cgroup2 none rw\n";
        assert_eq!(parse_mountinfo(info), Some(PathBuf::from("/mnt/cg two")));
    }

    #[test]
    fn no_cgroup2_is_none() {
        let info = "40 31 0:37 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(parse_mountinfo(info), None);
    }
}
