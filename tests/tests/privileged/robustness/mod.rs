//! Operator robustness on the real kernel: a policy reload, however hostile the file, never
//! stalls the workload's DNS or its connects.

mod metrics;

use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use egress_tests::agent::agent_bin;
use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::policy::PolicyYaml;
use egress_tests::probe::{errno_name, rcode};
use egress_tests::run_agent::{RunAgent, detach};
use egress_tests::scenario::UPSTREAM;
use egress_tests::server::SETTLE;
use nix::sys::signal::Signal;

use crate::{allow_8443, testbed};

/// Replaces the policy file by rename (so the watcher sees a new file) with `write`'s result.
fn replace(path: &Path, write: impl FnOnce(&Path)) {
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    write(&tmp);
    std::fs::rename(&tmp, path).unwrap();
}

/// Valid YAML of about `bytes` bytes whose last entry is invalid: every pass of the parser
/// runs over the whole file before it is refused.
fn large_but_refused(bytes: usize) -> String {
    let mut text =
        String::from("egress_policy:\n  default_action: DENY\n  allowed_destinations:\n");
    let mut i = 0u32;
    while text.len() < bytes {
        let [_, a, b, c] = i.to_be_bytes();
        text.push_str(&format!(
            "    - cidr: 10.{a}.{b}.{c}/32\n      ports: [443]\n      protocols: [tcp]\n"
        ));
        i += 1;
    }
    text.push_str("    - cidr: 10.0.0.0/33\n      ports: [443]\n      protocols: [tcp]\n");
    text
}

/// While hostile files are reloaded (by the watcher and by SIGHUP), the workload's lookups
/// and connects all keep working: the file is screened and parsed off the thread that serves
/// the DNS proxy, and each one is refused with an error naming the cap it broke.
#[test]
fn hostile_policy_reloads_never_stall_the_workloads_dns_or_connects() {
    let Some(tb) = testbed() else { return };
    let upstream: IpAddr = UPSTREAM.parse().unwrap();
    let _dns = Dnsmasq::config()
        .record("api.example.test", upstream)
        .listen(upstream)
        .start(tb.remote())
        .expect("dnsmasq");
    let listener = tb.listen_tcp("198.18.0.2:8443".parse().unwrap()).unwrap();
    let cg = tb.cgroups.child("hostile-reload").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    let policy = PolicyYaml::new().allowed_resolvers(&[UPSTREAM]).allow_host(
        "api.example.test",
        &[8443],
        &["tcp"],
    );
    std::fs::write(&path, policy.render()).unwrap();
    let mut agent = RunAgent::start(tb.client(), &path, &cg, &["--watch-interval", "1"]);

    const LOOP_MS: u64 = 9000;
    const CONNECTS: usize = 80;
    let lookups = vec![format!(
        "dnsloop udp4 {UPSTREAM} api.example.test 50 {LOOP_MS}"
    )];
    let mut connects = Vec::new();
    for i in 0..CONNECTS {
        connects.push(format!("send tcp4 198.18.0.2 8443 c{i}"));
        connects.push("sleep 100".to_owned());
    }
    let (dns_out, conn_out) = std::thread::scope(|s| {
        let d = s.spawn(|| tb.run_in_cgroup(&cg, &lookups));
        let c = s.spawn(|| tb.run_in_cgroup(&cg, &connects));
        std::thread::sleep(Duration::from_millis(500));
        let mut refusals = 0;
        // Deeply nested: quadratic in the YAML parser without the depth cap.
        replace(&path, |p| {
            let text = format!(
                "egress_policy: {}{}\n",
                "[".repeat(100_000),
                "]".repeat(100_000)
            );
            std::fs::write(p, text).unwrap();
        });
        refusals += 1;
        agent.wait_for_lines("policy reload refused", refusals);
        agent.send(Signal::SIGHUP);
        refusals += 1;
        agent.wait_for_lines("policy reload refused", refusals);
        // A FIFO with no writer.
        replace(&path, |p| {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        });
        refusals += 1;
        agent.wait_for_lines("policy reload refused", refusals);
        // An endless device.
        replace(&path, |p| {
            std::os::unix::fs::symlink("/dev/zero", p).unwrap()
        });
        refusals += 1;
        agent.wait_for_lines("policy reload refused", refusals);
        // A large file (8 MiB, half the size cap), parsed in full before it is refused.
        replace(&path, |p| {
            std::fs::write(p, large_but_refused(8 * 1024 * 1024 - 4096)).unwrap();
        });
        refusals += 1;
        agent.wait_for_lines("policy reload refused", refusals);
        agent.send(Signal::SIGHUP);
        refusals += 1;
        agent.wait_for_lines("policy reload refused", refusals);
        (d.join().unwrap(), c.join().unwrap())
    });

    let samples = dns_out
        .results
        .first()
        .and_then(|r| r.samples.clone())
        .unwrap_or_else(|| panic!("no dnsloop samples\n{}", dns_out.describe()));
    assert!(samples.len() > 50, "{}", dns_out.describe());
    let bad: Vec<String> = samples
        .iter()
        .filter(|s| !(s.ok && s.rcode == Some(rcode::NOERROR) && s.addrs == [upstream]))
        .map(|s| {
            format!(
                "at {} ms: ok {} rcode {:?} addrs {:?} errno {:?}",
                s.at_ms,
                s.ok,
                s.rcode,
                s.addrs,
                s.errno.map(errno_name)
            )
        })
        .collect();
    assert!(
        bad.is_empty(),
        "lookups failed during the reloads:\n{}\n{}",
        bad.join("\n"),
        agent.log()
    );
    let sends: Vec<_> = conn_out
        .results
        .iter()
        .filter(|r| r.op.starts_with("send"))
        .collect();
    assert_eq!(sends.len(), CONNECTS, "{}", conn_out.describe());
    assert!(
        sends.iter().all(|r| r.ok),
        "connects failed during the reloads:\n{}",
        conn_out.describe()
    );
    std::thread::sleep(SETTLE);
    assert_eq!(listener.connections(), CONNECTS);

    let log = agent.log();
    for why in [
        "nest deeper than 32 levels",
        "it is a FIFO, not a regular file",
        "it is a character device, not a regular file",
        "allowed_destinations",
    ] {
        assert!(log.contains(why), "no refusal saying {why:?}:\n{log}");
    }
    agent.signal(Signal::SIGTERM);
    let (code, text) = detach(tb.client(), &cg).unwrap();
    assert_eq!(code, 0, "{text}");
}

/// Like a shell: a workload command that does not exist exits 127, one that cannot be
/// executed 126, and the error names the command and the OS reason once.
#[test]
fn a_missing_command_exits_127_and_one_that_cannot_run_126() {
    let Some(tb) = testbed() else { return };
    let policy = tb.write_policy_yaml(&allow_8443()).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("egress-cmd")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let plain = dir.path().join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&plain, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let missing = dir.path().join("missing");
    for (program, code, reason) in [
        (&missing, 127, "No such file or directory"),
        (&plain, 126, "Permission denied"),
    ] {
        let out = egress_tests::agent::AgentRun::new(&policy, &tb.cgroups, program)
            .unwrap()
            .run_in(tb.client())
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{}", out.describe());
        // As the JSON log line spells it, quotes escaped.
        let needle = format!(
            "cannot run the workload command \\\"{}\\\": {reason}\"",
            program.display()
        );
        assert!(out.stderr.contains(&needle), "{needle}\n{}", out.describe());
        assert_eq!(
            out.stderr.matches(reason).count(),
            1,
            "the reason is said once\n{}",
            out.describe()
        );
    }
}

/// Without root, `exec` and `run` say that root (or which capabilities) is needed, before
/// they try anything; `check` needs no privilege.
#[test]
fn without_root_exec_and_run_say_what_is_needed() {
    use std::os::unix::process::CommandExt as _;
    let Some(tb) = testbed() else { return };
    let policy = tb.write_policy_yaml(&allow_8443()).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut cmd = Command::new(agent_bin().unwrap());
        cmd.args(args)
            .current_dir("/")
            .uid(egress_tests::NOBODY_UID)
            .gid(egress_tests::NOBODY_GID)
            .stdin(Stdio::null());
        cmd.output().unwrap()
    };
    let p = policy.to_str().unwrap();
    let out = as_nobody(&["check", p]);
    assert!(out.status.success(), "{out:?}");
    for args in [
        vec!["exec", "--policy", p, "--", "/bin/true"],
        vec!["run", "--policy", p, "--cgroup", "/sys/fs/cgroup"],
    ] {
        let out = as_nobody(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "`egress-agent {}` must run as root (or with the capabilities CAP_BPF, \
                 CAP_NET_ADMIN, CAP_SYS_ADMIN)",
                args[0]
            )),
            "{args:?}: {stderr}"
        );
    }
}

/// `exec` forwards SIGTERM; a workload that ignores it is killed with its whole cgroup once
/// `--stop-timeout` has passed, and the agent exits 137 within that bound. A workload that
/// does stop exits on the signal (143) without waiting for the timeout.
#[test]
fn a_workload_that_ignores_sigterm_is_killed_after_the_stop_timeout() {
    let Some(tb) = testbed() else { return };
    let policy = allow_8443();
    let sync = tb.sync_dir().unwrap();
    for (ignores, code, within) in [
        (true, 137, Duration::from_secs(2)..Duration::from_secs(6)),
        (false, 143, Duration::ZERO..Duration::from_secs(2)),
    ] {
        let ready = sync.path().join(format!("ready-{ignores}"));
        let mut ops = Vec::new();
        if ignores {
            ops.push("ignore-sigterm".to_owned());
        }
        ops.push(format!("touch {}", ready.display()));
        ops.push("sleep 60000".to_owned());
        let run = tb
            .agent(&policy)
            .unwrap()
            .json_log()
            .agent_arg("--stop-timeout")
            .agent_arg("2")
            .args(&ops);
        let mut cmd = run.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        tb.client().run_in(&mut cmd);
        let mut agent = cmd.spawn().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let reader = {
            let (log, stderr) = (std::sync::Arc::clone(&log), agent.stderr.take().unwrap());
            std::thread::spawn(move || {
                for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
                    let Ok(line) = line else { break };
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };
        // The workload is up, and so is the agent's supervision of it (it handles SIGTERM from
        // the moment it logs that the workload started).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(ready.exists() && log.lock().unwrap().contains("workload started")) {
            assert!(Instant::now() < deadline, "the workload did not start");
            assert!(
                agent.try_wait().unwrap().is_none(),
                "the agent exited early"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let signalled = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(agent.id()).unwrap()),
            Signal::SIGTERM,
        )
        .unwrap();
        let status = loop {
            if let Some(status) = agent.try_wait().unwrap() {
                break status;
            }
            if signalled.elapsed() > Duration::from_secs(20) {
                let _ = agent.kill();
                panic!("the agent did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = signalled.elapsed();
        reader.join().unwrap();
        let stderr = log.lock().unwrap().clone();
        assert_eq!(status.code(), Some(code), "{stderr}");
        assert!(within.contains(&took), "exited after {took:?}\n{stderr}");
        assert_eq!(
            stderr.contains("did not exit within --stop-timeout"),
            ignores,
            "{stderr}"
        );
    }
}

/// A blocked attempt's line says when the kernel judged it (`attempt_time`, at or before the
/// line's own `timestamp`) and names the protected cgroup's path.
#[test]
fn blocked_events_carry_the_attempt_time_and_the_cgroup_path() {
    let Some(tb) = testbed() else { return };
    let policy = allow_8443();
    let before = now_rfc3339();
    let out = tb
        .agent(&policy)
        .unwrap()
        .json_log()
        .args(["connect tcp4 198.18.0.9 8443"])
        .run_in(tb.client())
        .unwrap();
    out.assert_exit(0);
    let line = out
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "egress_blocked" && v["dst.ip"] == "198.18.0.9")
        .unwrap_or_else(|| panic!("no blocked event\n{}", out.describe()));
    let at = line["attempt_time"].as_str().unwrap_or_default();
    let logged = line["timestamp"].as_str().unwrap_or_default();
    assert_eq!(at.len(), "2026-01-01T00:00:00.000000Z".len(), "{line}");
    assert!(
        before.as_str() <= at && at <= logged,
        "{before} <= {at} <= {logged}\n{line}"
    );
    let cgroup = line["cgroup.path"].as_str().unwrap_or_default();
    let parent = tb.cgroups.path().display().to_string();
    assert!(
        cgroup.starts_with(&format!("{parent}/exec-")),
        "{cgroup} is not an exec cgroup under {parent}\n{line}"
    );
}

/// Now in the log's own format.
fn now_rfc3339() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%6NZ"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Text logs to a pipe or file carry no colour codes.
#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let out = Command::new(agent_bin().unwrap())
        .args([
            "--log-format",
            "text",
            "exec",
            "--policy",
            "/nonexistent/egress.yaml",
            "--",
            "/bin/true",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("cannot read the policy file: No such file or directory"),
        "{stderr}"
    );
    assert!(!stderr.contains('\u{1b}'), "colour codes in {stderr:?}");
}

/// What `check`'s loopback warning advises works: with `allow_loopback: false`, an entry for
/// 127.0.0.1 on one port allows that local port (here nothing listens: ECONNREFUSED from the
/// kernel's TCP, not EPERM from the policy) and no other.
#[test]
fn loopback_can_be_limited_to_the_ports_an_entry_allows() {
    let Some(tb) = testbed() else { return };
    let policy =
        PolicyYaml::new()
            .allow_loopback(false)
            .allow_cidr("127.0.0.1/32", &[5432], &["tcp"]);
    let out = tb
        .agent(&policy)
        .unwrap()
        .json_log()
        .args(["connect tcp4 127.0.0.1 5432", "connect tcp4 127.0.0.1 8080"])
        .run_in(tb.client())
        .unwrap();
    out.assert_exit(0);
    out.assert_errno("connect tcp4 127.0.0.1 5432", libc::ECONNREFUSED);
    out.assert_errno("connect tcp4 127.0.0.1 8080", libc::EPERM);
}

/// `check` passes a legal but suspicious policy (exit 0, the summary on stdout) and prints
/// its warnings on stderr.
#[test]
fn check_warns_on_stderr_and_still_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.yaml");
    std::fs::write(
        &path,
        PolicyYaml::new()
            .allow_cidr("0.0.0.0/0", &[443], &["tcp"])
            .render(),
    )
    .unwrap();
    let out = Command::new(agent_bin().unwrap())
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains(": OK\n") && !stdout.contains("warning"),
        "{stdout}"
    );
    let prefix = format!(
        "{}: warning: egress_policy.allowed_destinations[0]: `0.0.0.0/0` allows every IPv4 address",
        path.display()
    );
    assert!(stderr.lines().any(|l| l.starts_with(&prefix)), "{stderr}");
}
