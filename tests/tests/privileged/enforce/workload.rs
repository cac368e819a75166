//! The workload and its policy: large policies, the workload's identity, exit status and
//! environment, concurrent agents, blocked attempts in the log.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use egress_tests::cgroup::cgroup2_mount;
use egress_tests::policy::PolicyYaml;
use egress_tests::server::{SETTLE, assert_arrived, assert_nothing_arrived};
use egress_tests::{NOBODY_GID, NOBODY_UID};
use libc::EPERM;

use crate::{ip, sa, scenario, testbed};

/// (10) A policy with 100,000 entries loads and enforces: the real allowed listener works,
/// listed entries deep in the list work, a non-listed address is refused.
#[test]
fn policy_with_100k_entries_loads_and_enforces() {
    let Some(tb) = testbed() else { return };
    const V4_ENTRIES: u32 = 50_000;
    const V6_ENTRIES: u32 = 50_000;
    let mut policy = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);
    // 198.18.32.0 .. 198.18.227.79, one /32 each.
    let v4_entry = |i: u32| format!("198.18.{}.{}", 32 + i / 256, i % 256);
    for i in 0..V4_ENTRIES {
        policy = policy.allow_cidr(&format!("{}/32", v4_entry(i)), &[8080], &["tcp"]);
    }
    let v6_entry = |i: u32| format!("fd00:e9:ff::{i:x}");
    for i in 0..V6_ENTRIES {
        policy = policy.allow_cidr(&format!("{}/128", v6_entry(i)), &[8080], &["tcp"]);
    }
    let listed4 = v4_entry(43_015); // 198.18.200.7
    let listed6 = v6_entry(V6_ENTRIES - 1);
    for a in [
        listed4.as_str(),
        listed6.as_str(),
        "198.18.1.9",
        "fd00:e9:fe::1",
    ] {
        tb.topo.add_remote_addr(ip(a)).expect("address");
    }
    let real = tb.listen_tcp(sa("198.18.0.2:8080")).expect("listener");
    let deep4 = tb
        .listen_tcp(SocketAddr::new(ip(&listed4), 8080))
        .expect("listener");
    let deep6 = tb
        .listen_tcp(SocketAddr::new(ip(&listed6), 8080))
        .expect("listener");
    let unlisted4 = tb.listen_tcp(sa("198.18.1.9:8080")).expect("listener");
    let unlisted6 = tb.listen_tcp(sa("[fd00:e9:fe::1]:8080")).expect("listener");

    let send_deep4 = format!("send tcp4 {listed4} 8080 deep-v4");
    let send_deep6 = format!("send tcp6 {listed6} 8080 deep-v6");
    let out = tb
        .agent(&policy)
        .expect("agent")
        .args([
            "send tcp4 198.18.0.2 8080 real-allowed",
            send_deep4.as_str(),
            send_deep6.as_str(),
            "send tcp4 198.18.1.9 8080 unlisted-v4",
            "send tcp6 fd00:e9:fe::1 8080 unlisted-v6",
        ])
        .timeout(Duration::from_secs(300))
        .run_in(tb.client())
        .expect("agent run");
    eprintln!("100k-entry policy: agent run took {:?}", out.elapsed);
    out.assert_exit(0);
    out.assert_ok("send tcp4 198.18.0.2 8080 real-allowed");
    out.assert_ok(&send_deep4);
    out.assert_ok(&send_deep6);
    out.assert_errno("send tcp4 198.18.1.9 8080 unlisted-v4", EPERM);
    out.assert_errno("send tcp6 fd00:e9:fe::1 8080 unlisted-v6", EPERM);
    assert_arrived(&real, b"real-allowed", &out);
    assert_arrived(&deep4, b"deep-v4", &out);
    assert_arrived(&deep6, b"deep-v6", &out);
    assert_nothing_arrived(&[&unlisted4, &unlisted6], &out);
}

/// (11) The workload runs as uid/gid 65534 without capabilities, in a cgroup below the given
/// parent, and the agent exits with the workload's exit status.
#[test]
fn workload_runs_as_nobody_and_its_exit_status_is_propagated() {
    let Some(tb) = testbed() else { return };
    let policy = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);
    let out = tb
        .run_agent(&policy, &["whoami", "cgroup", "exit 7", "whoami"])
        .expect("agent run");
    out.assert_exit(7);
    let who = out.assert_ok("whoami");
    assert_eq!(
        (who.uid, who.euid, who.gid, who.egid),
        (
            Some(NOBODY_UID),
            Some(NOBODY_UID),
            Some(NOBODY_GID),
            Some(NOBODY_GID)
        ),
        "{}",
        out.describe()
    );
    assert!(
        who.groups
            .as_ref()
            .is_some_and(|g| g.iter().all(|&g| g == NOBODY_GID)),
        "supplementary groups {:?}\n{}",
        who.groups,
        out.describe()
    );
    assert_eq!(
        who.cap_eff.as_deref(),
        Some("0000000000000000"),
        "{}",
        out.describe()
    );
    let parent = tb
        .cgroups
        .path()
        .strip_prefix(cgroup2_mount().expect("cgroup2"))
        .expect("parent below the mount");
    let cgroup = out.assert_ok("cgroup").cgroup.clone().unwrap_or_default();
    assert!(
        cgroup.starts_with(&format!("/{}/", parent.display())),
        "workload cgroup {cgroup:?} is not below {}\n{}",
        parent.display(),
        out.describe()
    );
    assert_eq!(
        out.results.len(),
        3,
        "nothing may run after `exit`\n{}",
        out.describe()
    );

    let out = tb.run_agent(&policy, &["exit 0"]).expect("agent run");
    out.assert_exit(0);
    let out = tb.run_agent(&policy, &["exit 255"]).expect("agent run");
    out.assert_exit(255);
}

/// Two agents running at the same time, each with its own policy, do not see each other's
/// rules: each workload reaches only its own allowed port.
#[test]
fn concurrent_agents_enforce_their_own_policies() {
    let Some(tb) = scenario()
        .tcp("198.18.0.2:8080")
        .tcp("198.18.0.2:9090")
        .build()
    else {
        return;
    };
    let [a, b] = tb.listeners();
    let policy_a = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);
    let policy_b = PolicyYaml::new().allow_host("198.18.0.2", &[9090], &["tcp"]);
    // The sleeps make both workloads live while the other agent loads its policy.
    let ops_a = [
        "sleep 1500",
        "send tcp4 198.18.0.2 8080 from-a",
        "send tcp4 198.18.0.2 9090 a-to-b",
    ];
    let ops_b = [
        "sleep 1500",
        "send tcp4 198.18.0.2 9090 from-b",
        "send tcp4 198.18.0.2 8080 b-to-a",
    ];
    let run_a = tb.agent(&policy_a).expect("agent").args(ops_a);
    let run_b = tb.agent(&policy_b).expect("agent").args(ops_b);
    let (out_a, out_b) = std::thread::scope(|s| {
        let ha = s.spawn(|| run_a.run_in(tb.client()).expect("agent run a"));
        let hb = s.spawn(|| run_b.run_in(tb.client()).expect("agent run b"));
        (ha.join().expect("thread a"), hb.join().expect("thread b"))
    });
    out_a.assert_exit(0);
    out_b.assert_exit(0);
    out_a.assert_ok("send tcp4 198.18.0.2 8080 from-a");
    out_a.assert_errno("send tcp4 198.18.0.2 9090 a-to-b", EPERM);
    out_b.assert_ok("send tcp4 198.18.0.2 9090 from-b");
    out_b.assert_errno("send tcp4 198.18.0.2 8080 b-to-a", EPERM);
    assert_arrived(a, b"from-a", &out_a);
    assert_arrived(b, b"from-b", &out_b);
    std::thread::sleep(SETTLE);
    assert_eq!((a.connections(), b.connections()), (1, 1));
}

/// MCP-NET-02: blocked attempts appear in the logs (the agent logs to stderr), naming the
/// destination.
#[test]
fn blocked_attempts_are_logged_with_the_destination() {
    let Some(tb) = scenario().tcp("198.18.1.9:8443").build() else {
        return;
    };
    let policy = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);
    let out = tb
        .run_agent(&policy, &["connect tcp4 198.18.1.9 8443", "sleep 500"])
        .expect("agent run");
    out.assert_exit(0);
    out.assert_errno("connect tcp4 198.18.1.9 8443", EPERM);
    assert!(
        out.stderr.contains("198.18.1.9") && out.stderr.contains("8443"),
        "agent stderr does not mention the blocked destination 198.18.1.9:8443\n{}",
        out.describe()
    );
}

/// nobody's passwd entry: (home, shell).
fn nobody_entry() -> (String, String) {
    let out = std::process::Command::new("getent")
        .args(["passwd", "nobody"])
        .output()
        .expect("getent");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let f: Vec<&str> = line.split(':').collect();
    assert_eq!(f.len(), 7, "passwd entry {line:?}");
    (f[5].to_owned(), f[6].to_owned())
}

/// Under `--user`, the workload's environment names its own user, not the invoking root's,
/// keeps what the MCP client passed, and it starts in a directory it can use: its home, else
/// `/`, or `--cwd`; `--env-clear` and `--env` shape the rest.
#[test]
fn the_workload_gets_its_users_environment_and_a_usable_working_directory() {
    let Some(tb) = testbed() else { return };
    let (home, shell) = nobody_entry();
    let policy = PolicyYaml::new().allow_host("198.18.0.2", &[8080], &["tcp"]);
    let as_root_under_sudo = |run: egress_tests::agent::AgentRun| {
        run.agent_env("HOME", "/root")
            .agent_env("USER", "root")
            .agent_env("LOGNAME", "root")
            .agent_env("MAIL", "/var/mail/root")
            .agent_env("XDG_CONFIG_HOME", "/root/.config")
            .agent_env("GITHUB_TOKEN", "t0ken")
            .agent_env("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    };
    let out = as_root_under_sudo(tb.agent(&policy).unwrap())
        .arg("environ")
        .run_in(tb.client())
        .unwrap();
    out.assert_exit(0);
    let r = out.assert_ok("environ");
    let env = r.env.clone().unwrap_or_default();
    let get = |k: &str| env.get(k).map(String::as_str);
    assert_eq!(get("HOME"), Some(home.as_str()), "{env:#?}");
    assert_eq!(get("USER"), Some("nobody"));
    assert_eq!(get("LOGNAME"), Some("nobody"));
    assert_eq!(get("SHELL"), Some(shell.as_str()));
    assert_eq!(get("MAIL"), None);
    assert_eq!(get("XDG_CONFIG_HOME"), None);
    assert_eq!(get("GITHUB_TOKEN"), Some("t0ken"));
    assert_eq!(
        get("SSL_CERT_FILE"),
        Some("/etc/ssl/certs/ca-certificates.crt")
    );
    let expected_cwd = if Path::new(&home).is_dir() {
        home.as_str()
    } else {
        "/"
    };
    assert_eq!(r.cwd.as_deref(), Some(expected_cwd), "{}", out.describe());

    let out = tb
        .agent(&policy)
        .unwrap()
        .agent_arg("--cwd")
        .agent_arg("/tmp")
        .agent_arg("--env-clear")
        .agent_arg("--env")
        .agent_arg("GITHUB_TOKEN")
        .agent_arg("--env")
        .agent_arg("MODE=read-only")
        .agent_env("GITHUB_TOKEN", "t0ken")
        .agent_env("OTHER", "x")
        .arg("environ")
        .run_in(tb.client())
        .unwrap();
    out.assert_exit(0);
    let r = out.assert_ok("environ");
    assert_eq!(r.cwd.as_deref(), Some("/tmp"));
    let names: Vec<&str> = r
        .env
        .as_ref()
        .map(|e| e.keys().map(String::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        names,
        [
            "GITHUB_TOKEN",
            "HOME",
            "LOGNAME",
            "MODE",
            "PATH",
            "SHELL",
            "USER"
        ],
        "{}",
        out.describe()
    );

    // A --cwd the user cannot enter: the workload does not start, and the agent says why.
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        private.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let out = tb
        .agent(&policy)
        .unwrap()
        .agent_arg("--cwd")
        .agent_arg(private.path())
        .arg("environ")
        .run_in(tb.client())
        .unwrap();
    assert_ne!(out.exit_code(), Some(0), "{}", out.describe());
    assert!(out.results.is_empty(), "{}", out.describe());
    assert!(
        out.stderr.contains("working directory"),
        "{}",
        out.describe()
    );
}
