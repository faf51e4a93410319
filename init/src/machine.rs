//! What the boot, the drain, the spot lifecycle and the power events share: the machine they act
//! on, the cloud they talk to, what the boot got done, and the shutdown requests. Every one of
//! them imports this module; it imports none of them.

use crate::cloud::{CloudError, Identity, Metadata};
use crate::config::Config;
use crate::services::Supervisor;
use crate::sys::{Paths, System};
use crate::volume::{Mounted, VolumeError, VolumePhase};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Time kept back from a shutdown's deadline for what follows the containers: containerd,
/// sync, unmount, DetachVolume and its confirmation.
pub const RESERVE: Duration = Duration::from_secs(20);

/// Where spotinit runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of our image: everything from the early mounts to power-off.
    Pid1,
    /// A service under another init (Ubuntu, Amazon Linux): configuration, volume and, if
    /// enabled, Docker; no mounts of its own, no network, no power-off.
    Service,
}

/// What every phase shares.
pub struct Machine<S: System> {
    pub sys: Arc<S>,
    pub paths: Paths,
    pub mode: Mode,
    pub supervisor: Supervisor,
    /// Shutdown requests (signals, power button, spot notice) go here.
    pub requests: mpsc::UnboundedSender<Request>,
    /// Mounts made by the early phase, undone in reverse at shutdown.
    pub early_mounts: Mutex<Vec<PathBuf>>,
}

impl<S: System> Machine<S> {
    pub fn new(sys: Arc<S>, paths: Paths, mode: Mode) -> (Self, mpsc::UnboundedReceiver<Request>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let supervisor = Supervisor::start(sys.clone());
        (
            Machine {
                sys,
                paths,
                mode,
                supervisor,
                requests: tx,
                early_mounts: Mutex::new(Vec::new()),
            },
            rx,
        )
    }
}

/// The cloud side of the boot: production talks to IMDS and EC2; tests plug in fakes.
pub trait Platform {
    type Meta: Metadata + Clone;
    type Volume: VolumePhase;
    fn metadata(&self, endpoint: Option<&str>) -> Result<Self::Meta, CloudError>;
    fn volume(
        &self,
        cfg: &Config,
        identity: &Identity,
        meta: &Self::Meta,
    ) -> Result<Self::Volume, VolumeError>;
    /// What the watcher hands on to the upkeep of the state volume (the instance events).
    type Events: Send + 'static;
    /// Starts watching for spot notices (and other instance events) once IMDS is known: a
    /// notice becomes a request; the events go to the volume's upkeep.
    fn watch(
        &self,
        cfg: &Config,
        meta: &Self::Meta,
        requests: mpsc::UnboundedSender<Request>,
    ) -> Self::Events;
    /// Once the state volume is mounted: its snapshots (on a schedule, and on the rebalance
    /// recommendations among `events`) and the stable address (the Elastic IP).
    fn start_volume_upkeep(
        &self,
        cfg: &Config,
        identity: &Identity,
        meta: &Self::Meta,
        mounted: &crate::volume::Mounted,
        events: Self::Events,
    );
}

/// What the boot got done, for the shutdown.
pub struct BootState<P: Platform> {
    pub config: Option<Config>,
    pub identity: Option<Identity>,
    pub metadata: Option<P::Meta>,
    pub volume: Option<P::Volume>,
    pub mounted: Option<Mounted>,
    pub docker_started: bool,
    pub ready: bool,
    /// The background task making Docker's containers match `[[containers]]`; the drain stops
    /// it first, so nothing is pulled, created or started into a shutdown.
    pub declared_containers: Option<tokio::task::JoinHandle<()>>,
}

impl<P: Platform> Default for BootState<P> {
    fn default() -> Self {
        BootState {
            config: None,
            identity: None,
            metadata: None,
            volume: None,
            mounted: None,
            docker_started: false,
            ready: false,
            declared_containers: None,
        }
    }
}

/// What follows the drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    PowerOff,
    Reboot,
    /// Wait for EC2 to take the instance (spot: never power off early on our own).
    Wait,
    /// Stay up without Docker (debugging after a failed boot).
    Stay,
    /// Exit the process (service mode).
    Exit,
}

#[derive(Clone, Debug)]
pub struct Request {
    pub reason: String,
    pub then: Then,
    /// When EC2 will take the instance, if it said.
    pub deadline: Option<Instant>,
}

impl Request {
    pub fn new(reason: impl Into<String>, then: Then) -> Self {
        Request {
            reason: reason.into(),
            then,
            deadline: None,
        }
    }
    pub fn with_deadline(mut self, d: Instant) -> Self {
        self.deadline = Some(d);
        self
    }
}
