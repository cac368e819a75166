//! The kernel side, seen from userspace: loading and attaching the programs, the pins in
//! bpffs, cgroup v2, and every writer and reader of the maps (allowlist, inbound, rate
//! limits, counters). Nothing here parses or compiles a policy: it writes what it is given.

pub mod bpf_sys;
pub mod bpffs;
pub mod cgroup;
pub mod counters;
pub mod inbound;
pub mod loader;
pub mod maps;
pub mod mip6;
pub mod mountinfo;
pub mod ratelimit;
