//! Long-running programs: the supervisor and what it runs.

pub mod docker;
pub mod supervisor;

pub use supervisor::{ServiceSpec, Stopped, Supervisor};
