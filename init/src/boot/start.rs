//! Starting what the machine is for once its state is in place: Docker (under the golden rule),
//! the declared containers after `ready`, and SSH for the operator.

use super::background::Background;
use super::background::ImdsRulesError;
use super::phase::{phase, BootError, PhaseError};
use crate::cloud::Metadata;
use crate::config::{Config, VolumeMode};
use crate::console::human;
use crate::machine::{BootState, Machine, Platform};
use crate::services::{self, docker};
use crate::sys::{Paths, System};
use crate::volume;
use std::time::Duration;
use tokio::time::Instant;

/// The golden rule, in one place: Docker starts only on the state volume it just verified (or
/// on tmpfs when the user chose `volume.mode = none`), with its modules loaded and the IMDS
/// firewall in. containerd and dockerd start together: dockerd dials containerd's socket
/// itself (for up to a minute), so their start-ups overlap instead of adding up. Both
/// readiness checks stay: a containerd that never answers is named as such.
pub(super) async fn start_docker<S: System, P: Platform>(
    m: &Machine<S>,
    st: &mut BootState<P>,
    config: &Config,
    background: Background,
    imds_rules: Option<Result<String, ImdsRulesError>>,
) -> Result<(), BootError> {
    let paths = &m.paths;
    if let Some(mounted) = &st.mounted {
        let verify = if config.volume.mode == VolumeMode::PersistedRoot {
            volume::verify_persisted_root
        } else {
            volume::verify_docker_state
        };
        verify(paths, mounted, &config.docker.storage_driver).map_err(|e| BootError::Phase {
            phase: "docker state check",
            source: Box::new(PhaseError::DockerState(e)),
        })?;
    }
    background.drivers_loaded().await;
    st.docker_started = true;
    let containerd_started = Instant::now();
    phase("containerd", async {
        m.supervisor.launch(docker::containerd(paths)).await?;
        Ok::<_, PhaseError>(())
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
            .map_err(PhaseError::DaemonJson)?;
        for host in docker::tcp_hosts(&config.docker) {
            if tls.is_some() {
                crate::log!("docker: the Engine API listens on tcp://{host} with TLS; clients need a certificate of the configured CA");
            } else {
                crate::log!("docker: WARNING: the Engine API listens on tcp://{host} WITHOUT TLS (docker.insecure_plain_tcp_api): anyone who reaches that port is root on this host");
            }
        }
        // Before dockerd, which starts the containers: they never run without the rules.
        match imds_rules {
            Some(Ok(r)) => crate::log!(
                "docker: containers cannot reach IMDS ({r} rejected; docker.block_imds)"
            ),
            Some(Err(e)) => return Err(PhaseError::ImdsRules(e)),
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
                .map_err(PhaseError::Containerd)?;
            Ok::<_, PhaseError>(containerd_started.elapsed())
        };
        let dockerd = async { Ok(docker::wait_for_ping(&docker_socket, within).await?) };
        let (containerd, _) = tokio::try_join!(containerd, dockerd)?;
        crate::log!("containerd: answering {} after its start", human(containerd));
        Ok::<_, PhaseError>(())
    })
    .await
}

/// `[[containers]]`: made to match the declaration in the background, after `ready` (Docker is
/// ready; a slow pull must not make the host look down). Their files live on the state volume:
/// its top in `docker` mode, `/var/lib/spotinit` of the persisted root, tmpfs without a volume.
pub(super) fn start_declared_containers(
    paths: &Paths,
    config: &Config,
) -> tokio::task::JoinHandle<()> {
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
