//! The two bpf(2) commands aya 0.14 does not offer: opening a pinned object, and detaching a
//! link for good (BPF_LINK_DETACH, Linux 5.9+) whoever still holds it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `union bpf_attr` is larger than any member we use; the kernel wants the rest zeroed.
#[repr(C, align(8))]
struct Attr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, zero-padded bpf_attr of the size we pass.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// BPF_OBJ_GET: a descriptor for the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr([0; 128]);
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    attr.0[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Detaches the link pinned at `path` (the pin itself stays until removed).
pub fn detach_pinned_link(path: &Path) -> io::Result<()> {
    let fd = obj_get(path)?;
    let mut attr = Attr([0; 128]);
    // struct { __u32 link_fd; }
    let raw = u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("negative descriptor"))?;
    attr.0[..4].copy_from_slice(&raw.to_ne_bytes());
    match bpf(BPF_LINK_DETACH, &mut attr) {
        Ok(_) => Ok(()),
        // Already detached (its cgroup is gone): nothing left to do.
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => Ok(()),
        Err(e) => Err(e),
    }
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type`: BPF_CGROUP_SETSOCKOPT.
pub const ATTACH_CGROUP_SETSOCKOPT: u32 = 22;

/// BPF_LINK_CREATE for a cgroup program (aya 0.14 cannot hand out a sockopt link to pin).
pub fn link_create_cgroup(
    prog: std::os::fd::BorrowedFd<'_>,
    cgroup: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = Attr([0; 128]);
    // struct { __u32 prog_fd; __u32 target_fd; __u32 attach_type; __u32 flags; ... }
    let p = u32::try_from(prog.as_raw_fd()).map_err(|_| io::Error::other("negative descriptor"))?;
    let c =
        u32::try_from(cgroup.as_raw_fd()).map_err(|_| io::Error::other("negative descriptor"))?;
    attr.0[0..4].copy_from_slice(&p.to_ne_bytes());
    attr.0[4..8].copy_from_slice(&c.to_ne_bytes());
    attr.0[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// BPF_OBJ_PIN: pins the object behind `fd` at `path`.
pub fn obj_pin(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr([0; 128]);
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    attr.0[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    let raw = u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("negative descriptor"))?;
    attr.0[8..12].copy_from_slice(&raw.to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}
