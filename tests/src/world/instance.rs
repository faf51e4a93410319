//! A launched instance: its console, its IMDS (spot notices), its power, its loss, and the host
//! ports that reach its Docker API and service.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::{BOOT_FAILED_MARKER, DOCKER_API_PORT, READY_MARKER, SERVICE_PORT};
use crate::docker::Docker;
use crate::ebs::EbsBridge;
use crate::fidelity::Fidelity;
use crate::imds::ImdsMock;
use crate::qemu::{ConsoleCursor, ConsoleLine, Error, Result, Vm};

/// A launched instance: its VM, its IMDS, its place in the API.
pub struct SimInstance {
    pub id: String,
    pub name: String,
    pub zone: String,
    pub(super) vm: Arc<Vm>,
    pub(super) imds: ImdsMock,
    pub(super) fidelity: Arc<Fidelity>,
    pub(super) ebs: Arc<EbsBridge>,
    /// When QEMU started (the zero of console line times).
    pub(super) started: Instant,
}

impl SimInstance {
    /// A console cursor at the first line (timestamps count from QEMU's start).
    pub fn console(&self) -> ConsoleCursor {
        self.vm.console()
    }

    /// A console cursor past everything printed so far.
    pub fn console_from_now(&self) -> ConsoleCursor {
        self.vm.console_from_now()
    }

    pub fn imds(&self) -> &ImdsMock {
        &self.imds
    }

    /// The host instant a console line was received.
    pub fn instant_of(&self, line: &ConsoleLine) -> Instant {
        self.started + line.at
    }

    /// Waits for `spotinit: ready`; fails at once if the boot fails (`BOOT FAILED`) or QEMU exits.
    pub async fn wait_ready(&self, deadline: Duration) -> Result<ConsoleLine> {
        let line = self
            .console()
            .wait_until(
                "\"spotinit: ready in\" (or \"BOOT FAILED\")",
                |t| t.contains(READY_MARKER) || t.contains(BOOT_FAILED_MARKER),
                deadline,
            )
            .await
            .map_err(|e| e.context(format!("instance {} ({})", self.name, self.id)))?;
        if line.text.contains(BOOT_FAILED_MARKER) {
            // Give the rest of the failure report a moment to arrive, for the message.
            let _ = self
                .console()
                .wait_for("Docker was not started", Duration::from_secs(10))
                .await;
            return Err(Error::new(format!(
                "instance {} ({}) failed to boot instead of reaching ready\n{}",
                self.name,
                self.id,
                self.vm.diagnostics()
            )));
        }
        Ok(line)
    }

    /// Posts a spot interruption notice (`terminate`) for `in_` from now, as EC2 does two minutes
    /// before it takes a spot instance.
    pub fn post_spot_notice(&self, in_: Duration) -> SystemTime {
        let at = SystemTime::now() + in_;
        self.imds.post_spot_notice("terminate", at);
        at
    }

    /// Posts a rebalance recommendation (now).
    pub fn post_rebalance(&self) {
        self.imds.post_rebalance(SystemTime::now());
    }

    /// Presses the ACPI power button (EC2 stop/terminate of an on-demand instance).
    pub async fn powerdown(&self) -> Result<()> {
        self.vm.powerdown().await
    }

    /// The instance is lost without warning: QEMU is SIGKILLed (nothing more reaches the disks),
    /// then EC2 terminates it. Its volumes stay attached, held, for the fidelity layer's
    /// `release_after_termination`, then they are `available`.
    pub async fn kill_hard(&self) -> Result<()> {
        self.vm.kill();
        self.vm
            .wait_exit(Duration::from_secs(30))
            .await
            .map_err(|e| e.context(format!("kill instance {}", self.id)))?;
        self.fidelity.terminate(&self.id).await.map_err(Error::new)
    }

    /// EC2 takes the instance (after a drain, at the notice's deadline): the same as
    /// [`SimInstance::kill_hard`]; after a clean drain it holds no volume any more.
    pub async fn reclaim(&self) -> Result<()> {
        self.kill_hard().await
    }

    /// Waits for QEMU to exit (the guest powered off); returns whether it exited with status 0.
    pub async fn wait_poweroff(&self, deadline: Duration) -> Result<bool> {
        let status = self.vm.wait_exit(deadline).await?;
        Ok(status.success())
    }

    /// The host port forwarded to `guest_port`.
    pub fn host_port(&self, guest_port: u16) -> Result<u16> {
        self.vm.host_port(guest_port).ok_or_else(|| {
            Error::new(format!(
                "instance {}: guest port {guest_port} is not forwarded",
                self.name
            ))
        })
    }

    /// The Docker Engine API of the instance, through its forwarded port.
    pub fn docker(&self) -> Result<Docker> {
        Ok(Docker::new(self.host_port(DOCKER_API_PORT)?))
    }

    /// The host port that reaches the test service (guest port [`SERVICE_PORT`]).
    pub fn service_port(&self) -> Result<u16> {
        self.host_port(SERVICE_PORT)
    }

    /// Console tail and QEMU state, for error messages.
    pub fn diagnostics(&self) -> String {
        self.vm.diagnostics()
    }
}

impl Drop for SimInstance {
    fn drop(&mut self) {
        // The bridge holds the VM too: kill it explicitly and stop routing attachments to it.
        self.vm.kill();
        self.ebs.forget_instance(&self.id);
    }
}
