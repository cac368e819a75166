//! Where the metrics go: an HTTP endpoint on TCP or on a Unix socket (`/metrics`,
//! `/healthz`), and a textfile for node_exporter's textfile collector, rewritten atomically.
//!
//! One MCP client may start many `exec` agents on one host; they cannot share a TCP port, but
//! each can have its own socket or textfile (`{pid}` in the path is replaced by the agent's
//! process id).
//!
//! `/metrics` is OpenMetrics when the scraper asks for it (Prometheus does), else the
//! Prometheus text format 0.0.4, which is also what the textfile holds: the format
//! node_exporter and `promtool check metrics` read.

use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// `--metrics-addr`: `HOST:PORT`, or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "`unix:{path}`: the socket path must be absolute, e.g. \
                     unix:/run/egress/metrics-{{pid}}.sock"
                ));
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(MetricsAddr::Tcp)
            .map_err(|_| format!("`{s}`: expected HOST:PORT such as 127.0.0.1:9464, or unix:/PATH"))
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "{a}"),
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// `path` with `{pid}` replaced by this process's id.
pub fn expand(path: &Path) -> PathBuf {
    let text = path.to_string_lossy();
    if text.contains("{pid}") {
        PathBuf::from(text.replace("{pid}", &std::process::id().to_string()))
    } else {
        path.to_path_buf()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("listening for metrics on {addr}: {source}")]
    Listen {
        addr: MetricsAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listening for metrics on {addr}: another process is serving that socket")]
    InUse { addr: MetricsAddr },
    #[error("writing the metrics textfile {}: {source}", path.display())]
    Textfile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A running metrics output; stopping (or dropping) it ends it and removes the socket or
/// file it made.
#[derive(Debug)]
pub struct Output {
    task: tokio::task::JoinHandle<()>,
    remove: Option<PathBuf>,
}

impl Output {
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(path) = self.remove.take()
            && let Err(error) = std::fs::remove_file(&path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), %error, "removing the metrics socket or textfile failed");
        }
    }
}

/// Serves `/metrics` and `/healthz` on `addr` until stopped. Requests are read with a size
/// and time bound; anything else gets 404 or 400.
pub async fn serve(addr: &MetricsAddr, registry: Arc<Registry>) -> Result<Output, ScrapeError> {
    match addr {
        MetricsAddr::Tcp(sa) => {
            let listener =
                tokio::net::TcpListener::bind(sa)
                    .await
                    .map_err(|source| ScrapeError::Listen {
                        addr: addr.clone(),
                        source,
                    })?;
            let local = listener.local_addr().unwrap_or(*sa);
            tracing::info!(addr = %local, "serving metrics at /metrics and health at /healthz");
            let task = tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    spawn_answer(stream, Arc::clone(&registry));
                }
            });
            Ok(Output { task, remove: None })
        }
        MetricsAddr::Unix(path) => {
            let path = expand(path);
            let shown = MetricsAddr::Unix(path.clone());
            clear_stale_socket(&path, &shown)?;
            let listener =
                tokio::net::UnixListener::bind(&path).map_err(|source| ScrapeError::Listen {
                    addr: shown.clone(),
                    source,
                })?;
            tracing::info!(addr = %shown, "serving metrics at /metrics and health at /healthz");
            let task = tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    spawn_answer(stream, Arc::clone(&registry));
                }
            });
            Ok(Output {
                task,
                remove: Some(path),
            })
        }
    }
}

/// A socket left by an agent that died is removed; one that answers is another agent's.
fn clear_stale_socket(path: &Path, shown: &MetricsAddr) -> Result<(), ScrapeError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ScrapeError::Listen {
            addr: shown.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ScrapeError::InUse {
            addr: shown.clone(),
        }),
        Err(_) => std::fs::remove_file(path).map_err(|source| ScrapeError::Listen {
            addr: shown.clone(),
            source,
        }),
    }
}

fn spawn_answer<S>(stream: S, registry: Arc<Registry>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &registry)).await;
    });
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn answer<S>(mut stream: S, registry: &Registry) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            return respond(&mut stream, "431 Request Header Fields Too Large", TEXT, "").await;
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let mut lines = request.lines();
    let mut parts = lines.next().unwrap_or("").split_whitespace();
    let wants_openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("accept")
                && value.contains("application/openmetrics-text")
        })
    });
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => {
            let mut body = String::new();
            if prometheus_client::encoding::text::encode(&mut body, registry).is_err() {
                return respond(&mut stream, "500 Internal Server Error", TEXT, "").await;
            }
            if wants_openmetrics {
                respond(&mut stream, "200 OK", OPENMETRICS, &body).await
            } else {
                respond(&mut stream, "200 OK", TEXT, &text_format(&body)).await
            }
        }
        (Some("GET"), Some("/healthz")) => respond(&mut stream, "200 OK", TEXT, "ok\n").await,
        (Some(_), Some(_)) => respond(&mut stream, "404 Not Found", TEXT, "").await,
        _ => respond(&mut stream, "400 Bad Request", TEXT, "").await,
    }
}

async fn respond<S>(
    stream: &mut S,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The Prometheus text format 0.0.4 of an OpenMetrics exposition: a counter family is named
/// by its `_total` samples, an info family becomes a gauge named `_info`, and `# EOF` and
/// `# UNIT` lines go.
pub fn text_format(openmetrics: &str) -> String {
    let mut suffix: std::collections::HashMap<String, &'static str> =
        std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            match kind {
                "counter" => suffix.insert(name.to_owned(), "_total"),
                "info" => suffix.insert(name.to_owned(), "_info"),
                _ => None,
            };
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let add = suffix.get(name)?;
            let tail = if *prefix == "# TYPE " && tail == "info" {
                "gauge"
            } else {
                tail
            };
            Some(format!("{prefix}{name}{add} {tail}"))
        });
        match rewritten {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Writes the registry to `path` in the text format: to a temporary file in the same
/// directory, then renamed over `path`, so a reader never sees half a file.
pub fn write_textfile(path: &Path, registry: &Registry) -> Result<(), ScrapeError> {
    let fail = |source| ScrapeError::Textfile {
        path: path.to_path_buf(),
        source,
    };
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, registry)
        .map_err(|e| fail(std::io::Error::other(e)))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Not `*.prom`: node_exporter reads only files with that suffix.
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, text_format(&body)).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail(e)
    })
}

/// Rewrites the textfile every `every` until stopped (a first time at once, so that a
/// failure is reported at start).
pub fn textfile(
    path: &Path,
    registry: Arc<Registry>,
    every: Duration,
) -> Result<Output, ScrapeError> {
    let path = expand(path);
    write_textfile(&path, &registry)?;
    tracing::info!(path = %path.display(), every_secs = every.as_secs(), "writing metrics to a textfile");
    let file = path.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(error) = write_textfile(&file, &registry) {
                tracing::warn!(%error, "the metrics textfile was not updated");
            }
        }
    });
    Ok(Output {
        task,
        remove: Some(path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::{counter::Counter, family::Family, info::Info};

    fn registry() -> Registry {
        let mut r = Registry::default();
        let loads: Family<Vec<(String, String)>, Counter> = Family::default();
        loads
            .get_or_create(&vec![("result".into(), "success".into())])
            .inc();
        r.register("egress_policy_loads", "Policy loads", loads);
        let empty: Family<Vec<(String, String)>, Counter> = Family::default();
        r.register("egress_dns_queries", "DNS queries", empty);
        r.register("egress_build", "Build", Info::new(vec![("version", "1")]));
        r
    }

    #[test]
    fn the_text_format_names_counters_by_their_samples() {
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &registry()).unwrap();
        let text = text_format(&om);
        // A family without series is left out entirely by prometheus-client, HELP and TYPE
        // included: hence `Metrics::declare`.
        assert!(!om.contains("egress_dns_queries"), "{om}");
        assert_eq!(
            text,
            "# HELP egress_policy_loads_total Policy loads.\n\
             # TYPE egress_policy_loads_total counter\n\
             egress_policy_loads_total{result=\"success\"} 1\n\
             # HELP egress_build_info Build.\n\
             # TYPE egress_build_info gauge\n\
             egress_build_info{version=\"1\"} 1\n",
            "from:\n{om}"
        );
    }

    #[test]
    fn addresses_parse_and_pid_expands() {
        assert_eq!(
            "127.0.0.1:9464".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Tcp("127.0.0.1:9464".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/egress/m.sock".parse::<MetricsAddr>(),
            Ok(MetricsAddr::Unix("/run/egress/m.sock".into()))
        );
        assert!("unix:rel.sock".parse::<MetricsAddr>().is_err());
        assert!("localhost".parse::<MetricsAddr>().is_err());
        let p = expand(Path::new("/run/egress/metrics-{pid}.sock"));
        assert_eq!(
            p,
            PathBuf::from(format!("/run/egress/metrics-{}.sock", std::process::id()))
        );
    }

    #[tokio::test]
    async fn a_unix_socket_serves_metrics_and_health_and_the_textfile_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("m.sock");
        let reg = Arc::new(registry());
        let out = serve(&MetricsAddr::Unix(sock.clone()), Arc::clone(&reg))
            .await
            .unwrap();
        // A second agent on the same socket is refused, not silently stolen from.
        let second = serve(&MetricsAddr::Unix(sock.clone()), Arc::clone(&reg)).await;
        assert!(
            matches!(second, Err(ScrapeError::InUse { .. })),
            "{second:?}"
        );
        for (path, want) in [
            ("/healthz", "ok\n"),
            (
                "/metrics",
                "egress_policy_loads_total{result=\"success\"} 1\n",
            ),
        ] {
            let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).await.unwrap();
            assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
            assert!(reply.contains(want), "{reply}");
        }
        out.stop();
        assert!(!sock.exists());
        // A socket left behind by a dead agent is taken over.
        let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        drop(stale);
        let out = serve(&MetricsAddr::Unix(sock.clone()), Arc::clone(&reg))
            .await
            .unwrap();
        out.stop();

        let file = dir.path().join("egress.prom");
        let t = textfile(&file, reg, Duration::from_secs(60)).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.contains("# TYPE egress_policy_loads_total counter\n"),
            "{text}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("egress.prom")]);
        t.stop();
        assert!(!file.exists());
    }
}
