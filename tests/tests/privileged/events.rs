//! Every blocked attempt is reported: one event and one JSON log line with who, what and
//! why; floods are collapsed in the log while the counters stay exact; Prometheus scrapes the
//! counts.

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use egress_tests::agent::workspace_root;
use egress_tests::log::{events, verdict_counts};
use egress_tests::metrics::http_get;
use egress_tests::netns::Netns;
use egress_tests::policy::PolicyYaml;
use serde_json::Value;

use crate::testbed;

#[test]
fn each_blocked_seed_case_is_one_event_with_who_what_and_why() {
    let Some(tb) = testbed() else { return };
    let policy = PolicyYaml::new()
        .allow_cidr("198.18.0.2/32", &[443], &["https"])
        .deny_cidr("198.18.1.0/24");
    let cases: [(&str, &str, u16, &str, &str); 6] = [
        (
            "connect tcp4 198.18.0.66 443",
            "198.18.0.66",
            443,
            "no_matching_rule",
            "connect4",
        ),
        (
            "send tcp4 198.18.0.67 443 secret",
            "198.18.0.67",
            443,
            "no_matching_rule",
            "connect4",
        ),
        (
            "connect tcp4 198.18.0.2 80",
            "198.18.0.2",
            80,
            "port_not_allowed",
            "connect4",
        ),
        // A resolver on another port than 53 (queries to port 53 go to the agent's DNS proxy
        // instead: the `dns` module).
        (
            "sendto udp4 198.18.0.99 5353 query",
            "198.18.0.99",
            5353,
            "no_matching_rule",
            "sendmsg4",
        ),
        (
            "connect tcp4 198.18.1.5 443",
            "198.18.1.5",
            443,
            "denied_by_rule",
            "connect4",
        ),
        (
            "connect tcp6 fd00:e9::66 443",
            "fd00:e9::66",
            443,
            "no_matching_rule",
            "connect6",
        ),
    ];
    let mut ops = vec!["whoami", "socket udplite4"];
    ops.extend(cases.iter().map(|c| c.0));
    // Alive while the agent reads its events, so its command line can be read too.
    ops.push("sleep 300");
    let out = tb.run_agent(&policy, &ops).unwrap();
    assert_eq!(out.exit_code(), Some(0), "{}", out.describe());
    let pid = out
        .result("whoami")
        .and_then(|r| r.pid)
        .expect("whoami pid");
    let blocked = events(&out.stderr, "egress_blocked");
    for (op, ip, port, reason, hook) in cases {
        out.assert_errno(op, libc::EPERM);
        let matching: Vec<&Value> = blocked
            .iter()
            .filter(|e| e["dst.ip"] == ip && e["dst.port"] == port && e["hook"] == hook)
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "{op}: expected one event, got {matching:?}\n{}",
            out.stderr
        );
        let e = matching[0];
        assert_eq!(e["reason"], reason, "{op}: {e}");
        assert_eq!(e["verdict"], "deny");
        assert_eq!(e["pid"], pid, "{op}: {e}");
        assert_eq!(e["comm"], "egress-probe", "{op}: {e}");
        assert_eq!(e["uid"], 65534);
        assert!(
            e["cmdline"].as_str().unwrap_or("").contains("egress-probe"),
            "{e}"
        );
        assert!(e["cgroup.id"].as_u64().unwrap_or(0) > 0);
        assert!(e["policy"].as_str().is_some_and(|p| !p.is_empty()));
    }
    let port80 = blocked.iter().find(|e| e["dst.port"] == 80).unwrap();
    assert_eq!(
        port80["rule.id"], 0,
        "the rule that covers the address is named"
    );
    assert!(
        port80["rule.target"]
            .as_str()
            .unwrap()
            .contains("198.18.0.2/32")
    );
    let denied = blocked
        .iter()
        .find(|e| e["reason"] == "denied_by_rule")
        .unwrap();
    assert!(
        denied["rule.target"]
            .as_str()
            .unwrap()
            .contains("198.18.1.0/24"),
        "{denied}"
    );
    let sock: Vec<&Value> = blocked
        .iter()
        .filter(|e| e["hook"] == "sock_create")
        .collect();
    assert_eq!(sock.len(), 1, "{sock:?}");
    assert_eq!(sock[0]["reason"], "socket_type_refused");
    assert_eq!(sock[0]["socket.protocol"], 136, "UDP-Lite");
    // Nothing else was blocked: seven attempts, seven events.
    assert_eq!(blocked.len(), 7, "{blocked:#?}");
    // The start-up probes are reported as such, not as blocked egress.
    assert_eq!(
        events(&out.stderr, "egress_probe").len(),
        2,
        "{}",
        out.stderr
    );
}

#[test]
fn a_million_denied_connects_are_all_denied_and_counted_exactly_with_a_small_log() {
    let Some(tb) = testbed() else { return };
    const N: u64 = 1_000_000;
    let isolated = Netns::new("flood").unwrap();
    let policy = PolicyYaml::new().allow_cidr("198.18.0.2/32", &[443], &["tcp"]);
    let op = format!("flood tcp4 198.18.0.66 443 {N}");
    let out = tb
        .agent(&policy)
        .unwrap()
        .timeout(Duration::from_secs(400))
        .arg(&op)
        .run_in(&isolated)
        .unwrap();
    assert_eq!(out.exit_code(), Some(0), "{}", out.describe());
    let r = out.result(&op).expect("flood result");
    assert_eq!(r.attempts, Some(N));
    assert_eq!(r.eperm, Some(N), "every attempt must be denied");
    let c = verdict_counts(&out.stderr);
    assert_eq!(
        c.get(&("no_matching_rule".into(), "tcp".into())),
        Some(&N),
        "{c:?}"
    );
    assert_eq!(
        c.get(&("socket_created".into(), "tcp".into())),
        Some(&N),
        "{c:?}"
    );
    // Accounting: the first line, the "repeated N times" lines and the events the ring buffer
    // could not hold add up to the attempts.
    let blocked = events(&out.stderr, "egress_blocked");
    let logged: u64 = blocked
        .iter()
        .map(|e| 1 + e["repeated"].as_u64().unwrap_or(0))
        .sum();
    let repeated_lines = blocked.iter().filter(|e| e["repeated"].is_u64()).count() as u64;
    let lost: u64 = out
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["lost"].as_u64())
        .sum();
    assert_eq!(
        logged - repeated_lines + lost,
        N,
        "logged {logged} ({repeated_lines} repeat lines), lost {lost}"
    );
    let lines = out.stderr.lines().count();
    assert!(lines < 100, "the log must stay small: {lines} lines");
    eprintln!(
        "1M denied connects: {} log lines, {lost} events lost, {:?}",
        lines, out.elapsed
    );
}

fn prometheus_bin() -> std::path::PathBuf {
    let p = workspace_root().join("target/tools/prometheus/usr/bin/prometheus");
    assert!(
        p.exists(),
        "{} missing: run scripts/bootstrap.sh",
        p.display()
    );
    p
}

#[test]
fn prometheus_scrapes_the_blocked_count() {
    let Some(tb) = testbed() else { return };
    let metrics: SocketAddr = "127.0.0.1:19464".parse().unwrap();
    let prom: SocketAddr = "127.0.0.1:19090".parse().unwrap();
    let policy = PolicyYaml::new().allow_cidr("198.18.0.2/32", &[443], &["tcp"]);
    let run = tb
        .agent(&policy)
        .unwrap()
        .agent_arg("--metrics-addr")
        .agent_arg(metrics.to_string())
        .args([
            "connect tcp4 198.18.0.66 443",
            "connect tcp4 198.18.0.67 443",
            "connect tcp4 198.18.0.68 443",
            "sleep 12000",
        ]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: egress\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let handle = tb.client().handle();
    let (out, exposition, answer) = std::thread::scope(|s| {
        let agent = s.spawn(|| run.run_in(tb.client()).unwrap());
        let mut cmd = Command::new(prometheus_bin());
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--web.listen-address={prom}"))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        tb.client().run_in(&mut cmd);
        let mut server = cmd.spawn().unwrap();
        // Wait (bounded) until Prometheus has scraped the three denials.
        let deadline = Instant::now() + Duration::from_secs(11);
        let mut answer = String::new();
        let mut exposition = String::new();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            // Empty while nothing listens yet (a server still starting on a loaded machine).
            exposition = http_get(&handle, metrics, "/metrics").unwrap_or_default();
            answer = http_get(
                &handle,
                prom,
                "/api/v1/query?query=sum(egress_connections_total%7Bverdict%3D%22deny%22%2Creason%3D%22no_matching_rule%22%7D)",
            )
            .unwrap_or_default();
            if answer.contains("\"3\"") {
                break;
            }
        }
        // Stopped by pid.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(server.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = server.wait();
        (agent.join().unwrap(), exposition, answer)
    });
    assert_eq!(out.exit_code(), Some(0), "{}", out.describe());
    assert!(
        answer.contains("\"3\""),
        "Prometheus did not report 3 denials: {answer}\nexposition:\n{exposition}"
    );
    for metric in [
        "egress_connections_total{",
        "egress_events_lost_total",
        "egress_allowlist_entries{",
        "egress_policy_loads_total{result=\"success\"} 1",
        "egress_build_info{version=",
        "egress_log_lines_total{",
    ] {
        assert!(
            exposition.contains(metric),
            "missing {metric} in\n{exposition}"
        );
    }
    // Labels are bounded: no address appears in any metric.
    assert!(
        !exposition.contains("198.18."),
        "an address leaked into a label:\n{exposition}"
    );
    let _: IpAddr = metrics.ip();
}
