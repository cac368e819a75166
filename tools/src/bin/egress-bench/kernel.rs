//! The kernel's own account of a program's cost: with BPF run-time statistics on
//! (`BPF_ENABLE_STATS`, held only while this phase runs; no sysctl is written), every program
//! counts its runs and the nanoseconds spent in them. The programs are found by asking the
//! benchmark's cgroup which programs are attached to it (`BPF_PROG_QUERY`), so programs that
//! other processes load at the same time are never mistaken for ours.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};

/// `enum bpf_attach_type` values of the hooks egress attaches.
pub const HOOKS: [(&str, u32); 6] = [
    ("skb_ingress", 0),
    ("sock_create", 2),
    ("connect4", 10),
    ("connect6", 11),
    ("sendmsg4", 14),
    ("sendmsg6", 15),
];

const BPF_PROG_QUERY: libc::c_long = 16;

/// The `query` member of `union bpf_attr`, zero-padded past anything the kernel reads.
#[repr(C, align(8))]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    _rest: [u64; 8],
}

/// The id of the program attached to `cgroup` at `attach_type`, if exactly one is.
fn attached(cgroup: &File, attach_type: u32) -> Result<Option<u32>> {
    let mut ids = [0u32; 4];
    let mut attr = QueryAttr {
        target_fd: u32::try_from(cgroup.as_raw_fd()).unwrap_or(0),
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
        _rest: [0; 8],
    };
    // SAFETY: `attr` is a valid, zero-padded bpf_attr; `ids` outlives the call and holds
    // `prog_cnt` entries.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<QueryAttr>(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("BPF_PROG_QUERY attach type {attach_type}"));
    }
    Ok((attr.prog_cnt == 1).then_some(ids[0]))
}

/// The programs attached to one cgroup, by hook name.
pub struct Attached {
    ids: BTreeMap<&'static str, u32>,
}

impl Attached {
    pub fn query(cgroup: &Path) -> Result<Self> {
        let f = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let mut ids = BTreeMap::new();
        for (name, attach_type) in HOOKS {
            if let Some(id) = attached(&f, attach_type)? {
                ids.insert(name, id);
            }
        }
        Ok(Attached { ids })
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// (run count, run time) of each attached program now.
    pub fn snapshot(&self) -> Result<BTreeMap<&'static str, (u64, Duration)>> {
        let mut by_id = BTreeMap::new();
        for info in aya::programs::loaded_programs() {
            let info = info.context("listing loaded programs")?;
            by_id.insert(info.id(), (info.run_count(), info.run_time()));
        }
        Ok(self
            .ids
            .iter()
            .filter_map(|(name, id)| by_id.get(id).map(|v| (*name, *v)))
            .collect())
    }
}

/// Per program: (runs, nanoseconds per run).
pub type PerRun = BTreeMap<&'static str, (u64, f64)>;

/// Per-round [`PerRun`] values of one scenario.
#[derive(Clone, Default)]
pub struct Samples(BTreeMap<&'static str, Vec<(u64, f64)>>);

impl Samples {
    pub fn add(&mut self, round: &PerRun) {
        for (hook, v) in round {
            self.0.entry(hook).or_default().push(*v);
        }
    }

    /// Per program: all runs, and the median over rounds of the nanoseconds per run.
    pub fn medians(&self) -> PerRun {
        self.0
            .iter()
            .map(|(hook, v)| {
                let runs = v.iter().map(|(r, _)| r).sum();
                let ns: Vec<f64> = v.iter().map(|(_, ns)| *ns).collect();
                (*hook, (runs, crate::report::median(&ns)))
            })
            .collect()
    }
}

/// Nanoseconds per run of each program between two snapshots (programs that ran).
pub fn per_run(
    before: &BTreeMap<&'static str, (u64, Duration)>,
    after: &BTreeMap<&'static str, (u64, Duration)>,
) -> PerRun {
    after
        .iter()
        .filter_map(|(name, (count, time))| {
            let (c0, t0) = before.get(name)?;
            let runs = count.checked_sub(*c0)?;
            let ns = time.checked_sub(*t0)?.as_nanos() as f64;
            (runs > 0).then(|| (*name, (runs, ns / runs as f64)))
        })
        .collect()
}

/// Run-time statistics stay on while this is held.
pub fn enable_stats() -> Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS (needs Linux 5.8)")
}
