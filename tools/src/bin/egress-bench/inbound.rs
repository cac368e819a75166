//! The inbound check's per-packet cost. The ingress program runs on every packet a socket of a
//! protected cgroup receives; for any socket but a listener it only reads the socket's state.
//! Measured as a TCP request/response over the veth pair (one byte each way per operation:
//! one packet received per operation), in a cgroup without programs and in one with egress
//! attached, interleaved over rounds; then with BPF run-time statistics on, the kernel's own
//! nanoseconds per run of the ingress program. A TCP send on a connected socket runs no other
//! egress program, so the difference is the ingress program's.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result};
use egress_agent::compile::Resolved;
use egress_agent::enforcer::Enforcer;
use egress_agent::policy;
use rand::seq::SliceRandom as _;

use crate::report::{median, quantile, thousands};
use crate::world::{DEST4, Server, World};
use egress_tools::interrupt;

use crate::{MAX_OPS, Settings, kernel, progress};

/// The echo server's port on the remote destination (the sinks hold 8000).
const ECHO_PORT: u16 = 8001;
/// The scenario's own slot (its programs and maps are its own anyway).
const SLOT: u32 = 10;
const CLIENT: &str = "base";

/// What the phase measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InboundCost {
    pub rounds: usize,
    /// Medians over rounds of each round's fastest batch, ns per request/response.
    pub baseline_ns: f64,
    pub egress_ns: f64,
    /// Median over rounds of (egress − baseline), and half its interquartile range.
    pub added_ns: f64,
    pub added_half_iqr_ns: f64,
    /// Median over rounds of egress / baseline.
    pub ratio: f64,
    /// Kernel run time of the ingress program: runs and ns per run, if it could be read.
    pub kernel_runs: Option<u64>,
    pub kernel_ns_per_run: Option<f64>,
}

fn step(s: &Settings) -> String {
    let dest = SocketAddr::new(DEST4.into(), ECHO_PORT);
    // Longer batches than a connect's: a request/response is cheap and the difference small.
    format!("rr {dest} {} {MAX_OPS} {}", s.batches, s.tcp_batch_ms * 4)
}

fn cell(world: &World, cgroup: &Path, s: &Settings) -> Result<f64> {
    let batches = world.batches(world.client(CLIENT)?, cgroup, step(s))?;
    Ok(batches.iter().copied().fold(f64::INFINITY, f64::min))
}

/// An echo server in the remote namespace: one thread per connection, each byte sent back,
/// pinned to the CPU the workload is pinned to.
fn echo_server(world: &World) -> Result<Server> {
    Server::start(
        &world.remote,
        SocketAddr::new(DEST4.into(), ECHO_PORT),
        64,
        |mut stream| {
            let _ = stream.set_nodelay(true);
            std::thread::spawn(move || {
                // On the workload's CPU: each request/response is then two switches on one
                // CPU, not a wake-up of the other one (which made the path bimodal).
                let cpu = std::thread::available_parallelism().map_or(0, |n| n.get() - 1);
                // SAFETY: a CPU set on the stack, for this thread only; best effort.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                let mut buf = [0u8; 64];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        },
    )
}

/// Egress on a cgroup of its own, with a policy that allows the echo server.
fn egress(cgroup: &Path) -> Result<Enforcer> {
    let yaml = format!(
        "egress_policy:\n  name: bench-inbound\n  default_action: DENY\n  allowed_destinations:\n    \
         - {{cidr: \"{}/32\", ports: [{ECHO_PORT}], protocols: [tcp]}}\n",
        DEST4
    );
    let policy = policy::parse_str(&yaml, Path::new("bench-inbound.yaml"))?;
    let mut enforcer = Enforcer::start(policy, Resolved::new(), SLOT)?;
    enforcer.attach(cgroup)?;
    Ok(enforcer)
}

pub fn run(world: &mut World, s: &Settings, rng: &mut rand::rngs::StdRng) -> Result<InboundCost> {
    if world.client(CLIENT).is_err() {
        world.add_client(CLIENT)?;
    }
    let base: PathBuf = world.cgroups.child("inbound-base")?;
    let protected: PathBuf = world.cgroups.child("inbound-egress")?;
    let _echo = echo_server(world)?;
    let _enforcer = egress(&protected)?;
    progress("inbound check: request/response with and without the programs");
    // Unrecorded: proves both paths work.
    cell(world, &base, s).context("inbound warm-up, no programs")?;
    cell(world, &protected, s).context("inbound warm-up, egress")?;
    let (mut b, mut e, mut added, mut ratio) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..s.rounds {
        interrupt::check()?;
        let mut order = [false, true];
        order.shuffle(rng);
        let (mut base_ns, mut egress_ns) = (f64::NAN, f64::NAN);
        for protected_cell in order {
            if protected_cell {
                egress_ns = cell(world, &protected, s)
                    .with_context(|| format!("inbound round {round}, egress"))?;
            } else {
                base_ns = cell(world, &base, s)
                    .with_context(|| format!("inbound round {round}, no programs"))?;
            }
        }
        b.push(base_ns);
        e.push(egress_ns);
        added.push(egress_ns - base_ns);
        ratio.push(egress_ns / base_ns);
    }
    let (kernel_runs, kernel_ns_per_run) = match kernel_cost(world, &protected, s) {
        Ok(v) => (Some(v.0), Some(v.1)),
        Err(err) => {
            progress(&format!("inbound check: kernel run time not read: {err:#}"));
            (None, None)
        }
    };
    Ok(InboundCost {
        rounds: s.rounds,
        baseline_ns: median(&b),
        egress_ns: median(&e),
        added_ns: median(&added),
        added_half_iqr_ns: (quantile(&added, 0.75) - quantile(&added, 0.25)) / 2.0,
        ratio: median(&ratio),
        kernel_runs,
        kernel_ns_per_run,
    })
}

/// One more egress cell with run-time statistics on: (runs, ns per run) of the ingress
/// program.
fn kernel_cost(world: &World, cgroup: &Path, s: &Settings) -> Result<(u64, f64)> {
    let attached = kernel::Attached::query(cgroup)?;
    let _stats = kernel::enable_stats()?;
    let before = attached.snapshot()?;
    let t = Instant::now();
    cell(world, cgroup, s)?;
    let after = attached.snapshot()?;
    let per = kernel::per_run(&before, &after);
    let &(runs, ns) = per
        .get("skb_ingress")
        .with_context(|| format!("the ingress program did not run ({:.1?})", t.elapsed()))?;
    Ok((runs, ns))
}

impl InboundCost {
    pub fn markdown(&self) -> String {
        let kernel = match (self.kernel_runs, self.kernel_ns_per_run) {
            (Some(runs), Some(ns)) => format!(
                " Inside the kernel (BPF run-time statistics, one more run): the ingress program \
                 ran {} times at **{ns:.0} ns per packet**.",
                thousands(runs as f64)
            ),
            _ => " The kernel's run time of the ingress program could not be read.".to_owned(),
        };
        format!(
            "### Inbound check: cost per received packet\n\n\
             The workload keeps one TCP connection to an echo server in the remote namespace and \
             writes one byte and reads it back per operation (one packet received per \
             operation), in a cgroup without programs and in one with egress attached (whose \
             ingress program runs on every received packet); {} rounds, each running both in a \
             shuffled order, fastest batch per round, medians over rounds.\n\n\
             | path | ns per request/response | × no programs | added ns |\n\
             | --- | ---: | ---: | ---: |\n\
             | no programs | {} | 1 | — |\n\
             | egress attached | {} | {:.3} | {:+.0} ±{:.0} |\n\n\
             {}\n",
            self.rounds,
            thousands(self.baseline_ns),
            thousands(self.egress_ns),
            self.ratio,
            self.added_ns,
            self.added_half_iqr_ns,
            kernel.trim_start(),
        )
    }
}
