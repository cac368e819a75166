//! Starting the workload: into the cgroup before it runs any of its own code, enforcement
//! proven from inside, privileges dropped, no inherited descriptors beyond stdio.
//!
//! Everything between fork and exec runs in `setup_child`, which only makes raw system calls
//! (no allocation, no locks), as required after fork in a threaded process.

use std::ffi::OsString;
use std::io::{self, Read as _};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use egress_common::{Dest, Proto, decide};

use std::os::unix::ffi::OsStrExt as _;

use crate::workload::environment::WorkDir;
use egress_policy::compile::Compiled;

/// Destinations the probe tries, in order; the first that the policy denies for UDP is used.
/// A UDP `connect()` sends nothing, so even where enforcement were absent no packet leaves.
const PROBE_V4: [SocketAddr; 4] = [
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 1)), 9),
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 1)), 9),
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(240, 0, 0, 1)), 9),
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(100, 64, 0, 1)), 65535),
];
const PROBE_V6: [SocketAddr; 3] = [
    SocketAddr::new(
        IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        9,
    ),
    SocketAddr::new(
        IpAddr::V6(std::net::Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 1)),
        9,
    ),
    SocketAddr::new(
        IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9)),
        65535,
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot prove enforcement: the policy allows every probe destination ({family})")]
    NoProbe { family: &'static str },
    #[error("creating the status pipe: {0}")]
    Pipe(#[source] io::Error),
    #[error(
        "enforcement is not live: a UDP connect to the denied probe {probe} from inside the cgroup succeeded; refusing to start the workload"
    )]
    NotEnforced { probe: String },
    #[error("starting the workload failed while {stage}: {source}")]
    Setup {
        stage: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("starting the workload: {0}")]
    Spawn(#[source] io::Error),
    /// execve(2) of the workload's command failed: missing, not executable, bad format.
    #[error("cannot run the workload command {command:?}: {}", crate::observe::report::without_os_code(&source.to_string()))]
    Exec {
        command: String,
        #[source]
        source: io::Error,
    },
}

impl WorkloadError {
    /// Like a shell: 127 when the command is not found, 126 when it cannot be executed.
    pub fn exit_code(&self) -> u8 {
        match self {
            WorkloadError::Exec { source, .. } => match source.raw_os_error() {
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::ENAMETOOLONG) => {
                    crate::exit::NOT_FOUND
                }
                _ => crate::exit::NOT_EXECUTABLE,
            },
            _ => crate::exit::FAILURE,
        }
    }
}

/// The user the workload runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the user's, as `initgroups` would set them).
    pub groups: Vec<u32>,
}

/// Probe destinations the compiled policy denies for UDP.
#[derive(Clone, Copy, Debug)]
pub struct Probes {
    pub v4: SocketAddr,
    pub v6: SocketAddr,
}

impl Probes {
    pub fn choose(compiled: &Compiled) -> Result<Self, WorkloadError> {
        let slot = compiled.slot_config();
        let denied = |a: &&SocketAddr| {
            let dst = match a.ip() {
                IpAddr::V4(ip) => Dest::v4(ip.octets(), a.port(), Proto::Udp),
                IpAddr::V6(ip) => Dest::v6(ip.octets(), a.port(), Proto::Udp),
            };
            !decide(compiled, &slot, &dst).allowed()
        };
        let v4 = PROBE_V4
            .iter()
            .find(denied)
            .ok_or(WorkloadError::NoProbe { family: "IPv4" })?;
        let v6 = PROBE_V6
            .iter()
            .find(denied)
            .ok_or(WorkloadError::NoProbe { family: "IPv6" })?;
        Ok(Probes { v4: *v4, v6: *v6 })
    }
}

/// Everything the child needs, prepared before fork.
struct ChildPlan {
    procs_fd: RawFd,
    report_fd: RawFd,
    agent_pid: libc::pid_t,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    /// The working directory; with `cwd_fallback`, `/` when the user cannot enter it.
    cwd: std::ffi::CString,
    cwd_fallback: bool,
    probe4: libc::sockaddr_in,
    probe6: libc::sockaddr_in6,
    /// The network namespace to enter, or -1 to stay in the agent's.
    netns_fd: RawFd,
}

const STAGES: [(u8, &str); 9] = [
    (b'c', "joining the cgroup"),
    (b's', "entering the network namespace"),
    (b'p', "proving enforcement from inside the cgroup"),
    (b'g', "dropping group privileges"),
    (b'u', "dropping user privileges"),
    (
        b'w',
        "changing to the working directory (as the workload's user)",
    ),
    (b'n', "setting no_new_privs"),
    (b'd', "binding the workload's life to the agent"),
    (b'f', "closing inherited descriptors"),
];

/// Marks the probe's failure: the connect that must be refused was not.
const PROBE_PASSED_ERRNO: i32 = libc::ENOTRECOVERABLE;

/// Spawns `argv` as the workload: in the cgroup whose `cgroup.procs` is `procs`, as `creds`,
/// after proving from inside that the probes are refused.
pub fn spawn(
    argv: &[OsString],
    procs: std::fs::File,
    creds: Credentials,
    probes: Probes,
    netns: Option<&std::fs::File>,
    env: &[(OsString, OsString)],
    cwd: &WorkDir,
) -> Result<tokio::process::Child, WorkloadError> {
    let (program, args) = argv.split_first().ok_or_else(|| {
        WorkloadError::Spawn(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no command given",
        ))
    })?;
    let (dir, cwd_fallback) = match cwd {
        WorkDir::Given(d) => (d, false),
        WorkDir::Home(d) => (d, true),
    };
    let cwd = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
        WorkloadError::Spawn(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the working directory has a NUL byte",
        ))
    })?;
    let (read_end, write_end) = pipe()?;
    let plan = ChildPlan {
        procs_fd: procs.as_raw_fd(),
        report_fd: write_end.as_raw_fd(),
        agent_pid: std::process::id() as libc::pid_t,
        uid: creds.uid,
        gid: creds.gid,
        groups: creds.groups,
        cwd,
        cwd_fallback,
        probe4: sockaddr4(probes.v4),
        probe6: sockaddr6(probes.v6),
        netns_fd: netns.map_or(-1, |f| f.as_raw_fd()),
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(n, v)| (n, v)))
        .kill_on_drop(false);
    // SAFETY: setup_child only makes async-signal-safe system calls on data prepared above.
    unsafe {
        cmd.pre_exec(move || setup_child(&plan));
    }
    let spawned = cmd.spawn();
    drop(write_end);
    drop(procs);
    match spawned {
        Ok(child) => Ok(child),
        Err(err) => {
            let stage = last_stage(read_end);
            if err.raw_os_error() == Some(PROBE_PASSED_ERRNO) && stage == b'p' {
                return Err(WorkloadError::NotEnforced {
                    probe: format!("{} / {}", probes.v4, probes.v6),
                });
            }
            match STAGES.iter().find(|(c, _)| *c == stage) {
                Some((_, name)) => Err(WorkloadError::Setup {
                    stage: name,
                    source: err,
                }),
                // All stages passed: exec itself failed (missing binary, permissions).
                None => Err(WorkloadError::Exec {
                    command: program.to_string_lossy().into_owned(),
                    source: err,
                }),
            }
        }
    }
}

fn last_stage(read_end: OwnedFd) -> u8 {
    let mut f = std::fs::File::from(read_end);
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    buf.last().copied().unwrap_or(0)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), WorkloadError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid two-element array.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r != 0 {
        return Err(WorkloadError::Pipe(io::Error::last_os_error()));
    }
    // SAFETY: pipe2 returned two fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn sockaddr4(a: SocketAddr) -> libc::sockaddr_in {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    if let IpAddr::V4(ip) = a.ip() {
        s.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
    }
    s
}

fn sockaddr6(a: SocketAddr) -> libc::sockaddr_in6 {
    // SAFETY: all-zero is a valid sockaddr_in6.
    let mut s: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    s.sin6_port = a.port().to_be();
    if let IpAddr::V6(ip) = a.ip() {
        s.sin6_addr.s6_addr = ip.octets();
    }
    s
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(r: libc::c_long) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::from_raw_os_error(errno()))
    } else {
        Ok(())
    }
}

fn stage(plan: &ChildPlan, s: u8) {
    // SAFETY: writes one byte from a valid buffer to our own pipe.
    unsafe { libc::write(plan.report_fd, (&s as *const u8).cast(), 1) };
}

/// UDP connect to a denied destination must fail with EPERM.
///
/// # Safety
/// `addr` must point to a socket address of `len` bytes.
unsafe fn probe(
    family: libc::c_int,
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
) -> io::Result<()> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        let e = errno();
        // No IPv6 on this host: nothing to prove for it.
        if family == libc::AF_INET6 && e == libc::EAFNOSUPPORT {
            return Ok(());
        }
        return Err(io::Error::from_raw_os_error(e));
    }
    // SAFETY: the caller guarantees addr/len.
    let r = unsafe { libc::connect(fd, addr, len) };
    let e = errno();
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fd) };
    match (r, e) {
        (0, _) => Err(io::Error::from_raw_os_error(PROBE_PASSED_ERRNO)),
        (_, libc::EPERM) => Ok(()),
        (_, e) => Err(io::Error::from_raw_os_error(e)),
    }
}

fn setup_child(plan: &ChildPlan) -> io::Result<()> {
    // SAFETY (whole function): raw system calls on descriptors and structures prepared before
    // fork; no allocation.
    unsafe {
        stage(plan, b'c');
        let zero = b"0";
        if libc::write(plan.procs_fd, zero.as_ptr().cast(), 1) != 1 {
            return Err(io::Error::from_raw_os_error(errno()));
        }
        libc::close(plan.procs_fd);

        if plan.netns_fd >= 0 {
            stage(plan, b's');
            check(libc::setns(plan.netns_fd, libc::CLONE_NEWNET) as libc::c_long)?;
        }

        stage(plan, b'p');
        probe(
            libc::AF_INET,
            (&plan.probe4 as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )?;
        probe(
            libc::AF_INET6,
            (&plan.probe6 as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )?;

        stage(plan, b'g');
        check(libc::setgroups(plan.groups.len(), plan.groups.as_ptr()) as libc::c_long)?;
        let (uid, gid) = (plan.uid, plan.gid);
        check(libc::setresgid(gid, gid, gid) as libc::c_long)?;
        stage(plan, b'u');
        check(libc::setresuid(uid, uid, uid) as libc::c_long)?;

        // As the user, so that a directory it cannot enter is refused.
        stage(plan, b'w');
        if libc::chdir(plan.cwd.as_ptr()) != 0 {
            if !plan.cwd_fallback {
                return Err(io::Error::from_raw_os_error(errno()));
            }
            check(libc::chdir(c"/".as_ptr()) as libc::c_long)?;
        }

        stage(plan, b'n');
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;

        // Set after the uid change, which clears it. If the agent is gone, enforcement may be
        // too: the workload must not run without it.
        stage(plan, b'd');
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) as libc::c_long)?;
        if libc::getppid() != plan.agent_pid {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }

        stage(plan, b'f');
        check(libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ))?;
        stage(plan, b'x');
    }
    Ok(())
}
