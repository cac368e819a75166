//! Loading the embedded eBPF object, binding it to a slot, attaching it to a cgroup.
//!
//! Attachments are bpf_links (aya uses `BPF_LINK_CREATE` on kernels >= 5.7) in
//! `CgroupAttachMode::Single`; they live as long as the `Programs` value.

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError},
};
use egress_common::maps::GLOBAL_SLOT;

/// The object aya-build produced from `egress-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// The sock_addr programs, one per hook.
pub const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    "egress_connect4",
    "egress_connect6",
    "egress_sendmsg4",
    "egress_sendmsg6",
];
/// The socket-creation program.
pub const SOCK_CREATE_PROGRAM: &str = "egress_sock_create";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object: {0}")]
    Object(#[source] Box<aya::EbpfError>),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error(
        "kernel {found} is too old: egress attaches with bpf_link, which cgroups support from Linux 5.7; refusing to fall back to legacy attachment"
    )]
    KernelTooOld { found: String },
    #[error("reading the kernel version: {0}")]
    KernelVersion(#[source] std::io::Error),
    #[error("opening cgroup {path}: {source}")]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching {name} to cgroup {path}: {source}")]
    Attach {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<ProgramError>,
    },
}

/// The loaded programs of one slot, and (once attached) their links.
pub struct Programs {
    ebpf: Ebpf,
    slot: u32,
}

impl Programs {
    /// Loads and verifies every program, bound to `slot`.
    pub fn load(slot: u32) -> Result<Self, LoadError> {
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_SLOT, &slot, true)
            .load(OBJECT)
            .map_err(|e| LoadError::Object(Box::new(e)))?;
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|e| LoadError::Program {
                name,
                source: Box::new(e),
            })?;
        }
        let prog: &mut CgroupSock = program(&mut ebpf, SOCK_CREATE_PROGRAM)?;
        prog.load().map_err(|e| LoadError::Program {
            name: SOCK_CREATE_PROGRAM,
            source: Box::new(e),
        })?;
        Ok(Programs { ebpf, slot })
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Takes a map out of the object, for [`crate::maps::MapSet`].
    pub fn take_map(&mut self, name: &'static str) -> Result<aya::maps::Map, LoadError> {
        self.ebpf.take_map(name).ok_or(LoadError::MissingMap(name))
    }

    /// Attaches every program to the cgroup directory `path`. On error the programs attached
    /// so far stay attached until this value is dropped; callers drop it on error.
    pub fn attach(&mut self, path: &Path) -> Result<(), LoadError> {
        // aya falls back to BPF_PROG_ATTACH before 5.7; such attachments outlive nothing we
        // track and are not what we promise, so refuse instead.
        let kernel = aya::util::KernelVersion::current()
            .map_err(|e| LoadError::KernelVersion(std::io::Error::other(e.to_string())))?;
        if kernel < aya::util::KernelVersion::new(5, 7, 0) {
            return Err(LoadError::KernelTooOld {
                found: format!("{kernel:?}"),
            });
        }
        let cgroup = File::open(path).map_err(|source| LoadError::OpenCgroup {
            path: path.into(),
            source,
        })?;
        // Socket creation first: from then on no new socket of a refused type appears.
        let prog: &mut CgroupSock = program(&mut self.ebpf, SOCK_CREATE_PROGRAM)?;
        prog.attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| LoadError::Attach {
                name: SOCK_CREATE_PROGRAM,
                path: path.into(),
                source: Box::new(e),
            })?;
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| LoadError::Attach {
                    name,
                    path: path.into(),
                    source: Box::new(e),
                })?;
        }
        Ok(())
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?;
    prog.try_into().map_err(|e| LoadError::Program {
        name,
        source: Box::new(e),
    })
}
