//! The boot, top to bottom. Each phase is logged with its duration; the first failure stops the
//! boot before Docker starts. What the phases achieved is kept in [`BootState`], so a shutdown
//! that interrupts the boot (a spot notice, the power button) undoes exactly that.
//!
//! Beside it: `phase` (how a phase is run and fails), `background` (what runs beside the
//! phases), `start` (Docker, the declared containers, SSH), `footprint` (the ready line's figures).

mod background;
mod footprint;
mod phase;
mod start;

use crate::cloud::{CloudError, Identity, Metadata};
use crate::config::{Config, VolumeMode, IMAGE_CONFIG};
use crate::console::{human, uptime};
use crate::machine::{BootState, Machine, Mode, Platform};
use crate::retry::Retry;
use crate::services::{self, docker};
use crate::sys::{Paths, System};
use crate::volume::{self, Mounted, VolumePhase};
use background::{other_drivers_then_power_button, Background};
use footprint::{cpu_time, resident_memory};
use phase::phase;
use start::{start_declared_containers, start_docker};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

pub use background::ImdsRulesError;
pub use phase::{BootError, PhaseError};
pub use start::start_ssh;

/// The boot, as the list of its phases; each is a function below (or in `start`), in this
/// order. The ones only PID 1 runs (its own mounts, network, clock, SSH) are skipped as a
/// service under another init. Any phase may fail the boot, and then Docker is not started.
pub async fn boot<S: System, P: Platform>(
    m: &Machine<S>,
    platform: &P,
    st: &mut BootState<P>,
) -> Result<(), BootError> {
    let pid1 = m.mode == Mode::Pid1;
    let started = Instant::now();
    announce(m);
    if pid1 {
        early_mounts(m).await?;
    }
    let early = EarlyConfig::read(&m.paths)?;
    let mut background = Background::default();
    if pid1 {
        background = bring_up_the_host(m, &early.config).await?;
    }
    let (config, identity, meta) = configure(platform, &early).await?;
    if pid1 {
        name_the_host(m, &config, &identity, &meta).await;
    }
    let events = platform.watch(&config, &meta, m.requests.clone());
    background.imds_rules = start_the_imds_firewall(m, &config, &early.config);
    if pid1 {
        set_the_clock(m, &config).await?;
    }
    st.identity = Some(identity.clone());
    st.metadata = Some(meta.clone());
    st.config = Some(config.clone());
    take_the_volume(platform, st, &config, &identity, &meta, events).await?;
    let config = take_the_slot(m, st, config);
    // Before a pivot into a persisted root changes what /usr/sbin/iptables is.
    let imds_rules = background.imds_rules_in().await;
    if pid1 {
        let on_volume = config.volume.mode != VolumeMode::None;
        start_ssh(m, &config, &meta, on_volume).await;
    }
    if config.volume.mode == VolumeMode::PersistedRoot {
        enter_the_persisted_root(m, &config).await?;
    }
    if config.docker.enabled {
        start_docker(m, st, &config, background, imds_rules).await?;
    } else {
        crate::log!("docker: docker.enabled = false; not starting containerd and dockerd");
    }
    announce_ready(m, st, &config, started);
    Ok(())
}

/// The version, and how spotinit runs.
fn announce<S: System>(m: &Machine<S>) {
    crate::log!("{}", crate::host::version_line(&m.paths));
    crate::log!(
        "starting as {} at {} since power-on",
        if m.mode == Mode::Pid1 {
            "PID 1"
        } else {
            "a service"
        },
        human(uptime())
    );
}

/// PID 1: /proc, /sys, /dev, the tmpfs the read-only root needs; undone in reverse at shutdown.
async fn early_mounts<S: System>(m: &Machine<S>) -> Result<(), BootError> {
    let made = phase("early mounts", async {
        crate::host::early_mounts(&*m.sys, &m.paths)
    })
    .await?;
    m.early_mounts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(made);
    if let Some(note) = crate::host::hypervisor_note(&m.paths) {
        crate::log!("{note}");
    }
    Ok(())
}

/// The configuration before the network: the kernel command line and the image's file say
/// where IMDS is and how to bring the network up. User data joins them in [`configure`].
struct EarlyConfig {
    cmdline: String,
    image_file: Option<String>,
    config: Config,
}

impl EarlyConfig {
    fn read(paths: &Paths) -> Result<EarlyConfig, BootError> {
        let cmdline = std::fs::read_to_string(paths.p("/proc/cmdline")).unwrap_or_default();
        let image_file = std::fs::read_to_string(paths.p(IMAGE_CONFIG)).ok();
        let config =
            Config::load(&cmdline, None, image_file.as_deref()).map_err(BootError::Config)?;
        Ok(EarlyConfig {
            cmdline,
            image_file,
            config,
        })
    }
}

/// PID 1: hostname and loopback, the NIC's driver first so that DHCP starts while the other
/// drivers and Docker's modules load in the background, then the network.
async fn bring_up_the_host<S: System>(
    m: &Machine<S>,
    early: &Config,
) -> Result<Background, BootError> {
    let (sys, paths) = (&*m.sys, &m.paths);
    phase("hostname and loopback", async {
        sys.set_hostname(early.hostname.as_deref().unwrap_or("spotinit"))?;
        sys.interface_up("lo")
    })
    .await?;
    let (nic, tried) = phase(
        "network driver",
        crate::host::load_network_drivers(sys, paths),
    )
    .await?;
    crate::log!("modules: {nic}; the other drivers and Docker's modules load meanwhile");
    let background = Background {
        docker_modules: Some(crate::host::DockerModules::start(sys)),
        coldplug: Some(tokio::spawn(other_drivers_then_power_button(
            m.sys.clone(),
            paths.clone(),
            tried,
            m.requests.clone(),
        ))),
        imds_rules: None,
    };
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
    Ok(background)
}

/// IMDS: the instance's identity and its user data, which completes the configuration.
async fn configure<P: Platform>(
    platform: &P,
    early: &EarlyConfig,
) -> Result<(Config, Identity, P::Meta), BootError> {
    let (config, identity, meta) = phase("configuration", async {
        let meta = platform.metadata(early.config.imds_endpoint.as_deref())?;
        let identity = imds_retry("instance identity", || meta.identity()).await?;
        let user_data = imds_retry("user data", || meta.user_data()).await?;
        let config = Config::load(
            &early.cmdline,
            user_data.as_deref(),
            early.image_file.as_deref(),
        )
        .map_err(BootError::Config)?;
        Ok::<_, PhaseError>((config, identity, meta))
    })
    .await?;
    crate::log!(
        "instance {} ({}) in {}; {}",
        identity.instance_id,
        identity.instance_type,
        identity.zone,
        config.summary()
    );
    crate::notify::start(&config.notify, &identity.instance_id);
    Ok((config, identity, meta))
}

/// PID 1: the configured hostname, else IMDS's local hostname, else the instance id.
async fn name_the_host<S: System, M: Metadata>(
    m: &Machine<S>,
    config: &Config,
    identity: &Identity,
    meta: &M,
) {
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
    if let Err(e) = m.sys.set_hostname(&hostname) {
        crate::log!("hostname {hostname}: {e}");
    }
}

/// PID 1: the firewall that keeps containers away from IMDS goes in while the clock and the
/// volume phases run; dockerd starts only once it is in (or the boot fails).
fn start_the_imds_firewall<S: System>(
    m: &Machine<S>,
    config: &Config,
    early: &Config,
) -> Option<tokio::task::JoinHandle<Result<String, ImdsRulesError>>> {
    let wanted = m.mode == Mode::Pid1 && config.docker.enabled && config.docker.block_imds;
    wanted.then(|| {
        let ipv6 = config.docker.daemon.get("ipv6") == Some(&toml::Value::Boolean(true));
        let (sys, endpoint) = (m.sys.clone(), early.imds_endpoint.clone());
        tokio::spawn(async move { Ok(docker::block_imds(&*sys, endpoint.as_deref(), ipv6).await?) })
    })
}

/// PID 1, before the first signed EC2 call: SigV4 fails on a clock 5 minutes off.
async fn set_the_clock<S: System>(m: &Machine<S>, config: &Config) -> Result<(), BootError> {
    let clock = phase(
        "clock",
        services::clock::sync(&*m.sys, &m.paths, &m.supervisor, &config.time),
    )
    .await?;
    crate::log!("clock: {clock}");
    Ok(())
}

/// The state volume: found, attached exclusively, checked and mounted; then its upkeep
/// (snapshots, the Elastic IP) starts. Nothing with `volume.mode = none`.
async fn take_the_volume<P: Platform>(
    platform: &P,
    st: &mut BootState<P>,
    config: &Config,
    identity: &Identity,
    meta: &P::Meta,
    events: P::Events,
) -> Result<(), BootError> {
    if config.volume.mode == VolumeMode::None {
        crate::log!(
            "volume: volume.mode = none: Docker's state is on tmpfs and is LOST with this instance"
        );
        return Ok(());
    }
    if st.volume.is_none() {
        st.volume =
            Some(
                platform
                    .volume(config, identity, meta)
                    .map_err(|e| BootError::Phase {
                        phase: "volume",
                        source: Box::new(e.into()),
                    })?,
            );
    }
    let vol = st.volume.as_mut().expect("set above");
    let mounted = phase("volume", acquire_with_retries(vol, config)).await?;
    platform.start_volume_upkeep(config, identity, meta, &mounted, events);
    st.mounted = Some(mounted);
    Ok(())
}

/// `volume.pool`: the slot of the volume this instance took is its identity: the host's name,
/// the files that say it, the declared containers' environment.
fn take_the_slot<S: System, P: Platform>(
    m: &Machine<S>,
    st: &BootState<P>,
    config: Config,
) -> Config {
    let Some((slot, volume_id)) = st
        .mounted
        .as_ref()
        .and_then(|v| v.slot.clone().map(|s| (s, v.volume_id.clone())))
    else {
        return config;
    };
    if let Err(e) = crate::pool_slot::publish(&m.paths, &slot, &volume_id) {
        crate::log!("volume: pool {}: {e}", slot.pool);
    }
    if m.mode == Mode::Pid1 {
        let name = slot.host_name(config.hostname.as_deref());
        match m.sys.set_hostname(&name) {
            Ok(()) => crate::log!("hostname: {name} (pool {} slot {})", slot.pool, slot.number),
            Err(e) => crate::log!("hostname {name}: {e}"),
        }
    }
    let mut config = config;
    crate::pool_slot::into_containers(&mut config.containers, &slot);
    config
}

/// `volume.mode = "persisted-root"`: / becomes the state volume's root, and PID 1 may go to its
/// own init.
async fn enter_the_persisted_root<S: System>(
    m: &Machine<S>,
    config: &Config,
) -> Result<(), BootError> {
    let (sys, paths) = (&*m.sys, &m.paths);
    phase("persisted root", async {
        volume::pivot::into(sys, paths, &paths.p(volume::layout::VOLUME_MOUNT))
    })
    .await?;
    crate::log!("persisted root: / is now rootfs/ of the state volume");
    if let Some(init) = &config.volume.root_init {
        crate::log!("persisted root: handing PID 1 over to its own init, {init}");
        if let Err(e) = sys.exec(std::path::Path::new(init), &[]) {
            return Err(BootError::Phase {
                phase: "persisted root",
                source: Box::new(PhaseError::RootInit {
                    init: init.clone(),
                    source: e,
                }),
            });
        }
    }
    Ok(())
}

/// The `ready` line with spotinit's own figures, what listens, and the declared containers
/// (made to match in the background: `ready` waits for none of it).
fn announce_ready<S: System, P: Platform>(
    m: &Machine<S>,
    st: &mut BootState<P>,
    config: &Config,
    started: Instant,
) {
    let paths = &m.paths;
    st.ready = true;
    crate::log!(
        "ready in {} since power-on (spotinit's part {}, its CPU time {}, its memory {})",
        human(uptime()),
        human(started.elapsed()),
        human(cpu_time()),
        resident_memory(paths)
    );
    crate::log!("listening: {}", crate::listening::summary(paths));
    crate::notify::event(
        "boot-ready",
        format!(
            "ready in {} since power-on (spotinit's part {}); Docker runs on {}",
            human(uptime()),
            human(started.elapsed()),
            st.mounted
                .as_ref()
                .map_or("no state volume".into(), |m| match &m.slot {
                    Some(s) => format!("{} (pool {} slot {})", m.volume_id, s.pool, s.number),
                    None => m.volume_id.clone(),
                })
        ),
    );
    if config.docker.enabled && !config.containers.is_empty() {
        st.declared_containers = Some(start_declared_containers(paths, config));
    }
}

/// IMDS right after the network came up can be briefly unreachable: retry for a minute.
async fn imds_retry<T, F, Fut>(what: &'static str, f: F) -> Result<T, PhaseError>
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
        .map_err(|source| PhaseError::Imds { what, source })
}

/// The volume phase with the failure policy's retries: a failure that may pass (a holder
/// draining, EC2 throttling) is retried every `retry_interval_secs` for `retry_for_secs`.
async fn acquire_with_retries<V: VolumePhase>(
    vol: &mut V,
    config: &Config,
) -> Result<Mounted, BootError> {
    let interval = Duration::from_secs(config.failure.retry_interval_secs);
    let retry = Retry::new("volume")
        .every(interval)
        .max_delay(interval)
        .for_at_most(Duration::from_secs(config.failure.retry_for_secs))
        .announce(|_, e, wait, left| {
            crate::log!("volume: {e}");
            crate::log!(
                "volume: trying again in {} ({} left of failure.retry_for_secs); Docker stays stopped meanwhile",
                human(wait),
                human(left)
            );
        });
    let mut tries = retry.start();
    loop {
        match vol.acquire().await {
            Ok(m) => return Ok(m),
            Err(e) if e.retryable() => tries
                .wait_after(e)
                .await
                .map_err(|e| BootError::Volume(e.into_inner()))?,
            Err(e) => return Err(BootError::Volume(e)),
        }
    }
}

#[cfg(test)]
#[path = "boot_tests.rs"]
mod tests;
