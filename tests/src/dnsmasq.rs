//! A DNS server for tests: Debian's dnsmasq inside a test namespace, answering only the
//! names it is given. Stopped by pid on drop.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

const START_WAIT: Duration = Duration::from_secs(5);
const STOP_WAIT: Duration = Duration::from_secs(3);

/// A running dnsmasq.
#[derive(Debug)]
pub struct Dnsmasq {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// What a [`Dnsmasq`] serves, built up before it starts.
#[derive(Clone, Debug, Default)]
pub struct DnsmasqConfig {
    listen: Vec<IpAddr>,
    /// `--address=/name/ip`: the name and every name below it.
    records: Vec<(String, IpAddr)>,
    /// Hosts-file lines: exactly the name; a name may have several addresses.
    hosts: Vec<(String, IpAddr)>,
    /// `--cname=alias,target` (the target must be a hosts-file name).
    cnames: Vec<(String, String)>,
    local_ttl: Option<u32>,
}

impl DnsmasqConfig {
    /// Port 53 on `ip` (repeatable).
    #[must_use]
    pub fn listen(mut self, ip: IpAddr) -> Self {
        self.listen.push(ip);
        self
    }

    /// `name` and every name below it answer `ip` (several calls: several addresses; an
    /// IPv4 address answers A queries, an IPv6 one AAAA).
    #[must_use]
    pub fn record(mut self, name: &str, ip: IpAddr) -> Self {
        self.records.push((name.to_owned(), ip));
        self
    }

    /// Exactly `name` answers `ip`, from a hosts file (several calls: several addresses).
    /// Names from here can be CNAME targets.
    #[must_use]
    pub fn host(mut self, name: &str, ip: IpAddr) -> Self {
        self.hosts.push((name.to_owned(), ip));
        self
    }

    /// `alias` is a CNAME for `target`, a [`host`](Self::host) name.
    #[must_use]
    pub fn cname(mut self, alias: &str, target: &str) -> Self {
        self.cnames.push((alias.to_owned(), target.to_owned()));
        self
    }

    /// TTL of every answer (dnsmasq's default is 0).
    #[must_use]
    pub fn ttl(mut self, secs: u32) -> Self {
        self.local_ttl = Some(secs);
        self
    }

    /// Starts dnsmasq in `ns`.
    pub fn start(self, ns: &Netns) -> Result<Dnsmasq> {
        Dnsmasq::start_config(ns, &self)
    }
}

impl Dnsmasq {
    /// A configuration to fill in and [`start`](DnsmasqConfig::start).
    pub fn config() -> DnsmasqConfig {
        DnsmasqConfig::default()
    }

    /// Starts dnsmasq in `ns`, listening on `listen` port 53, answering `records`
    /// (`name -> address`) and nothing else.
    pub fn start(ns: &Netns, listen: IpAddr, records: &[(&str, IpAddr)]) -> Result<Self> {
        let config = records
            .iter()
            .fold(Self::config().listen(listen), |c, (name, ip)| {
                c.record(name, *ip)
            });
        Self::start_config(ns, &config)
    }

    fn start_config(ns: &Netns, config: &DnsmasqConfig) -> Result<Self> {
        if config.listen.is_empty() {
            bail!("dnsmasq needs at least one listen address");
        }
        let bin = crate::find_tool("dnsmasq").context(
            "dnsmasq not found: the DNS tests need Debian package dnsmasq-base \
             (scripts/bootstrap.sh installs it)",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("egress-dnsmasq-")
            .tempdir()
            .context("creating a temp dir for dnsmasq")?;
        let log = dir.path().join("queries.log");
        let hosts = dir.path().join("hosts");
        let mut hosts_text = String::new();
        for (name, ip) in &config.hosts {
            let _ = writeln!(hosts_text, "{ip} {name}");
        }
        std::fs::write(&hosts, hosts_text)
            .with_context(|| format!("writing {}", hosts.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args([
            "-k",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--bind-interfaces",
            "--log-queries",
            "--user=root",
            "--pid-file=",
        ])
        .args(
            config
                .listen
                .iter()
                .map(|ip| format!("--listen-address={ip}")),
        )
        .arg(format!("--log-facility={}", log.display()))
        .arg(format!("--addn-hosts={}", hosts.display()))
        .args(
            config
                .records
                .iter()
                .map(|(name, ip)| format!("--address=/{name}/{ip}")),
        )
        .args(
            config
                .cnames
                .iter()
                .map(|(alias, target)| format!("--cname={alias},{target}")),
        )
        .args(config.local_ttl.map(|t| format!("--local-ttl={t}")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        ns.run_in(&mut cmd);
        let child = cmd.spawn().context("spawning dnsmasq")?;
        let mut d = Self {
            child,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + START_WAIT;
        while !d.log().contains("started") {
            if let Some(status) = d.child.try_wait().context("waiting for dnsmasq")? {
                bail!("dnsmasq exited at start-up ({status}): {}", d.log());
            }
            if Instant::now() > deadline {
                bail!("dnsmasq did not start in {START_WAIT:?}: {}", d.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    /// The query log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Query lines (`query[A] name from ip`).
    pub fn queries(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("query["))
            .map(str::to_owned)
            .collect()
    }

    /// Every query received, in order.
    pub fn queried(&self) -> Vec<Query> {
        self.queries()
            .iter()
            .filter_map(|l| Query::parse(l))
            .collect()
    }

    /// Queries for `name` itself (case-insensitive, trailing dot ignored).
    pub fn queries_for(&self, name: &str) -> Vec<Query> {
        let name = normalize(name);
        self.queried()
            .into_iter()
            .filter(|q| q.name == name)
            .collect()
    }

    /// Queries for `domain` or any name below it.
    pub fn queries_at_or_below(&self, domain: &str) -> Vec<Query> {
        let domain = normalize(domain);
        let below = format!(".{domain}");
        self.queried()
            .into_iter()
            .filter(|q| q.name == domain || q.name.ends_with(&below))
            .collect()
    }
}

/// One `query[TYPE] NAME from CLIENT` log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub qtype: String,
    /// Lowercase, without a trailing dot.
    pub name: String,
    pub from: String,
}

impl Query {
    fn parse(line: &str) -> Option<Self> {
        let rest = &line[line.find("query[")? + "query[".len()..];
        let (qtype, rest) = rest.split_once(']')?;
        let mut words = rest.split_whitespace();
        let name = words.next()?;
        let from = match (words.next(), words.next()) {
            (Some("from"), Some(ip)) => ip.to_owned(),
            _ => String::new(),
        };
        Some(Self {
            qtype: qtype.to_owned(),
            name: normalize(name),
            from,
        })
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_WAIT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_lines_are_parsed() {
        assert_eq!(
            Query::parse(
                "Nov 21 14:52:04 dnsmasq[23741]: query[AAAA] A.B.example.test. from 198.18.0.1"
            ),
            Some(Query {
                qtype: "AAAA".into(),
                name: "a.b.example.test".into(),
                from: "198.18.0.1".into(),
            })
        );
        assert_eq!(
            Query::parse("Nov 21 14:52:04 dnsmasq[23741]: config example.test is 198.18.0.12"),
            None
        );
    }
}
