//! Unit tests of the declared containers: the plan per name (create, keep, replace, leave), the canonical declaration, and reconciling against a fake Engine API.

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
    let volume = std::env::temp_dir().join(format!("spotinit-reconcile-{}", std::process::id()));
    let outcomes = reconcile(&engine, &declared, &volume, &|_| None, Duration::ZERO).await;
    let running: Vec<&str> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Running))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(running, ["counter", "changed", "missing"], "{outcomes:?}");
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
    assert!(
        matches!(&outcomes[0], (n, Outcome::Running) if n == "counter"),
        "{outcomes:?}"
    );
    match &outcomes[1] {
        (n, Outcome::Failed(why)) => {
            assert_eq!(n, "pulled");
            assert!(matches!(why, ContainerError::Pull(_)), "{why:?}");
            assert!(why.to_string().contains("registry down"), "{why}");
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

#[test]
fn container_errors_say_what_they_said_before() {
    use std::error::Error;
    let conflict = || EngineError::Status {
        code: 409,
        message: "conflict".into(),
    };
    let stop = ContainerError::Stop {
        id: "0123456789ab".into(),
        source: conflict(),
    };
    assert_eq!(stop.to_string(), "stop 0123456789ab: HTTP 409: conflict");
    assert_eq!(
        ContainerError::StartKept(conflict()).to_string(),
        "start: HTTP 409: conflict"
    );
    assert_eq!(
        ContainerError::Create(conflict()).to_string(),
        "create: HTTP 409: conflict"
    );
    let inspect = ContainerError::Inspect {
        image: "redis".into(),
        source: EngineError::Transport("GET /images/redis/json: no answer within 60 s".into()),
    };
    assert_eq!(
        inspect.to_string(),
        "cannot ask Docker for redis: GET /images/redis/json: no answer within 60 s"
    );
    let pull = ContainerError::Pull(RetryError::TimedOut {
        last: EngineError::Pull("manifest unknown".into()),
        after: Duration::from_secs(600),
        attempts: 12,
    });
    assert_eq!(
        pull.to_string(),
        "manifest unknown (gave up after 10 min 00 s and 12 attempts)"
    );
    assert!(pull.source().unwrap().is::<EngineError>());
}
