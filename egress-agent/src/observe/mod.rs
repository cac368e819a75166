//! What the agent tells its operator: kernel events as log lines (`events`, with wall-clock
//! attempt times from `walltime`), Prometheus metrics and where they are served (`metrics`,
//! `scrape`), the recent-denials record (`recent`), log set-up and error reports.

pub mod events;
pub mod logging;
pub mod metrics;
pub mod recent;
pub mod report;
pub mod scrape;
pub mod walltime;
