//! Declared containers (`[[containers]]`): what to do so that Docker's containers match the
//! declaration. A container spotinit creates carries two labels: that spotinit manages it, and
//! the declaration it was created from (canonical JSON). At each boot, for each declared name:
//! a managed container with the same declaration is kept (its data and restart history stay;
//! Docker's restart policy has already started it), one with another declaration is replaced,
//! a missing one is created. Containers spotinit did not create are never touched, not even
//! one in the way of a declared name; managed containers no longer declared are left as they
//! are, with a console line.

use super::engine::{Engine, Existing};
use crate::config::containers::{parse_mount, parse_port, Container};
use crate::console::human;
use crate::retry::{Attempt, Retry, RetryError};
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

/// How one declared container ended up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Running,
    Failed(String),
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
) -> Result<(), String> {
    match engine.image_present(image).await {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(e) => return Err(format!("cannot ask Docker for {image}: {e}")),
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
                .map_err(|e| Attempt::Retry(e.to_string()))
        })
        .await
        .map_err(|e| match e {
            RetryError::Failed(e) => e,
            RetryError::TimedOut {
                last,
                after,
                attempts,
            } => format!(
                "{last} (gave up after {} and {attempts} attempts)",
                human(after)
            ),
        })?;
    crate::log!("containers: pulled {image} in {}", human(started.elapsed()));
    Ok(())
}

/// Makes the bind directories below the state volume (Docker would make them as root-owned
/// directories anyway; making them here keeps them under `binds/`, never elsewhere).
fn make_bind_dirs(c: &Container, volume: &Path) -> Result<(), String> {
    for b in &c.binds {
        if let Some((dir, _, _)) = parse_mount(b) {
            let d = volume.join(BINDS_DIR).join(dir);
            std::fs::create_dir_all(&d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        }
    }
    Ok(())
}

async fn create_and_start(engine: &Engine, c: &Container, volume: &Path) -> Result<String, String> {
    make_bind_dirs(c, volume)?;
    let id = engine
        .create(&c.name, &create_body(c, volume))
        .await
        .map_err(|e| format!("create: {e}"))?;
    engine
        .start(&id)
        .await
        .map_err(|e| format!("start {}: {e}", short(&id)))?;
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
                    return (name.clone(), Outcome::Failed(format!("start: {e}")));
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
                engine
                    .stop(id, timeout)
                    .await
                    .map_err(|e| format!("stop {}: {e}", short(id)))?;
                engine
                    .remove(id)
                    .await
                    .map_err(|e| format!("remove {}: {e}", short(id)))?;
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
                .map(|d| (d.name.clone(), Outcome::Failed(e.to_string())))
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
        .filter(|(_, o)| *o == Outcome::Running)
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
mod tests {
    use super::*;

    fn declared(toml_text: &str) -> Container {
        toml::from_str(toml_text).unwrap()
    }

    fn counter() -> Container {
        declared(
            "name = \"counter\"\nimage = \"10.0.2.2:5000/counter:1\"\nports = [\"8080:8080\"]\n\
             volumes = [\"count:/data\"]\nenvironment = { GREETING = \"hello\" }\n",
        )
    }

    fn existing(name: &str, labels: &[(&str, &str)], state: &str) -> Existing {
        Existing {
            id: format!("id-{name}"),
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            state: state.into(),
        }
    }

    fn created_from(c: &Container, state: &str) -> Existing {
        existing(
            &c.name,
            &[
                (MANAGED_LABEL, "true"),
                (DECLARATION_LABEL, &declaration(c)),
            ],
            state,
        )
    }

    #[test]
    fn a_missing_container_is_created() {
        assert_eq!(
            plan(&[counter()], &[]),
            [Step::Create {
                declared: counter()
            }]
        );
    }

    #[test]
    fn a_container_as_declared_is_kept_with_its_id() {
        let steps = plan(&[counter()], &[created_from(&counter(), "running")]);
        assert_eq!(
            steps,
            [Step::Keep {
                name: "counter".into(),
                id: "id-counter".into(),
                start: false
            }]
        );
        // Created but never started (a boot cut short): started, not recreated.
        let steps = plan(&[counter()], &[created_from(&counter(), "created")]);
        assert!(
            matches!(steps[0], Step::Keep { start: true, .. }),
            "{steps:?}"
        );
    }

    #[test]
    fn a_changed_declaration_replaces_the_container() {
        let old = counter();
        let mut new = counter();
        new.environment.insert("GREETING".into(), "bonjour".into());
        let steps = plan(std::slice::from_ref(&new), &[created_from(&old, "running")]);
        assert_eq!(
            steps,
            [Step::Replace {
                id: "id-counter".into(),
                declared: new
            }]
        );
    }

    #[test]
    fn containers_spotinit_did_not_create_are_never_touched() {
        let by_hand = existing("counter", &[], "running");
        let other = existing("debug-shell", &[("com.example", "x")], "running");
        let steps = plan(&[counter()], &[by_hand, other]);
        assert_eq!(
            steps,
            [Step::InTheWay {
                name: "counter".into(),
                id: "id-counter".into()
            }]
        );
    }

    #[test]
    fn a_managed_container_no_longer_declared_is_left_and_named() {
        let mut old = counter();
        old.name = "old-counter".into();
        let steps = plan(&[], &[created_from(&old, "running")]);
        assert_eq!(
            steps,
            [Step::NoLongerDeclared {
                name: "old-counter".into(),
                id: "id-old-counter".into()
            }]
        );
    }

    #[test]
    fn the_declaration_is_canonical() {
        let a = declared("name = \"a\"\nimage = \"x\"\nenvironment = { B = \"2\", A = \"1\" }\n");
        let b = declared("image = \"x\"\nenvironment = { A = \"1\", B = \"2\" }\nname = \"a\"\n");
        assert_eq!(declaration(&a), declaration(&b));
    }

    /// A Docker with `existing` containers and the images in `present`, whose registry refuses
    /// every pull; it answers creates with `new-<name>`.
    fn docker(
        name: &str,
        existing: Vec<Existing>,
        present: &'static [&'static str],
    ) -> (std::path::PathBuf, crate::services::engine::fake::Log) {
        use crate::services::engine::fake::{daemon, http};
        let list: Vec<Value> = existing
            .iter()
            .map(|e| {
                json!({"Id": e.id, "Names": [format!("/{}", e.name)], "Labels": e.labels,
                       "State": e.state})
            })
            .collect();
        let list = Value::Array(list).to_string();
        daemon(name, move |first, _| {
            let path = first.split_whitespace().nth(1).unwrap_or("");
            if path == "/containers/json?all=1" {
                http("200 OK", &list)
            } else if path.starts_with("/images/create") {
                http(
                    "200 OK",
                    "{\"error\":\"connection refused: registry down\"}\n",
                )
            } else if let Some(img) = path.strip_prefix("/images/") {
                let img = img.trim_end_matches("/json");
                if present.contains(&img) {
                    http("200 OK", "{}")
                } else {
                    http("404 Not Found", r#"{"message":"No such image"}"#)
                }
            } else if let Some(q) = path.strip_prefix("/containers/create?name=") {
                http("201 Created", &format!("{{\"Id\":\"new-{q}\"}}"))
            } else {
                http("204 No Content", "")
            }
        })
    }

    #[tokio::test]
    async fn reconcile_creates_keeps_replaces_and_leaves_alone() {
        let kept = counter();
        let mut changed = counter();
        changed.name = "changed".into();
        let mut old = changed.clone();
        old.environment.insert("GREETING".into(), "old".into());
        let mut missing = counter();
        missing.name = "missing".into();
        let (socket, seen) = docker(
            "reconcile",
            vec![
                created_from(&kept, "running"),
                created_from(&old, "running"),
                existing("by-hand", &[], "running"),
            ],
            &["10.0.2.2:5000/counter:1"],
        );
        let engine = Engine::new(&socket);
        let declared = [kept, changed, missing];
        let volume =
            std::env::temp_dir().join(format!("spotinit-reconcile-{}", std::process::id()));
        let outcomes = reconcile(&engine, &declared, &volume, &|_| None, Duration::ZERO).await;
        assert_eq!(
            outcomes,
            [
                ("counter".to_string(), Outcome::Running),
                ("changed".to_string(), Outcome::Running),
                ("missing".to_string(), Outcome::Running),
            ]
        );
        let seen = seen.lock().unwrap().clone();
        let calls: Vec<&str> = seen
            .iter()
            .map(|l| l.split(" HTTP").next().unwrap())
            .collect();
        // The kept one is never touched; the changed one is stopped with its timeout, removed,
        // created again; the one made by hand is not in any call.
        assert!(!calls.iter().any(|c| c.contains("id-counter")), "{calls:?}");
        assert!(!calls.iter().any(|c| c.contains("by-hand")), "{calls:?}");
        for c in [
            "POST /containers/id-changed/stop?t=30",
            "DELETE /containers/id-changed",
            "POST /containers/create?name=changed",
            "POST /containers/new-changed/start",
            "POST /containers/create?name=missing",
            "POST /containers/new-missing/start",
        ] {
            assert!(calls.contains(&c), "{c} not in {calls:?}");
        }
        let stop = calls
            .iter()
            .position(|c| c.contains("id-changed/stop"))
            .unwrap();
        let remove = calls
            .iter()
            .position(|c| c.starts_with("DELETE /containers/id-changed"))
            .unwrap();
        let create = calls
            .iter()
            .position(|c| *c == "POST /containers/create?name=changed")
            .unwrap();
        assert!(stop < remove && remove < create, "{calls:?}");
        let _ = std::fs::remove_dir_all(&volume);
    }

    #[tokio::test]
    async fn an_image_that_cannot_be_pulled_fails_that_container_only_and_keeps_the_old_one() {
        let mut pulled = counter();
        pulled.name = "pulled".into();
        pulled.image = "10.0.2.2:5000/new:2".into();
        let mut old = pulled.clone();
        old.image = "10.0.2.2:5000/new:1".into();
        let (socket, seen) = docker(
            "pull-fails",
            vec![created_from(&old, "running")],
            &["10.0.2.2:5000/counter:1"],
        );
        let engine = Engine::new(&socket);
        let volume = std::env::temp_dir().join(format!("spotinit-pullfail-{}", std::process::id()));
        let outcomes = reconcile(
            &engine,
            &[counter(), pulled],
            &volume,
            &|_| Some("e30=".into()),
            Duration::ZERO,
        )
        .await;
        assert_eq!(outcomes[0], ("counter".to_string(), Outcome::Running));
        match &outcomes[1] {
            (n, Outcome::Failed(why)) => {
                assert_eq!(n, "pulled");
                assert!(why.contains("registry down"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        let seen = seen.lock().unwrap().clone();
        // The old container was neither stopped nor removed; the pull carried the credentials.
        assert!(!seen.iter().any(|l| l.contains("id-pulled")), "{seen:?}");
        assert!(
            seen.iter().any(|l| l.starts_with(
                "POST /images/create?fromImage=10.0.2.2%3A5000%2Fnew&tag=2 HTTP/1.0 auth=e30="
            )),
            "{seen:?}"
        );
        let _ = std::fs::remove_dir_all(&volume);
    }

    #[test]
    fn the_create_body_says_what_was_declared() {
        let mut c = counter();
        c.binds = vec!["counter/config:/etc/counter:ro".into()];
        c.ports.push("127.0.0.1:9090:8080".into());
        c.shm_size_mib = Some(256);
        c.command = Some(vec!["serve".into(), "--port=8080".into()]);
        let b = create_body(&c, Path::new("/run/spotinit/volume"));
        assert_eq!(b["Image"], "10.0.2.2:5000/counter:1");
        assert_eq!(b["Env"], json!(["GREETING=hello"]));
        assert_eq!(b["Cmd"], json!(["serve", "--port=8080"]));
        assert_eq!(b["Labels"][MANAGED_LABEL], "true");
        assert_eq!(b["Labels"][DECLARATION_LABEL], declaration(&c));
        assert_eq!(b["ExposedPorts"], json!({ "8080/tcp": {} }));
        assert_eq!(
            b["HostConfig"]["PortBindings"]["8080/tcp"],
            json!([
                { "HostIp": "", "HostPort": "8080" },
                { "HostIp": "127.0.0.1", "HostPort": "9090" }
            ])
        );
        assert_eq!(
            b["HostConfig"]["Binds"],
            json!([
                "count:/data",
                "/run/spotinit/volume/binds/counter/config:/etc/counter:ro"
            ])
        );
        assert_eq!(b["HostConfig"]["RestartPolicy"]["Name"], "always");
        assert_eq!(b["HostConfig"]["ShmSize"], 256u64 << 20);
        assert_eq!(b["StopTimeout"], 30);
        assert!(b.get("Entrypoint").is_none());
    }
}
