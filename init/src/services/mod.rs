//! Long-running programs: the supervisor and what it runs.

pub mod clock;
pub mod containers;
pub mod docker;
pub mod engine;
pub mod registry_auth;
pub mod ssh;
pub mod supervisor;

pub use supervisor::{LaunchError, ServiceSpec, Stopped, Supervisor};
