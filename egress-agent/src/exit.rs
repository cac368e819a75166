//! Exit codes (sysexits): 0 ok, 64 usage, 78 bad configuration or policy, 1 runtime failure;
//! `exec` also 126/127 like a shell, and otherwise its workload's own.

pub const OK: u8 = 0;
pub const FAILURE: u8 = 1;
pub const USAGE: u8 = 64;
pub const CONFIG: u8 = 78;
/// `exec`: the workload's command was not found (as a shell reports it).
pub const NOT_FOUND: u8 = 127;
/// `exec`: the workload's command was found but could not be executed.
pub const NOT_EXECUTABLE: u8 = 126;
