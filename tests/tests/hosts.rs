//! Host names in the policy: resolved by the agent through a real DNS server (dnsmasq in the
//! remote namespace), enforced by address, and refreshed when the answer changes.
#![expect(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failure is a test failure"
)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use egress_tests::dnsmasq::Dnsmasq;
use egress_tests::netns::REMOTE_V4;
use egress_tests::policy::PolicyYaml;
use egress_tests::server::{SETTLE, contains};
use egress_tests::testbed::Testbed;

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
const NAME: &str = "api.company.test";

fn resolv_conf(tb: &Testbed, server: IpAddr) -> PathBuf {
    tb.write_policy(&format!("nameserver {server}\n"))
        .expect("writing resolv.conf")
}

#[test]
fn allowed_host_name_is_resolved_and_enforced_by_address() {
    let Some(tb) = Testbed::for_test(PROBE.as_ref()) else {
        return;
    };
    let remote: IpAddr = REMOTE_V4.into();
    let dns = Dnsmasq::start(tb.remote(), remote, &[(NAME, remote)]).expect("dnsmasq");
    let api = tb
        .listen_tcp(SocketAddr::new(remote, 8443))
        .expect("listener");
    let other = tb
        .listen_tcp(SocketAddr::new(remote, 9443))
        .expect("listener");
    let policy = PolicyYaml::new()
        .allow_host(NAME, &[8443], &["https"])
        .allow_host("missing.test", &[9443], &["https"]);
    let conf = resolv_conf(&tb, remote);
    let out = tb
        .agent(&policy)
        .unwrap()
        .agent_arg("--resolv-conf")
        .agent_arg(&conf)
        .args([
            "send tcp4 198.18.0.2 8443 via-name",
            "send tcp4 198.18.0.2 9443 unresolved",
        ])
        .run_in(tb.client())
        .unwrap();
    assert_eq!(out.exit_code(), Some(0), "{}", out.describe());
    out.assert_ok("send tcp4 198.18.0.2 8443 via-name");
    // missing.test does not resolve: its rule allows nothing, and the agent still runs.
    out.assert_errno("send tcp4 198.18.0.2 9443 unresolved", libc::EPERM);
    assert!(
        contains(
            &api.wait_for(b"via-name", Duration::from_secs(3)),
            b"via-name"
        ),
        "data did not arrive"
    );
    std::thread::sleep(SETTLE);
    assert_eq!(other.connections(), 0);
    let queries = dns.queries();
    assert!(
        queries.iter().any(|q| q.contains(NAME)),
        "no query for {NAME}: {queries:?}"
    );
    assert!(
        out.stderr.contains("missing.test"),
        "the failed lookup is not logged: {}",
        out.stderr
    );
}

#[test]
fn a_changed_answer_moves_the_allowance_to_the_new_address() {
    let Some(tb) = Testbed::for_test(PROBE.as_ref()) else {
        return;
    };
    let remote: IpAddr = REMOTE_V4.into();
    let new_addr: IpAddr = Ipv4Addr::new(198, 18, 0, 3).into();
    tb.topo
        .add_remote_addr(new_addr)
        .expect("second remote address");
    let old_listener = tb
        .listen_tcp(SocketAddr::new(remote, 8443))
        .expect("listener");
    let new_listener = tb
        .listen_tcp(SocketAddr::new(new_addr, 8443))
        .expect("listener");
    let dns = Dnsmasq::start(tb.remote(), remote, &[(NAME, remote)]).expect("dnsmasq");
    let conf = resolv_conf(&tb, remote);
    let policy = PolicyYaml::new().allow_host(NAME, &[8443], &["tcp"]);
    let sync = tb.sync_dir().unwrap();
    let before_done = sync.path().join("before-done");
    let touch = format!("touch {}", before_done.display());
    let run = tb
        .agent(&policy)
        .unwrap()
        .agent_arg("--resolv-conf")
        .agent_arg(&conf)
        .agent_arg("--dns-min-ttl")
        .agent_arg("1")
        .agent_arg("--dns-max-ttl")
        .agent_arg("1")
        .args([
            "send tcp4 198.18.0.2 8443 before",
            "send tcp4 198.18.0.3 8443 before",
            &touch,
            "sleep 4000",
            "send tcp4 198.18.0.3 8443 after",
            "send tcp4 198.18.0.2 8443 after",
        ]);
    let out = std::thread::scope(|s| {
        let agent = s.spawn(|| run.run_in(tb.client()).unwrap());
        // Once the probe made its first attempts (however long the agent took to start),
        // change the answer.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !before_done.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(dns);
        let _dns2 =
            Dnsmasq::start(tb.remote(), remote, &[(NAME, new_addr)]).expect("dnsmasq again");
        agent.join().unwrap()
    });
    assert_eq!(out.exit_code(), Some(0), "{}", out.describe());
    out.assert_ok("send tcp4 198.18.0.2 8443 before");
    out.assert_errno("send tcp4 198.18.0.3 8443 before", libc::EPERM);
    out.assert_ok("send tcp4 198.18.0.3 8443 after");
    out.assert_errno("send tcp4 198.18.0.2 8443 after", libc::EPERM);
    assert!(contains(
        &new_listener.wait_for(b"after", Duration::from_secs(3)),
        b"after"
    ));
    assert!(contains(
        &old_listener.wait_for(b"before", Duration::from_secs(3)),
        b"before"
    ));
    std::thread::sleep(SETTLE);
    assert_eq!(
        old_listener.connections(),
        1,
        "the old address was reachable after the change"
    );
    assert_eq!(
        new_listener.connections(),
        1,
        "the new address was reachable before the change"
    );
}

/// The agent's own lookups of the policy's host names pass the same rebinding filter as the
/// proxy's answers: an allowed name that answers with the metadata service opens nothing,
/// and the refusal is the same logged event.
#[test]
fn a_policy_host_answering_the_metadata_address_opens_nothing() {
    let Some(tb) = Testbed::for_test(PROBE.as_ref()) else {
        return;
    };
    let remote: IpAddr = REMOTE_V4.into();
    let metadata = tb
        .topo
        .add_remote_metadata_addr()
        .expect("metadata address");
    let dns =
        Dnsmasq::start(tb.remote(), remote, &[(NAME, remote), (NAME, metadata)]).expect("dnsmasq");
    let api = tb
        .listen_tcp(SocketAddr::new(remote, 8443))
        .expect("listener");
    let meta = tb
        .listen_tcp(SocketAddr::new(metadata, 8443))
        .expect("listener");
    let policy = PolicyYaml::new().allow_host(NAME, &[8443], &["tcp"]);
    let conf = resolv_conf(&tb, remote);
    // Without the agent the metadata address answers: the refusal below is the filter's.
    let bare = tb
        .run_probe(&["send tcp4 169.254.169.254 8443 reachable"])
        .unwrap();
    bare.assert_ok("send tcp4 169.254.169.254 8443 reachable");
    let out = tb
        .agent(&policy)
        .unwrap()
        .agent_arg("--resolv-conf")
        .agent_arg(&conf)
        .json_log()
        .args([
            "send tcp4 198.18.0.2 8443 via-name",
            "send tcp4 169.254.169.254 8443 metadata",
        ])
        .run_in(tb.client())
        .unwrap();
    assert_eq!(out.exit_code(), Some(0), "{}", out.describe());
    out.assert_ok("send tcp4 198.18.0.2 8443 via-name");
    out.assert_errno("send tcp4 169.254.169.254 8443 metadata", libc::EPERM);
    assert!(contains(
        &api.wait_for(b"via-name", Duration::from_secs(3)),
        b"via-name"
    ));
    std::thread::sleep(SETTLE);
    assert_eq!(
        meta.connections(),
        1,
        "only the run without the agent got in"
    );
    assert!(
        dns.queries().iter().any(|q| q.contains(NAME)),
        "the agent did not look the name up"
    );
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("dns_rebinding_blocked"))
        .unwrap_or_else(|| panic!("no rebinding event: {}", out.stderr));
    for field in [
        "\"source\":\"policy_lookup\"",
        "\"address\":\"169.254.169.254\"",
        "\"reason\":\"special_purpose_address\"",
        NAME,
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
}
