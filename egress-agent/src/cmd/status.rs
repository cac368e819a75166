//! `egress-agent status` and `explain-last`: what is enforced on this host, and what was
//! blocked lately, read from the instance records and the agents' recent-denial files
//! (`/run/egress/v<LAYOUT>/`). Both only read; they need root because the directory is
//! root-only.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::kernel::bpffs::{self, BpffsError, Instance, Kind};
use crate::observe::recent::{self, Denial};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    State(#[from] BpffsError),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no protected cgroup {0} on this host (no egress instance record names it)")]
    NotProtected(PathBuf),
}

impl StatusError {
    pub fn exit_code(&self) -> u8 {
        match self {
            StatusError::NotProtected(_) => crate::exit::USAGE,
            _ => crate::exit::FAILURE,
        }
    }
}

/// One protected cgroup.
#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub kind: Kind,
    pub slot: u32,
    pub policy_id: u32,
    pub agent_pid: u32,
    /// `enforce` or `audit`.
    pub mode: String,
    /// Whether that agent is running (a stopped `run` agent leaves enforcement pinned).
    pub agent_running: bool,
    /// Oldest first.
    pub recent: Vec<Denial>,
    /// The kernel's per-rule decision counts that are not zero (read from the pinned map;
    /// empty when it cannot be read).
    pub rules: Vec<crate::kernel::counters::RuleCounts>,
}

/// Every instance record in `state` with its recent denials.
pub fn entries(state: &Path) -> Result<Vec<Entry>, StatusError> {
    let dir = std::fs::read_dir(state).map_err(|source| StatusError::Read {
        path: state.into(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in dir.filter_map(Result::ok) {
        let path = entry.path();
        let is_record = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.starts_with("cg-") && n.ends_with(".json") && !n.contains(".recent.")
        });
        if !is_record {
            continue;
        }
        let Some(inst) = bpffs::read_instance(&path)? else {
            continue;
        };
        let recent =
            recent::read_file(&recent::file_for(&path)).map_err(|source| StatusError::Read {
                path: recent::file_for(&path),
                source,
            })?;
        out.push(entry_of(inst, recent));
    }
    out.sort_by(|a, b| a.cgroup.cmp(&b.cgroup));
    Ok(out)
}

fn entry_of(inst: Instance, recent: Vec<Denial>) -> Entry {
    Entry {
        agent_running: crate::supervisor::instance::agent_alive(inst.agent_pid),
        cgroup: inst.cgroup_path,
        cgroup_id: inst.cgroup_id,
        kind: inst.kind,
        slot: inst.slot,
        policy_id: inst.policy_id,
        agent_pid: inst.agent_pid,
        rules: pinned_rule_counts(inst.cgroup_id, inst.slot),
        mode: inst.mode.unwrap_or_else(|| "enforce".to_owned()),
        recent,
    }
}

/// The non-zero per-rule counts of a protected cgroup, from its pinned counter map. Only
/// reads: nothing is mounted or created when bpffs or the pin is missing.
fn pinned_rule_counts(cgroup_id: u64, slot: u32) -> Vec<crate::kernel::counters::RuleCounts> {
    use egress_common::counters::{MAP_RULE_COUNTERS, RULE_COUNTER_RULES};
    let Some(mount) = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| bpffs::find_mount(&info))
    else {
        return Vec::new();
    };
    let base = mount
        .join("egress")
        .join(format!("v{}", egress_common::LAYOUT_VERSION));
    let pin = bpffs::map_pin(&bpffs::instance_dir(&base, cgroup_id), MAP_RULE_COUNTERS);
    let Ok(data) = aya::maps::MapData::from_pin(&pin) else {
        return Vec::new();
    };
    let Ok(map) = aya::maps::PerCpuArray::<_, u64>::try_from(aya::maps::Map::PerCpuArray(data))
    else {
        return Vec::new();
    };
    crate::kernel::counters::read_rules(&map, slot, RULE_COUNTER_RULES, RULE_COUNTER_RULES)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.allowed + r.denied > 0)
        .collect()
}

/// `status`: one block per protected cgroup.
pub fn status(json: bool) -> Result<String, StatusError> {
    let all = entries(&bpffs::state_dir()?)?;
    if json {
        return Ok(serde_json::to_string_pretty(&all).unwrap_or_default() + "\n");
    }
    Ok(render_status(&all))
}

pub fn render_status(all: &[Entry]) -> String {
    if all.is_empty() {
        return "no protected cgroups on this host\n".to_owned();
    }
    let mut out = String::new();
    for e in all {
        let _ = writeln!(
            out,
            "{}\n  {} agent pid {} ({}), slot {}, policy id {}, mode {}, {} recent blocked attempt(s)",
            e.cgroup.display(),
            match e.kind {
                Kind::Exec => "exec",
                Kind::Run => "run",
            },
            e.agent_pid,
            if e.agent_running {
                "running"
            } else {
                "not running: enforcement stays pinned"
            },
            e.slot,
            e.policy_id,
            e.mode,
            e.recent.len()
        );
        if !e.rules.is_empty() {
            let rules: Vec<String> = e
                .rules
                .iter()
                .map(|r| {
                    if r.list == "denied_destinations" {
                        format!("{}[{}] {} denied", r.list, r.index, r.denied)
                    } else {
                        format!(
                            "{}[{}] {} allowed, {} denied",
                            r.list, r.index, r.allowed, r.denied
                        )
                    }
                })
                .collect();
            let _ = writeln!(out, "  rules: {}", rules.join("; "));
        }
        if let Some(last) = e.recent.last() {
            let _ = writeln!(out, "  last: {}", one_line(last));
        }
    }
    out
}

/// `explain-last`: the latest `limit` denials of one cgroup or of every one, newest first.
pub fn explain_last(
    cgroup: Option<&Path>,
    limit: usize,
    json: bool,
) -> Result<String, StatusError> {
    let mut all = entries(&bpffs::state_dir()?)?;
    if let Some(cg) = cgroup {
        let want = std::fs::canonicalize(cg).unwrap_or_else(|_| cg.to_path_buf());
        all.retain(|e| e.cgroup == want || e.cgroup == cg);
        if all.is_empty() {
            return Err(StatusError::NotProtected(cg.to_path_buf()));
        }
    }
    for e in &mut all {
        let skip = e.recent.len().saturating_sub(limit);
        e.recent.drain(..skip);
        e.recent.reverse();
    }
    if json {
        return Ok(serde_json::to_string_pretty(&all).unwrap_or_default() + "\n");
    }
    Ok(render_explain(&all))
}

pub fn render_explain(all: &[Entry]) -> String {
    if all.is_empty() {
        return "no protected cgroups on this host\n".to_owned();
    }
    let mut out = String::new();
    for e in all {
        let _ = writeln!(out, "{}", e.cgroup.display());
        if e.recent.is_empty() {
            let _ = writeln!(out, "  no blocked attempts recorded");
        }
        for d in &e.recent {
            let _ = writeln!(out, "  {}", one_line(d));
            let _ = writeln!(out, "    why: {}", d.explain());
        }
    }
    out
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch (civil-from-days, proleptic
/// Gregorian calendar).
pub fn utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn one_line(d: &Denial) -> String {
    let mut s = format!(
        "{} {} ({}, {})",
        utc(d.at_unix_s),
        d.reason,
        d.hook,
        d.protocol
    );
    if let Some(n) = &d.name {
        let _ = write!(s, " name {n}");
    }
    if let Some(dst) = &d.dst {
        let _ = write!(s, " to {dst}");
    }
    if let (Some(pid), Some(comm)) = (d.pid, &d.comm) {
        let _ = write!(s, " by pid {pid} ({comm})");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_civil_time() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_220_942), "2026-12-02T14:15:42Z");
    }

    #[test]
    fn reads_records_and_their_recent_denials() {
        let dir = tempfile::tempdir().unwrap();
        let record = bpffs::instance_file(dir.path(), 77);
        bpffs::write_instance(
            &record,
            &Instance {
                layout: egress_common::LAYOUT_VERSION,
                kind: Kind::Exec,
                cgroup_id: 77,
                cgroup_path: "/sys/fs/cgroup/egress/exec-1".into(),
                slot: 0,
                policy_id: 3,
                agent_pid: u32::MAX,
                mode: None,
            },
        )
        .unwrap();
        let d = Denial {
            at_unix_s: 5,
            reason: "dns_name_not_allowed".into(),
            cause: None,
            hook: "dns_proxy".into(),
            protocol: "udp".into(),
            dst: None,
            name: Some("evil.example.test".into()),
            rule: None,
            pid: None,
            comm: None,
        };
        recent::write_file(&recent::file_for(&record), &[d.clone(), d]).unwrap();
        let all = entries(dir.path()).unwrap();
        assert_eq!(all.len(), 1, "the recent file is not a record");
        assert_eq!(all[0].recent.len(), 2);
        assert!(!all[0].agent_running);
        let text = render_status(&all);
        assert!(
            text.contains("exec agent pid") && text.contains("2 recent"),
            "{text}"
        );
        assert!(text.contains("mode enforce"), "{text}");
        let mut with_rules = all.clone();
        with_rules[0].mode = "audit".into();
        with_rules[0].rules = vec![
            crate::kernel::counters::RuleCounts {
                list: "allowed_destinations",
                index: 1,
                allowed: 4,
                denied: 2,
            },
            crate::kernel::counters::RuleCounts {
                list: "denied_destinations",
                index: 0,
                allowed: 0,
                denied: 3,
            },
        ];
        let text = render_status(&with_rules);
        assert!(text.contains("mode audit"), "{text}");
        assert!(
            text.contains(
                "  rules: allowed_destinations[1] 4 allowed, 2 denied; denied_destinations[0] 3 denied\n"
            ),
            "{text}"
        );
        let text = render_explain(&all);
        assert!(
            text.contains("evil.example.test") && text.contains("why:"),
            "{text}"
        );
    }
}
