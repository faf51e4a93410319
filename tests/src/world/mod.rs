//! The spot world in a box, assembled: moto behind the EC2-fidelity layer, EBS volumes as backing
//! files hot-plugged into QEMU instances, an IMDSv2 mock per instance, and instances booted from
//! the image `image/build.sh` made.
//!
//! ```no_run
//! # async fn f() -> spotworld::qemu::Result<()> {
//! use spotworld::world::{InstanceSpec, UserData, World, WorldSettings};
//! let world = World::start(WorldSettings::new("example")).await?;
//! let a = world
//!     .launch(InstanceSpec::new("a", "us-east-1a").user_data(UserData::new("example").to_toml()))
//!     .await?;
//! a.wait_ready(std::time::Duration::from_secs(300)).await?;
//! a.post_spot_notice(std::time::Duration::from_secs(120));
//! # Ok(()) }
//! ```
//!
//! # How the guest reaches the simulated cloud
//!
//! QEMU user networking (slirp) maps the network's host address (`x.x.2.2`) to the host's
//! loopback, where the IMDS mocks and the fidelity layer listen on ports of their own. Two ways:
//!
//! - [`Net::HostAlias`] (the default for direct kernel boot): the default `10.0.2.0/24` network;
//!   the kernel command line says `spotinit.imds_endpoint=http://10.0.2.2:<imds port>`,
//!   `spotinit.aws.ec2_endpoint=http://10.0.2.2:<fidelity port>` and
//!   `spotinit.time.servers=['10.0.2.2:<ntp port>']` (the world's [`NtpServer`], standing in for
//!   the Amazon Time Sync Service that spotinit waits for before its first signed EC2 call).
//! - [`Net::LinkLocal`] (the only way for UEFI, whose kernel command line is sealed in the UKI):
//!   the network is `169.254.0.0/16`, IMDS is at the real `169.254.169.254:80` (a guest forward to
//!   the instance's mock, so spotinit uses its built-in default), and the EC2 endpoint,
//!   `http://169.254.2.2:<fidelity port>`, and the NTP server, `169.254.2.2:<ntp port>` (slirp
//!   forwards only TCP to chosen addresses, and 169.254.169.123:123 would need the host's port
//!   123), have to come in the user data: the world puts `aws.ec2_endpoint = "..."` and
//!   `time.servers = [...]` as its first lines (so the user data must not have an `[aws]` or a
//!   `[time]` table of its own).
//!
//! # Pristine images
//!
//! Every instance boots `build/image/spotinit.raw` attached read-only (QEMU `readonly=on`) and,
//! for direct kernel boot, the `vmlinuz`/`initrd.img`/`cmdline` of the same build: nothing an
//! instance does can change what the next one boots, so no copy is needed. (Rebuilding the image
//! while a test runs would change it under the running instances: don't.)
//!
//! Each world keeps its files under `build/test-runs/<name>/` for inspection afterwards: per
//! instance `console.log` (timestamped), `qmp.log`, `qemu-cmdline.sh`; `ebs/` with the volume and
//! snapshot backing files.
//!
//! # Files
//!
//! The world itself (this file: start, the API helpers) and one file per part: where the image
//! is (`image`), the world's settings (`settings`), what to launch and the launch
//! (`launch`), a launched instance (`instance`), the scenarios' user data (`user_data`), volume
//! pools (`pool`), a look inside a volume (`debugfs`) and spotinit's phase timings (`timings`).

mod debugfs;
mod image;
mod instance;
mod launch;
mod pool;
mod settings;
mod timings;
mod user_data;

pub use debugfs::debugfs;
pub use image::Image;
pub use instance::SimInstance;
pub use launch::{InstanceSpec, Net};
pub use pool::{one_volume_each, slot_of, LostRace, TookSlot, POOL_TAG, SLOT_TAG};
pub use settings::{e2e_settings, WorldSettings};
pub use timings::{parse_human, phase_timings};
pub use user_data::{docker_api_toml, UserData};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ebs::EbsBridge;
use crate::fidelity::Fidelity;
use crate::moto::{MotoServer, Volume};
use crate::ntp::NtpServer;
use crate::qemu::{Error, Result};
use crate::query::Params;

/// The guest port dockerd listens on (the user data's `docker.daemon.hosts`), with TLS.
pub const DOCKER_API_PORT: u16 = crate::tls::DOCKER_TLS_PORT;
/// The guest port the test service is published on.
pub const SERVICE_PORT: u16 = 8080;
/// Where slirp's host alias is on the link-local network (`169.254.0.0/16` → `x.x.2.2`).
pub const LINK_LOCAL_HOST: &str = "169.254.2.2";
/// spotinit's console line when Docker is up.
pub const READY_MARKER: &str = "spotinit: ready in";
/// spotinit's console line for a boot that stopped before Docker.
pub const BOOT_FAILED_MARKER: &str = "spotinit: BOOT FAILED: ";

/// The repository's top directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

/// moto + fidelity layer + EBS bridge + a work directory; instances are launched into it.
pub struct World {
    // Fields drop in order: instances hold clones of the Arcs, the moto server goes last.
    fidelity: Arc<Fidelity>,
    ebs: Arc<EbsBridge>,
    /// Held for its drop, which stops the server.
    _moto: MotoServer,
    ntp: NtpServer,
    image: Image,
    dir: PathBuf,
}

impl World {
    /// Checks the prerequisites (each failure names its fix), starts moto and the fidelity layer
    /// with an [`EbsBridge`] as its block-device side.
    pub async fn start(settings: WorldSettings) -> Result<World> {
        let image = Image::locate()?;
        check_program(
            crate::qemu::QEMU_BINARY,
            "install QEMU 10 from bookworm-backports: \
             apt-get install -t bookworm-backports qemu-system-x86 qemu-utils",
        )?;
        check_program(
            "busybox",
            "apt-get install busybox-static (the test container image and the guest forwards use it)",
        )?;
        let dir = workspace_root()
            .join("build/test-runs")
            .join(&settings.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::new(format!("create {}: {e}", dir.display())))?;
        let moto = MotoServer::start().await.map_err(Error::new)?;
        let ebs = Arc::new(
            EbsBridge::new(dir.join("ebs"))
                .map_err(Error::new)?
                .with_detach_deadline(settings.detach_deadline),
        );
        let fidelity = Fidelity::start(moto.endpoint(), ebs.clone(), settings.fidelity)
            .await
            .map_err(|e| Error::new(format!("start the EC2 fidelity layer: {e}")))?;
        let ntp = NtpServer::start()
            .await
            .map_err(|e| Error::new(format!("start the NTP server: {e}")))?;
        Ok(World {
            fidelity: Arc::new(fidelity),
            ebs,
            _moto: moto,
            ntp,
            image,
            dir,
        })
    }

    pub fn fidelity(&self) -> &Fidelity {
        &self.fidelity
    }

    pub fn ebs(&self) -> &EbsBridge {
        &self.ebs
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The NTP server every instance synchronises with.
    pub fn ntp(&self) -> &NtpServer {
        &self.ntp
    }

    /// `build/test-runs/<name>/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The volumes as EC2 (the fidelity layer) shows them, instance root volumes left out (moto
    /// gives every instance an untagged one).
    pub async fn volumes(&self) -> Result<Vec<Volume>> {
        let mut v = self
            .fidelity
            .client()
            .describe_volumes_all()
            .await
            .map_err(|e| Error::new(format!("DescribeVolumes: {e}")))?;
        v.retain(|v| !v.tags.is_empty());
        Ok(v)
    }

    /// One volume as EC2 shows it.
    pub async fn volume(&self, id: &str) -> Result<Volume> {
        self.fidelity
            .client()
            .describe_volume(id)
            .await
            .map_err(|e| Error::new(format!("DescribeVolumes {id}: {e}")))
    }

    /// The snapshots this account owns.
    pub async fn snapshots(&self) -> Result<Vec<crate::moto::Snapshot>> {
        self.fidelity
            .client()
            .describe_snapshots()
            .await
            .map_err(|e| Error::new(format!("DescribeSnapshots: {e}")))
    }

    /// A volume's backing file: inspect it (`debugfs`, `dumpe2fs`) only while it is detached.
    pub fn volume_file(&self, id: &str) -> PathBuf {
        self.ebs.volume_file(id)
    }

    /// Creates a blank volume through the API (as an operator would), tagged, and waits until it
    /// is `available`. Returns its id.
    pub async fn create_volume(
        &self,
        zone: &str,
        size_gib: u32,
        tags: &[(&str, &str)],
    ) -> Result<String> {
        let size = size_gib.to_string();
        let mut params = Params::from_pairs([
            ("AvailabilityZone", zone),
            ("Size", &size),
            ("VolumeType", "gp3"),
        ]);
        params.push_tag_specification("volume", tags);
        let api = self.fidelity.client();
        let xml = api
            .call_with("CreateVolume", params)
            .await
            .map_err(|e| Error::new(format!("CreateVolume in {zone}: {e}")))?;
        let id = crate::moto::root_text(&xml, "volumeId")
            .ok_or_else(|| Error::new(format!("CreateVolume answered without an id: {xml}")))?;
        self.wait_volume(&id, "available", |v| v.state == "available", STEP)
            .await?;
        Ok(id)
    }

    /// Polls DescribeVolumes until `cond` holds for the volume (`what` names it in the error).
    pub async fn wait_volume(
        &self,
        id: &str,
        what: &str,
        mut cond: impl FnMut(&Volume) -> bool,
        deadline: Duration,
    ) -> Result<Volume> {
        let until = Instant::now() + deadline;
        loop {
            let v = self.volume(id).await?;
            if cond(&v) {
                return Ok(v);
            }
            if Instant::now() > until {
                return Err(Error::new(format!(
                    "volume {id} not {what} after {:.0} s: state {}, attachments {:?}",
                    deadline.as_secs_f64(),
                    v.state,
                    v.attachments
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

const STEP: Duration = Duration::from_secs(60);

fn check_program(program: &str, fix: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()));
    if found {
        Ok(())
    } else {
        Err(Error::new(format!("{program} not found on PATH: {fix}")))
    }
}
