//! The privilege boundary. Every mount, pivot, reboot, kill and exec goes through [`System`];
//! [`Linux`] makes the real calls and [`fake::FakeSystem`] records them, so the boot and
//! shutdown sequences are unit-tested without root (the youki pattern). Plain file reads and
//! writes do not go through here: they use [`Paths`], which tests root in a temp directory.

pub mod fake;
mod fake_mounts;
pub mod linux;
mod logfile;
pub use logfile::{is_error_line, RollingFile};
mod reaper;

mod errors;
mod system;

pub use errors::*;
pub use linux::Linux;
pub use system::*;
