//! Long-running programs: the supervisor and what it runs.

pub mod clock;
pub mod docker;
pub mod ssh;
pub mod supervisor;

pub use supervisor::{ServiceSpec, Stopped, Supervisor};
