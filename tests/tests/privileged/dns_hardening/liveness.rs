//! Once a `run` agent is gone, DNS is denied within seconds, so that whatever binds the dead
//! proxy's port is never believed; a restarted agent serves DNS again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::log::verdict_count;
use egress_tests::probe::{DnsSample, ProbeResult, boot_time_ms, errno_name, rcode};
use egress_tests::process::RunOutput;
use egress_tests::run_agent::RunAgent;
use egress_tests::scenario::Scenario;
use egress_tests::server::SETTLE;
use egress_tests::testbed::{Testbed, run_probe_as_nobody};
use egress_tests::wait;
use libc::EPERM;
use nix::sys::signal::Signal;

use super::policy;
use crate::{ip, scenario};

// --- 4. Liveness ------------------------------------------------------------------------------

/// How long the workload queries before the agent is stopped, and after.
const BEFORE_STOP: Duration = Duration::from_secs(1);
const AFTER_STOP: Duration = Duration::from_secs(8);
/// The squatter's answer: an address no real answer gives.
const SQUATTER_ANSWER: &str = "198.18.0.66";

/// What one stop of an agent under DNS load showed.
struct Stopped {
    /// CLOCK_BOOTTIME (ms) at the signal.
    at_ms: u64,
    workload: RunOutput,
    squatter: RunOutput,
}

impl Stopped {
    fn samples(&self) -> &[DnsSample] {
        let r = self
            .workload
            .results
            .iter()
            .find(|r| r.op.starts_with("dnsloop"));
        r.and_then(|r| r.samples.as_deref())
            .unwrap_or_else(|| panic!("no dnsloop samples\n{}", self.workload.describe()))
    }

    fn squatted(&self) -> &[DnsSample] {
        let r: Option<&ProbeResult> = self.squatter.results.first();
        match r {
            Some(r) if r.ok => r.samples.as_deref().unwrap_or_default(),
            _ => panic!("the squatter did not run\n{}", self.squatter.describe()),
        }
    }

    /// The samples relative to the signal, runs of the same outcome on one line.
    fn describe(&self) -> String {
        let rel = |s: &DnsSample| s.at_ms as i64 - self.at_ms as i64;
        let outcome = |s: &DnsSample| {
            if s.ok {
                format!("rcode {:?} {:?}", s.rcode, s.addrs)
            } else {
                format!("errno {:?}", s.errno.map(errno_name))
            }
        };
        let mut runs: Vec<(i64, i64, usize, String)> = Vec::new();
        for s in self.samples() {
            match runs.last_mut() {
                Some(run) if run.3 == outcome(s) => {
                    run.1 = rel(s);
                    run.2 += 1;
                }
                _ => runs.push((rel(s), rel(s), 1, outcome(s))),
            }
        }
        let squatted: Vec<i64> = self.squatted().iter().map(rel).collect();
        format!(
            "signal at {} ms (CLOCK_BOOTTIME); the workload's queries, sent at:\n  {}\nthe \
             squatter answered {} queries, at {:?} ms",
            self.at_ms,
            runs.iter()
                .map(|(from, to, n, what)| format!("{from:+} .. {to:+} ms ({n}x): {what}"))
                .collect::<Vec<_>>()
                .join("\n  "),
            squatted.len(),
            squatted
        )
    }

    /// The first query refused with EPERM.
    fn first_eperm(&self) -> &DnsSample {
        self.samples()
            .iter()
            .find(|s| s.errno == Some(EPERM))
            .unwrap_or_else(|| panic!("DNS was never denied\n{}", self.describe()))
    }

    /// Queries sent well before the signal were answered by the real proxy; the first
    /// refusal came at most `limit` after the signal and every query after it was refused
    /// too; no answer of the squatter was received after that.
    #[track_caller]
    fn assert_denied_within(&self, limit: Duration, agent_log: &str) {
        let limit_ms = u64::try_from(limit.as_millis()).unwrap();
        let samples = self.samples();
        let before: Vec<&DnsSample> = samples
            .iter()
            .filter(|s| s.at_ms + 500 < self.at_ms)
            .collect();
        assert!(
            !before.is_empty()
                && before.iter().all(|s| s.ok
                    && s.rcode == Some(rcode::NOERROR)
                    && s.addrs == [ip("198.18.0.10")]),
            "DNS did not work before the signal\n{}\n{agent_log}",
            self.describe()
        );
        let first = self.first_eperm();
        assert!(
            first.at_ms <= self.at_ms + limit_ms,
            "the first refusal came {} ms after the signal, not within {limit_ms} ms\n{}",
            first.at_ms.saturating_sub(self.at_ms),
            self.describe()
        );
        let after: Vec<&DnsSample> = samples.iter().filter(|s| s.at_ms >= first.at_ms).collect();
        assert!(
            after.len() > 10 && after.iter().all(|s| s.errno == Some(EPERM)),
            "once refused, every later query must be refused\n{}",
            self.describe()
        );
        assert!(
            self.squatted().iter().all(|s| s.at_ms < first.at_ms),
            "the squatter got queries after DNS was denied\n{}",
            self.describe()
        );
    }

    fn eperms(&self) -> u64 {
        self.samples()
            .iter()
            .filter(|s| s.errno == Some(EPERM))
            .count() as u64
    }
}

/// How the workload of [`stop_under_dns_load`] sends its queries.
#[derive(Clone, Copy, Debug)]
enum Load {
    /// A fresh unconnected socket per query, sendto 198.18.0.2:53.
    FreshSockets,
    /// One UDP socket, connected to 198.18.0.2:53 (so to the proxy) once, then send per query.
    OneConnectedSocket,
}

/// Stops `agent` with `sig` while a workload in `cgroup` sends a DNS query every 100 ms;
/// once the agent is gone, a squatter (uid nobody, outside the cgroup) binds the dead proxy's
/// `port` on 127.0.0.1 and answers every query with [`SQUATTER_ANSWER`].
fn stop_under_dns_load(
    tb: &Testbed,
    cgroup: &Path,
    agent: &mut RunAgent,
    sig: Signal,
    load: Load,
    port: u16,
    sync: &Path,
) -> Stopped {
    let tag = format!("{sig:?}-{load:?}");
    let (proto, mode) = match load {
        Load::FreshSockets => ("udp4-sendto", ""),
        Load::OneConnectedSocket => ("udp4", " one-socket"),
    };
    let started = sync.join(format!("{tag}-started"));
    let squatting = sync.join(format!("{tag}-squatting"));
    let total = BEFORE_STOP + AFTER_STOP;
    let ops = vec![
        format!("touch {}", started.display()),
        format!(
            "dnsloop {proto} 198.18.0.2 api.example.test 100 {}{mode}",
            total.as_millis()
        ),
    ];
    let squat = format!(
        "dnsserve udp4 127.0.0.1 {port} {SQUATTER_ANSWER} {} {}",
        AFTER_STOP.as_millis(),
        squatting.display()
    );
    std::thread::scope(|s| {
        let load = s.spawn(|| tb.run_in_cgroup(cgroup, &ops));
        assert!(
            wait::for_file(&started, Duration::from_secs(15)),
            "the workload did not start"
        );
        std::thread::sleep(BEFORE_STOP);
        let at_ms = boot_time_ms();
        let status = agent.signal(sig);
        if sig == Signal::SIGTERM {
            assert!(status.success(), "{status}\n{}", agent.log());
        }
        let squatter =
            s.spawn(|| run_probe_as_nobody(tb.client(), tb.probe.path(), &[&squat]).unwrap());
        let bound = wait::for_file(&squatting, Duration::from_secs(5));
        let squatter = squatter.join().expect("squatter thread");
        assert!(bound, "the squatter did not bind\n{}", squatter.describe());
        Stopped {
            at_ms,
            workload: load.join().expect("workload thread"),
            squatter,
        }
    })
}

/// The liveness tests' world: the upstream server answering `api.example.test` with
/// 198.18.0.10.
fn liveness_scenario() -> Scenario {
    scenario().upstream(Dnsmasq::config().record("api.example.test", ip("198.18.0.10")))
}

/// What the liveness tests share besides their world: a cgroup for `run` agents, a policy
/// allowing `*.example.test` and a directory to sync with the workloads.
struct LivenessBed {
    cgroup: PathBuf,
    sync: tempfile::TempDir,
    policy: PathBuf,
}

impl LivenessBed {
    fn new(tb: &Testbed, name: &str) -> Self {
        // The proxies' ports are privileged: with the default only root could squat one. Many
        // container namespaces let anyone bind them, and so does this test's, so that an
        // unprivileged squatter can try.
        tb.client()
            .sysctl("net.ipv4.ip_unprivileged_port_start", "0")
            .unwrap();
        let policy = tb
            .write_policy(
                &policy()
                    .name(name)
                    .allow_wildcard("example.test", &[8443], &["tcp"])
                    .render(),
            )
            .unwrap();
        Self {
            cgroup: tb.cgroups.child(name).unwrap(),
            sync: tb.sync_dir().expect("sync dir"),
            policy,
        }
    }
}

/// A `run` agent serves a workload that queries DNS every 100 ms. After SIGTERM the workload's
/// queries get EPERM within 1 s; after SIGKILL within 5 s (plus 1 s of slack for the
/// sampling); in both cases a process of uid nobody outside the cgroup that binds the dead
/// proxy's port and answers is never believed once DNS is denied (after SIGTERM it never
/// even gets a query). A restarted agent adopts the pinned state and serves DNS again, and
/// counted every refusal as `dns_proxy_down`.
#[test]
fn dns_is_denied_once_the_proxys_agent_is_gone_and_a_squatter_is_never_believed() {
    let Some(tb) = liveness_scenario().tcp("198.18.0.10:8443").build() else {
        return;
    };
    let [api] = tb.listeners();
    let bed = LivenessBed::new(&tb, "alive");
    let (cg, sync, path) = (&bed.cgroup, &bed.sync, &bed.policy);
    let serves = |n: usize| {
        let op =
            format!("resolve udp4 198.18.0.2 api.example.test A then-connect tcp4 8443 served-{n}");
        let out = tb.run_in_cgroup(cg, std::slice::from_ref(&op));
        out.assert_answer(&op, rcode::NOERROR, &["198.18.0.10"]);
    };

    let mut first = RunAgent::start(tb.client(), path, cg, &[]);
    let port = first.proxy_port();
    serves(1);
    let term = stop_under_dns_load(
        &tb,
        cg,
        &mut first,
        Signal::SIGTERM,
        Load::FreshSockets,
        port,
        sync.path(),
    );
    term.assert_denied_within(Duration::from_secs(1), &first.log());
    eprintln!(
        "after SIGTERM: first refusal {} ms after the signal",
        term.first_eperm().at_ms.saturating_sub(term.at_ms)
    );
    assert!(
        term.squatted().is_empty(),
        "after SIGTERM the squatter must never get a query\n{}",
        term.describe()
    );

    let mut second = RunAgent::start(tb.client(), path, cg, &[]);
    assert!(
        second.log().contains("adopted pinned enforcement"),
        "{}",
        second.log()
    );
    let port = second.proxy_port();
    serves(2);
    let kill = stop_under_dns_load(
        &tb,
        cg,
        &mut second,
        Signal::SIGKILL,
        Load::FreshSockets,
        port,
        sync.path(),
    );
    kill.assert_denied_within(Duration::from_secs(6), &second.log());
    eprintln!(
        "after SIGKILL: first refusal {} ms after the signal; {} answer(s) of the squatter \
         believed before it",
        kill.first_eperm().at_ms.saturating_sub(kill.at_ms),
        kill.samples()
            .iter()
            .filter(|s| s.addrs.contains(&ip(SQUATTER_ANSWER)))
            .count()
    );

    let mut third = RunAgent::start(tb.client(), path, cg, &[]);
    serves(3);
    assert!(third.signal(Signal::SIGTERM).success());
    let log = third.log();
    assert_eq!(
        verdict_count(&log, "dns_proxy_down"),
        term.eperms() + kill.eperms(),
        "every refused query is counted as dns_proxy_down\n{log}"
    );
    std::thread::sleep(SETTLE);
    let served: Vec<Vec<u8>> = api.messages();
    assert_eq!(
        served,
        [
            b"served-1".to_vec(),
            b"served-2".to_vec(),
            b"served-3".to_vec()
        ],
        "connections to the answered address"
    );
}

/// A resolver that keeps one UDP socket connected to its server (here 198.18.0.2:53, so in the
/// kernel to the proxy) sends each query with send(), which names no address and runs no hook:
/// after SIGTERM of the `run` agent such sends still go to the dead proxy's port, where a
/// squatter able to bind it (see [`LivenessBed::new`]) reads them (docs/dns.md says so). What
/// the kernel guarantees is that its answers no longer appear to come from the server the
/// resolver asked, so a resolver that checks (glibc, musl) drops them.
#[test]
fn a_socket_connected_to_the_proxy_is_not_answered_by_a_squatter_after_its_agent_stops() {
    let Some(tb) = liveness_scenario().build() else {
        return;
    };
    let bed = LivenessBed::new(&tb, "connected");
    let (cg, sync, path) = (&bed.cgroup, &bed.sync, &bed.policy);
    let mut agent = RunAgent::start(tb.client(), path, cg, &[]);
    let port = agent.proxy_port();
    let stopped = stop_under_dns_load(
        &tb,
        cg,
        &mut agent,
        Signal::SIGTERM,
        Load::OneConnectedSocket,
        port,
        sync.path(),
    );
    let server: std::net::SocketAddr = "198.18.0.2:53".parse().unwrap();
    let samples = stopped.samples();
    let before: Vec<&DnsSample> = samples
        .iter()
        .filter(|s| s.at_ms + 500 < stopped.at_ms)
        .collect();
    assert!(
        !before.is_empty()
            && before
                .iter()
                .all(|s| s.ok && s.addrs == [ip("198.18.0.10")] && s.from == Some(server)),
        "DNS did not work before the signal (answers from the server asked)\n{}",
        stopped.describe()
    );
    // SIGTERM clears the liveness at once; 1 s covers the agent's exit.
    let believable: Vec<&DnsSample> = samples
        .iter()
        .filter(|s| s.at_ms > stopped.at_ms + 1000 && s.ok && s.from == Some(server))
        .collect();
    assert!(
        believable.is_empty(),
        "{} answers after the agent stopped still appear to come from {server}\n{}",
        believable.len(),
        stopped.describe()
    );
    assert!(
        samples
            .iter()
            .filter(|s| s.at_ms > stopped.at_ms + 1000 && s.addrs.contains(&ip(SQUATTER_ANSWER)))
            .all(|s| s.from == Some(format!("127.0.0.1:{port}").parse().unwrap())),
        "the squatter's answers show where they come from\n{}",
        stopped.describe()
    );
}
