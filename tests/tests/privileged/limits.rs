//! Map sizes set at load time (`--max-entries KIND=N`) on the real kernel: a raised size lets
//! a policy beyond the default's half load and enforce; a lowered one refuses a policy that
//! fits the default, at `check` as at `exec`, with the message naming the flag; a malformed
//! value is a usage error.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use egress_tests::agent::agent_bin;
use egress_tests::policy::PolicyYaml;

use crate::testbed;

/// `check` with `args` before the file: (exit code, stderr).
fn check(file: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(agent_bin().expect("agent binary"))
        .arg("check")
        .args(args)
        .arg(file)
        .output()
        .expect("running check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_raised_map_size_loads_a_policy_beyond_the_default_and_a_lowered_one_refuses_it() {
    let Some(tb) = testbed() else { return };
    let listener = tb
        .listen_tcp("198.18.0.2:8443".parse().expect("literal"))
        .expect("listener");
    // 600 allowed resolvers: more than half of the default resolver map (1024).
    let resolvers: Vec<String> = (0..600)
        .map(|i| format!("10.77.{}.{}", i / 200, 1 + i % 200))
        .collect();
    let names: Vec<&str> = resolvers.iter().map(String::as_str).collect();
    let wide =
        PolicyYaml::new()
            .allowed_resolvers(&names)
            .allow_cidr("198.18.0.2/32", &[8443], &["tcp"]);
    let op = "send tcp4 198.18.0.2 8443 over-the-default";

    let refused = tb
        .agent(&wide)
        .expect("agent command")
        .arg(op)
        .run_in(tb.client())
        .expect("agent run");
    assert_eq!(refused.exit_code(), Some(78), "{}", refused.describe());
    assert!(
        refused.stderr.contains(
            "600 allowed resolvers needed, at most 512 allowed (MAX_DNS_RESOLVERS = 1024; \
             `--max-entries resolvers=N` sets another size)"
        ),
        "{}",
        refused.describe()
    );
    assert!(refused.results.is_empty(), "the workload ran");

    let raised = tb
        .agent(&wide)
        .expect("agent command")
        .agent_arg("--max-entries")
        .agent_arg("resolvers=2048")
        .arg(op)
        .run_in(tb.client())
        .expect("agent run");
    assert_eq!(raised.exit_code(), Some(0), "{}", raised.describe());
    raised.assert_ok(op);
    assert_eq!(
        listener.wait_for(b"over-the-default", Duration::from_secs(3)),
        b"over-the-default"
    );

    // Three ports on one address: three port-set entries, more than half of 4.
    let small = PolicyYaml::new().allow_cidr("198.18.0.2/32", &[8443, 8444, 8445], &["tcp"]);
    let want = "3 port-set entries needed, at most 2 allowed (--max-entries ports=4; the \
                default is MAX_PORTS = 262144)";
    let lowered = tb
        .agent(&small)
        .expect("agent command")
        .agent_arg("--max-entries")
        .agent_arg("ports=4")
        .arg(op)
        .run_in(tb.client())
        .expect("agent run");
    assert_eq!(lowered.exit_code(), Some(78), "{}", lowered.describe());
    assert!(lowered.stderr.contains(want), "{}", lowered.describe());

    let file = tb.write_policy(&small.render()).expect("policy file");
    assert_eq!(check(&file, &[]).0, Some(0));
    let (code, stderr) = check(&file, &["--max-entries", "ports=4"]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains(want), "{stderr}");
    let (code, stderr) = check(&file, &["--max-entries", "counters=4"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("unknown map `counters`; the maps that can be sized are `ports`"),
        "{stderr}"
    );
    let (code, stderr) = check(&file, &["--max-entries", "ports=1"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("`1` for ports is not a number of entries from 2 to 16777216"),
        "{stderr}"
    );
}
