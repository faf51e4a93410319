//! One phase of the boot: its end and duration on the console, and the error that stops the
//! boot before Docker.

use crate::config::ConfigError;
use crate::console::human;
use crate::volume::VolumeError;
use std::fmt;
use std::future::Future;
use tokio::time::Instant;

/// Why the boot stopped before Docker.
#[derive(Debug)]
pub enum BootError {
    Config(Vec<ConfigError>),
    Volume(VolumeError),
    Phase {
        phase: &'static str,
        message: String,
    },
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::Config(errors) => {
                write!(f, "invalid configuration:")?;
                for e in errors {
                    write!(f, "\n  {e}")?;
                }
                Ok(())
            }
            BootError::Volume(e) => write!(f, "{e}"),
            BootError::Phase { phase, message } => write!(f, "{phase}: {message}"),
        }
    }
}

/// Runs one phase: logs its start only if it is slow to matter, and always its end and duration.
pub(super) async fn phase<T, E, F>(name: &'static str, f: F) -> Result<T, BootError>
where
    F: Future<Output = Result<T, E>>,
    E: Into<PhaseFailure>,
{
    let start = Instant::now();
    match f.await {
        Ok(v) => {
            crate::log!("phase {name}: done in {}", human(start.elapsed()));
            Ok(v)
        }
        Err(e) => {
            let e = match e.into() {
                PhaseFailure::Message(message) => BootError::Phase {
                    phase: name,
                    message,
                },
                PhaseFailure::Boot(b) => b,
            };
            crate::log!("phase {name}: FAILED after {}", human(start.elapsed()));
            Err(e)
        }
    }
}

/// A phase fails with a message, or with a typed boot error.
pub enum PhaseFailure {
    Message(String),
    Boot(BootError),
}

impl From<String> for PhaseFailure {
    fn from(s: String) -> Self {
        PhaseFailure::Message(s)
    }
}

impl From<BootError> for PhaseFailure {
    fn from(b: BootError) -> Self {
        PhaseFailure::Boot(b)
    }
}
