//! egress-probe: the workload the egress tests run under the agent, as an unprivileged user.
//!
//! It performs the network operations given on the command line, one op per argument (or
//! one per line of `--ops-file PATH`), and prints one JSON line per op on stdout. The op
//! grammar is documented in `egress_tests::probe`. Exit status: 0, or 64 when the arguments
//! are malformed, or N for an `exit N` op.

mod bypass;
mod dns;
mod dnsloop;
mod listen;
mod load;
mod op;
mod parse;
mod resolve;
mod sock;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use egress_tests::probe::{ProbeResult, errno_name};

use crate::bypass::{cmsg_send, ping4, raw6, set_sockopt, srh6};
use crate::dnsloop::{dns_loop, dns_serve};
use crate::listen::listen;
use crate::load::{flood, hammer};
use crate::op::{Action, Op};
use crate::parse::parse_args;
use crate::resolve::{dns, dns_raw, resolve};
use crate::sock::{
    connect_only, fastopen, send_stream, sendto_udp, socket_for_kind, udp_connect_send,
};

const EX_USAGE: u8 = 64;

/// A syscall failure: errno plus, for non-errno failures, a description.
#[derive(Debug)]
struct Failure {
    errno: Option<i32>,
    error: String,
}

impl Failure {
    fn errno(errno: i32) -> Self {
        Self {
            errno: Some(errno),
            error: errno_name(errno),
        }
    }

    fn last() -> Self {
        Self::errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    fn other(error: String) -> Self {
        Self { errno: None, error }
    }
}

type OpResult = Result<(), Failure>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ops = match parse_args(&args) {
        Ok(ops) => ops,
        Err(e) => {
            eprintln!("egress-probe: {e}");
            eprintln!(
                "usage: egress-probe [--ops-file PATH] OP...   (see egress_tests::probe for the op grammar)"
            );
            return ExitCode::from(EX_USAGE);
        }
    };
    let stdout = std::io::stdout();
    for op in &ops {
        if let Action::Exit(code) = op.action {
            emit(&stdout, &ProbeResult::ok(&op.text));
            return ExitCode::from(code);
        }
        let result = run(op);
        emit(&stdout, &result);
    }
    ExitCode::SUCCESS
}

fn emit(stdout: &std::io::Stdout, result: &ProbeResult) {
    let line = serde_json::to_string(result).unwrap_or_else(|e| {
        format!(
            r#"{{"op":"<unserialisable>","ok":false,"errno":null,"error":"{}"}}"#,
            e.to_string().replace('"', "'")
        )
    });
    let mut out = stdout.lock();
    // A closed stdout must not turn into a panic; the exit status still reports the run.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run(op: &Op) -> ProbeResult {
    let text = op.text.as_str();
    let outcome = match &op.action {
        Action::Connect(t, f, addr) => connect_only(*t, *f, *addr),
        Action::Send(t, f, addr, data) => send_stream(*t, *f, *addr, data),
        Action::SendTo(f, addr, data) => sendto_udp(*f, *addr, data),
        Action::UdpConnectSend(f, addr, data) => udp_connect_send(*f, *addr, data),
        Action::Tfo(t, f, addr, data) => fastopen(*t, *f, *addr, data),
        Action::Socket(kind, f) => socket_for_kind(*kind, *f).map(drop),
        Action::Sleep(d) => {
            std::thread::sleep(*d);
            Ok(())
        }
        Action::IgnoreStop => {
            // SAFETY: setting the disposition of two signals to SIG_IGN.
            let failed = unsafe {
                libc::signal(libc::SIGTERM, libc::SIG_IGN) == libc::SIG_ERR
                    || libc::signal(libc::SIGINT, libc::SIG_IGN) == libc::SIG_ERR
            };
            if failed { Err(Failure::last()) } else { Ok(()) }
        }
        Action::Whoami => return whoami(text),
        Action::Environ => {
            return ProbeResult {
                env: Some(
                    std::env::vars_os()
                        .map(|(n, v)| {
                            (
                                n.to_string_lossy().into_owned(),
                                v.to_string_lossy().into_owned(),
                            )
                        })
                        .collect(),
                ),
                cwd: std::env::current_dir()
                    .ok()
                    .map(|d| d.display().to_string()),
                ..ProbeResult::ok(text)
            };
        }
        Action::Flood(f, a, n) => return flood(text, *f, *a, *n),
        Action::Srh6(via, a, data) => srh6(*via, *a, data),
        Action::Ping4(a) => ping4(*a),
        Action::Raw6(a, bytes) => raw6(*a, bytes),
        Action::Hammer(threads, n, inner) => return hammer(text, *threads, *n, inner),
        Action::Dns(mode, f, addr, name, n) => return dns(text, *mode, *f, *addr, name, *n),
        Action::Resolve(r) => return resolve(text, r),
        Action::DnsRaw(proto, f, addr, bytes) => return dns_raw(text, *proto, *f, *addr, bytes),
        Action::DnsLoop(l) => return dns_loop(text, l),
        Action::DnsServe(d) => return dns_serve(text, d),
        Action::Listen(l) => return listen(text, l),
        Action::SetSockopt(t, f, option, ifname) => set_sockopt(*t, *f, *option, ifname),
        Action::CmsgSend {
            connected,
            family,
            to,
            cmsg,
            data,
        } => cmsg_send(*connected, *family, *to, cmsg, data),
        Action::Touch(path) => std::fs::File::create(path).map(drop).map_err(|e| Failure {
            errno: e.raw_os_error(),
            error: e.to_string(),
        }),
        Action::WaitFile(path, timeout) => wait_file(path, *timeout),
        Action::Cgroup => return cgroup(text),
        Action::Exit(_) => Ok(()),
    };
    match outcome {
        Ok(()) => ProbeResult::ok(text),
        Err(f) => ProbeResult::failed(text, f.errno, f.error),
    }
}

fn whoami(text: &str) -> ProbeResult {
    // SAFETY: these getters have no preconditions and cannot fail.
    let (uid, euid, gid, egid) = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
        )
    };
    let groups = nix::unistd::getgroups()
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect::<Vec<u32>>())
        .ok();
    let cap_eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .map(|v| v.trim().to_owned())
        });
    ProbeResult {
        pid: Some(std::process::id()),
        uid: Some(uid),
        euid: Some(euid),
        gid: Some(gid),
        egid: Some(egid),
        groups,
        cap_eff,
        ..ProbeResult::ok(text)
    }
}

fn cgroup(text: &str) -> ProbeResult {
    match std::fs::read_to_string("/proc/self/cgroup") {
        Ok(s) => ProbeResult {
            cgroup: s
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(str::to_owned),
            ..ProbeResult::ok(text)
        },
        Err(e) => ProbeResult::failed(text, e.raw_os_error(), e.to_string()),
    }
}

/// Polls (bounded) until `path` exists.
fn wait_file(path: &std::path::Path, timeout: Duration) -> OpResult {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(Failure::errno(libc::ETIMEDOUT));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
