//! The protected process: spawning it as an unprivileged user inside its cgroup
//! (`spawn`), its environment and working directory (`environment`), and whether this
//! process has the privileges that needs (`privilege`).

pub mod environment;
pub mod privilege;
mod spawn;

pub use spawn::*;
