//! A plan is an ordered list of named steps. Steps run one after another with their output
//! streamed; the first failure stops the plan. Every run ends with one summary line per step,
//! including the steps that never ran, so a CI log says at a glance what happened.

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::bail;

pub struct Step {
    name: &'static str,
    action: Action,
}

enum Action {
    Run(Command),
    /// Known in advance not to run; the reason is printed where the step would have run and
    /// again in the summary.
    Skip(String),
}

impl Step {
    pub fn run(name: &'static str, command: Command) -> Self {
        Self {
            name,
            action: Action::Run(command),
        }
    }

    pub fn skip(name: &'static str, reason: impl Into<String>) -> Self {
        Self {
            name,
            action: Action::Skip(reason.into()),
        }
    }
}

enum Outcome {
    Ok(Duration),
    Failed(Duration, String),
    Skipped(String),
    NotRun,
}

/// Runs `steps` in order. Returns an error naming the first step that failed.
pub fn execute(title: &str, steps: Vec<Step>) -> anyhow::Result<()> {
    let mut results: Vec<(&'static str, String, Outcome)> = Vec::with_capacity(steps.len());
    let mut failed: Option<(&'static str, String)> = None;

    for step in steps {
        let Step { name, action } = step;
        match action {
            Action::Skip(reason) => {
                banner(&format!("SKIPPED step `{name}`: {reason}"));
                results.push((name, String::new(), Outcome::Skipped(reason)));
            }
            Action::Run(command) if failed.is_some() => {
                results.push((name, display(&command), Outcome::NotRun));
            }
            Action::Run(mut command) => {
                let shown = display(&command);
                eprintln!("\nxtask: ==> {name}: {shown}");
                let started = Instant::now();
                let status = command.stdin(Stdio::null()).status();
                let elapsed = started.elapsed();
                let outcome = match status {
                    Ok(status) if status.success() => Outcome::Ok(elapsed),
                    Ok(status) => Outcome::Failed(elapsed, status.to_string()),
                    Err(err) => Outcome::Failed(elapsed, format!("could not start: {err}")),
                };
                if let Outcome::Failed(_, why) = &outcome {
                    eprintln!("xtask: <== {name} FAILED ({why})");
                    failed = Some((name, why.clone()));
                }
                results.push((name, shown, outcome));
            }
        }
    }

    eprintln!("{}", summary(title, &results));
    // Repeated after the summary: the first banner has usually scrolled away by now.
    for (name, _, outcome) in &results {
        if let Outcome::Skipped(reason) = outcome {
            banner(&format!("SKIPPED step `{name}`: {reason}"));
        }
    }
    if let Some((name, why)) = failed {
        bail!("step `{name}` failed ({why})");
    }
    Ok(())
}

fn summary(title: &str, results: &[(&'static str, String, Outcome)]) -> String {
    let width = results
        .iter()
        .map(|(name, _, _)| name.len())
        .max()
        .unwrap_or(0);
    let mut out = format!("\nxtask {title}: summary");
    for (name, shown, outcome) in results {
        let line = match outcome {
            Outcome::Ok(t) => format!("ok       {name:width$}  {:>7.1}s  {shown}", t.as_secs_f64()),
            Outcome::Failed(t, why) => format!(
                "FAILED   {name:width$}  {:>7.1}s  {shown}  ({why})",
                t.as_secs_f64()
            ),
            Outcome::Skipped(reason) => format!("SKIPPED  {name:width$}            {reason}"),
            Outcome::NotRun => format!("not run  {name:width$}            {shown}"),
        };
        let _ = write!(out, "\n  {line}");
    }
    out
}

fn banner(message: &str) {
    let rule = "!".repeat(78);
    eprintln!("\n{rule}\n!! {message}\n{rule}");
}

/// The command as a user could paste it: environment overrides, program, arguments.
fn display(command: &Command) -> String {
    let mut out = String::new();
    for (key, value) in command.get_envs() {
        if let Some(value) = value {
            let _ = write!(
                out,
                "{}={} ",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            );
        }
    }
    out.push_str(&quote(&command.get_program().to_string_lossy()));
    for arg in command.get_args() {
        out.push(' ');
        out.push_str(&quote(&arg.to_string_lossy()));
    }
    out
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_needs_it() {
        let mut command = Command::new("cargo");
        command
            .args(["test", "--", "--test-threads=2", "a b"])
            .env("EGRESS_AGENT_BIN", "/t/release/egress-agent");
        assert_eq!(
            display(&command),
            "EGRESS_AGENT_BIN=/t/release/egress-agent cargo test -- --test-threads=2 'a b'"
        );
    }

    #[test]
    fn first_failure_stops_the_plan() {
        let result = execute(
            "unit",
            vec![
                Step::run("first", Command::new("true")),
                Step::run("second", Command::new("false")),
                Step::skip("third", "not needed"),
                Step::run("fourth", Command::new("true")),
            ],
        );
        let Err(err) = result else {
            panic!("a plan with a failing step succeeded");
        };
        assert!(err.to_string().starts_with("step `second` failed"), "{err}");
    }
}
