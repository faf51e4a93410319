//! Declared containers (`[[containers]]`): what to do so that Docker's containers match the
//! declaration. A container spotinit creates carries two labels: that spotinit manages it, and
//! the declaration it was created from (canonical JSON). At each boot, for each declared name:
//! a managed container with the same declaration is kept (its data and restart history stay;
//! Docker's restart policy has already started it), one with another declaration is replaced,
//! a missing one is created. Containers spotinit did not create are never touched, not even
//! one in the way of a declared name; managed containers no longer declared are left as they
//! are, with a console line.

use super::engine::{Engine, EngineError, Existing};
use crate::config::containers::{parse_mount, parse_port, Container};
use crate::console::human;
use crate::retry::{Attempt, Retry, RetryError};
use crate::sys::FileError;
use serde_json::{json, Map, Value};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;

/// Label: this container is spotinit's (created from a declaration).
pub const MANAGED_LABEL: &str = "org.spotinit.managed";
/// Label: the declaration it was created from, as [`declaration`] writes it.
pub const DECLARATION_LABEL: &str = "org.spotinit.declaration";
/// Where bind mounts take their host side: below this directory of the state volume.
pub const BINDS_DIR: &str = "binds";

impl Existing {
    fn managed(&self) -> bool {
        self.labels.get(MANAGED_LABEL).map(String::as_str) == Some("true")
    }
}

/// One step of the reconciliation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Declared and as declared: left alone (started if Docker has not, e.g. `restart = "no"`).
    Keep {
        name: String,
        id: String,
        start: bool,
    },
    /// Declared and missing: pull if needed, create, start.
    Create { declared: Container },
    /// Declared, but created from another declaration: stop (its timeout), remove, create,
    /// start. Its named volumes and binds stay: they are not part of the container.
    Replace { id: String, declared: Container },
    /// A container of the declared name that spotinit did not create: never touched.
    InTheWay { name: String, id: String },
    /// Created by spotinit, no longer declared: left as it is (removing is the user's call).
    NoLongerDeclared { name: String, id: String },
}

/// The canonical form of a declaration: what the label holds and what is compared. JSON of the
/// struct, whose maps are ordered, so equal declarations give equal text.
pub fn declaration(c: &Container) -> String {
    serde_json::to_string(c).expect("a declaration serialises")
}

/// What to do, in declaration order, then the leftovers in Docker's order.
pub fn plan(declared: &[Container], existing: &[Existing]) -> Vec<Step> {
    let mut steps = Vec::new();
    for d in declared {
        let step = match existing.iter().find(|e| e.name == d.name) {
            None => Step::Create {
                declared: d.clone(),
            },
            Some(e) if !e.managed() => Step::InTheWay {
                name: e.name.clone(),
                id: e.id.clone(),
            },
            Some(e) if e.labels.get(DECLARATION_LABEL) == Some(&declaration(d)) => Step::Keep {
                name: e.name.clone(),
                id: e.id.clone(),
                start: e.state == "created"
                    || (e.state == "exited" && d.restart.docker_name() == "no"),
            },
            Some(e) => Step::Replace {
                id: e.id.clone(),
                declared: d.clone(),
            },
        };
        steps.push(step);
    }
    for e in existing {
        if e.managed() && !declared.iter().any(|d| d.name == e.name) {
            steps.push(Step::NoLongerDeclared {
                name: e.name.clone(),
                id: e.id.clone(),
            });
        }
    }
    steps
}

/// The Engine API's `POST /containers/create` body for a declaration; `volume` is where the
/// state volume is mounted (bind sources are below its `binds/`).
pub fn create_body(c: &Container, volume: &Path) -> Value {
    let mut labels = Map::new();
    labels.insert(MANAGED_LABEL.into(), "true".into());
    labels.insert(DECLARATION_LABEL.into(), declaration(c).into());
    let mut exposed = Map::new();
    let mut bindings: Map<String, Value> = Map::new();
    for p in &c.ports {
        // Checked with the configuration: every entry parses.
        if let Some((ip, host, container, proto)) = parse_port(p) {
            let key = format!("{container}/{proto}");
            exposed.insert(key.clone(), json!({}));
            let entry = json!({
                "HostIp": ip.map(|i| i.to_string()).unwrap_or_default(),
                "HostPort": host.to_string(),
            });
            match bindings.get_mut(&key) {
                Some(Value::Array(a)) => a.push(entry),
                _ => {
                    bindings.insert(key, json!([entry]));
                }
            }
        }
    }
    let mut binds: Vec<String> = Vec::new();
    for v in &c.volumes {
        if let Some((name, target, ro)) = parse_mount(v) {
            binds.push(format!("{name}:{target}{}", if ro { ":ro" } else { "" }));
        }
    }
    for b in &c.binds {
        if let Some((dir, target, ro)) = parse_mount(b) {
            let source = volume.join(BINDS_DIR).join(dir);
            binds.push(format!(
                "{}:{target}{}",
                source.display(),
                if ro { ":ro" } else { "" }
            ));
        }
    }
    let mut host = json!({
        "Binds": binds,
        "PortBindings": bindings,
        "RestartPolicy": { "Name": c.restart.docker_name() },
    });
    if let Some(mib) = c.shm_size_mib {
        host["ShmSize"] = json!(mib << 20);
    }
    if let Some(driver) = &c.log_driver {
        host["LogConfig"] = json!({ "Type": driver, "Config": c.log_options });
    }
    let mut body = json!({
        "Image": c.image,
        "Env": c.environment.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "Labels": labels,
        "ExposedPorts": exposed,
        "StopTimeout": c.stop_timeout_secs,
        "HostConfig": host,
    });
    if let Some(cmd) = &c.command {
        body["Cmd"] = json!(cmd);
    }
    if let Some(ep) = &c.entrypoint {
        body["Entrypoint"] = json!(ep);
    }
    if let Some(h) = &c.hostname {
        body["Hostname"] = json!(h);
    }
    body
}

/// How long a pull is retried (a registry that is down, a network not there yet) before the
/// container is reported failed; the other containers and Docker are not held up by it.
pub const PULL_RETRY_FOR: Duration = Duration::from_secs(600);

/// Why a declared container is not running. Container ids are short.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    List(EngineError),
    #[error("cannot ask Docker for {image}: {source}")]
    Inspect { image: String, source: EngineError },
    #[error(transparent)]
    Pull(RetryError<EngineError>),
    #[error(transparent)]
    BindDir(#[from] FileError),
    #[error("create: {0}")]
    Create(#[source] EngineError),
    /// A kept container that Docker had not started.
    #[error("start: {0}")]
    StartKept(#[source] EngineError),
    #[error("start {id}: {source}")]
    Start { id: String, source: EngineError },
    #[error("stop {id}: {source}")]
    Stop { id: String, source: EngineError },
    #[error("remove {id}: {source}")]
    Remove { id: String, source: EngineError },
}

/// How one declared container ended up.
#[derive(Debug)]
pub enum Outcome {
    Running,
    Failed(ContainerError),
    /// Not ours to run: in the way, or no longer declared.
    LeftAlone,
}

/// The image, pulled if Docker does not have it (an image on the state volume needs no
/// network). Pull progress: a line when it starts, one per finished layer, one at the end.
async fn ensure_image(
    engine: &Engine,
    image: &str,
    auth: Option<&str>,
    pull_for: Duration,
) -> Result<(), ContainerError> {
    match engine.image_present(image).await {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(source) => {
            return Err(ContainerError::Inspect {
                image: image.into(),
                source,
            })
        }
    }
    let started = Instant::now();
    let retry = Retry::new(format!("containers: pull {image}"))
        .every(Duration::from_secs(2))
        .max_delay(Duration::from_secs(60))
        .for_at_most(pull_for)
        .jitter();
    retry
        .run(|attempt| async move {
            if attempt == 1 {
                crate::log!("containers: pulling {image}");
            }
            let mut layers = 0;
            engine
                .pull(image, auth, |v| {
                    if v["status"].as_str() == Some("Pull complete") {
                        layers += 1;
                        crate::log!(
                            "containers: {image}: layer {} done ({layers})",
                            v["id"].as_str().unwrap_or("?")
                        );
                    }
                })
                .await
                .map_err(Attempt::Retry)
        })
        .await
        .map_err(ContainerError::Pull)?;
    crate::log!("containers: pulled {image} in {}", human(started.elapsed()));
    Ok(())
}

/// Makes the bind directories below the state volume (Docker would make them as root-owned
/// directories anyway; making them here keeps them under `binds/`, never elsewhere).
fn make_bind_dirs(c: &Container, volume: &Path) -> Result<(), FileError> {
    for b in &c.binds {
        if let Some((dir, _, _)) = parse_mount(b) {
            let d = volume.join(BINDS_DIR).join(dir);
            std::fs::create_dir_all(&d).map_err(FileError::at("mkdir", &d))?;
        }
    }
    Ok(())
}

async fn create_and_start(
    engine: &Engine,
    c: &Container,
    volume: &Path,
) -> Result<String, ContainerError> {
    make_bind_dirs(c, volume)?;
    let id = engine
        .create(&c.name, &create_body(c, volume))
        .await
        .map_err(ContainerError::Create)?;
    engine
        .start(&id)
        .await
        .map_err(|source| ContainerError::Start {
            id: short(&id).into(),
            source,
        })?;
    Ok(id)
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Carries out one step; `auth` gives the `X-Registry-Auth` value for an image, if any.
async fn carry_out(
    engine: &Engine,
    step: &Step,
    volume: &Path,
    auth: &(dyn Fn(&str) -> Option<String> + Sync),
    pull_for: Duration,
) -> (String, Outcome) {
    match step {
        Step::Keep { name, id, start } => {
            if *start {
                if let Err(e) = engine.start(id).await {
                    return (name.clone(), Outcome::Failed(ContainerError::StartKept(e)));
                }
            }
            crate::log!("containers: {name} ({}) is as declared; kept", short(id));
            (name.clone(), Outcome::Running)
        }
        Step::Create { declared } => {
            let name = declared.name.clone();
            let result = async {
                ensure_image(
                    engine,
                    &declared.image,
                    auth(&declared.image).as_deref(),
                    pull_for,
                )
                .await?;
                create_and_start(engine, declared, volume).await
            }
            .await;
            match result {
                Ok(id) => {
                    crate::log!("containers: {name} created and started ({})", short(&id));
                    (name, Outcome::Running)
                }
                Err(e) => (name, Outcome::Failed(e)),
            }
        }
        Step::Replace { id, declared } => {
            let name = declared.name.clone();
            let result = async {
                // The new image first: if it cannot be had, the old container keeps running.
                ensure_image(engine, &declared.image, auth(&declared.image).as_deref(), pull_for)
                    .await?;
                crate::log!(
                    "containers: {name} ({}) was created from another declaration; replacing it (its named volumes and binds stay)",
                    short(id)
                );
                let timeout = Duration::from_secs(declared.stop_timeout_secs);
                let id_short = || short(id).to_string();
                engine
                    .stop(id, timeout)
                    .await
                    .map_err(|source| ContainerError::Stop { id: id_short(), source })?;
                engine
                    .remove(id)
                    .await
                    .map_err(|source| ContainerError::Remove { id: id_short(), source })?;
                create_and_start(engine, declared, volume).await
            }
            .await;
            match result {
                Ok(new) => {
                    crate::log!("containers: {name} replaced ({})", short(&new));
                    (name, Outcome::Running)
                }
                Err(e) => (name, Outcome::Failed(e)),
            }
        }
        Step::InTheWay { name, id } => {
            crate::log!(
                "containers: a container named {name} ({}) exists that spotinit did not create; left alone, so the declared {name} is not running: rename or remove it (docker rm -f {name}) and reboot, or rename the declaration",
                short(id)
            );
            (name.clone(), Outcome::LeftAlone)
        }
        Step::NoLongerDeclared { name, id } => {
            crate::log!(
                "containers: {name} ({}) was created from a declaration that is gone; left as it is (docker rm -f {name} removes it)",
                short(id)
            );
            (name.clone(), Outcome::LeftAlone)
        }
    }
}

/// Runs every future at once on the calling task; their outputs in order.
async fn join_all<F: Future + Unpin>(mut futures: Vec<F>) -> Vec<F::Output> {
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match Pin::new(f).poll(cx) {
                    Poll::Ready(o) => *out = Some(o),
                    Poll::Pending => all = false,
                }
            }
        }
        if all {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

/// Makes Docker's containers match the declaration, every step at once (a slow pull holds up
/// no other container), and says how it ended: one line when all declared containers run,
/// with the time; otherwise which failed and why.
/// A pull is retried for `pull_for` ([`PULL_RETRY_FOR`] at boot).
pub async fn reconcile(
    engine: &Engine,
    declared: &[Container],
    volume: &Path,
    auth: &(dyn Fn(&str) -> Option<String> + Sync),
    pull_for: Duration,
) -> Vec<(String, Outcome)> {
    let started = Instant::now();
    let existing = match engine.containers().await {
        Ok(e) => e,
        Err(e) => {
            crate::log!(
                "containers: cannot list Docker's containers: {e}; nothing declared was started"
            );
            return declared
                .iter()
                .map(|d| {
                    (
                        d.name.clone(),
                        Outcome::Failed(ContainerError::List(e.clone())),
                    )
                })
                .collect();
        }
    };
    let steps = plan(declared, &existing);
    let outcomes = join_all(
        steps
            .iter()
            .map(|s| Box::pin(carry_out(engine, s, volume, auth, pull_for)))
            .collect(),
    )
    .await;
    let running = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Running))
        .count();
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|(n, o)| match o {
            Outcome::Failed(why) => Some(format!("{n} ({why})")),
            _ => None,
        })
        .collect();
    if failed.is_empty() && running == declared.len() {
        crate::log!(
            "containers: all {running} declared running, {} after Docker was ready",
            human(started.elapsed())
        );
    } else {
        crate::log!(
            "containers: {running} of {} declared running after {}{}",
            declared.len(),
            human(started.elapsed()),
            if failed.is_empty() {
                String::new()
            } else {
                format!("; FAILED: {}", failed.join("; "))
            }
        );
    }
    outcomes
}

#[cfg(test)]
#[path = "containers_tests.rs"]
mod tests;
