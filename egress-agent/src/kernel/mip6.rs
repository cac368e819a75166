//! Whether the kernel accepts an IPv6 routing header in a message's ancillary data. Kernels
//! built with Mobile IPv6 (CONFIG_IPV6_MIP6, y or m) accept a type 2 header there from any
//! process; it sends the packet to an address the connect/sendmsg hooks never judged, and no
//! socket-option guard sees it. Where it is accepted, a per-packet check is attached too.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

static ALWAYS: AtomicBool = AtomicBool::new(false);

/// `--packet-check always`: attach the per-packet check whatever the kernel accepts.
pub fn check_always() {
    ALWAYS.store(true, Ordering::SeqCst);
}

/// Whether the per-packet routing-header check is to be attached.
pub fn check_needed() -> bool {
    ALWAYS.load(Ordering::SeqCst) || routing_header_accepted()
}

/// Asked once per process, from the agent's own socket (never the workload's): a UDP send to
/// [::1]:9 carrying a type 2 routing header whose home address is ::1, so nothing leaves the
/// host whatever the answer. EINVAL means the header is refused; anything else (sent, or a
/// later error) means it was accepted. No IPv6 at all: nothing to check.
pub fn routing_header_accepted() -> bool {
    static ACCEPTED: OnceLock<bool> = OnceLock::new();
    *ACCEPTED.get_or_init(probe)
}

fn probe() -> bool {
    const IPV6_RTHDR: libc::c_int = 57;
    // SAFETY: plain socket/sendmsg/close on a descriptor this function owns, with buffers that
    // outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return false;
        }
        // Type 2 routing header (RFC 6275 §6.4): next header (set by the kernel), length 2,
        // type 2, segments left 1, 4 reserved octets, the home address.
        let mut rthdr = [0u8; 24];
        rthdr[1] = 2;
        rthdr[2] = 2;
        rthdr[3] = 1;
        rthdr[23] = 1;
        let space = libc::CMSG_SPACE(rthdr.len() as u32) as usize;
        let mut control = vec![0u8; space];
        let mut dst: libc::sockaddr_in6 = std::mem::zeroed();
        dst.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        dst.sin6_port = 9u16.to_be();
        dst.sin6_addr.s6_addr[15] = 1;
        let payload = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut dst as *mut libc::sockaddr_in6).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            libc::close(fd);
            return true;
        }
        (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
        (*cmsg).cmsg_type = IPV6_RTHDR;
        (*cmsg).cmsg_len = libc::CMSG_LEN(rthdr.len() as u32) as usize;
        std::ptr::copy_nonoverlapping(rthdr.as_ptr(), libc::CMSG_DATA(cmsg), rthdr.len());
        let r = libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT);
        let errno = std::io::Error::last_os_error().raw_os_error();
        libc::close(fd);
        !(r < 0 && errno == Some(libc::EINVAL))
    }
}
