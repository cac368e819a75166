//! The commands: each one turns its parsed arguments into a run of the phases below it and an
//! exit code. `exec` and `run` protect a workload (through `supervisor`); `check`, `explain`
//! and `learn` read and write policies; `status`, `explain-last` and `detach` look at or
//! remove what is enforced on this host.

pub mod check;
pub mod detach;
pub mod exec;
pub mod explain;
pub mod learn;
pub mod run;
pub mod status;
