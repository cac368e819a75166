//! Denied attempts from the kernel's ring buffer, enriched and written as log lines.
//!
//! Every event is logged, but a flood of identical attempts (same process, destination,
//! hook and reason) within one window becomes one line at once plus one "repeated N times"
//! line when the window closes, so logs stay bounded while the kernel's counters stay exact.
//! The log schema is documented in docs/events.md.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use aya::maps::{MapData, RingBuf};
use egress_common::{Event, Hook, Proto, Reason, verdict::NO_RULE};
use tokio::io::unix::AsyncFd;

use crate::kernel::counters::proto_name;
use egress_policy::Policy;
use egress_policy::compile::Resolved;

/// The log target of every blocked-attempt line, kept as documented (docs/events.md) whatever
/// the module is called, so that log filters and pipelines keep matching.
pub const TARGET: &str = "egress_agent::events";

/// Distinct (process, destination, reason) keys remembered per window; past this, further
/// distinct attempts in the window are summarised in one overflow line.
const MAX_KEYS_PER_WINDOW: usize = 4096;

/// A decoded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocked {
    pub event: Event,
}

impl Blocked {
    /// Decodes one ring-buffer record; `None` for a record of the wrong size.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < std::mem::size_of::<Event>() {
            return None;
        }
        // SAFETY: the length is checked; Event is plain old data, read unaligned.
        let event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
        Some(Blocked { event })
    }

    pub fn tgid(&self) -> u32 {
        (self.event.pid_tgid >> 32) as u32
    }

    pub fn tid(&self) -> u32 {
        self.event.pid_tgid as u32
    }

    pub fn uid(&self) -> u32 {
        self.event.uid_gid as u32
    }

    pub fn gid(&self) -> u32 {
        (self.event.uid_gid >> 32) as u32
    }

    pub fn comm(&self) -> String {
        let end = self
            .event
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.event.comm.len());
        String::from_utf8_lossy(&self.event.comm[..end]).into_owned()
    }

    /// The destination address; `None` for socket-creation events.
    pub fn dst(&self) -> Option<IpAddr> {
        if matches!(self.hook(), Some(Hook::SockCreate | Hook::Setsockopt)) {
            return None;
        }
        let a = self.event.addr;
        match self.event.family {
            4 => Some(Ipv4Addr::new(a[0], a[1], a[2], a[3]).into()),
            6 => Some(Ipv6Addr::from(a).into()),
            _ => None,
        }
    }

    pub fn reason(&self) -> Option<Reason> {
        Reason::ALL
            .iter()
            .copied()
            .find(|r| *r as u32 == self.event.reason)
    }

    /// The policy's reason behind a classified reason (`udp_connect_refused`).
    pub fn cause(&self) -> Option<Reason> {
        Reason::ALL
            .iter()
            .copied()
            .find(|r| *r as u32 == self.event.cause)
    }

    /// Whether audit mode let the attempt through (the policy denies it).
    pub fn audited(&self) -> bool {
        self.event.verdict == egress_common::events::VERDICT_AUDIT
    }

    /// `deny`, or `audit` for an attempt audit mode let through.
    pub fn verdict(&self) -> &'static str {
        if self.audited() { "audit" } else { "deny" }
    }

    /// Whether the refused attempt would have sent anything: a UDP connect does not.
    pub fn carries_data(&self) -> bool {
        self.reason() != Some(Reason::UdpConnectRefused)
    }

    pub fn hook(&self) -> Option<Hook> {
        [
            Hook::Connect4,
            Hook::Connect6,
            Hook::Sendmsg4,
            Hook::Sendmsg6,
            Hook::SockCreate,
            Hook::Setsockopt,
            Hook::SkbEgress,
            Hook::SkbIngress,
        ]
        .into_iter()
        .find(|h| *h as u8 == self.event.hook)
    }

    pub fn proto(&self) -> Proto {
        match self.event.proto {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            _ => Proto::Other,
        }
    }
}

pub fn hook_name(h: Option<Hook>) -> &'static str {
    match h {
        Some(Hook::Connect4) => "connect4",
        Some(Hook::Connect6) => "connect6",
        Some(Hook::Sendmsg4) => "sendmsg4",
        Some(Hook::Sendmsg6) => "sendmsg6",
        Some(Hook::SockCreate) => "sock_create",
        Some(Hook::Setsockopt) => "setsockopt",
        Some(Hook::SkbEgress) => "skb_egress",
        Some(Hook::SkbIngress) => "skb_ingress",
        None => "unknown",
    }
}

/// The ring buffer, readable from the async loop.
pub struct EventStream {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl EventStream {
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: the ring buffer owns its map descriptor for its whole life and always
        // reports the same one; the AsyncFd owns the ring buffer.
        let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(EventStream { fd })
    }

    /// Waits until records are available, then hands each decoded one to `f`. Returns how
    /// many were read (undecodable records are counted in `bad`).
    pub async fn drain(
        &mut self,
        mut f: impl FnMut(Blocked),
        bad: &mut u64,
    ) -> std::io::Result<usize> {
        let mut guard = self.fd.readable_mut().await?;
        let n = read_all(guard.get_inner_mut(), &mut f, bad);
        guard.clear_ready();
        Ok(n)
    }
}

impl EventStream {
    /// Reads whatever is in the ring buffer now, without waiting.
    pub fn drain_now(&mut self, mut f: impl FnMut(Blocked), bad: &mut u64) -> usize {
        read_all(self.fd.get_mut(), &mut f, bad)
    }
}

/// Hands every record in the ring to `f`; counts undecodable ones in `bad`.
fn read_all(ring: &mut RingBuf<MapData>, f: &mut impl FnMut(Blocked), bad: &mut u64) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        match Blocked::decode(&item) {
            Some(b) => f(b),
            None => *bad += 1,
        }
        n += 1;
    }
    n
}

/// What the log line says about the policy behind a decision.
pub struct Context<'a> {
    pub policy: &'a Policy,
    pub resolved: &'a Resolved,
}

impl Context<'_> {
    /// The event as `explain-last` shows it.
    pub fn denial(&self, b: &Blocked) -> crate::observe::recent::Denial {
        let reason = b.reason();
        let cause = b.cause().filter(|_| !b.carries_data());
        let (rule, _) = self.rule(cause.or(reason), b.event.rule_id);
        let dst = b
            .dst()
            .map(|ip| std::net::SocketAddr::new(ip, b.event.port).to_string());
        let name = b
            .dst()
            .map(|ip| self.hosts_of(ip).join(","))
            .filter(|h| !h.is_empty());
        crate::observe::recent::Denial {
            at_unix_s: crate::observe::recent::now_unix_s(),
            reason: reason.map_or("unknown", Reason::as_str).to_owned(),
            cause: cause.map(|c| c.as_str().to_owned()),
            hook: hook_name(b.hook()).to_owned(),
            protocol: proto_name(b.proto()).to_owned(),
            dst,
            name,
            rule,
            // Packets seen outside the workload's tasks (the inbound check) name no process.
            pid: (b.tgid() != 0).then(|| b.tgid()),
            comm: (b.tgid() != 0).then(|| b.comm()),
        }
    }

    /// The host names the policy resolved to this address.
    fn hosts_of(&self, ip: IpAddr) -> Vec<&str> {
        self.resolved
            .iter()
            .filter(|(_, addrs)| addrs.iter().any(|a| a.to_canonical() == ip))
            .map(|(h, _)| h.as_str())
            .collect()
    }

    /// The rule a decision names: its target and purpose.
    fn rule(&self, reason: Option<Reason>, id: u32) -> (Option<String>, Option<String>) {
        if id == NO_RULE {
            return (None, None);
        }
        let idx = id as usize;
        match reason {
            Some(Reason::DenyRule) => (
                self.policy
                    .denied
                    .get(idx)
                    .map(|d| format!("denied_destinations[{idx}] {}", d.target)),
                None,
            ),
            Some(Reason::DenyInbound) => match self.policy.inbound.get(idx) {
                Some(r) => (
                    Some(format!("inbound[{idx}] tcp/{}", r.port)),
                    r.purpose.clone(),
                ),
                None => (None, None),
            },
            Some(Reason::DenyDoh) => (
                crate::dns::doh_list()
                    .providers()
                    .get(idx)
                    .map(|p| format!("dns_policy.block_doh: {}", p.name)),
                None,
            ),
            Some(_) => match self.policy.allowed.get(idx) {
                Some(a) => (
                    Some(format!("allowed_destinations[{idx}] {}", a.target)),
                    a.purpose.clone(),
                ),
                None => (None, None),
            },
            None => (None, None),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    tgid: u32,
    slot: u32,
    reason: u32,
    hook: u8,
    verdict: u8,
    family: u8,
    proto: u8,
    addr: [u8; 16],
    port: u16,
    sock: (u32, u32),
}

impl Key {
    fn of(b: &Blocked) -> Self {
        let e = &b.event;
        Key {
            tgid: b.tgid(),
            slot: e.slot,
            reason: e.reason,
            hook: e.hook,
            verdict: e.verdict,
            family: e.family,
            proto: e.proto,
            addr: e.addr,
            port: e.port,
            sock: (e.sock_type, e.sock_protocol),
        }
    }
}

struct Pending {
    first: Blocked,
    repeats: u64,
}

/// Writes events as log lines, collapsing repeats within a window.
pub struct EventLog {
    window: Duration,
    started: Instant,
    pending: HashMap<Key, Pending>,
    overflow: u64,
    cmdlines: HashMap<u32, Option<String>>,
    /// Lines written and lines saved by collapsing, for metrics.
    pub lines: u64,
    pub collapsed: u64,
    /// The protected cgroup (the events' cgroup or an ancestor of it), for `cgroup.path`.
    cgroup: Option<String>,
}

impl EventLog {
    pub fn new(window: Duration) -> Self {
        EventLog {
            window,
            started: Instant::now(),
            pending: HashMap::new(),
            overflow: 0,
            cmdlines: HashMap::new(),
            lines: 0,
            collapsed: 0,
            cgroup: None,
        }
    }

    /// Names the protected cgroup in every line from now on.
    pub fn set_cgroup(&mut self, path: &std::path::Path) {
        self.cgroup = Some(path.display().to_string());
    }

    /// When the current window closes.
    pub fn window_end(&self) -> Instant {
        self.started + self.window
    }

    pub fn record(&mut self, b: Blocked, ctx: &Context<'_>) {
        let key = Key::of(&b);
        if let Some(p) = self.pending.get_mut(&key) {
            p.repeats += 1;
            self.collapsed += 1;
            return;
        }
        if self.pending.len() >= MAX_KEYS_PER_WINDOW {
            self.overflow += 1;
            self.collapsed += 1;
            return;
        }
        let cmdline = self.cmdline(b.tgid());
        self.write(&b, ctx, cmdline.as_deref(), 0);
        self.pending.insert(
            key,
            Pending {
                first: b,
                repeats: 0,
            },
        );
    }

    /// Closes the window: one line per collapsed flood, then a fresh window.
    pub fn flush(&mut self, ctx: &Context<'_>) {
        let pending = std::mem::take(&mut self.pending);
        for p in pending.into_values().filter(|p| p.repeats > 0) {
            let cmdline = self.cmdlines.get(&p.first.tgid()).cloned().flatten();
            self.write(&p.first, ctx, cmdline.as_deref(), p.repeats);
        }
        if self.overflow > 0 {
            tracing::warn!(
                target: TARGET,
                event = "egress_blocked_overflow",
                policy = %ctx.policy.name,
                count = self.overflow,
                window_secs = self.window.as_secs_f64(),
                "more distinct blocked attempts than one window logs individually; counted in metrics"
            );
            self.lines += 1;
            self.overflow = 0;
        }
        self.cmdlines.clear();
        self.started = Instant::now();
    }

    fn cmdline(&mut self, tgid: u32) -> Option<String> {
        self.cmdlines
            .entry(tgid)
            .or_insert_with(|| {
                let raw = std::fs::read(format!("/proc/{tgid}/cmdline")).ok()?;
                let raw = &raw[..raw.len().min(512)];
                let s: String = String::from_utf8_lossy(raw)
                    .split('\0')
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ");
                // A process that already exited reads as empty: say nothing rather than "".
                (!s.is_empty()).then_some(s)
            })
            .clone()
    }

    fn write(&mut self, b: &Blocked, ctx: &Context<'_>, cmdline: Option<&str>, repeats: u64) {
        self.lines += 1;
        let reason = b.reason();
        let carries_data = b.carries_data();
        // The rule is named by the policy's reason, also behind a classified one.
        let cause = b.cause().filter(|_| !carries_data);
        let (rule_target, rule_purpose) = ctx.rule(cause.or(reason), b.event.rule_id);
        let dst = b.dst();
        let hosts = dst
            .map(|ip| ctx.hosts_of(ip).join(","))
            .filter(|h| !h.is_empty());
        let rule_id = (b.event.rule_id != NO_RULE).then_some(b.event.rule_id);
        let sock = b.hook() == Some(Hook::SockCreate);
        let sockopt = b.hook() == Some(Hook::Setsockopt);
        let socket_type = sock.then_some(b.event.sock_type);
        let socket_protocol = sock.then_some(b.event.sock_protocol);
        let option_level = sockopt.then_some(b.event.sock_type);
        let option_name = sockopt.then_some(b.event.sock_protocol);
        let repeated = (repeats > 0).then_some(repeats);
        // A packet to a listener arrives outside any task of the workload: its event names
        // the socket's owner and cgroup, and no process.
        let task = b.hook() != Some(Hook::SkbIngress);
        let audited = b.audited();
        tracing::warn!(
            target: TARGET,
            // A refused UDP connect sent nothing: reported, but not as blocked egress. An
            // audited attempt went through: named apart, so that alerts on blocked egress do
            // not fire while a policy is only being tried.
            event = match (audited, carries_data) {
                (false, true) => "egress_blocked",
                (false, false) => "egress_refused_no_data",
                (true, true) => "egress_audit",
                (true, false) => "egress_audit_no_data",
            },
            policy = %ctx.policy.name,
            verdict = b.verdict(),
            reason = reason.map_or("unknown", Reason::as_str),
            cause = cause.map(Reason::as_str),
            carries_data,
            hook = hook_name(b.hook()),
            protocol = proto_name(b.proto()),
            family = if b.event.family == 6 { "ipv6" } else { "ipv4" },
            dst.ip = dst.map(|ip| ip.to_string()),
            dst.port = dst.map(|_| b.event.port),
            dst.host = hosts,
            rule.id = rule_id,
            rule.target = rule_target,
            rule.purpose = rule_purpose,
            socket.type = socket_type,
            socket.protocol = socket_protocol,
            option.level = option_level,
            option.name = option_name,
            pid = task.then_some(b.tgid()),
            tid = task.then_some(b.tid()),
            uid = b.uid(),
            gid = task.then_some(b.gid()),
            comm = task.then(|| b.comm()),
            cmdline = cmdline,
            cgroup.id = b.event.cgroup_id,
            cgroup.path = self.cgroup.as_deref(),
            // When the kernel judged the attempt (`timestamp` is when this line was written).
            attempt_time = crate::observe::walltime::boot_to_unix_ns(b.event.boot_ns).map(crate::observe::walltime::rfc3339),
            slot = b.event.slot,
            repeated,
            window_secs = repeated.map(|_| self.window.as_secs_f64()),
            "{}",
            match (audited, carries_data, repeats > 0) {
                (false, true, false) => "egress blocked",
                (false, true, true) => "egress blocked (repeated)",
                (false, false, false) => "udp connect refused (no data sent)",
                (false, false, true) => "udp connect refused (no data sent, repeated)",
                (true, true, false) => "egress the policy denies, let through (audit mode)",
                (true, true, true) => "egress the policy denies, let through (audit mode, repeated)",
                (true, false, false) => "udp connect the policy denies, let through (audit mode)",
                (true, false, true) =>
                    "udp connect the policy denies, let through (audit mode, repeated)",
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(port: u16, tgid: u32) -> Blocked {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[198, 18, 0, 66]);
        Blocked {
            event: Event {
                boot_ns: 1,
                cgroup_id: 7,
                pid_tgid: (u64::from(tgid) << 32) | 9,
                uid_gid: (65534u64 << 32) | 65534,
                comm: *b"probe\0\0\0\0\0\0\0\0\0\0\0",
                addr,
                port,
                family: 4,
                proto: 6,
                hook: Hook::Connect4 as u8,
                verdict: 0,
                _pad: [0; 2],
                reason: Reason::DenyNoRule as u32,
                rule_id: NO_RULE,
                slot: 0,
                sock_type: 0,
                sock_protocol: 0,
                cause: Reason::DenyNoRule as u32,
            },
        }
    }

    #[test]
    fn decode_roundtrip_and_fields() {
        let b = event(443, 1234);
        // SAFETY: viewing a POD struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&b.event as *const Event).cast::<u8>(),
                std::mem::size_of::<Event>(),
            )
        };
        let d = Blocked::decode(bytes).expect("decodes");
        assert_eq!(d, b);
        assert_eq!(d.tgid(), 1234);
        assert_eq!(d.tid(), 9);
        assert_eq!(d.uid(), 65534);
        assert_eq!(d.comm(), "probe");
        assert_eq!(d.dst(), Some(IpAddr::from([198, 18, 0, 66])));
        assert_eq!(d.reason(), Some(Reason::DenyNoRule));
        assert!(Blocked::decode(&bytes[..10]).is_none());
    }

    #[test]
    fn floods_collapse_but_distinct_attempts_do_not() {
        let policy = egress_policy::parse_str(
            "egress_policy:\n  default_action: DENY\n",
            std::path::Path::new("t.yaml"),
        )
        .expect("parses");
        let resolved = Resolved::new();
        let ctx = Context {
            policy: &policy,
            resolved: &resolved,
        };
        let mut log = EventLog::new(Duration::from_secs(60));
        for _ in 0..10_000 {
            log.record(event(443, 1), &ctx);
        }
        log.record(event(80, 1), &ctx);
        log.record(event(443, 2), &ctx);
        assert_eq!(log.lines, 3);
        log.flush(&ctx);
        // One "repeated 9999 times" line for the flood; the single attempts need none.
        assert_eq!(log.lines, 4);
        assert_eq!(log.collapsed, 9_999);
    }
}
