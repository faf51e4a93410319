//! The boot, top to bottom. Each phase is logged with its duration; the first failure stops the
//! boot before Docker starts. What the phases achieved is kept in [`BootState`], so a shutdown
//! that interrupts the boot (a spot notice, the power button) undoes exactly that.

use crate::cloud::{CloudError, Identity, Metadata};
use crate::config::{Config, ConfigError, VolumeMode, IMAGE_CONFIG};
use crate::console::{human, uptime};
use crate::retry::Retry;
use crate::services::{self, docker, Supervisor};
use crate::shutdown::Request;
use crate::sys::{Paths, System};
use crate::volume::{self, Mounted, VolumeError, VolumePhase};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

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
    ) -> Result<Self::Volume, String>;
    /// Starts watching for spot notices (and other instance events) once IMDS is known.
    fn watch(&self, cfg: &Config, meta: &Self::Meta, requests: mpsc::UnboundedSender<Request>);
    /// Starts what needs the state volume: its snapshots.
    fn volume_ready(&self, cfg: &Config, identity: &Identity, meta: &Self::Meta, volume_id: &str);
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
async fn phase<T, E, F>(name: &'static str, f: F) -> Result<T, BootError>
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

/// The boot sequence.
pub async fn boot<S: System, P: Platform>(
    m: &Machine<S>,
    platform: &P,
    st: &mut BootState<P>,
) -> Result<(), BootError> {
    let sys = &*m.sys;
    let paths = &m.paths;
    let pid1 = m.mode == Mode::Pid1;
    let started = Instant::now();
    crate::log!("{}", crate::host::version_line(paths));
    crate::log!(
        "starting as {} at {} since power-on",
        if pid1 { "PID 1" } else { "a service" },
        human(uptime())
    );

    if pid1 {
        let made = phase("early mounts", async {
            crate::host::early_mounts(sys, paths)
        })
        .await?;
        m.early_mounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(made);
        if let Some(note) = crate::host::hypervisor_note(paths) {
            crate::log!("{note}");
        }
    }

    // The command line and the image's file first: they say where IMDS is and how to
    // bring the network up. User data joins them in the configuration phase.
    let cmdline = std::fs::read_to_string(paths.p("/proc/cmdline")).unwrap_or_default();
    let image_file = std::fs::read_to_string(paths.p(IMAGE_CONFIG)).ok();
    let early = Config::load(&cmdline, None, image_file.as_deref()).map_err(BootError::Config)?;

    // Docker's kernel modules and the other device drivers, loading in the background from
    // the network driver on; both are waited for before Docker starts.
    let mut docker_modules = None;
    let mut coldplug = None;
    if pid1 {
        phase("hostname and loopback", async {
            sys.set_hostname(early.hostname.as_deref().unwrap_or("spotinit"))
                .map_err(|e| e.to_string())?;
            sys.interface_up("lo").map_err(|e| e.to_string())
        })
        .await?;
        // The NIC's driver first: DHCP starts while the other drivers and Docker's modules load.
        let (nic, tried) = phase(
            "network driver",
            crate::host::load_network_drivers(sys, paths),
        )
        .await?;
        crate::log!("modules: {nic}; the other drivers and Docker's modules load meanwhile");
        docker_modules = Some(crate::host::DockerModules::start(sys));
        coldplug = Some(tokio::spawn(other_drivers_then_power_button(
            m.sys.clone(),
            paths.clone(),
            tried,
            m.requests.clone(),
        )));
        let net = phase(
            "network",
            crate::host::network(
                sys,
                paths,
                &m.supervisor,
                early.network.interface.as_deref(),
                Duration::from_secs(early.network.dhcp_timeout_secs),
            ),
        )
        .await?;
        crate::log!("network: {net}");
    }

    let (config, identity, meta) = phase("configuration", async {
        let meta = platform
            .metadata(early.imds_endpoint.as_deref())
            .map_err(|e| e.to_string())?;
        let identity = imds_retry("instance identity", || meta.identity()).await?;
        let user_data = imds_retry("user data", || meta.user_data()).await?;
        let config = Config::load(&cmdline, user_data.as_deref(), image_file.as_deref())
            .map_err(BootError::Config)?;
        Ok::<_, PhaseFailure>((config, identity, meta))
    })
    .await?;
    crate::log!(
        "instance {} ({}) in {}; {}",
        identity.instance_id,
        identity.instance_type,
        identity.zone,
        config.summary()
    );
    if pid1 {
        let hostname = match &config.hostname {
            Some(h) => h.clone(),
            None => meta
                .local_hostname()
                .await
                .ok()
                .flatten()
                .and_then(|h| h.split('.').next().map(str::to_string))
                .filter(|h| crate::config::is_hostname(h))
                .unwrap_or_else(|| identity.instance_id.clone()),
        };
        if let Err(e) = sys.set_hostname(&hostname) {
            crate::log!("hostname {hostname}: {e}");
        }
    }
    platform.watch(&config, &meta, m.requests.clone());
    // The firewall that keeps containers away from IMDS goes in while the clock and the volume
    // phases run; dockerd starts only once it is in (or the boot fails, below).
    let imds_rules = (pid1 && config.docker.enabled && config.docker.block_imds).then(|| {
        let ipv6 = config.docker.daemon.get("ipv6") == Some(&toml::Value::Boolean(true));
        let (sys, endpoint) = (m.sys.clone(), early.imds_endpoint.clone());
        tokio::spawn(async move { docker::block_imds(&*sys, endpoint.as_deref(), ipv6).await })
    });
    if pid1 {
        // Before the first signed EC2 call: SigV4 fails on a clock 5 minutes off.
        let clock = phase(
            "clock",
            services::clock::sync(sys, paths, &m.supervisor, &config.time),
        )
        .await?;
        crate::log!("clock: {clock}");
    }
    st.identity = Some(identity.clone());
    st.metadata = Some(meta.clone());
    st.config = Some(config.clone());

    match config.volume.mode {
        VolumeMode::None => crate::log!(
            "volume: volume.mode = none: Docker's state is on tmpfs and is LOST with this instance"
        ),
        VolumeMode::Docker | VolumeMode::PersistedRoot => {
            if st.volume.is_none() {
                st.volume = Some(platform.volume(&config, &identity, &meta).map_err(
                    |message| BootError::Phase {
                        phase: "volume",
                        message,
                    },
                )?);
            }
            let vol = st.volume.as_mut().expect("set above");
            let mounted = phase("volume", acquire_with_retries(vol, &config)).await?;
            platform.volume_ready(&config, &identity, &meta, &mounted.volume_id);
            st.mounted = Some(mounted);
        }
    }
    // Before a pivot into a persisted root changes what /usr/sbin/iptables is.
    let imds_rules = match imds_rules {
        Some(task) => Some(
            task.await
                .unwrap_or_else(|e| Err(format!("the task installing them ended: {e}"))),
        ),
        None => None,
    };
    if pid1 {
        let on_volume = config.volume.mode != VolumeMode::None;
        start_ssh(m, &config, &meta, on_volume).await;
    }
    if config.volume.mode == VolumeMode::PersistedRoot {
        phase("persisted root", async {
            volume::pivot::into(sys, paths, &paths.p(volume::layout::VOLUME_MOUNT))
                .map_err(|e| e.to_string())
        })
        .await?;
        crate::log!("persisted root: / is now rootfs/ of the state volume");
        if let Some(init) = &config.volume.root_init {
            crate::log!("persisted root: handing PID 1 over to its own init, {init}");
            if let Err(e) = sys.exec(std::path::Path::new(init), &[]) {
                return Err(BootError::Phase {
                    phase: "persisted root",
                    message: format!("cannot start {init} (volume.root_init): {e}"),
                });
            }
        }
    }

    if !config.docker.enabled {
        crate::log!("docker: docker.enabled = false; not starting containerd and dockerd");
    } else {
        // The golden rule, in one place: Docker starts only on the state volume it just
        // verified (or on tmpfs when the user chose volume.mode = none).
        if let Some(mounted) = &st.mounted {
            let verify = if config.volume.mode == VolumeMode::PersistedRoot {
                volume::verify_persisted_root
            } else {
                volume::verify_docker_state
            };
            verify(paths, mounted, &config.docker.storage_driver).map_err(|message| {
                BootError::Phase {
                    phase: "docker state check",
                    message: format!(
                        "{message}; refusing to start Docker on anything but the state volume"
                    ),
                }
            })?;
        }
        if let Some(drivers) = coldplug.take() {
            if let Err(e) = drivers.await {
                crate::log!("modules: the device drivers' task ended: {e}");
            }
        }
        if let Some(modules) = docker_modules.take() {
            crate::log!("modules: {}", modules.wait().await);
        }
        st.docker_started = true;
        // containerd and dockerd start together: dockerd dials containerd's socket itself
        // (for up to a minute), so their start-ups overlap instead of adding up. Both
        // readiness checks stay: a containerd that never answers is named as such.
        let containerd_started = Instant::now();
        phase("containerd", async {
            m.supervisor.launch(docker::containerd(paths)).await?;
            Ok::<_, String>(())
        })
        .await?;
        phase("dockerd", async {
            let tls = docker::tls_files(paths, &config.docker)?;
            if docker::write_registry_cas(paths, &config.docker)? > 0 {
                let registries: Vec<&str> =
                    config.docker.registry_cas.keys().map(String::as_str).collect();
                crate::log!(
                    "docker: registries with their own CA (docker.registry_cas): {}",
                    registries.join(", ")
                );
            }
            docker::write_daemon_json(paths, &config.docker, tls.as_ref())
                .map_err(|e| e.to_string())?;
            for host in docker::tcp_hosts(&config.docker) {
                if tls.is_some() {
                    crate::log!("docker: the Engine API listens on tcp://{host} with TLS; clients need a certificate of the configured CA");
                } else {
                    crate::log!("docker: WARNING: the Engine API listens on tcp://{host} WITHOUT TLS (docker.insecure_plain_tcp_api): anyone who reaches that port is root on this host");
                }
            }
            // Before dockerd, which starts the containers: they never run without the rules.
            match &imds_rules {
                Some(Ok(r)) => crate::log!(
                    "docker: containers cannot reach IMDS ({r} rejected; docker.block_imds)"
                ),
                Some(Err(e)) => return Err(format!(
                    "cannot install the firewall rules that keep containers away from IMDS: {e}. Without them containers could take the instance role's credentials, so Docker is not started; set docker.block_imds = false to run without them knowingly"
                )),
                None => {}
            }
            m.supervisor
                .launch(docker::dockerd(paths, &config.docker))
                .await?;
            let within = Duration::from_secs(config.docker.start_timeout_secs);
            let docker_socket = paths.p(docker::DOCKER_SOCKET);
            let containerd = async {
                docker::wait_for_socket(&paths.p(docker::CONTAINERD_SOCKET), within)
                    .await
                    .map_err(|e| format!("containerd: {e}"))?;
                Ok::<_, String>(containerd_started.elapsed())
            };
            let (containerd, _) = tokio::try_join!(
                containerd,
                docker::wait_for_ping(&docker_socket, within),
            )?;
            crate::log!("containerd: answering {} after its start", human(containerd));
            Ok(())
        })
        .await?;
    }
    st.ready = true;
    crate::log!(
        "ready in {} since power-on (spotinit's part {}, its CPU time {}, its memory {})",
        human(uptime()),
        human(started.elapsed()),
        human(cpu_time()),
        resident_memory(paths)
    );
    crate::log!("listening: {}", crate::listening::summary(paths));
    if config.docker.enabled && !config.containers.is_empty() {
        st.declared_containers = Some(start_declared_containers(paths, &config));
    }
    Ok(())
}

/// `[[containers]]`: made to match the declaration in the background, after `ready` (Docker is
/// ready; a slow pull must not make the host look down). Their files live on the state volume:
/// its top in `docker` mode, `/var/lib/spotinit` of the persisted root, tmpfs without a volume.
fn start_declared_containers(paths: &Paths, config: &Config) -> tokio::task::JoinHandle<()> {
    let home = match config.volume.mode {
        VolumeMode::Docker => paths.p(volume::layout::VOLUME_MOUNT),
        VolumeMode::PersistedRoot | VolumeMode::None => paths.p("/var/lib/spotinit"),
    };
    let auth = match services::registry_auth::RegistryAuth::load(&home) {
        Ok(a) => a,
        Err(e) => {
            crate::log!("containers: registry credentials not used: {e}");
            services::registry_auth::RegistryAuth::default()
        }
    };
    if !auth.registries().is_empty() {
        crate::log!(
            "containers: credentials for {} (from {})",
            auth.registries().join(", "),
            services::registry_auth::AUTH_FILE
        );
    }
    let engine = services::engine::Engine::new(&paths.p(docker::DOCKER_SOCKET));
    let declared = config.containers.clone();
    crate::log!(
        "containers: {} declared: {}",
        declared.len(),
        declared
            .iter()
            .map(|c| format!("{} ({})", c.name, c.image))
            .collect::<Vec<_>>()
            .join(", ")
    );
    tokio::spawn(async move {
        services::containers::reconcile(
            &engine,
            &declared,
            &home,
            &|image| auth.header_for(image),
            services::containers::PULL_RETRY_FOR,
        )
        .await;
    })
}

/// Operator access, when a key is configured. Its host key is on the state volume when there is
/// one, so replacements present the same key. Never fatal: a boot without SSH is still a boot.
pub async fn start_ssh<S: System, M: Metadata>(
    m: &Machine<S>,
    config: &Config,
    meta: &M,
    on_volume: bool,
) {
    let pair = if config.ssh.use_key_pair {
        meta.key_pair().await.ok().flatten()
    } else {
        None
    };
    // IMDS serves what the launch gave: checked like ssh.authorized_keys.
    let pair = pair.filter(|k| match crate::config::ssh_key_problem(k) {
        None => true,
        Some(why) => {
            crate::log!("ssh: ignoring the EC2 key pair from IMDS: {why}");
            false
        }
    });
    let keys = services::ssh::authorized_keys(&config.ssh, pair.as_deref());
    if keys.is_empty() {
        crate::log!("ssh: off (no EC2 key pair and no ssh.authorized_keys)");
        return;
    }
    let dir = services::ssh::key_dir(&m.paths, on_volume);
    match services::ssh::start(&*m.sys, &m.paths, &m.supervisor, &config.ssh, &keys, &dir).await {
        Ok(line) => crate::log!("ssh: {line}"),
        Err(e) => crate::log!("ssh: not started: {e}"),
    }
}

/// The device drivers beyond the NIC's (coldplug), then the power button: evdev, which makes
/// it readable, is one of them. Runs beside the network, configuration and volume phases.
async fn other_drivers_then_power_button<S: System>(
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

/// Our CPU time so far (user and system, every thread; not the children), for the ready line.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the rusage the pointer points to (zeroed, so initialised even if
    // it did not); RUSAGE_SELF is always valid.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let of = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    of(usage.ru_utime) + of(usage.ru_stime)
}

/// Our resident memory (VmRSS), for the ready line.
fn resident_memory(paths: &Paths) -> String {
    std::fs::read_to_string(paths.p("/proc/self/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// IMDS right after the network came up can be briefly unreachable: retry for a minute.
async fn imds_retry<T, F, Fut>(what: &str, f: F) -> Result<T, PhaseFailure>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, CloudError>>,
{
    let retry = Retry::new(format!("IMDS {what}"))
        .every(Duration::from_millis(500))
        .max_delay(Duration::from_secs(5))
        .for_at_most(Duration::from_secs(60));
    crate::cloud::with_retries(&retry, f)
        .await
        .map_err(|e| PhaseFailure::Message(format!("cannot read {what} from IMDS: {e}")))
}

/// The volume phase with the failure policy's retries: a failure that may pass (a holder
/// draining, EC2 throttling) is retried every `retry_interval_secs` for `retry_for_secs`.
async fn acquire_with_retries<V: VolumePhase>(
    vol: &mut V,
    config: &Config,
) -> Result<Mounted, BootError> {
    let interval = Duration::from_secs(config.failure.retry_interval_secs);
    let retry_for = Duration::from_secs(config.failure.retry_for_secs);
    let start = Instant::now();
    loop {
        match vol.acquire().await {
            Ok(m) => return Ok(m),
            Err(e) if e.retryable() && start.elapsed() + interval <= retry_for => {
                crate::log!("volume: {e}");
                crate::log!(
                    "volume: trying again in {} ({} left of failure.retry_for_secs); Docker stays stopped meanwhile",
                    human(interval),
                    human(retry_for.saturating_sub(start.elapsed()))
                );
                tokio::time::sleep(interval).await;
            }
            Err(e) => return Err(BootError::Volume(e)),
        }
    }
}

#[cfg(test)]
#[path = "boot_tests.rs"]
mod tests;
