//! Unit tests of the Engine API client against a fake daemon on a unix socket: pull parameters, the container calls, and a pull's progress.

use super::fake::{daemon, http};
use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A daemon that answers requests with `answers`, one per request in order.
fn fake_daemon(name: &str, answers: Vec<String>) -> (PathBuf, super::fake::Log) {
    let next = Arc::new(AtomicUsize::new(0));
    daemon(name, move |_, _| {
        answers[next.fetch_add(1, Ordering::SeqCst).min(answers.len() - 1)].clone()
    })
}

#[test]
fn pull_parameters_split_the_tag_not_the_port() {
    assert_eq!(
        pull_parameters("10.0.2.2:5000/counter:1"),
        ("10.0.2.2:5000/counter".into(), Some("1".into()))
    );
    assert_eq!(
        pull_parameters("10.0.2.2:5000/counter"),
        ("10.0.2.2:5000/counter".into(), Some("latest".into()))
    );
    assert_eq!(pull_parameters("app@sha256:ab").1, None);
    assert_eq!(encode("a/b:c d"), "a%2Fb%3Ac%20d");
    assert_eq!(encode_image_path("reg:5000/a b:1"), "reg:5000/a%20b:1");
    assert_eq!(encode_image_path("app@sha256:ab"), "app@sha256:ab");
}

#[tokio::test]
async fn list_create_start_stop_remove_as_the_daemon_answers() {
    let (socket, seen) = fake_daemon(
        "calls",
        vec![
            http(
                "200 OK",
                r#"[{"Id":"abc","Names":["/counter"],"Labels":{"org.spotinit.managed":"true"},"State":"running"}]"#,
            ),
            http("201 Created", r#"{"Id":"def","Warnings":[]}"#),
            http("204 No Content", ""),
            http("304 Not Modified", ""),
            http("204 No Content", ""),
            http(
                "409 Conflict",
                r#"{"message":"Conflict. The container name \"/x\" is already in use"}"#,
            ),
        ],
    );
    let e = Engine::new(&socket);
    let list = e.containers().await.unwrap();
    assert_eq!(list[0].name, "counter");
    assert_eq!(list[0].labels["org.spotinit.managed"], "true");
    let id = e
        .create("counter", &serde_json::json!({"Image": "x"}))
        .await
        .unwrap();
    assert_eq!(id, "def");
    e.start("def").await.unwrap();
    e.stop("def", Duration::from_secs(30)).await.unwrap();
    e.remove("def").await.unwrap();
    let err = e.create("x", &serde_json::json!({})).await.unwrap_err();
    assert_eq!(
        err,
        EngineError::Status {
            code: 409,
            message: "Conflict. The container name \"/x\" is already in use".into()
        }
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            "GET /containers/json?all=1 HTTP/1.0 ",
            "POST /containers/create?name=counter HTTP/1.0 {\"Image\":\"x\"}",
            "POST /containers/def/start HTTP/1.0 ",
            "POST /containers/def/stop?t=30 HTTP/1.0 ",
            "DELETE /containers/def HTTP/1.0 ",
            "POST /containers/create?name=x HTTP/1.0 {}",
        ]
    );
}

#[tokio::test]
async fn a_pull_streams_its_progress_and_fails_on_an_error_line() {
    let (socket, seen) = fake_daemon(
        "pull",
        vec![
            http(
                "200 OK",
                "{\"status\":\"Pulling from counter\",\"id\":\"1\"}\n{\"status\":\"Pull complete\",\"id\":\"a1\"}\n",
            ),
            http(
                "200 OK",
                "{\"status\":\"Pulling from nope\"}\n{\"error\":\"manifest unknown\"}\n",
            ),
            http("404 Not Found", "{\"message\":\"no such image\"}"),
            http("200 OK", "{}"),
        ],
    );
    let e = Engine::new(&socket);
    let mut statuses = Vec::new();
    e.pull("10.0.2.2:5000/counter:1", Some("e30="), |v| {
        statuses.push(v["status"].as_str().unwrap_or("").to_string())
    })
    .await
    .unwrap();
    assert_eq!(statuses, ["Pulling from counter", "Pull complete"]);
    let err = e
        .pull("10.0.2.2:5000/nope:1", None, |_| {})
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::Pull("manifest unknown".into()));
    assert!(!e.image_present("10.0.2.2:5000/nope:1").await.unwrap());
    assert!(e.image_present("busybox").await.unwrap());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen[0],
        "POST /images/create?fromImage=10.0.2.2%3A5000%2Fcounter&tag=1 HTTP/1.0 auth=e30= "
    );
    assert_eq!(seen[2], "GET /images/10.0.2.2:5000/nope:1/json HTTP/1.0 ");
}

#[test]
fn a_container_list_that_is_not_one_is_named() {
    assert_eq!(parse_containers("[]").unwrap(), []);
    assert_eq!(
        parse_containers("{}").unwrap_err().to_string(),
        "container list: not an array"
    );
    let e = parse_containers("[").unwrap_err();
    assert!(
        matches!(&e, ListError::Json(_)) && e.to_string().starts_with("container list: "),
        "{e}"
    );
}
