//! Metrics for many servers on one host: each `exec` agent serves its own Unix socket and
//! writes its own textfile.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use egress_tests::policy::PolicyYaml;

use crate::testbed;

/// GET `path` over the Unix socket at `sock`, optionally asking for OpenMetrics.
fn unix_get(sock: &Path, path: &str, openmetrics: bool) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let accept = if openmetrics {
        "Accept: application/openmetrics-text;version=1.0.0\r\n"
    } else {
        ""
    };
    write!(s, "GET {path} HTTP/1.1\r\nHost: egress\r\n{accept}\r\n").unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply
}

/// `promtool check metrics` on `text`: its exit status and what it said.
fn promtool(text: &str) -> (bool, String) {
    use std::io::Write as _;
    let bin =
        egress_tests::agent::workspace_root().join("target/tools/prometheus/usr/bin/promtool");
    assert!(
        bin.exists(),
        "{} missing: run scripts/bootstrap.sh",
        bin.display()
    );
    let mut child = Command::new(bin)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Two `exec` agents with the same metrics options run side by side: each serves its own Unix
/// socket and writes its own textfile (`{pid}`), with `/healthz`, every metric family and
/// its series present from the start (DNS ones included, before any query), in output that
/// passes `promtool check metrics`; both are removed when the agents stop.
#[test]
fn many_exec_agents_each_have_their_own_metrics_socket_and_textfile() {
    let Some(tb) = testbed() else { return };
    let sync = tb.sync_dir().unwrap();
    let out_dir = tempfile::Builder::new()
        .prefix("egress-metrics")
        .tempdir()
        .unwrap();
    let sock = out_dir.path().join("metrics-{pid}.sock");
    let file = out_dir.path().join("egress-{pid}.prom");
    let agents: Vec<Child> = (0..2)
        .map(|i| {
            let policy = PolicyYaml::new().name(&format!("server-{i}")).allow_cidr(
                "198.18.0.2/32",
                &[8443],
                &["tcp"],
            );
            let ready = sync.path().join(format!("ready-{i}"));
            let run = tb
                .agent(&policy)
                .unwrap()
                .json_log()
                .agent_arg("--metrics-addr")
                .agent_arg(format!("unix:{}", sock.display()))
                .agent_arg("--metrics-textfile")
                .agent_arg(&file)
                .agent_arg("--metrics-textfile-interval")
                .agent_arg("1")
                .args([
                    format!("touch {}", ready.display()),
                    "sleep 4000".to_owned(),
                ]);
            let mut cmd = run.command();
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            tb.client().run_in(&mut cmd);
            cmd.spawn().unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(0..2).all(|i| sync.path().join(format!("ready-{i}")).exists()) {
        assert!(Instant::now() < deadline, "the workloads did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, agent) in agents.iter().enumerate() {
        let pid = agent.id().to_string();
        let sock = PathBuf::from(sock.to_str().unwrap().replace("{pid}", &pid));
        let file = PathBuf::from(file.to_str().unwrap().replace("{pid}", &pid));
        let health = unix_get(&sock, "/healthz", false);
        assert!(
            health.starts_with("HTTP/1.1 200 OK\r\n") && health.ends_with("\r\n\r\nok\n"),
            "{health}"
        );
        let reply = unix_get(&sock, "/metrics", false);
        let (head, body) = reply.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        let textfile = std::fs::read_to_string(&file).unwrap();
        for text in [body, textfile.as_str()] {
            let (ok, said) = promtool(text);
            assert!(ok, "promtool check metrics failed: {said}\n{text}");
            for series in [
                format!("egress_dns_queries_total{{policy=\"server-{i}\",result=\"allowed\"}} 0"),
                format!(
                    "egress_dns_queries_total{{policy=\"server-{i}\",result=\"upstream_failure\"}} 0"
                ),
                format!("egress_dns_rebinding_blocked_total{{policy=\"server-{i}\"}} 0"),
                format!("egress_dns_learned_addresses{{policy=\"server-{i}\"}} 0"),
                "egress_policy_loads_total{result=\"failure\"} 0".to_owned(),
                "egress_policy_loads_total{result=\"success\"} 1".to_owned(),
                "# TYPE egress_connections_total counter".to_owned(),
                "# TYPE egress_build_info gauge".to_owned(),
            ] {
                assert!(text.contains(&series), "missing {series}:\n{text}");
            }
        }
        // Prometheus asks for OpenMetrics, and gets it.
        let om = unix_get(&sock, "/metrics", true);
        assert!(
            om.contains("application/openmetrics-text") && om.ends_with("# EOF\n"),
            "{om}"
        );
    }
    for mut agent in agents {
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = agent.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "agent did not finish");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{status}");
    }
    let left: Vec<_> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
