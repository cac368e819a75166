//! The ABI between the egress kernel programs and the agent.
//!
//! Everything here is `#[repr(C)]`, fixed-size and free of pointers, so that the same bytes mean
//! the same thing on both sides. Sizes are pinned by const assertions: a change that moves a
//! field is a layout change and must bump [`LAYOUT_VERSION`].
#![no_std]

pub mod counters;
pub mod dest;
pub mod events;
pub mod inbound;
pub mod maps;
pub mod packet;
pub mod ratelimit;
pub mod verdict;

pub use counters::{Hook, Reason};
pub use dest::{Dest, Family, Proto};
pub use events::Event;
pub use maps::{PortKey, RuleKey, RuleValue, SlotConfig};
pub use verdict::{Decision, Tables, decide};

/// Version of the map layout. Part of every pin path, so that an agent never reuses maps it
/// cannot read.
pub const LAYOUT_VERSION: u32 = 5;
