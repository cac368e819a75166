//! The kernel side of the rate limits: limit entries, and the collector that deletes buckets
//! which have refilled completely.
//!
//! Deleting only full buckets keeps the promise that no bucket is ever reset: a full bucket
//! and a missing one decide alike. The one imprecision is a connection charged to a bucket
//! between the collector reading it as full and deleting it (a window of microseconds every
//! [`COLLECT_PERIOD`]); the recreated bucket starts full, so at most that connection is not
//! counted.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use aya::maps::{HashMap, MapData, MapError};
use egress_common::ratelimit::{
    Bucket, BucketKey, LimitKey, MAP_BUCKETS, MAP_RATE_LIMITS, RuleLimits, is_full,
};

use crate::kernel::loader::{LoadError, Programs};
use egress_policy::limits::CompiledLimits;

/// How often the collector looks for full buckets.
pub const COLLECT_PERIOD: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RateMapsError {
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("map {map}: {op}: {source}")]
    Op {
        map: &'static str,
        op: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("starting the bucket collector thread: {0}")]
    Thread(#[source] std::io::Error),
}

fn op_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> RateMapsError {
    move |e| RateMapsError::Op {
        map,
        op,
        source: Box::new(e),
    }
}

type Buckets = HashMap<MapData, BucketKey, Bucket>;

pub struct RateMaps {
    limits: HashMap<MapData, LimitKey, RuleLimits>,
    buckets: Arc<Mutex<Buckets>>,
    /// The kernel's id of the bucket map (for `bpftool map dump id N`, and to tell this
    /// agent's programs from others': they use this map).
    bucket_map_id: Option<u32>,
    collector: Option<Collector>,
}

impl RateMaps {
    pub fn take(programs: &mut Programs) -> Result<Self, RateMapsError> {
        let limits = HashMap::try_from(programs.take_map(MAP_RATE_LIMITS)?)
            .map_err(op_err(MAP_RATE_LIMITS, "open"))?;
        let buckets = programs.take_map(MAP_BUCKETS)?;
        let bucket_map_id = match &buckets {
            aya::maps::Map::HashMap(data) => data.info().ok().map(|i| i.id()),
            _ => None,
        };
        let buckets = HashMap::try_from(buckets).map_err(op_err(MAP_BUCKETS, "open"))?;
        Ok(RateMaps {
            limits,
            buckets: Arc::new(Mutex::new(buckets)),
            bucket_map_id,
            collector: None,
        })
    }

    /// Moves the limit entries from `old` to `new`: new and changed entries first, then the
    /// ones `new` no longer has. Buckets are untouched (they are keyed by budget, not by
    /// policy id).
    pub fn apply(
        &mut self,
        old: &CompiledLimits,
        new: &CompiledLimits,
    ) -> Result<(), RateMapsError> {
        for (k, v) in &new.limits {
            if old.limits.get(k) != Some(v) {
                self.limits
                    .insert(k, v, 0)
                    .map_err(op_err(MAP_RATE_LIMITS, "insert"))?;
            }
        }
        for k in old.limits.keys() {
            if !new.limits.contains_key(k) {
                match self.limits.remove(k) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(MapError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(op_err(MAP_RATE_LIMITS, "remove")(e)),
                }
            }
        }
        Ok(())
    }

    pub fn bucket_map_id(&self) -> Option<u32> {
        self.bucket_map_id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every bucket in the map.
    pub fn buckets(&self) -> Result<Vec<(BucketKey, Bucket)>, RateMapsError> {
        let map = self.lock();
        map.iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op_err(MAP_BUCKETS, "iterate"))
    }

    /// Writes a bucket (tools and tests: e.g. to fill the table).
    pub fn insert_bucket(&self, key: &BucketKey, bucket: &Bucket) -> Result<(), RateMapsError> {
        self.lock()
            .insert(key, bucket, 0)
            .map_err(op_err(MAP_BUCKETS, "insert"))
    }

    /// Deletes a bucket; a missing one is not an error.
    pub fn remove_bucket(&self, key: &BucketKey) -> Result<(), RateMapsError> {
        remove_missing_ok(&mut self.lock(), key)
    }

    /// Deletes the buckets of `slot` that are full at `now_ns` (`CLOCK_MONOTONIC`, the
    /// clock of `bpf_ktime_get_ns`). Returns how many it deleted.
    pub fn collect_full(&self, slot: u32, now_ns: u64) -> Result<usize, RateMapsError> {
        collect_full(&self.buckets, slot, now_ns)
    }

    /// Starts a thread that runs [`collect_full`](Self::collect_full) for `slot` every
    /// `period` until this value is dropped.
    pub fn start_collector(&mut self, slot: u32, period: Duration) -> Result<(), RateMapsError> {
        if self.collector.is_some() {
            return Ok(());
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let buckets = Arc::clone(&self.buckets);
        let thread = std::thread::Builder::new()
            .name("egress-buckets".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                    match collect_full(&buckets, slot, monotonic_ns()) {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(slot, deleted = n, "deleted full rate-limit buckets"),
                        Err(error) => tracing::warn!(slot, %error, "collecting full rate-limit buckets failed; a full table denies new destinations"),
                    }
                }
            })
            .map_err(RateMapsError::Thread)?;
        self.collector = Some(Collector {
            stop: Some(stop),
            thread: Some(thread),
        });
        Ok(())
    }
}

fn collect_full(buckets: &Mutex<Buckets>, slot: u32, now_ns: u64) -> Result<usize, RateMapsError> {
    let mut map = buckets.lock().unwrap_or_else(PoisonError::into_inner);
    // Collected first: deleting while iterating restarts the kernel's key walk.
    let full: Vec<BucketKey> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, b)| k.slot == slot && is_full(b, now_ns))
        .map(|(k, _)| k)
        .collect();
    for k in &full {
        remove_missing_ok(&mut map, k)?;
    }
    Ok(full.len())
}

fn remove_missing_ok(map: &mut Buckets, key: &BucketKey) -> Result<(), RateMapsError> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(op_err(MAP_BUCKETS, "remove")(e)),
    }
}

struct Collector {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        // Closing the channel wakes the thread at once.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        // CLOCK_MONOTONIC cannot fail on Linux; 0 makes the collector delete nothing.
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

impl RateMaps {
    /// Removes every limit entry whose policy id is not `keep` (left by an earlier agent).
    /// Buckets are keyed by slot and budget, not by policy id, and are left alone.
    pub fn retain_policy(&mut self, keep: u32) -> Result<usize, RateMapsError> {
        let stale: Vec<LimitKey> = self
            .limits
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.policy_id != keep)
            .collect();
        for k in &stale {
            match self.limits.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(op_err(MAP_RATE_LIMITS, "remove")(e)),
            }
        }
        Ok(stale.len())
    }
}
