//! Log set-up: structured lines on stderr (stdout belongs to the workload, which for a stdio
//! MCP server is the protocol channel).

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {message}")]
pub struct LogError {
    filter: String,
    message: String,
}

pub fn init(format: Option<LogFormat>, filter: &str) -> Result<(), LogError> {
    let env = EnvFilter::try_new(filter).map_err(|e| LogError {
        filter: filter.into(),
        message: e.to_string(),
    })?;
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    });
    // Colour codes only for a person at a terminal: in a file or a journal they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| LogError {
        filter: filter.into(),
        message: e.to_string(),
    })
}
