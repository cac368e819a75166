//! Loading the embedded eBPF object, binding it to a slot, attaching it to a cgroup.
//!
//! Attachments are bpf_links (aya uses `BPF_LINK_CREATE` on kernels >= 5.7) in
//! `CgroupAttachMode::Single`; they live as long as the `Programs` value.

use std::fs::File;
use std::path::{Path, PathBuf};

use std::os::unix::fs::DirBuilderExt as _;

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        CgroupSockopt, ProgramError,
        links::{FdLink, LinkError},
    },
};

use crate::kernel::{bpf_sys, bpffs};
use egress_common::maps::GLOBAL_SLOT;
use egress_policy::capacity::{MapKind, MapLimits, Origin};

/// The object aya-build produced from `egress-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress"));

/// The sock_addr programs, one per hook.
pub const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    "egress_connect4",
    "egress_connect6",
    "egress_sendmsg4",
    "egress_sendmsg6",
    "egress_recvmsg4",
    "egress_recvmsg6",
    "egress_getpeername4",
    "egress_getpeername6",
];
/// The socket-creation program.
pub const SOCK_CREATE_PROGRAM: &str = "egress_sock_create";
/// The setsockopt guard.
pub const SOCKOPT_PROGRAM: &str = "egress_setsockopt";
/// The per-packet check (routing headers, loopback off the loopback device), attached where
/// the kernel needs it or on request (`mip6`).
pub const SKB_PROGRAM: &str = "egress_skb";
/// The inbound check (connections to listening sockets), always attached.
pub const INGRESS_PROGRAM: &str = "egress_skb_ingress";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this agent was built with AYA_BUILD_SKIP and holds no eBPF programs; rebuild it without AYA_BUILD_SKIP"
    )]
    NoPrograms,
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
    #[error("{what} {path}: {message}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error(
        "attaching {name} to cgroup {path} was refused ({source}): another program is attached to this cgroup in a way that excludes ours (an exclusive or override attachment); egress will not run unenforced next to it"
    )]
    Foreign {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching {name} to cgroup {path}: {source}")]
    Attach {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<ProgramError>,
    },
}

/// The programs of one slot: loaded by this agent (and, once attached, their links), or
/// adopted from the pins a previous agent left.
pub struct Programs {
    /// `None` for an adopted instance: its programs and links live on in the kernel, held by
    /// their pins, and only its maps are opened.
    ebpf: Option<Ebpf>,
    slot: u32,
    /// Where maps and links are pinned, once they are.
    pins: Option<PathBuf>,
    /// Links made outside aya and not pinned: held here, released with the programs.
    held_links: Vec<std::os::fd::OwnedFd>,
    /// The sizes of the maps an operator may size: as loaded, or as pinned.
    sizes: MapLimits,
}

impl Programs {
    /// Loads and verifies every program, bound to `slot`, with the maps at their default
    /// sizes.
    pub fn load(slot: u32) -> Result<Self, LoadError> {
        Self::load_sized(slot, &MapLimits::default())
    }

    /// As [`Programs::load`], with the maps `limits` sizes created at those sizes.
    pub fn load_sized(slot: u32, limits: &MapLimits) -> Result<Self, LoadError> {
        if OBJECT.is_empty() {
            return Err(LoadError::NoPrograms);
        }
        let mut loader = EbpfLoader::new();
        loader.override_global(GLOBAL_SLOT, &slot, true);
        for (kind, entries) in limits.overrides() {
            loader.map_max_entries(kind.map(), entries);
        }
        let mut ebpf = loader
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
        let prog: &mut CgroupSockopt = program(&mut ebpf, SOCKOPT_PROGRAM)?;
        prog.load().map_err(|e| LoadError::Program {
            name: SOCKOPT_PROGRAM,
            source: Box::new(e),
        })?;
        for name in [SKB_PROGRAM, INGRESS_PROGRAM] {
            let prog: &mut CgroupSkb = program(&mut ebpf, name)?;
            prog.load().map_err(|e| LoadError::Program {
                name,
                source: Box::new(e),
            })?;
        }
        Ok(Programs {
            ebpf: Some(ebpf),
            slot,
            pins: None,
            held_links: Vec::new(),
            sizes: *limits,
        })
    }

    /// Opens the instance pinned in `dir` by an earlier agent. Its links must all be there:
    /// a partial instance is refused rather than patched.
    pub fn adopt(dir: &Path, slot: u32) -> Result<Self, LoadError> {
        for name in SOCK_ADDR_PROGRAMS.into_iter().chain([
            SOCK_CREATE_PROGRAM,
            SOCKOPT_PROGRAM,
            INGRESS_PROGRAM,
        ]) {
            let path = bpffs::link_pin(dir, name);
            aya::programs::links::PinnedLink::from_pin(&path).map_err(|e| LoadError::Pin {
                what: "opening the pinned link",
                path,
                message: e.to_string(),
            })?;
        }
        Ok(Programs {
            ebpf: None,
            slot,
            pins: Some(dir.to_path_buf()),
            held_links: Vec::new(),
            sizes: pinned_sizes(dir)?,
        })
    }

    /// The sizes of the maps an operator may size, as they are in the kernel.
    pub fn sizes(&self) -> &MapLimits {
        &self.sizes
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Whether this instance was adopted from pins rather than loaded now.
    pub fn adopted(&self) -> bool {
        self.ebpf.is_none()
    }

    /// Pins every map of the object into `dir` (created root-only); links are pinned there
    /// when attached.
    pub fn pin_maps(&mut self, dir: &Path) -> Result<(), LoadError> {
        let Some(ebpf) = &self.ebpf else {
            return Ok(());
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| LoadError::Pin {
                what: "creating the pin directory",
                path: dir.into(),
                message: e.to_string(),
            })?;
        for (name, map) in ebpf.maps() {
            // `.rodata` holds the load-time globals (the slot); the programs keep it, nothing
            // reads it back, and bpffs does not accept dots in names.
            if name.starts_with('.') {
                continue;
            }
            let path = bpffs::map_pin(dir, name);
            map.pin(&path).map_err(|e| LoadError::Pin {
                what: "pinning map",
                path,
                message: e.to_string(),
            })?;
        }
        self.pins = Some(dir.to_path_buf());
        Ok(())
    }

    /// Takes a map out of the object, or opens its pin for an adopted instance.
    pub fn take_map(&mut self, name: &'static str) -> Result<aya::maps::Map, LoadError> {
        match (&mut self.ebpf, &self.pins) {
            (Some(ebpf), _) => ebpf.take_map(name).ok_or(LoadError::MissingMap(name)),
            (None, Some(dir)) => {
                let path = bpffs::map_pin(dir, name);
                let data = aya::maps::MapData::from_pin(&path).map_err(|e| LoadError::Pin {
                    what: "opening the pinned map",
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                aya::maps::Map::from_map_data(data).map_err(|e| LoadError::Pin {
                    what: "reading the pinned map",
                    path,
                    message: e.to_string(),
                })
            }
            (None, None) => Err(LoadError::MissingMap(name)),
        }
    }

    /// Attaches every program to the cgroup directory `path`. On error the programs attached
    /// so far stay attached until this value is dropped; callers drop it on error.
    /// A second handle on map `name` (a duplicated descriptor), for a writer that works apart
    /// from the one that takes the map. Call it before the map is taken.
    pub fn dup_map(&self, name: &'static str) -> Result<aya::maps::Map, LoadError> {
        use std::os::fd::AsFd as _;
        let pin_err = |what: &'static str, e: String| LoadError::Pin {
            what,
            path: PathBuf::from(name),
            message: e,
        };
        match (&self.ebpf, &self.pins) {
            (Some(ebpf), _) => {
                let data = match ebpf.map(name) {
                    Some(aya::maps::Map::HashMap(data)) => data,
                    Some(_) => return Err(pin_err("duplicating the map", "not a hash map".into())),
                    None => return Err(LoadError::MissingMap(name)),
                };
                let fd = data
                    .fd()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| pin_err("duplicating the map descriptor", e.to_string()))?;
                let data = aya::maps::MapData::from_fd(fd)
                    .map_err(|e| pin_err("opening the duplicated map", e.to_string()))?;
                aya::maps::Map::from_map_data(data)
                    .map_err(|e| pin_err("reading the duplicated map", e.to_string()))
            }
            (None, Some(dir)) => {
                let path = bpffs::map_pin(dir, name);
                let data = aya::maps::MapData::from_pin(&path).map_err(|e| LoadError::Pin {
                    what: "opening the pinned map",
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                aya::maps::Map::from_map_data(data).map_err(|e| LoadError::Pin {
                    what: "reading the pinned map",
                    path,
                    message: e.to_string(),
                })
            }
            (None, None) => Err(LoadError::MissingMap(name)),
        }
    }

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
        let pins = self.pins.clone();
        // An adopted instance is attached already: its pinned links hold the programs on.
        let Some(ebpf) = &mut self.ebpf else {
            return Ok(());
        };
        // Socket creation first: from then on no new socket of a refused type appears.
        let prog: &mut CgroupSock = program(ebpf, SOCK_CREATE_PROGRAM)?;
        let id = prog
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| attach_error(SOCK_CREATE_PROGRAM, path, e))?;
        if let Some(dir) = &pins {
            let link = prog
                .take_link(id)
                .map_err(|e| attach_error(SOCK_CREATE_PROGRAM, path, e))?;
            pin_link(FdLink::try_from(link), dir, SOCK_CREATE_PROGRAM)?;
        }
        // The setsockopt guard before the address hooks: no socket can be given a header that
        // sends its packets past the address they judge.
        // aya 0.14 cannot turn a sockopt link into one that can be pinned, so this one link is
        // made with bpf(2) directly; it lives as long as its pin or this process does.
        let prog: &mut CgroupSockopt = program(ebpf, SOCKOPT_PROGRAM)?;
        let prog_fd = prog
            .fd()
            .map_err(|e| attach_error(SOCKOPT_PROGRAM, path, e))?;
        let link = bpf_sys::link_create_cgroup(
            std::os::fd::AsFd::as_fd(prog_fd),
            std::os::fd::AsFd::as_fd(&cgroup),
            bpf_sys::ATTACH_CGROUP_SETSOCKOPT,
        )
        .map_err(|e| {
            attach_error(
                SOCKOPT_PROGRAM,
                path,
                ProgramError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_link_create",
                    io_error: e,
                }),
            )
        })?;
        match &pins {
            Some(dir) => {
                let pin = bpffs::link_pin(dir, SOCKOPT_PROGRAM);
                bpf_sys::obj_pin(std::os::fd::AsFd::as_fd(&link), &pin).map_err(|e| {
                    LoadError::Pin {
                        what: "pinning the link",
                        path: pin,
                        message: e.to_string(),
                    }
                })?;
            }
            None => self.held_links.push(link),
        }
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(ebpf, name)?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| attach_error(name, path, e))?;
            if let Some(dir) = &pins {
                let link = prog
                    .take_link(id)
                    .map_err(|e| attach_error(name, path, e))?;
                pin_link(FdLink::try_from(link), dir, name)?;
            }
        }
        // No hook sees listen() or accept(): connections from other hosts are refused per
        // packet, at the listening socket, by default.
        let prog: &mut CgroupSkb = program(ebpf, INGRESS_PROGRAM)?;
        let id = prog
            .attach(
                &cgroup,
                CgroupSkbAttachType::Ingress,
                CgroupAttachMode::Single,
            )
            .map_err(|e| attach_error(INGRESS_PROGRAM, path, e))?;
        if let Some(dir) = &pins {
            let link = prog
                .take_link(id)
                .map_err(|e| attach_error(INGRESS_PROGRAM, path, e))?;
            pin_link(FdLink::try_from(link), dir, INGRESS_PROGRAM)?;
        }
        if crate::kernel::mip6::check_needed() {
            let prog: &mut CgroupSkb = program(ebpf, SKB_PROGRAM)?;
            let id = prog
                .attach(
                    &cgroup,
                    CgroupSkbAttachType::Egress,
                    CgroupAttachMode::Single,
                )
                .map_err(|e| attach_error(SKB_PROGRAM, path, e))?;
            if let Some(dir) = &pins {
                let link = prog
                    .take_link(id)
                    .map_err(|e| attach_error(SKB_PROGRAM, path, e))?;
                pin_link(FdLink::try_from(link), dir, SKB_PROGRAM)?;
            }
            tracing::info!(
                cgroup = %path.display(),
                kernel_accepts_routing_headers = crate::kernel::mip6::routing_header_accepted(),
                "per-packet check attached: outgoing IPv6 packets with a routing header, and packets to loopback leaving through another device, are dropped"
            );
        }
        Ok(())
    }
}

/// The sizes of the pinned maps of an instance, read from the kernel: they are the ones the
/// instance was created with, whatever `--max-entries` says now.
pub fn pinned_sizes(dir: &Path) -> Result<MapLimits, LoadError> {
    let mut sizes = MapLimits::default();
    for kind in MapKind::ALL {
        let path = bpffs::map_pin(dir, kind.map());
        let info = aya::maps::MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(|e| LoadError::Pin {
                what: "reading the size of the pinned map",
                path,
                message: e.to_string(),
            })?;
        let entries = info.max_entries();
        let origin = if entries == kind.default_entries() {
            Origin::Default
        } else {
            Origin::Pinned
        };
        sizes.set(kind, entries, origin);
    }
    Ok(sizes)
}

/// Pins a link so that it outlives this process; the pin, not the descriptor, keeps it.
fn pin_link(
    link: Result<FdLink, LinkError>,
    dir: &Path,
    name: &'static str,
) -> Result<(), LoadError> {
    let path = bpffs::link_pin(dir, name);
    let link = link.map_err(|e| LoadError::Pin {
        what: "taking the link",
        path: path.clone(),
        message: e.to_string(),
    })?;
    link.pin(&path).map_err(|e| LoadError::Pin {
        what: "pinning the link",
        path,
        message: e.to_string(),
    })?;
    Ok(())
}

fn attach_error(name: &'static str, path: &Path, e: ProgramError) -> LoadError {
    let busy = matches!(&e, ProgramError::SyscallError(s) if matches!(s.io_error.raw_os_error(), Some(libc::EPERM) | Some(libc::EEXIST) | Some(libc::EBUSY)));
    if busy {
        return LoadError::Foreign {
            name,
            path: path.into(),
            source: Box::new(e),
        };
    }
    LoadError::Attach {
        name,
        path: path.into(),
        source: Box::new(e),
    }
}

/// Removes an instance's enforcement for good: every pinned link is detached in the kernel
/// (BPF_LINK_DETACH, so it ends even while some process still holds the link open), then the
/// link and map pins and the directory are removed. Only `detach` and the end of an `exec`
/// workload call this.
pub fn remove_instance(dir: &Path) -> Result<(), LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|e| LoadError::Pin {
        what: "listing",
        path: dir.into(),
        message: e.to_string(),
    })?;
    let mut paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    // Links first: enforcement ends with them, after which the maps no longer matter.
    paths.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
    });
    for path in paths {
        let is_link = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"));
        if is_link {
            bpf_sys::detach_pinned_link(&path).map_err(|e| LoadError::Pin {
                what: "detaching the pinned link",
                path: path.clone(),
                message: e.to_string(),
            })?;
        }
        std::fs::remove_file(&path).map_err(|e| LoadError::Pin {
            what: "removing the pin",
            path: path.clone(),
            message: e.to_string(),
        })?;
    }
    std::fs::remove_dir(dir).map_err(|e| LoadError::Pin {
        what: "removing",
        path: dir.into(),
        message: e.to_string(),
    })
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
