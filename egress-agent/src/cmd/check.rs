//! `egress-agent check`: validate a policy and say what it allows.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use crate::dns::install::{NameDecision, NamePolicy, restriction_detail};
use crate::supervisor::session::{self, SessionError};
use egress_policy::{Policy, PolicyError, aws};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Session(#[from] SessionError),
    /// Several entries are invalid: each error on its own line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Policy(Vec<PolicyError>),
}

impl CheckError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CheckError::Session(e) => e.exit_code(),
            CheckError::Policy(_) => crate::exit::CONFIG,
        }
    }
}

/// What `check` says about a policy it accepts.
#[derive(Debug)]
pub struct Checked {
    /// For stdout: the summary and the name judgements.
    pub text: String,
    /// For stderr: likely mistakes (`lint`), each `FILE: warning: ...`.
    pub warnings: Vec<String>,
}

/// The text to print for a policy that this version can enforce, followed by how the DNS
/// proxy would judge each of `names`, and its warnings. A policy with errors in several
/// entries gets all of them (up to `policy::MAX_REPORTED`).
pub fn check(
    path: &Path,
    names: &[String],
    limits: &egress_policy::capacity::MapLimits,
) -> Result<Checked, CheckError> {
    let policy = match session::load_policy(path, limits) {
        Ok(p) => p,
        Err(SessionError::Policy(first @ PolicyError::Invalid { .. })) => {
            let all = egress_policy::read_policy_text(path)
                .map(|text| egress_policy::all_errors(&text, path))
                .unwrap_or_default();
            return Err(if all.len() > 1 {
                CheckError::Policy(all)
            } else {
                SessionError::Policy(first).into()
            });
        }
        Err(e) => return Err(e.into()),
    };
    let mut text = format!("{}: OK\n{}", path.display(), policy.summary());
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let warnings = egress_policy::lint::warnings(&policy)
        .into_iter()
        .map(|w| format!("{}: warning: {w}", path.display()))
        .collect();
    let view = NamePolicy::new(Arc::new(policy));
    for name in names {
        text.push_str(&judge_name(&view, name));
        text.push('\n');
    }
    Ok(Checked { text, warnings })
}

/// One line: the name, its AWS classification, and the proxy's decision without
/// `--aws-ip-ranges`.
pub fn judge_name(view: &NamePolicy, name: &str) -> String {
    let mut line = format!("name {name}: ");
    match aws::classify(name) {
        Some(ep) => {
            let _ = write!(
                line,
                "AWS {} in {} ({} form); ",
                ep.service,
                ep.region.as_deref().unwrap_or("no region"),
                ep.form
            );
        }
        None if aws::is_under_aws_suffix(name) => {
            line.push_str("AWS name of no known service endpoint form; ");
        }
        None => {}
    }
    let policy: &Policy = &view.policy;
    match view.decide(name) {
        NameDecision::Allowed(rules) => {
            let listed: Vec<String> = rules
                .iter()
                .filter_map(|&r| {
                    let rule = policy.allowed.get(usize::try_from(r).ok()?)?;
                    Some(format!("allowed_destinations[{r}] ({})", rule.target))
                })
                .collect();
            let _ = write!(line, "allowed by {}", listed.join(", "));
        }
        NameDecision::Restricted { rule, miss } => {
            let _ = write!(
                line,
                "refused ({}): {}",
                miss.result(),
                restriction_detail(rule, &miss)
            );
        }
        NameDecision::Denied(rule) => {
            let _ = write!(
                line,
                "refused (denied): denied by denied_destinations[{rule}]"
            );
        }
        NameDecision::DohProvider(p) => {
            let _ = write!(
                line,
                "refused (doh_provider): DNS-over-HTTPS endpoint of {p} (block_doh)"
            );
        }
        NameDecision::NotAllowed => {
            line.push_str("refused (not_allowed): no allowed_destinations entry names it");
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed_view() -> NamePolicy {
        let text = include_str!("../../../policies/mcp-net-02-example.yaml");
        match egress_policy::parse_str(text, Path::new("mcp-net-02-example.yaml")) {
            Ok(p) => NamePolicy::new(Arc::new(p)),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn names_under_the_seed_policy() {
        let v = seed_view();
        let cases = [
            (
                "bucket.s3.eu-west-1.amazonaws.com",
                "name bucket.s3.eu-west-1.amazonaws.com: AWS s3 in eu-west-1 (virtual-hosted \
                 bucket form); allowed by allowed_destinations[1] (*.amazonaws.com)",
            ),
            (
                "dynamodb.us-west-2.amazonaws.com",
                "name dynamodb.us-west-2.amazonaws.com: AWS dynamodb in us-west-2 (regional \
                 form); refused (restriction_region): allowed_destinations[1].restrictions: an \
                 endpoint in region us-west-2, which is not listed",
            ),
            (
                "ec2.us-east-1.amazonaws.com",
                "name ec2.us-east-1.amazonaws.com: AWS name of no known service endpoint form; \
                 refused (restriction_unclassified): allowed_destinations[1].restrictions: not \
                 an endpoint name of a known service and region (regionless names need \
                 --aws-ip-ranges)",
            ),
            (
                "bucket.s3.amazonaws.com",
                "name bucket.s3.amazonaws.com: AWS s3 in no region (virtual-hosted bucket on the \
                 global name (regionless) form); refused (restriction_unclassified): \
                 allowed_destinations[1].restrictions: not an endpoint name of a known service \
                 and region (regionless names need --aws-ip-ranges)",
            ),
            (
                "api.company.com",
                "name api.company.com: allowed by allowed_destinations[0] (api.company.com)",
            ),
            (
                "x.torproject.org",
                "name x.torproject.org: refused (denied): denied by denied_destinations[1]",
            ),
            (
                "evil.com",
                "name evil.com: refused (not_allowed): no allowed_destinations entry names it",
            ),
        ];
        for (name, want) in cases {
            assert_eq!(judge_name(&v, name), want);
        }
    }

    #[test]
    fn check_reports_the_errors_of_every_entry() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = dir.path().join("p.yaml");
        std::fs::write(
            &p,
            "egress_policy:\n  default_action: DENY\n  allowed_destinations:\n    - cidr: \
             10.0.0.0/33\n      ports: [443]\n      protocols: [tcp]\n    - host: ok.example.com\n      \
             ports: [443]\n      protocols: [tcp]\n    - cidr: 10.0.0.0/8\n      ports: [70000]\n      \
             protocols: [tcp]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let e = match check(&p, &[], &egress_policy::capacity::MapLimits::default()) {
            Ok(t) => panic!("{}", t.text),
            Err(e) => e,
        };
        assert_eq!(e.exit_code(), 78);
        let text = e.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains(":4:13: egress_policy.allowed_destinations[0].cidr"),
            "{text}"
        );
        assert!(
            lines[1].contains(":11:15: egress_policy.allowed_destinations[2].ports"),
            "{text}"
        );
    }

    #[test]
    fn check_prints_the_summary_and_the_names() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/mcp-net-02-example.yaml"
        ));
        let text = match check(
            path,
            &["s3.us-east-1.amazonaws.com".to_owned()],
            &egress_policy::capacity::MapLimits::default(),
        ) {
            Ok(t) => t.text,
            Err(e) => panic!("{e}"),
        };
        assert!(text.contains(": OK\n"), "{text}");
        assert!(
            text.contains("restrictions: regions [us-east-1, eu-west-1], services [s3, dynamodb]"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "name s3.us-east-1.amazonaws.com: AWS s3 in us-east-1 (regional form); allowed \
                 by allowed_destinations[1] (*.amazonaws.com)\n"
            ),
            "{text}"
        );
    }
}
