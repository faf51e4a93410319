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

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::docker::Docker;
use crate::ebs::EbsBridge;
use crate::fidelity::{Fidelity, Settings};
use crate::imds::ImdsMock;
use crate::moto::{MotoServer, Volume};
use crate::ntp::NtpServer;
use crate::qemu::{ConsoleCursor, ConsoleLine, Error, Result, Vm, VmSpec};
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

/// The built image: what `image/build.sh` leaves in `build/image/`.
#[derive(Clone, Debug)]
pub struct Image {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The production kernel command line (`build/image/cmdline`).
    pub cmdline: String,
}

impl Image {
    /// `$SPOTINIT_IMAGE_DIR` or `build/image/`. Fails naming the fix if a file is missing.
    pub fn locate() -> Result<Image> {
        let dir = std::env::var_os("SPOTINIT_IMAGE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("build/image"));
        let fix = "build it: `nice cargo build --release -p spotinit && image/build.sh` (as root)";
        let file = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::new(format!(
                    "the spotinit image is not built: {} is missing; {fix}",
                    p.display()
                )))
            }
        };
        let image = Image {
            disk: file("spotinit.raw")?,
            kernel: file("vmlinuz")?,
            initrd: file("initrd.img")?,
            cmdline: std::fs::read_to_string(file("cmdline")?)
                .map_err(|e| Error::new(format!("read {}/cmdline: {e}", dir.display())))?
                .trim()
                .to_owned(),
            dir,
        };
        image.warn_if_stale();
        Ok(image)
    }

    /// A spotinit binary newer than the image means the image does not run the code under test.
    fn warn_if_stale(&self) {
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let bin = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("release/spotinit");
        if let (Some(b), Some(i)) = (modified(&bin), modified(&self.disk)) {
            if b > i {
                eprintln!(
                    "spotworld: WARNING: {} is newer than {}: the instances run an older spotinit; \
                     run image/build.sh to test the current one",
                    bin.display(),
                    self.disk.display()
                );
            }
        }
    }

    /// One line saying which build this is (`build/image/version`).
    pub fn version_line(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("version")).unwrap_or_default();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or("?")
                .to_owned()
        };
        format!(
            "spotinit {} (git {}), image {}",
            get("spotinit_version"),
            get("git_commit"),
            get("image_id")
        )
    }
}

/// Fidelity pacing for end-to-end runs: EC2's attach and detach latencies, a short volume
/// release after a termination (EC2 takes minutes; spotinit's wait is the same code either way).
pub fn e2e_settings() -> Settings {
    Settings {
        attach_latency: Duration::from_secs(2),
        detach_latency: Duration::from_secs(1),
        volume_creation: Duration::from_secs(1),
        snapshot_duration: Duration::from_secs(3),
        shutting_down: Duration::from_secs(3),
        release_after_termination: Duration::from_secs(15),
        ..Settings::default()
    }
}

/// What a world is made of.
#[derive(Clone, Debug)]
pub struct WorldSettings {
    /// Names the work directory `build/test-runs/<name>/` (emptied at start).
    pub name: String,
    pub fidelity: Settings,
    /// How long a detach may wait for the guest to let go of the device (the EBS bridge's deadline).
    pub detach_deadline: Duration,
}

impl WorldSettings {
    pub fn new(name: &str) -> WorldSettings {
        WorldSettings {
            name: name.to_owned(),
            fidelity: e2e_settings(),
            detach_deadline: crate::ebs::DEFAULT_DETACH_DEADLINE,
        }
    }
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

    /// Launches an instance: RunInstances in moto, an IMDS mock with its identity, user data and
    /// role (its access key registered with the fidelity layer, so authorization errors name the
    /// instance), a VM booted from the image, registered with the EBS bridge before it can call
    /// AttachVolume. Returns once QEMU runs; wait for markers on [`SimInstance::console`].
    pub async fn launch(&self, spec: InstanceSpec) -> Result<SimInstance> {
        let what = format!("launch instance {} in {}", spec.name, spec.zone);
        let net = spec.net.unwrap_or(if spec.uefi {
            Net::LinkLocal
        } else {
            Net::HostAlias
        });
        if spec.uefi && net == Net::HostAlias {
            return Err(Error::new(format!(
                "{what}: a UEFI boot cannot take the endpoints on its kernel command line (it is \
                 sealed in the UKI): use Net::LinkLocal"
            )));
        }
        if spec.uefi {
            check_file(
                crate::qemu::OVMF_CODE,
                "apt-get install ovmf (UEFI firmware for QEMU)",
            )?;
        }
        let id = self
            .fidelity
            .client()
            .run_instance(&spec.zone)
            .await
            .map_err(|e| Error::new(format!("{what}: RunInstances: {e}")))?;
        let what = format!("{what} ({id})");

        let (host, ec2_endpoint_in_user_data) = match net {
            Net::HostAlias => ("10.0.2.2", false),
            Net::LinkLocal => (LINK_LOCAL_HOST, spec.uefi),
        };
        let ec2_endpoint = format!("http://{host}:{}", self.fidelity.port());
        let ntp_server = format!("{host}:{}", self.ntp.port());
        let user_data = if ec2_endpoint_in_user_data {
            let u = spec.user_data.clone().unwrap_or_default();
            if u.lines()
                .any(|l| l.trim_start().starts_with("[aws") || l.trim_start().starts_with("[time"))
            {
                return Err(Error::new(format!(
                    "{what}: the world puts aws.ec2_endpoint and time.servers into the user data \
                     of a UEFI instance; the user data must not have an [aws] or [time] table"
                )));
            }
            Some(format!(
                "aws.ec2_endpoint = \"{ec2_endpoint}\"\ntime.servers = [\"{ntp_server}\"]\n{u}"
            ))
        } else {
            spec.user_data.clone()
        };
        let mut identity = crate::imds::Identity::new(&id, &spec.zone);
        if net == Net::LinkLocal {
            identity.private_ip = "169.254.2.15".into();
            identity.local_hostname = "ip-169-254-2-15.ec2.internal".into();
        }
        let imds = ImdsMock::start(identity, user_data.clone())
            .await
            .map_err(|e| Error::new(format!("{what}: start its IMDS mock: {e}")))?;
        if let Some(c) = imds.credentials() {
            self.fidelity.register_caller(&c.access_key_id, &id);
        }
        for (name, key) in &spec.public_keys {
            imds.set_public_key(name, key);
        }

        let work_dir = self.dir.join(format!("{}-{id}", spec.name));
        let mut vm_spec = if spec.uefi {
            VmSpec::uefi(&spec.name, &work_dir, &self.image.disk)
        } else {
            let mut append = self.image.cmdline.clone();
            if net == Net::HostAlias {
                append.push_str(&format!(
                    " spotinit.imds_endpoint=http://{host}:{}",
                    imds.port()
                ));
            }
            append.push_str(&format!(
                " spotinit.aws.ec2_endpoint={ec2_endpoint} spotinit.time.servers=['{ntp_server}']"
            ));
            if !spec.extra_cmdline.is_empty() {
                append.push(' ');
                append.push_str(&spec.extra_cmdline);
            }
            VmSpec::direct_kernel(
                &spec.name,
                &work_dir,
                &self.image.kernel,
                Some(&self.image.initrd),
                &append,
            )
            .with_root_disk(&self.image.disk)
        };
        vm_spec = vm_spec
            .with_memory_mib(spec.memory_mib)
            .with_cpus(spec.cpus);
        if net == Net::LinkLocal {
            vm_spec = vm_spec.with_subnet("169.254.0.0/16").with_guest_forward(
                Ipv4Addr::new(169, 254, 169, 254),
                80,
                imds.port(),
            );
        }
        for port in &spec.forward_ports {
            vm_spec = vm_spec.with_host_forward(0, *port);
        }
        if let Some(base) = &spec.rtc_base {
            vm_spec = vm_spec.with_rtc_base(base);
        }
        if let Some(u) = &user_data {
            let _ = std::fs::create_dir_all(&work_dir);
            let _ = std::fs::write(work_dir.join("user-data.toml"), u);
        }
        let vm = Arc::new(Vm::start(vm_spec).await.map_err(|e| e.context(&what))?);
        let started = Instant::now() - vm.uptime();
        // Before the guest can ask for an attachment.
        self.ebs.register_instance(&id, vm.clone());
        Ok(SimInstance {
            id,
            name: spec.name,
            zone: spec.zone,
            vm,
            imds,
            fidelity: self.fidelity.clone(),
            ebs: self.ebs.clone(),
            started,
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

fn check_file(path: &str, fix: &str) -> Result<()> {
    if Path::new(path).is_file() {
        Ok(())
    } else {
        Err(Error::new(format!("{path} not found: {fix}")))
    }
}

/// How the guest reaches IMDS and the EC2 endpoint (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    /// `10.0.2.0/24`; both endpoints on the kernel command line at `10.0.2.2`.
    HostAlias,
    /// `169.254.0.0/16`; IMDS at `169.254.169.254:80`, EC2 at `169.254.2.2`.
    LinkLocal,
}

/// One instance to launch.
#[derive(Clone, Debug)]
pub struct InstanceSpec {
    /// Short name for logs and the work directory (`a`, `b`, `racer-1`).
    pub name: String,
    pub zone: String,
    /// TOML, served by IMDS as is (for UEFI with the EC2 endpoint put in front).
    pub user_data: Option<String>,
    /// Appended to the kernel command line (direct kernel boot only).
    pub extra_cmdline: String,
    /// Boot `spotinit.raw` under OVMF (systemd-boot, the UKI) instead of the direct kernel.
    pub uefi: bool,
    /// `None`: [`Net::HostAlias`] for direct boot, [`Net::LinkLocal`] for UEFI.
    pub net: Option<Net>,
    /// `-rtc base=…`: a wrong guest clock.
    pub rtc_base: Option<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Guest ports forwarded to free host ports (default: the Docker API and the service).
    pub forward_ports: Vec<u16>,
    /// The EC2 key pair's public key(s) IMDS serves from the start (`public-keys/`).
    pub public_keys: Vec<(String, String)>,
}

impl InstanceSpec {
    pub fn new(name: &str, zone: &str) -> InstanceSpec {
        InstanceSpec {
            name: name.to_owned(),
            zone: zone.to_owned(),
            user_data: None,
            extra_cmdline: String::new(),
            uefi: false,
            net: None,
            rtc_base: None,
            memory_mib: crate::qemu::DEFAULT_MEMORY_MIB,
            cpus: crate::qemu::DEFAULT_CPUS,
            forward_ports: vec![DOCKER_API_PORT, SERVICE_PORT],
            public_keys: Vec::new(),
        }
    }
    pub fn user_data(mut self, text: impl Into<String>) -> Self {
        self.user_data = Some(text.into());
        self
    }
    pub fn extra_cmdline(mut self, words: &str) -> Self {
        self.extra_cmdline = words.to_owned();
        self
    }
    pub fn uefi(mut self) -> Self {
        self.uefi = true;
        self
    }
    pub fn net(mut self, net: Net) -> Self {
        self.net = Some(net);
        self
    }
    pub fn rtc_base(mut self, base: &str) -> Self {
        self.rtc_base = Some(base.to_owned());
        self
    }
    /// Launched with the EC2 key pair `name` (its public key served by IMDS before the boot).
    pub fn key_pair(mut self, name: &str, public_key: &str) -> Self {
        self.public_keys
            .push((name.to_owned(), public_key.trim().to_owned()));
        self
    }
    /// Also forward `guest_port` to a free host port.
    pub fn forward(mut self, guest_port: u16) -> Self {
        self.forward_ports.push(guest_port);
        self
    }
}

/// A launched instance: its VM, its IMDS, its place in the API.
pub struct SimInstance {
    pub id: String,
    pub name: String,
    pub zone: String,
    vm: Arc<Vm>,
    imds: ImdsMock,
    fidelity: Arc<Fidelity>,
    ebs: Arc<EbsBridge>,
    /// When QEMU started (the zero of console line times).
    started: Instant,
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

/// The user data the scenarios share, as fields; [`UserData::to_toml`] writes it.
#[derive(Clone, Debug)]
pub struct UserData {
    /// The volume's `Name` tag (one per test, so worlds never share a volume by accident).
    pub volume_name: String,
    /// `volume.id`: this volume (and wherever its state moved), whatever the tags say.
    pub volume_id: Option<String>,
    pub size_gib: u32,
    pub create: bool,
    pub storage_driver: String,
    /// spotinit refuses less than 60.
    pub release_wait_secs: u64,
    pub force_detach: bool,
    pub failure_action: String,
    pub retry_for_secs: u64,
    pub retry_interval_secs: u64,
    pub after_drain: String,
    /// The Engine API on TCP with TLS client certificates ([`docker_api_toml`]), so the host
    /// reaches it.
    pub docker_api: bool,
    /// TOML appended as is (new tables only).
    pub extra: String,
}

impl UserData {
    pub fn new(volume_name: &str) -> UserData {
        UserData {
            volume_name: volume_name.to_owned(),
            volume_id: None,
            size_gib: 1,
            create: true,
            storage_driver: "overlay2".into(),
            release_wait_secs: 60,
            force_detach: false,
            failure_action: "poweroff".into(),
            retry_for_secs: 60,
            retry_interval_secs: 5,
            after_drain: "wait".into(),
            docker_api: true,
            extra: String::new(),
        }
    }

    pub fn to_toml(&self) -> String {
        let mut t = format!(
            "[volume]\nsize_gib = {}\ncreate = {}\nrelease_wait_secs = {}\nforce_detach = {}\n\
             attach_timeout_secs = 120\ndevice_timeout_secs = 60\nsnapshot_timeout_secs = 300\n\
             [volume.tags]\nName = \"{}\"\n\n[docker]\nstorage_driver = \"{}\"\n",
            self.size_gib,
            self.create,
            self.release_wait_secs,
            self.force_detach,
            self.volume_name,
            self.storage_driver
        );
        if let Some(id) = &self.volume_id {
            t = t.replacen("[volume]\n", &format!("[volume]\nid = \"{id}\"\n"), 1);
        }
        if self.docker_api {
            t.push_str(&docker_api_toml());
        }
        t.push_str(&format!(
            "\n[failure]\naction = \"{}\"\nretry_for_secs = {}\nretry_interval_secs = {}\n\n\
             [spot]\nafter_drain = \"{}\"\n",
            self.failure_action, self.retry_for_secs, self.retry_interval_secs, self.after_drain
        ));
        if !self.extra.is_empty() {
            t.push('\n');
            t.push_str(&self.extra);
            t.push('\n');
        }
        t
    }
}

/// The `[docker]` lines that serve the Engine API on [`DOCKER_API_PORT`] with TLS client
/// certificates (the server's side of the test PKI): to append inside a `[docker]` table.
pub fn docker_api_toml() -> String {
    let pki = crate::tls::Pki::get().unwrap_or_else(|e| panic!("the test PKI: {e}"));
    format!(
        "daemon = {{ hosts = [\"tcp://0.0.0.0:{DOCKER_API_PORT}\"] }}\n{}",
        pki.docker_tls_toml()
    )
}

/// Runs `debugfs -R REQUEST FILE` (read-only) on a volume's backing file and returns its output:
/// a look inside the ext4 from outside the guest, no mount (and no root) needed. Only while the
/// volume is detached.
pub fn debugfs(file: &Path, request: &str) -> Result<String> {
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(file)
        .output()
        .map_err(|e| {
            Error::new(format!(
                "run debugfs (apt-get install e2fsprogs) on {}: {e}",
                file.display()
            ))
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // debugfs exits 0 even when the request failed; anything on stderr but its banner is an error.
    let complaints = stderr
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .count();
    if !out.status.success() || complaints > 0 {
        return Err(Error::new(format!(
            "debugfs -R {request:?} {}: {}{}",
            file.display(),
            stderr.trim(),
            stdout.trim()
        )));
    }
    Ok(stdout)
}

/// Reads `phase X: done in Y` lines (and `FAILED after`) from console lines: (phase, seconds).
pub fn phase_timings(lines: &[ConsoleLine]) -> Vec<(String, f64)> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l.text.split("spotinit: phase ").nth(1)?;
            let (name, took) = rest
                .split_once(": done in ")
                .or_else(|| rest.split_once(": FAILED after "))?;
            Some((name.to_owned(), parse_human(took)?))
        })
        .collect()
}

/// Parses spotinit's human durations (`850 ms`, `4.21 s`, `3 min 05 s`) into seconds.
pub fn parse_human(text: &str) -> Option<f64> {
    let t = text.trim();
    let words: Vec<&str> = t.split_whitespace().collect();
    match words.as_slice() {
        [n, "ms", ..] => n.parse::<f64>().ok().map(|v| v / 1000.0),
        [n, "s", ..] => n.parse::<f64>().ok(),
        [m, "min", s, "s", ..] => Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_parse() {
        assert_eq!(parse_human("850 ms"), Some(0.85));
        assert_eq!(parse_human("4.21 s"), Some(4.21));
        assert_eq!(parse_human("3 min 05 s"), Some(185.0));
        assert_eq!(parse_human("4.21 s (12 s left)"), Some(4.21));
        assert_eq!(parse_human("soon"), None);
    }

    #[test]
    fn phase_lines_are_read() {
        let l = |t: &str| ConsoleLine {
            at: Duration::ZERO,
            text: t.into(),
        };
        let lines = [
            l("[   3.100] spotinit: phase early mounts: done in 12 ms"),
            l("[   9.000] spotinit: phase volume: done in 4.21 s"),
            l("[   9.100] spotinit: volume: something else"),
            l("[  10.000] spotinit: phase dockerd: FAILED after 1.50 s"),
        ];
        assert_eq!(
            phase_timings(&lines),
            vec![
                ("early mounts".to_string(), 0.012),
                ("volume".to_string(), 4.21),
                ("dockerd".to_string(), 1.5)
            ]
        );
    }

    #[test]
    fn user_data_is_valid_toml_with_the_tag() {
        let mut u = UserData::new("t1");
        u.extra = "[snapshots]\nkeep = 2".into();
        let text = u.to_toml();
        // The TLS table's PEM blocks are multi-line strings the flat reader below does not take.
        let tls_at = text.find("[docker.tls]").expect("the Engine API's TLS");
        let tls_end = tls_at
            + text[tls_at..]
                .find("\n[failure]")
                .expect("a table after it");
        assert_eq!(text[tls_at..tls_end].matches("-----BEGIN ").count(), 3);
        let flat = format!("{}{}", &text[..tls_at], &text[tls_end..]);
        let t: toml_check::Table = toml_check::parse(&flat);
        assert_eq!(
            t.get("volume.tags.Name").map(String::as_str),
            Some("\"t1\"")
        );
        assert_eq!(
            t.get("docker.daemon").map(String::as_str),
            Some("{ hosts = [\"tcp://0.0.0.0:2376\"] }")
        );
    }

    /// A tiny reader of the flat TOML `to_toml` writes (no TOML crate in this package).
    mod toml_check {
        pub type Table = std::collections::HashMap<String, String>;
        pub fn parse(text: &str) -> Table {
            let mut section = String::new();
            let mut t = Table::new();
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                if let Some(s) = line.strip_prefix('[') {
                    section = s.trim_end_matches(']').to_owned();
                    continue;
                }
                let (k, v) = line.split_once(" = ").expect("key = value");
                assert!(t.insert(format!("{section}.{k}"), v.to_owned()).is_none());
            }
            t
        }
    }
}
