//! The workload's environment and working directory, as the user it runs as.
//!
//! `exec` starts the workload as an unprivileged user, usually from a root agent that an MCP
//! client launched through sudo. Like `sudo -u` and systemd's `User=`, the identity variables
//! are the target user's: HOME, USER, LOGNAME and SHELL come from its passwd entry, and
//! variables naming the invoking user's private places (its mail spool, its runtime and XDG
//! directories under its home) are dropped, since the workload could not use them. Everything
//! else the agent was given is passed on unchanged: that is how an MCP client hands the server
//! its settings (API tokens, SSL_CERT_FILE, proxy settings, LANG, PATH). `--env-clear` starts
//! from nothing instead (plus the identity variables and a default PATH), and `--env` sets a
//! variable (`NAME=VALUE`) or passes one from the agent's environment (`NAME`), last one wins.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

/// The PATH of a workload started with `--env-clear` and no `--env PATH=...` (systemd's
/// default for services, less the sbin directories).
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The passwd entry the workload runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// `/run/user/<uid>` when it exists and belongs to the user.
    pub runtime_dir: Option<PathBuf>,
}

/// One `--env` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvSetting {
    /// `NAME=VALUE`.
    Set(OsString, OsString),
    /// `NAME`: the agent's own value, if it has one.
    Pass(OsString),
}

/// Parses `--env NAME=VALUE` or `--env NAME`.
pub fn parse_env_setting(s: &str) -> Result<EnvSetting, String> {
    let (name, value) = match s.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (s, None),
    };
    if name.is_empty() {
        return Err(format!(
            "{s:?}: expected NAME=VALUE or NAME, with a non-empty NAME"
        ));
    }
    if name.contains('\0') || value.is_some_and(|v| v.contains('\0')) {
        return Err(format!("{s:?}: a NUL byte cannot be in the environment"));
    }
    Ok(match value {
        Some(v) => EnvSetting::Set(name.into(), v.into()),
        None => EnvSetting::Pass(name.into()),
    })
}

/// `--env-clear` and the `--env` options, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvOptions {
    pub clear: bool,
    pub settings: Vec<EnvSetting>,
}

/// Variables that name the invoking user's own places whatever their value.
const INVOKER_ONLY: [&str; 2] = ["MAIL", "XDG_RUNTIME_DIR"];

/// Whether `name=value` points into the invoking user's home (`old_home`): XDG base
/// directories set for root are of no use to the workload's user.
fn under_old_home(name: &OsStr, value: &OsStr, old_home: Option<&OsStr>) -> bool {
    let Some(old) = old_home.filter(|h| !h.is_empty() && h.as_bytes() != b"/") else {
        return false;
    };
    let name = name.as_bytes();
    name.starts_with(b"XDG_") && Path::new(value).starts_with(Path::new(old))
}

/// The workload's environment: the agent's `inherited` one adjusted for `account` and the
/// options. Sorted by name, each name once.
pub fn workload_env(
    inherited: &[(OsString, OsString)],
    account: &Account,
    opts: &EnvOptions,
) -> Vec<(OsString, OsString)> {
    let old_home = inherited
        .iter()
        .find(|(n, _)| n == "HOME")
        .map(|(_, v)| v.as_os_str())
        .filter(|h| Path::new(h) != account.home);
    let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
    if !opts.clear {
        for (name, value) in inherited {
            let invoker_only = INVOKER_ONLY.iter().any(|n| name == *n);
            if !invoker_only && !under_old_home(name, value, old_home) {
                env.insert(name.clone(), value.clone());
            }
        }
    } else {
        env.insert("PATH".into(), DEFAULT_PATH.into());
    }
    env.insert("HOME".into(), account.home.clone().into_os_string());
    env.insert("USER".into(), account.name.clone().into());
    env.insert("LOGNAME".into(), account.name.clone().into());
    env.insert("SHELL".into(), account.shell.clone().into_os_string());
    if let Some(dir) = &account.runtime_dir {
        env.insert("XDG_RUNTIME_DIR".into(), dir.clone().into_os_string());
    }
    for s in &opts.settings {
        match s {
            EnvSetting::Set(n, v) => {
                env.insert(n.clone(), v.clone());
            }
            EnvSetting::Pass(n) => {
                if let Some((_, v)) = inherited.iter().find(|(name, _)| name == n) {
                    env.insert(n.clone(), v.clone());
                }
            }
        }
    }
    env.into_iter().collect()
}

/// Where the workload starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkDir {
    /// `--cwd`: the workload does not start if it cannot change there (as its user).
    Given(PathBuf),
    /// The user's home, or `/` when the user cannot change there (no home, as for nobody).
    Home(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> Account {
        Account {
            name: "mcp".into(),
            uid: 1001,
            home: "/home/mcp".into(),
            shell: "/bin/bash".into(),
            runtime_dir: None,
        }
    }

    fn root_env() -> Vec<(OsString, OsString)> {
        [
            ("HOME", "/root"),
            ("USER", "root"),
            ("LOGNAME", "root"),
            ("SHELL", "/bin/zsh"),
            ("MAIL", "/var/mail/root"),
            ("XDG_RUNTIME_DIR", "/run/user/0"),
            ("XDG_CONFIG_HOME", "/root/.config"),
            ("XDG_DATA_DIRS", "/usr/share"),
            ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"),
            ("GITHUB_TOKEN", "t0ken"),
            ("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
            ("NO_PROXY", "localhost"),
            ("SUDO_UID", "1001"),
        ]
        .into_iter()
        .map(|(n, v)| (n.into(), v.into()))
        .collect()
    }

    fn get<'a>(env: &'a [(OsString, OsString)], name: &str) -> Option<&'a str> {
        env.iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.to_str())
    }

    #[test]
    fn identity_comes_from_the_user_and_the_rest_is_passed_on() {
        let env = workload_env(&root_env(), &account(), &EnvOptions::default());
        assert_eq!(get(&env, "HOME"), Some("/home/mcp"));
        assert_eq!(get(&env, "USER"), Some("mcp"));
        assert_eq!(get(&env, "LOGNAME"), Some("mcp"));
        assert_eq!(get(&env, "SHELL"), Some("/bin/bash"));
        for gone in ["MAIL", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"] {
            assert_eq!(get(&env, gone), None, "{gone}");
        }
        for (kept, v) in [
            ("GITHUB_TOKEN", "t0ken"),
            ("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
            ("NO_PROXY", "localhost"),
            ("XDG_DATA_DIRS", "/usr/share"),
            ("SUDO_UID", "1001"),
        ] {
            assert_eq!(get(&env, kept), Some(v), "{kept}");
        }
        assert!(get(&env, "PATH").is_some_and(|p| p.contains("/usr/bin")));
        let names: Vec<_> = env.iter().map(|(n, _)| n.clone()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(names, sorted);
    }

    #[test]
    fn the_users_runtime_dir_replaces_the_invokers() {
        let a = Account {
            runtime_dir: Some("/run/user/1001".into()),
            ..account()
        };
        let env = workload_env(&root_env(), &a, &EnvOptions::default());
        assert_eq!(get(&env, "XDG_RUNTIME_DIR"), Some("/run/user/1001"));
    }

    #[test]
    fn env_clear_keeps_only_identity_a_default_path_and_what_is_named() {
        let opts = EnvOptions {
            clear: true,
            settings: vec![
                parse_env_setting("GITHUB_TOKEN").unwrap(),
                parse_env_setting("MODE=read-only").unwrap(),
                parse_env_setting("UNSET_IN_AGENT").unwrap(),
            ],
        };
        let env = workload_env(&root_env(), &account(), &opts);
        let names: Vec<&str> = env.iter().filter_map(|(n, _)| n.to_str()).collect();
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
            ]
        );
        assert_eq!(get(&env, "PATH"), Some(DEFAULT_PATH));
        assert_eq!(get(&env, "MODE"), Some("read-only"));
    }

    #[test]
    fn env_options_override_in_order_even_identity() {
        let opts = EnvOptions {
            clear: false,
            settings: vec![
                parse_env_setting("HOME=/srv/mcp").unwrap(),
                parse_env_setting("A=1").unwrap(),
                parse_env_setting("A=2=3").unwrap(),
                parse_env_setting("EMPTY=").unwrap(),
            ],
        };
        let env = workload_env(&root_env(), &account(), &opts);
        assert_eq!(get(&env, "HOME"), Some("/srv/mcp"));
        assert_eq!(get(&env, "A"), Some("2=3"));
        assert_eq!(get(&env, "EMPTY"), Some(""));
    }

    #[test]
    fn malformed_env_options_are_refused() {
        for bad in ["", "=x", "A\0=b"] {
            assert!(parse_env_setting(bad).is_err(), "{bad:?}");
        }
    }
}
