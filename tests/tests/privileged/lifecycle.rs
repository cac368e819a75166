//! Enforcement that survives its agent: `kill -9` and a restart change nothing the workload
//! observes, a policy reload under load never opens or closes what both policies agree on, a
//! broken policy file changes nothing, and only `detach` removes enforcement.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use egress_tests::metrics::http_get;
use egress_tests::netns::{Netns, REMOTE_V4};
use egress_tests::policy::PolicyYaml;
use egress_tests::probe::{ProbeResult, parse_output};
use egress_tests::run_agent::{self, RunAgent};
use egress_tests::server::{Listener, SETTLE};
use egress_tests::testbed::{Testbed, probe_in_cgroup_command};
use nix::sys::signal::Signal;

use crate::{allow_8443, testbed};

const ALLOWED: &str = "198.18.0.2";
const OTHER: &str = "198.18.0.3";
/// The policy file is looked at every second.
const WATCH: [&str; 2] = ["--watch-interval", "1"];

/// A `run` agent for `cgroup`, watching `policy`, with `extra` arguments; enforcing.
fn run_agent(tb: &Testbed, policy: &Path, cgroup: &Path, extra: &[&str]) -> RunAgent {
    RunAgent::start(tb.client(), policy, cgroup, &[&WATCH[..], extra].concat())
}

/// The probe as nobody inside `cgroup` (joined before exec) in `ns`, in the background.
fn workload(tb: &Testbed, cgroup: &Path, ns: &Netns, ops: &[String]) -> Child {
    let mut cmd = probe_in_cgroup_command(ns, cgroup, tb.probe.path(), ops).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd.spawn().unwrap()
}

fn finish(child: Child) -> Vec<ProbeResult> {
    let out = child.wait_with_output().unwrap();
    parse_output(&String::from_utf8_lossy(&out.stdout)).0
}

fn detach(ns: &Netns, cgroup: &Path) -> (i32, String) {
    run_agent::detach(ns, cgroup).unwrap()
}

fn pins_of(cgroup: &Path) -> PathBuf {
    let id = std::fs::metadata(cgroup).unwrap().ino();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let bpffs = info
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "bpf")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .expect("bpffs is mounted once an agent ran");
    bpffs.join(format!("egress/v{}/cg-{id}", egress_common::LAYOUT_VERSION))
}

fn setup(tb: &Testbed) -> (Listener, Listener) {
    tb.topo.add_remote_addr(OTHER.parse().unwrap()).unwrap();
    let allowed = tb
        .listen_tcp(format!("{ALLOWED}:8443").parse().unwrap())
        .unwrap();
    let other = tb
        .listen_tcp(format!("{OTHER}:8443").parse().unwrap())
        .unwrap();
    (allowed, other)
}

fn rounds(n: usize, extra: &[&str]) -> Vec<String> {
    let mut ops = Vec::new();
    for i in 0..n {
        ops.push(format!("send tcp4 {ALLOWED} 8443 a{i}"));
        ops.push(format!("connect tcp4 {OTHER} 8443"));
        for e in extra {
            ops.push((*e).to_owned());
        }
        ops.push("sleep 50".into());
    }
    ops
}

#[test]
fn kill_9_and_restart_change_nothing_the_workload_sees_and_only_detach_ends_enforcement() {
    let Some(tb) = testbed() else { return };
    let (allowed, other) = setup(&tb);
    let cg = tb.cgroups.child("life").unwrap();
    let policy = tb.write_policy_yaml(&allow_8443()).unwrap();

    let mut first = run_agent(&tb, &policy, &cg, &[]);
    for link in ["link_egress_connect4", "link_egress_skb_ingress"] {
        assert!(pins_of(&cg).join(link).exists(), "{link} is pinned");
    }

    const N: usize = 40;
    let load = workload(&tb, &cg, tb.client(), &rounds(N, &[]));
    std::thread::sleep(Duration::from_millis(400));
    let status = first.signal(Signal::SIGKILL);
    assert!(!status.success());
    std::thread::sleep(Duration::from_millis(500));
    let mut second = run_agent(&tb, &policy, &cg, &[]);
    assert!(
        second.log().contains("adopted pinned enforcement"),
        "{}",
        second.log()
    );
    let results = finish(load);

    assert_eq!(results.len(), 3 * N, "{results:?}");
    for r in &results {
        if r.op.starts_with("send") {
            assert!(
                r.ok,
                "an allowed connection failed across the restart: {r:?}"
            );
        } else if r.op.starts_with("connect") {
            assert_eq!(
                r.errno,
                Some(libc::EPERM),
                "a denied connection was not refused: {r:?}"
            );
        }
    }
    std::thread::sleep(SETTLE);
    assert_eq!(other.connections(), 0, "a denied destination was reached");
    assert_eq!(allowed.connections(), N);

    // SIGTERM stops the agent but not enforcement.
    assert!(second.signal(Signal::SIGTERM).success(), "{}", second.log());
    assert!(pins_of(&cg).exists());
    let after = finish(workload(
        &tb,
        &cg,
        tb.client(),
        &[format!("connect tcp4 {OTHER} 8443")],
    ));
    assert_eq!(
        after[0].errno,
        Some(libc::EPERM),
        "enforcement ended with the agent: {after:?}"
    );

    // detach removes it, and everything it pinned.
    let (code, text) = detach(tb.client(), &cg);
    assert_eq!(code, 0, "{text}");
    assert!(!pins_of(&cg).exists(), "pins left after detach");
    let free = finish(workload(
        &tb,
        &cg,
        tb.client(),
        &[format!("connect tcp4 {OTHER} 8443")],
    ));
    assert!(free[0].ok, "still enforced after detach: {free:?}");
    let (code, text) = detach(tb.client(), &cg);
    assert_eq!(code, 0, "detach twice: {text}");
    assert!(text.contains("no egress enforcement"), "{text}");
}

#[test]
fn reload_under_load_keeps_what_both_policies_agree_on_and_a_broken_file_changes_nothing() {
    let Some(tb) = testbed() else { return };
    let (allowed, other) = setup(&tb);
    tb.topo
        .add_remote_addr("198.18.0.4".parse().unwrap())
        .unwrap();
    let newly = tb.listen_tcp("198.18.0.4:8443".parse().unwrap()).unwrap();
    let cg = tb.cgroups.child("reload").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    let old = PolicyYaml::new()
        .allow_cidr("198.18.0.2/32", &[8443], &["tcp"])
        .deny_cidr("198.18.0.3/32");
    let new = PolicyYaml::new()
        .allow_cidr("198.18.0.2/32", &[8443], &["tcp"])
        .allow_cidr("198.18.0.4/32", &[8443], &["tcp"])
        .deny_cidr("198.18.0.3/32");
    std::fs::write(&path, old.render()).unwrap();
    let metrics: std::net::SocketAddr = "127.0.0.1:19465".parse().unwrap();
    let metrics_arg = metrics.to_string();
    let mut agent = run_agent(&tb, &path, &cg, &["--metrics-addr", &metrics_arg]);

    const N: usize = 60;
    let load = workload(
        &tb,
        &cg,
        tb.client(),
        &rounds(N, &["connect tcp4 198.18.0.4 8443"]),
    );
    std::thread::sleep(Duration::from_millis(600));
    // Replace the file (picked up by the watcher), then SIGHUP too.
    let tmp = dir.path().join("policy.yaml.new");
    std::fs::write(&tmp, new.render()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    agent.wait_for("\"policy reloaded\"");
    agent.send(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(600));
    // A broken file: refused, and the loaded policy stays.
    std::fs::write(&path, "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - cidr: 198.18.0.4/33\n").unwrap();
    agent.wait_for("policy reload refused");
    let results = finish(load);

    let mut newly_ok = Vec::new();
    for r in &results {
        if r.op.starts_with("send") {
            assert!(r.ok, "allowed in both, refused during a reload: {r:?}");
        } else if r.op.starts_with(&format!("connect tcp4 {OTHER}")) {
            assert_eq!(
                r.errno,
                Some(libc::EPERM),
                "denied in both, let through during a reload: {r:?}"
            );
        } else if r.op.starts_with("connect tcp4 198.18.0.4") {
            newly_ok.push(r.ok);
        }
    }
    // Refused under the old policy, allowed once the new one is in force, and never back.
    let first_ok = newly_ok.iter().position(|ok| *ok).unwrap_or_else(|| {
        panic!(
            "the new rule never took effect: {results:?}\n{}",
            agent.log()
        )
    });
    assert!(first_ok > 0, "allowed before the reload");
    assert!(
        newly_ok[first_ok..].iter().all(|ok| *ok),
        "flapped after the reload: {newly_ok:?}"
    );
    std::thread::sleep(SETTLE);
    assert_eq!(other.connections(), 0);
    assert_eq!(allowed.connections(), N);
    assert_eq!(
        newly.connections(),
        newly_ok.iter().filter(|ok| **ok).count()
    );

    let log = agent.log();
    assert!(
        log.contains("198.18.0.4/33"),
        "the error names the bad value: {log}"
    );
    // ... and is counted: one start, two good reloads (file change, SIGHUP), one refusal.
    let exposition = http_get(&tb.client().handle(), metrics, "/metrics").unwrap();
    assert!(
        exposition.contains("egress_policy_loads_total{result=\"failure\"} 1"),
        "{exposition}"
    );
    assert!(
        exposition.contains("egress_policy_loads_total{result=\"success\"} 3"),
        "{exposition}"
    );
    // The broken file left the new policy in force.
    let still = finish(workload(
        &tb,
        &cg,
        tb.client(),
        &["connect tcp4 198.18.0.4 8443".to_owned()],
    ));
    assert!(still[0].ok, "{still:?}");
    assert!(agent.signal(Signal::SIGTERM).success());
    let (code, text) = detach(tb.client(), &cg);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn state_of_another_layout_version_is_refused_not_ignored() {
    let Some(tb) = testbed() else { return };
    let cg = tb.cgroups.child("layout").unwrap();
    let policy = tb.write_policy_yaml(&allow_8443()).unwrap();
    // An agent run first makes sure bpffs is mounted and shows where pins go.
    let mut agent = run_agent(&tb, &policy, &cg, &[]);
    assert!(agent.signal(Signal::SIGTERM).success());
    assert_eq!(detach(tb.client(), &cg).0, 0);
    let ours = pins_of(&cg);
    let foreign = ours
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("v999")
        .join(ours.file_name().unwrap());
    std::fs::create_dir_all(&foreign).unwrap();
    let mut agent = RunAgent::spawn(tb.client(), &policy, &cg, &WATCH).unwrap();
    // An agent that ran beside foreign state would not stop.
    let status = agent.wait_exit(Duration::from_secs(15));
    std::fs::remove_dir(&foreign).unwrap();
    let _ = std::fs::remove_dir(foreign.parent().unwrap());
    assert!(!status.success());
    assert!(
        agent.log().contains("another layout version"),
        "{}",
        agent.log()
    );
    assert!(!ours.exists(), "nothing may be pinned when refusing");
    let _: std::net::Ipv4Addr = REMOTE_V4;
}

#[test]
fn a_resolved_address_expires_in_the_kernel_with_no_agent_running() {
    let Some(tb) = testbed() else { return };
    let remote: std::net::IpAddr = REMOTE_V4.into();
    let api = tb
        .listen_tcp(std::net::SocketAddr::new(remote, 8443))
        .unwrap();
    let dns =
        egress_tests::dnsmasq::Dnsmasq::start(tb.remote(), remote, &[("api.company.test", remote)])
            .unwrap();
    let cg = tb.cgroups.child("expiry").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("resolv.conf");
    std::fs::write(&conf, format!("nameserver {remote}\n")).unwrap();
    let policy = tb
        .write_policy(
            &PolicyYaml::new()
                .allow_host("api.company.test", &[8443], &["tcp"])
                .render(),
        )
        .unwrap();
    let conf_arg = conf.to_str().unwrap();
    // TTL clamped to 2 s, plus 1 s of grace: the address lapses 3-4 s after it was resolved.
    let mut agent = run_agent(
        &tb,
        &policy,
        &cg,
        &[
            "--resolv-conf",
            conf_arg,
            "--dns-min-ttl",
            "2",
            "--dns-max-ttl",
            "2",
            "--dns-expiry-grace",
            "1",
        ],
    );
    assert!(agent.signal(Signal::SIGTERM).success());
    drop(dns);
    let results = finish(workload(
        &tb,
        &cg,
        tb.client(),
        &[
            "send tcp4 198.18.0.2 8443 fresh".to_owned(),
            "sleep 5500".to_owned(),
            "connect tcp4 198.18.0.2 8443".to_owned(),
        ],
    ));
    assert!(
        results[0].ok,
        "the address works while its answer is fresh: {results:?}"
    );
    assert_eq!(
        results[2].errno,
        Some(libc::EPERM),
        "the address outlived its deadline: {results:?}"
    );
    std::thread::sleep(SETTLE);
    assert_eq!(api.connections(), 1);
    assert_eq!(detach(tb.client(), &cg).0, 0);
}

#[test]
fn a_killed_exec_agent_takes_its_workload_along_and_the_next_exec_cleans_up() {
    let Some(tb) = testbed() else { return };
    let policy = allow_8443();
    let run = tb.agent(&policy).unwrap().args(["whoami", "sleep 20000"]);
    let mut cmd = run.command();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    tb.client().run_in(&mut cmd);
    let mut first = cmd.spawn().unwrap();
    // The workload's cgroup appears under the test parent once the agent has set it up.
    let deadline = Instant::now() + Duration::from_secs(15);
    let workload_cg = loop {
        let found = tb.cgroups.descendants().into_iter().find(|c| {
            std::fs::read_to_string(c.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
        });
        if let Some(c) = found {
            break c;
        }
        assert!(Instant::now() < deadline, "the workload never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    let pins = pins_of(&workload_cg);
    let workload_pids = std::fs::read_to_string(workload_cg.join("cgroup.procs")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    first.wait().unwrap();
    // The workload dies with its agent (parent-death signal); its enforcement stays pinned.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(workload_cg.join("cgroup.procs"))
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "workload {workload_pids} outlived its agent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(pins.exists(), "pins were removed by a killed agent?");

    // The next exec finds the dead agent's instance and removes it.
    let out = tb.run_agent(&policy, &["whoami"]).unwrap();
    assert_eq!(out.exit_code(), Some(0), "{}", out.describe());
    // (Any exec may do the clean-up; what matters is that it is done.)
    assert!(!pins.exists(), "the dead agent's pins are still there");
    assert!(
        !workload_cg.exists(),
        "the dead agent's cgroup is still there"
    );
}

#[test]
fn a_reload_that_fails_half_way_leaves_nothing_that_a_later_policy_could_inherit() {
    let Some(tb) = testbed() else { return };
    let listener = tb
        .listen_tcp(format!("{ALLOWED}:9999").parse().unwrap())
        .unwrap();
    let cg = tb.cgroups.child("halfway").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, allow_8443().render()).unwrap();
    let mut agent = run_agent(&tb, &path, &cg, &[]);

    // Every port on five addresses: 327,675 port entries, more than the port map holds.
    // Writing it would fail part-way through; the capacity check refuses it before anything
    // is written, naming the map.
    let all: Vec<u16> = (1..=u16::MAX).collect();
    let mut huge = PolicyYaml::new();
    for last in 2..7 {
        huge = huge.allow_cidr(&format!("198.18.0.{last}/32"), &all, &["tcp"]);
    }
    let tmp = dir.path().join("policy.yaml.new");
    std::fs::write(&tmp, huge.render()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    agent.wait_for("policy reload refused");
    assert!(
        agent
            .log()
            .contains("327675 port-set entries needed, at most 131072 allowed (MAX_PORTS"),
        "{}",
        agent.log()
    );

    // A good policy whose three ports live in the port map, like the failed one's did.
    let good = PolicyYaml::new().allow_cidr("198.18.0.2/32", &[8443, 8444, 8445], &["tcp"]);
    std::fs::write(&tmp, good.render()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    agent.wait_for("\"policy reloaded\"");
    let r = finish(workload(
        &tb,
        &cg,
        tb.client(),
        &[format!("connect tcp4 {ALLOWED} 9999")],
    ));
    assert_eq!(
        r[0].errno,
        Some(libc::EPERM),
        "a port of the failed policy came into force: {r:?}\n{}",
        agent.log()
    );
    std::thread::sleep(SETTLE);
    assert_eq!(listener.connections(), 0);
    assert!(agent.signal(Signal::SIGTERM).success());
    assert_eq!(detach(tb.client(), &cg).0, 0);
}

/// A reload that fails half-way through writing the maps: the capacity check passes (it
/// cannot count the addresses host names resolve to), the address map was made small with
/// `--max-entries addresses=16`, and the new policy's host name resolves to 20 addresses, so
/// the write fails after the new policy's port entries are in. The policy in force stays, and
/// a later policy (with its ports in the port map, like the failed one's) inherits nothing.
#[test]
fn a_reload_that_overfills_a_map_fails_half_way_and_a_later_policy_inherits_nothing() {
    let Some(tb) = testbed() else { return };
    let listener = tb
        .listen_tcp(format!("{ALLOWED}:9999").parse().unwrap())
        .unwrap();
    let dns = (1..=20)
        .fold(
            egress_tests::dnsmasq::Dnsmasq::config().listen(ALLOWED.parse().unwrap()),
            |c, i| {
                c.host(
                    "many.halfway.test",
                    format!("198.18.9.{i}").parse().unwrap(),
                )
            },
        )
        .start(tb.remote())
        .unwrap();
    let cg = tb.cgroups.child("halfway-dns").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    let first = PolicyYaml::new().allowed_resolvers(&[ALLOWED]).allow_cidr(
        "198.18.0.2/32",
        &[8443],
        &["tcp"],
    );
    std::fs::write(&path, first.render()).unwrap();
    let mut agent = run_agent(&tb, &path, &cg, &["--max-entries", "addresses=16"]);

    let failing = PolicyYaml::new()
        .allowed_resolvers(&[ALLOWED])
        .allow_cidr("198.18.0.2/32", &[9999, 9998, 9997], &["tcp"])
        .allow_host("many.halfway.test", &[443], &["tcp"]);
    let tmp = dir.path().join("policy.yaml.new");
    std::fs::write(&tmp, failing.render()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    agent.wait_for("applying the reloaded policy failed");
    assert!(agent.log().contains("EGRESS_EXACT"), "{}", agent.log());
    assert!(
        !dns.queries_for("many.halfway.test").is_empty(),
        "the name was never resolved: {}",
        agent.log()
    );
    let r = finish(workload(
        &tb,
        &cg,
        tb.client(),
        &[
            format!("connect tcp4 {ALLOWED} 9999"),
            format!("connect tcp4 {ALLOWED} 8443"),
        ],
    ));
    assert_eq!(
        (r[0].errno, r[1].errno == Some(libc::EPERM)),
        (Some(libc::EPERM), false),
        "after the failed reload the first policy must still be in force: {r:?}\n{}",
        agent.log()
    );

    let good = PolicyYaml::new().allowed_resolvers(&[ALLOWED]).allow_cidr(
        "198.18.0.2/32",
        &[8443, 8444, 8445],
        &["tcp"],
    );
    std::fs::write(&tmp, good.render()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    agent.wait_for("\"policy reloaded\"");
    let r = finish(workload(
        &tb,
        &cg,
        tb.client(),
        &[format!("connect tcp4 {ALLOWED} 9999")],
    ));
    assert_eq!(
        r[0].errno,
        Some(libc::EPERM),
        "a port of the failed policy came into force: {r:?}\n{}",
        agent.log()
    );
    std::thread::sleep(SETTLE);
    assert_eq!(listener.connections(), 0);
    assert!(agent.signal(nix::sys::signal::Signal::SIGTERM).success());
    assert_eq!(detach(tb.client(), &cg).0, 0);
}
