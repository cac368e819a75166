//! Exit codes (sysexits): 0 ok, 64 usage, 78 bad configuration or policy, 1 runtime failure.

pub const OK: u8 = 0;
pub const FAILURE: u8 = 1;
pub const USAGE: u8 = 64;
pub const CONFIG: u8 = 78;
