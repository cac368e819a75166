#![no_std]
// This file exists so the agent can depend on this crate from its build script, which makes
// cargo rebuild the agent when the programs change. The programs are in main.rs.
