//! What an operator sees: DNS results in the metrics, blocked names and addresses alike, and
//! `explain-last`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use egress_tests::agent::AgentRun;
use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::log::blocked;
use egress_tests::metrics::{http_get, metric};
use egress_tests::server::assert_nothing_arrived;
use serde_json::Value;

use super::{agent, policy};
use crate::{ip, sa, scenario};

// --- 12. Metrics --------------------------------------------------------------------------

/// A metric, label pairs its sample must have, and the value expected.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// `egress_dns_queries_total{policy,result}` counts every outcome; the rebinding counter and
/// the learned-address gauge move; no label holds an address or a query name.
#[test]
fn dns_queries_are_counted_by_result_in_the_metrics() {
    let Some(tb) = scenario()
        .upstream(
            Dnsmasq::config()
                .record("api.example.test", ip("198.18.0.10"))
                .record("meta.example.test", ip("169.254.169.254"))
                .record("evil.test", ip("198.18.0.11")),
        )
        .build()
    else {
        return;
    };
    let metrics: SocketAddr = sa("127.0.0.1:19466");
    let sync = tb.sync_dir().expect("sync dir");
    let ready = sync.path().join("ready");
    let scraped = sync.path().join("scraped");
    let policy = policy()
        .name("dns-metrics")
        .allow_wildcard("example.test", &[8443], &["tcp"])
        .allow_wildcard("quad9.net", &[443], &["tcp"])
        .deny_host("secret.example.test")
        .block_doh(true);
    let ops = vec![
        "resolve udp4 198.18.0.2 evil.test A".to_owned(),
        "resolve udp4 198.18.0.2 evil.test AAAA".to_owned(),
        "resolve tcp4 198.18.0.2 x.evil.test A".to_owned(),
        "resolve udp4 198.18.0.2 api.example.test A".to_owned(),
        "resolve udp4 198.18.0.2 meta.example.test A".to_owned(),
        "resolve udp4 198.18.0.2 secret.example.test A".to_owned(),
        "resolve udp4 198.18.0.2 dns.quad9.net A".to_owned(),
        "dnsraw udp4 198.18.0.2 123401000001000000000000c00c00010001".to_owned(),
        format!("touch {}", ready.display()),
        format!("wait-file {} 30000", scraped.display()),
    ];
    let run = agent(&tb, &policy)
        .agent_arg("--metrics-addr")
        .agent_arg(metrics.to_string())
        .args(&ops);
    let handle = tb.client().handle();
    let q = "egress_dns_queries_total";
    let p = ("policy", "dns-metrics");
    let c = "egress_connections_total";
    let deny = ("verdict", "deny");
    let want: [Expected; 10] = [
        // Refused names are blocked attempts, in the same family as refused connects.
        (c, &[p, deny, ("reason", "dns_name_not_allowed")], 3.0),
        (c, &[p, deny, ("reason", "dns_name_denied")], 1.0),
        (c, &[p, deny, ("reason", "dns_name_doh_provider")], 1.0),
        (q, &[p, ("result", "not_allowed")], 3.0),
        (q, &[p, ("result", "allowed")], 2.0),
        (q, &[p, ("result", "denied")], 1.0),
        (q, &[p, ("result", "doh_provider")], 1.0),
        (q, &[p, ("result", "malformed")], 1.0),
        ("egress_dns_rebinding_blocked_total", &[p], 1.0),
        ("egress_dns_learned_addresses", &[p], 1.0),
    ];
    let (out, exposition) = std::thread::scope(|s| {
        let agent = s.spawn(|| run.run_in(tb.client()).expect("agent run"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut exposition = String::new();
        while Instant::now() < deadline {
            exposition = http_get(&handle, metrics, "/metrics").unwrap_or_default();
            if want
                .iter()
                .all(|(m, labels, v)| metric(&exposition, m, labels) == Some(*v))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        std::fs::write(&scraped, b"").expect("releasing the workload");
        (agent.join().expect("agent thread"), exposition)
    });
    out.assert_exit(0);
    for (m, labels, v) in want {
        assert_eq!(
            metric(&exposition, m, labels),
            Some(v),
            "{m} {labels:?} in\n{exposition}\n{}",
            out.describe()
        );
    }
    for leak in ["198.18.", "169.254.", "evil.test", "example.test", "quad9"] {
        assert!(
            !exposition.contains(leak),
            "{leak:?} leaked into a label:\n{exposition}"
        );
    }
}

/// A real HTTP client (curl) as the workload: a name the policy refuses and an address it
/// refuses are both blocked attempts, logged as `egress_blocked` and counted under
/// `egress_connections_total{verdict="deny"}`, the family the shipped alert watches.
#[test]
fn curl_refused_by_name_and_by_address_both_count_as_blocked_egress() {
    let Some(tb) = scenario()
        .tcp("198.18.0.66:8080")
        .upstream(Dnsmasq::config().record("evil.example.test", ip("198.18.0.66")))
        .build()
    else {
        return;
    };
    let curl = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("curl"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.is_file());
    let Some(curl) = curl else {
        assert!(
            std::env::var_os("CI").is_none(),
            "curl is missing (scripts/bootstrap.sh installs it)"
        );
        eprintln!("SKIP: no curl");
        return;
    };
    let [rogue] = tb.listeners();
    let metrics: SocketAddr = sa("127.0.0.1:19467");
    let sync = tb.sync_dir().expect("sync dir");
    let ready = sync.path().join("ready");
    let scraped = sync.path().join("scraped");
    let script = format!(
        // curl's own messages would share stderr with the agent's JSON lines: silenced.
        "{curl} -s -m 5 -o /dev/null http://evil.example.test:8080/by-name 2>/dev/null; echo by-name=$?; \
         {curl} -s -m 5 -o /dev/null http://198.18.0.66:8080/by-address 2>/dev/null; echo by-address=$?; \
         touch {ready}; i=0; while [ ! -e {scraped} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done",
        curl = curl.display(),
        ready = ready.display(),
        scraped = scraped.display(),
    );
    let policy_path = tb
        .write_policy(&policy().name("curl").render())
        .expect("policy");
    let run = AgentRun::new(&policy_path, &tb.cgroups, Path::new("/bin/sh"))
        .expect("agent command")
        .json_log()
        .agent_arg("--metrics-addr")
        .agent_arg(metrics.to_string())
        .args(["-c", script.as_str()]);
    let handle = tb.client().handle();
    let c = "egress_connections_total";
    let (out, exposition) = std::thread::scope(|s| {
        let agent = s.spawn(|| run.run_in(tb.client()).expect("agent run"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut exposition = String::new();
        while Instant::now() < deadline {
            exposition = http_get(&handle, metrics, "/metrics").unwrap_or_default();
            if metric(&exposition, c, &[("reason", "no_matching_rule")]).is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        std::fs::write(&scraped, b"").expect("releasing the workload");
        (agent.join().expect("agent thread"), exposition)
    });
    assert_eq!(out.exit_code(), Some(0), "{}", out.describe());
    // curl: 6 = could not resolve the host, 7 = could not connect.
    assert!(out.stdout.contains("by-name=6"), "{}", out.describe());
    assert!(out.stdout.contains("by-address=7"), "{}", out.describe());
    assert_nothing_arrived(&[rogue], &out);
    let deny = ("verdict", "deny");
    let policy_label = ("policy", "curl");
    let by_name = metric(
        &exposition,
        c,
        &[policy_label, deny, ("reason", "dns_name_not_allowed")],
    );
    let by_address = metric(
        &exposition,
        c,
        &[
            policy_label,
            deny,
            ("reason", "no_matching_rule"),
            ("protocol", "tcp"),
        ],
    );
    assert!(by_name.is_some_and(|n| n >= 1.0), "{exposition}");
    assert!(by_address.is_some_and(|n| n >= 1.0), "{exposition}");
    let name_events: Vec<Value> = blocked(&out.stderr, "dns_name_not_allowed")
        .into_iter()
        .filter(|e| e["hook"] == "dns_proxy" && e["dns.name"] == "evil.example.test")
        .collect();
    assert!(!name_events.is_empty(), "{}", out.describe());
    assert_eq!(name_events[0]["level"], "WARN");
    let addr_events: Vec<Value> = blocked(&out.stderr, "no_matching_rule")
        .into_iter()
        .filter(|e| e["dst.ip"] == "198.18.0.66" && e["dst.port"] == 8080)
        .collect();
    assert!(!addr_events.is_empty(), "{}", out.describe());
    assert_eq!(addr_events[0]["level"], name_events[0]["level"]);
}

/// `explain-last` and `status` show a running workload's last blocked attempts, by name and
/// by address, with what would allow them.
#[test]
fn explain_last_shows_a_running_workloads_blocked_attempts() {
    let Some(tb) = scenario()
        .tcp("198.18.0.66:8080")
        .upstream(Dnsmasq::config().record("api.example.test", ip("198.18.0.10")))
        .build()
    else {
        return;
    };
    let [_rogue] = tb.listeners();
    let sync = tb.sync_dir().expect("sync dir");
    let ready = sync.path().join("ready");
    let done = sync.path().join("done");
    let policy = policy().allow_host("api.example.test", &[8443], &["tcp"]);
    let run = agent(&tb, &policy).args([
        "resolve udp4 198.18.0.2 evil.example.test A".to_owned(),
        "connect tcp4 198.18.0.66 8080".to_owned(),
        format!("touch {}", ready.display()),
        format!("wait-file {} 30000", done.display()),
    ]);
    let agent_bin = egress_tests::agent::agent_bin().expect("agent binary");
    let parent = tb.cgroups.path().to_path_buf();
    let (out, explained, status) = std::thread::scope(|s| {
        let agent = s.spawn(|| run.run_in(tb.client()).expect("agent run"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let ours = |v: &Value| {
            v["cgroup"]
                .as_str()
                .is_some_and(|c| Path::new(c).starts_with(&parent))
        };
        let mut explained = Value::Null;
        while Instant::now() < deadline {
            let out = std::process::Command::new(&agent_bin)
                .args(["explain-last", "--json"])
                .output()
                .expect("explain-last");
            let all: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if let Some(e) = all.as_array().and_then(|a| a.iter().find(|v| ours(v)))
                && e["recent"].as_array().is_some_and(|r| r.len() >= 2)
            {
                explained = e.clone();
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let status = std::process::Command::new(&agent_bin)
            .arg("status")
            .output()
            .expect("status");
        std::fs::write(&done, b"").expect("releasing the workload");
        (
            agent.join().expect("agent thread"),
            explained,
            String::from_utf8_lossy(&status.stdout).into_owned(),
        )
    });
    out.assert_exit(0);
    let recent = explained["recent"].as_array().cloned().unwrap_or_default();
    assert!(
        recent
            .iter()
            .any(|d| d["reason"] == "no_matching_rule" && d["dst"] == "198.18.0.66:8080"),
        "{explained:#}\n{}",
        out.describe()
    );
    assert!(
        recent
            .iter()
            .any(|d| d["reason"] == "dns_name_not_allowed" && d["name"] == "evil.example.test"),
        "{explained:#}"
    );
    assert_eq!(explained["agent_running"], true);
    assert!(
        status.contains("recent blocked attempt") && status.contains("running"),
        "{status}"
    );
}
