//! The agent's metrics endpoint as a scraper sees it: a plain HTTP GET from inside a test
//! namespace, and the samples of a Prometheus exposition.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::netns::NetnsHandle;

/// GET `path` from `addr` inside the namespace `ns`: the whole answer (head and body), or
/// `None` while nothing accepts connections there (a server still starting), so callers poll.
pub fn http_get(ns: &NetnsHandle, addr: SocketAddr, path: &str) -> Option<String> {
    let ns = ns.clone();
    let path = path.to_owned();
    std::thread::spawn(move || {
        ns.enter_current_thread().ok()?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        // What arrived before an error is still the answer.
        let _ = s.read_to_string(&mut answer);
        Some(answer)
    })
    .join()
    .ok()
    .flatten()
}

/// The sum of the samples of `metric` whose labels include every `labels` pair; `None` when
/// no sample matches.
pub fn metric(exposition: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if name != metric {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    found
}
