//! The command line. This is a contract used by people and by outside tests: keep it stable.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "egress-agent",
    version,
    about = "Kernel-enforced egress allowlist for MCP servers"
)]
pub struct Cli {
    /// Log line format on stderr. Default: json when stderr is not a terminal, else text.
    #[arg(long, value_enum, global = true)]
    pub log_format: Option<LogFormat>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `egress_agent=debug`.
    #[arg(long, global = true, default_value = "info", env = "EGRESS_LOG")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run CMD in a fresh cgroup under the policy; exit with CMD's status.
    Exec(ExecArgs),
    /// Protect an existing cgroup; enforcement stays pinned after the agent stops, until
    /// `detach`.
    Run(RunArgs),
    /// Validate a policy and print what it allows (exit 0), or the error (exit 78).
    Check(CheckArgs),
    /// Remove egress enforcement (pinned programs and maps) from a cgroup.
    Detach(DetachArgs),
    /// List the protected cgroups on this host: agent, policy id, recent blocked attempts.
    Status(StatusArgs),
    /// Show the last blocked attempts of the protected workloads, and what would allow them.
    ExplainLast(ExplainLastArgs),
    /// Run CMD like exec, in audit mode, and write a policy that allows what it did.
    Learn(LearnArgs),
}

#[derive(Debug, Args)]
pub struct LearnArgs {
    /// Where to write the learned policy (MCP-NET-02 YAML, commented).
    #[arg(long)]
    pub out: PathBuf,
    /// Start from this policy (run in audit mode, its entries kept) instead of one that
    /// allows nothing.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Collapse two or more names under one registrable domain into `*.domain` (never over
    /// a public suffix).
    #[arg(long)]
    pub wildcards: bool,
    /// User (name or uid) to run CMD as. Default: the invoking user from SUDO_UID, else nobody.
    #[arg(long)]
    pub user: Option<String>,
    /// cgroup v2 directory under which the workload's cgroup is created.
    #[arg(long)]
    pub cgroup_parent: Option<PathBuf>,
    /// Directory the workload starts in.
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Set NAME=VALUE in the workload's environment, or pass NAME from the agent's own.
    #[arg(long = "env", value_name = "NAME[=VALUE]", value_parser = crate::workload::environment::parse_env_setting)]
    pub env: Vec<crate::workload::environment::EnvSetting>,
    /// Start the workload with an empty environment (as for exec).
    #[arg(long)]
    pub env_clear: bool,
    /// Seconds the workload has to exit after a forwarded SIGTERM or SIGINT (as for exec).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub stop_timeout: u64,
    #[command(flatten)]
    pub dns: DnsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub reload: ReloadArgs,
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<OsString>,
}

impl LearnArgs {
    /// The `exec` that learn runs: audit mode, the starting policy's file (or none).
    pub fn exec_args(&self) -> ExecArgs {
        ExecArgs {
            policy: self.policy.clone().unwrap_or_default(),
            user: self.user.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
            cwd: self.cwd.clone(),
            env: self.env.clone(),
            env_clear: self.env_clear,
            mode: Some(ModeArg::Audit),
            stop_timeout: self.stop_timeout,
            dns: self.dns.clone(),
            telemetry: self.telemetry.clone(),
            reload: self.reload.clone(),
            kernel: self.kernel.clone(),
            command: self.command.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExplainLastArgs {
    /// Only the workload in this cgroup v2 directory (default: every protected cgroup).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// How many of the latest blocked attempts to show per workload.
    #[arg(long, short = 'n', default_value_t = 10)]
    pub limit: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, Args)]
pub struct DnsArgs {
    /// resolv.conf to read name servers from when the policy names no resolvers.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// Shortest time an answer is kept before asking again, in seconds.
    #[arg(long, default_value_t = 5)]
    pub dns_min_ttl: u64,
    /// Longest time an answer is kept before asking again, in seconds.
    #[arg(long, default_value_t = 300)]
    pub dns_max_ttl: u64,
    /// Seconds an answer stays in force in the kernel past its TTL, for the agent's refresh.
    /// With no agent running, resolved addresses stop working TTL + this many seconds after
    /// they were learned.
    #[arg(long, default_value_t = 10)]
    pub dns_expiry_grace: u64,
    /// Seconds to wait for one DNS answer.
    #[arg(long, default_value_t = 2)]
    pub dns_timeout: u64,
    /// Network namespace of the workload (a path such as /run/netns/NAME or
    /// /proc/PID/ns/net). `exec` runs the workload in it; the DNS proxy listens in it. Default:
    /// the agent's own.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// DNS queries per second the workload may send (its budget refills at this rate).
    #[arg(long, default_value_t = 200)]
    pub dns_query_rate: u32,
    /// DNS queries the workload may send at once before the rate applies.
    #[arg(long, default_value_t = 400)]
    pub dns_query_burst: u32,
    /// Addresses kept per allowed name learned from DNS answers.
    #[arg(long, default_value_t = 32)]
    pub dns_max_addrs_per_name: u32,
    /// A local copy of AWS's ip-ranges.json (never downloaded by the agent). With it, the
    /// addresses of answers admitted by an entry with `restrictions` must lie in a prefix AWS
    /// publishes for the name's service in an allowed region; the others are not installed.
    #[arg(long, value_name = "FILE")]
    pub aws_ip_ranges: Option<PathBuf>,
    /// How the proxy answers a name the policy does not allow.
    #[arg(long, value_enum, default_value_t = Refusal::Nxdomain)]
    pub dns_refusal: Refusal,
}

#[derive(Clone, Debug, Args)]
pub struct KernelArgs {
    /// The per-packet check that drops outgoing IPv6 packets with a routing header and
    /// packets to loopback leaving through another device: `auto` attaches it only on kernels
    /// that accept a routing header in ancillary data (Mobile IPv6); `always` attaches it
    /// everywhere, at a cost per packet (docs/dns.md).
    #[arg(long, value_enum, default_value_t = PacketCheck::Auto)]
    pub packet_check: PacketCheck,
    #[command(flatten)]
    pub maps: MapArgs,
}

/// Map sizes, shared by `exec`, `run`, `learn` and `check`.
#[derive(Clone, Debug, Default, Args)]
pub struct MapArgs {
    /// Create map KIND with N entries instead of its default (repeatable; a policy may use
    /// half of each map): ports, addresses, prefixes, inbound, rate-limits, resolvers,
    /// learned. N is 2..=16777216. An instance `run` adopts keeps the sizes it was created
    /// with (docs/policy.md#limits).
    #[arg(long = "max-entries", value_name = "KIND=N")]
    pub max_entries: Vec<egress_policy::capacity::MaxEntries>,
}

impl MapArgs {
    pub fn limits(&self) -> egress_policy::capacity::MapLimits {
        egress_policy::capacity::MapLimits::from_flags(&self.max_entries)
    }
}

/// `--mode`: enforce denials (the default), or only report them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    Enforce,
    Audit,
}

impl From<ModeArg> for egress_policy::Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Enforce => egress_policy::Mode::Enforce,
            ModeArg::Audit => egress_policy::Mode::Audit,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PacketCheck {
    Auto,
    Always,
}

/// The answer to a query for a name the policy does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Refusal {
    Nxdomain,
    Refused,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Policy file (MCP-NET-02 YAML).
    #[arg(long)]
    pub policy: PathBuf,
    /// User (name or uid) to run CMD as. Default: the invoking user from SUDO_UID, else nobody.
    #[arg(long)]
    pub user: Option<String>,
    /// cgroup v2 directory under which the workload's cgroup is created.
    /// Default: `egress` at the root of the cgroup v2 hierarchy.
    #[arg(long)]
    pub cgroup_parent: Option<PathBuf>,
    /// Directory the workload starts in (it must be able to enter it as --user).
    /// Default: the user's home, or / when it has none it can enter.
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Set NAME=VALUE in the workload's environment, or pass NAME from the agent's own
    /// (repeatable; later ones win). HOME, USER, LOGNAME and SHELL are the user's.
    #[arg(long = "env", value_name = "NAME[=VALUE]", value_parser = crate::workload::environment::parse_env_setting)]
    pub env: Vec<crate::workload::environment::EnvSetting>,
    /// Start the workload with an empty environment (plus HOME, USER, LOGNAME, SHELL, a
    /// default PATH and what --env names) instead of the agent's.
    #[arg(long)]
    pub env_clear: bool,
    /// `audit`: let denied attempts through, logging and counting them with verdict audit
    /// (for a policy without `mode:`, or with `mode: audit`). A policy that says
    /// `mode: enforce` is never run in audit. Default: the policy's mode, else enforce.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Seconds the workload has to exit after a forwarded SIGTERM or SIGINT; then every
    /// process in its cgroup is killed (cgroup.kill) and the agent exits 137.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub stop_timeout: u64,
    #[command(flatten)]
    pub dns: DnsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub reload: ReloadArgs,
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Policy file (MCP-NET-02 YAML).
    #[arg(long)]
    pub policy: PathBuf,
    /// cgroup v2 directory to protect.
    #[arg(long)]
    pub cgroup: PathBuf,
    /// `audit`: let denied attempts through, logging and counting them with verdict audit
    /// (for a policy without `mode:`, or with `mode: audit`). A policy that says
    /// `mode: enforce` is never run in audit. Default: the policy's mode, else enforce.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    #[command(flatten)]
    pub dns: DnsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub reload: ReloadArgs,
    #[command(flatten)]
    pub kernel: KernelArgs,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Policy file to validate.
    pub file: PathBuf,
    /// Also say how the DNS proxy would judge this name (repeatable).
    #[arg(long = "name", value_name = "HOST")]
    pub names: Vec<String>,
    /// Say whether a destination would be allowed, by which rule (file:line) and why:
    /// HOST[:PORT][/PROTO], ADDR[:PORT][/PROTO] or [V6ADDR][:PORT][/PROTO] (repeatable).
    #[arg(long = "explain", value_name = "DEST")]
    pub explain: Vec<String>,
    #[command(flatten)]
    pub maps: MapArgs,
}

/// Telemetry options shared by `exec` and `run`.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Serve Prometheus metrics at /metrics and a health check at /healthz, over HTTP on
    /// ADDR: HOST:PORT (for example 127.0.0.1:9464) or unix:/PATH, a Unix socket (for many
    /// agents on one host; `{pid}` in PATH becomes the agent's process id).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<crate::observe::scrape::MetricsAddr>,
    /// Also write the metrics to FILE in the Prometheus text format, replaced atomically
    /// every --metrics-textfile-interval seconds (for node_exporter's textfile collector;
    /// `{pid}` becomes the agent's process id). Removed when the agent stops.
    #[arg(long, value_name = "FILE")]
    pub metrics_textfile: Option<PathBuf>,
    /// Seconds between rewrites of --metrics-textfile.
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    pub metrics_textfile_interval: u64,
    /// Seconds over which identical blocked attempts are folded into one "repeated N times"
    /// log line.
    #[arg(long, default_value_t = 5)]
    pub log_window: u64,
}

/// Policy reload options: SIGHUP reloads at once; the file is also watched.
#[derive(Debug, Clone, Args)]
pub struct ReloadArgs {
    /// Seconds between checks of the policy file for changes (a change reloads it).
    #[arg(long, default_value_t = 2)]
    pub watch_interval: u64,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// The protected cgroup v2 directory.
    #[arg(long)]
    pub cgroup: PathBuf,
}
