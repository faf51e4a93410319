//! One phase of the boot: its end and duration on the console, and the error that stops the
//! boot before Docker.

use super::background::ImdsRulesError;
use crate::cloud::CloudError;
use crate::config::ConfigError;
use crate::console::human;
use crate::host::HostError;
use crate::services::clock::ClockError;
use crate::services::docker::DockerError;
use crate::services::LaunchError;
use crate::sys::{FileError, SysError};
use crate::volume::pivot::PivotError;
use crate::volume::{StateError, VolumeError};
use std::fmt;
use std::future::Future;
use tokio::time::Instant;

/// Why the boot stopped before Docker.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    Config(Vec<ConfigError>),
    Volume(#[source] VolumeError),
    Phase {
        phase: &'static str,
        #[source]
        source: Box<PhaseError>,
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
            BootError::Phase { phase, source } => write!(f, "{phase}: {source}"),
        }
    }
}

/// Why one phase failed, with the error it failed with as the source.
#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error("cannot read {what} from IMDS: {source}")]
    Imds {
        what: &'static str,
        source: CloudError,
    },
    #[error(transparent)]
    Clock(#[from] ClockError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Pivot(#[from] PivotError),
    #[error("cannot start {init} (volume.root_init): {source}")]
    RootInit { init: String, source: SysError },
    #[error("{0}; refusing to start Docker on anything but the state volume")]
    DockerState(#[source] StateError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    DaemonJson(FileError),
    #[error("cannot install the firewall rules that keep containers away from IMDS: {0}. Without them containers could take the instance role's credentials, so Docker is not started; set docker.block_imds = false to run without them knowingly")]
    ImdsRules(#[source] ImdsRulesError),
    #[error("containerd: {0}")]
    Containerd(#[source] DockerError),
    /// A boot error met inside a phase (the configuration's), passed on as it is.
    #[error(transparent)]
    Boot(Box<BootError>),
}

impl From<BootError> for PhaseError {
    fn from(e: BootError) -> Self {
        PhaseError::Boot(Box::new(e))
    }
}

/// Runs one phase: logs its start only if it is slow to matter, and always its end and duration.
pub(super) async fn phase<T, E, F>(name: &'static str, f: F) -> Result<T, BootError>
where
    F: Future<Output = Result<T, E>>,
    E: Into<PhaseError>,
{
    let start = Instant::now();
    match f.await {
        Ok(v) => {
            crate::log!("phase {name}: done in {}", human(start.elapsed()));
            Ok(v)
        }
        Err(e) => {
            let e = match e.into() {
                PhaseError::Boot(b) => *b,
                source => BootError::Phase {
                    phase: name,
                    source: Box::new(source),
                },
            };
            crate::log!("phase {name}: FAILED after {}", human(start.elapsed()));
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::clock::ClockError;
    use std::error::Error;

    fn denied() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::EACCES)
    }

    #[tokio::test]
    async fn a_failed_phase_keeps_the_underlying_error_as_its_source() {
        let failing = async {
            let e = FileError::at("mkdir", "/var/lib/chrony")(denied());
            Err::<(), _>(ClockError::from(e))
        };
        let e = phase("clock", failing).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("clock: mkdir /var/lib/chrony: {}", denied())
        );
        let io = std::iter::successors(Some(&e as &(dyn Error + 'static)), |err| (*err).source())
            .find_map(|err| err.downcast_ref::<std::io::Error>())
            .expect("the io::Error is in the source chain");
        assert_eq!(io.raw_os_error(), Some(libc::EACCES));
    }

    #[tokio::test]
    async fn a_boot_error_inside_a_phase_passes_through_unnamed() {
        let failing = async { Err::<(), _>(BootError::Config(Vec::new())) };
        let e = phase("configuration", failing).await.unwrap_err();
        assert!(matches!(e, BootError::Config(_)), "{e:?}");
        assert_eq!(e.to_string(), "invalid configuration:");
    }

    #[test]
    fn a_daemon_json_that_cannot_be_written_is_named() {
        let e = BootError::Phase {
            phase: "dockerd",
            source: Box::new(PhaseError::DaemonJson(FileError::at(
                "write",
                "/run/spotinit/daemon.json",
            )(denied()))),
        };
        assert_eq!(
            e.to_string(),
            format!("dockerd: write /run/spotinit/daemon.json: {}", denied())
        );
        assert_eq!(
            denied().to_string(),
            "Permission denied (os error 13)",
            "the io error's own text"
        );
    }

    #[test]
    fn phase_errors_say_what_they_said_before() {
        let imds = PhaseError::Imds {
            what: "user data",
            source: CloudError::from_code("IMDS", "/latest/user-data", None, "timed out", None),
        };
        assert_eq!(
            imds.to_string(),
            "cannot read user data from IMDS: IMDS /latest/user-data: timed out"
        );
        let state = BootError::Phase {
            phase: "docker state check",
            source: Box::new(PhaseError::DockerState(StateError::NotMounted(
                "/var/lib/docker".into(),
            ))),
        };
        assert_eq!(
            state.to_string(),
            "docker state check: /var/lib/docker is not mounted; refusing to start Docker on anything but the state volume"
        );
    }
}
