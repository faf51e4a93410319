//! What runs beside the boot's phases: the other device drivers then the power button, Docker's
//! kernel modules, the IMDS firewall rules. Docker waits for all of it.

use crate::machine::Request;
use crate::sys::{Paths, System};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Why the IMDS firewall rules are not in.
#[derive(Debug, thiserror::Error)]
pub enum ImdsRulesError {
    #[error(transparent)]
    Command(#[from] crate::sys::CommandError),
    #[error("the task installing them ended: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// What runs in the background while the boot goes on; Docker waits for all of it.
#[derive(Default)]
pub(super) struct Background {
    /// Docker's kernel modules.
    pub(super) docker_modules: Option<crate::host::DockerModules>,
    /// The other device drivers, then the power button.
    pub(super) coldplug: Option<tokio::task::JoinHandle<()>>,
    /// The firewall rules that keep containers away from IMDS.
    pub(super) imds_rules: Option<tokio::task::JoinHandle<Result<String, ImdsRulesError>>>,
}

impl Background {
    /// The firewall rules' outcome, once they are in (None: not asked for).
    pub(super) async fn imds_rules_in(&mut self) -> Option<Result<String, ImdsRulesError>> {
        match self.imds_rules.take() {
            Some(task) => Some(task.await.unwrap_or_else(|e| Err(ImdsRulesError::Task(e)))),
            None => None,
        }
    }

    /// The drivers and Docker's modules, loaded.
    pub(super) async fn drivers_loaded(self) {
        if let Some(drivers) = self.coldplug {
            if let Err(e) = drivers.await {
                crate::log!("modules: the device drivers' task ended: {e}");
            }
        }
        if let Some(modules) = self.docker_modules {
            crate::log!("modules: {}", modules.wait().await);
        }
    }
}

/// The device drivers beyond the NIC's (coldplug), then the power button: evdev, which makes
/// it readable, is one of them. Runs beside the network, configuration and volume phases.
pub(super) async fn other_drivers_then_power_button<S: System>(
    sys: Arc<S>,
    paths: Paths,
    tried: Vec<String>,
    requests: mpsc::UnboundedSender<Request>,
) {
    match crate::host::load_device_drivers(&*sys, &paths, tried).await {
        Ok(line) => crate::log!("modules: {line}"),
        Err(e) => crate::log!("modules: {e}"),
    }
    // EC2's stop and terminate press it: the drain starts there.
    if crate::power::listen_power_button(&paths, requests) == 0 {
        crate::log!(
            "power button: no input device named \"Power Button\" (input devices: {}); EC2 stop and terminate will not drain cleanly",
            crate::power::input_devices(&paths).join(", ")
        );
    }
}
