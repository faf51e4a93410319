//! The Docker Engine API client: one TLS connection per request, JSON in and out.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};

use crate::qemu::{Error, Result};

/// One API request may take this long (an image import of a few MiB under TCG included).
const REQUEST_DEADLINE: Duration = Duration::from_secs(120);

/// The Docker Engine API at `127.0.0.1:<port>`, over TLS.
#[derive(Clone)]
pub struct Docker {
    port: u16,
    tls: tokio_rustls::TlsConnector,
}

/// A container as `GET /containers/json` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSummary {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    pub image: String,
    /// `running`, `exited`, `restarting`, …
    pub state: String,
    pub status: String,
}

/// What to create: `docker run -d --name NAME --restart always -v VOLUME:PATH -p HOST:CONTAINER
/// IMAGE CMD...`.
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub cmd: Vec<String>,
    pub restart_always: bool,
    /// A named volume and where it is mounted.
    pub volume: Option<(String, String)>,
    /// (host port, container port), TCP.
    pub publish: Option<(u16, u16)>,
    /// `--privileged --pid=host`: sees and may act on the host's processes and mounts.
    pub host_powers: bool,
}

impl Docker {
    /// A client presenting the test PKI's client certificate, trusting only its CA.
    pub fn new(port: u16) -> Docker {
        let config = crate::tls::Pki::get()
            .and_then(|p| p.client_config())
            .unwrap_or_else(|e| panic!("the test PKI for the Docker API: {e}"));
        Docker {
            port,
            tls: tokio_rustls::TlsConnector::from(config),
        }
    }

    /// One request; the status and the body. Errors name the request.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<(u16, Bytes)> {
        let what = format!("Docker API {method} {path} (127.0.0.1:{})", self.port);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "docker");
        if let Some(ct) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, ct);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| Error::new(format!("{what}: {e}")))?;
        // One connection per request: slirp keeps accepting on the host side while the guest
        // end is gone, so a kept connection could be a dead one.
        let (status, _, body) =
            crate::tls::exchange(&self.tls, self.port, req, REQUEST_DEADLINE, &what).await?;
        Ok((status, body))
    }

    /// A request whose answer must be 2xx (or 304); the body as JSON (`Null` when empty).
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let (ct, bytes) = match body {
            Some(v) => (Some("application/json"), Bytes::from(v.to_string())),
            None => (None, Bytes::new()),
        };
        let (status, body) = self.request(method, path, ct, bytes).await?;
        if !(200..300).contains(&status) && status != 304 {
            return Err(Error::new(format!(
                "Docker API {method} {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body).trim()
            )));
        }
        if body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&body).map_err(|e| {
            Error::new(format!(
                "Docker API {method} {path}: not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            ))
        })
    }

    /// `GET /_ping` answers `OK`.
    pub async fn ping(&self) -> Result<()> {
        let (status, body) = self.request("GET", "/_ping", None, Bytes::new()).await?;
        if status == 200 && body.as_ref() == b"OK" {
            Ok(())
        } else {
            Err(Error::new(format!(
                "Docker API /_ping: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )))
        }
    }

    /// Pings until it answers (slirp accepts on the host before the guest listens).
    pub async fn wait_ping(&self, deadline: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let e = match self.ping().await {
                Ok(()) => return Ok(start.elapsed()),
                Err(e) => e,
            };
            if start.elapsed() > deadline {
                return Err(e.context(format!(
                    "the Docker API did not answer /_ping within {:.0} s",
                    deadline.as_secs_f64()
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// `GET /info`.
    pub async fn info(&self) -> Result<Value> {
        self.call("GET", "/info", None).await
    }

    /// `POST /images/create?fromSrc=-`: imports a root filesystem tarball as `repo:tag`. Returns
    /// the image id.
    pub async fn import_image(&self, tar: Vec<u8>, repo: &str, tag: &str) -> Result<String> {
        let path = format!("/images/create?fromSrc=-&repo={repo}&tag={tag}");
        let (status, body) = self
            .request("POST", &path, Some("application/x-tar"), Bytes::from(tar))
            .await?;
        let text = String::from_utf8_lossy(&body);
        if status != 200 {
            return Err(Error::new(format!(
                "Docker API POST {path}: HTTP {status}: {}",
                text.trim()
            )));
        }
        // A stream of JSON messages; an error comes as {"error": ...} with status 200.
        let mut id = None;
        for msg in serde_json::Deserializer::from_str(&text).into_iter::<Value>() {
            let msg = msg.map_err(|e| Error::new(format!("import {repo}:{tag}: {e}: {text}")))?;
            if let Some(err) = msg.get("error") {
                return Err(Error::new(format!("import {repo}:{tag}: {err}")));
            }
            if let Some(s) = msg.get("status").and_then(Value::as_str) {
                if s.starts_with("sha256:") {
                    id = Some(s.to_owned());
                }
            }
        }
        id.ok_or_else(|| Error::new(format!("import {repo}:{tag}: no image id in {text}")))
    }

    /// `POST /containers/create?name=…`; returns the container id.
    pub async fn create_container(&self, spec: &ContainerSpec) -> Result<String> {
        let mut host = json!({});
        if spec.restart_always {
            host["RestartPolicy"] = json!({ "Name": "always" });
        }
        if let Some((volume, path)) = &spec.volume {
            host["Binds"] = json!([format!("{volume}:{path}")]);
        }
        if spec.host_powers {
            host["Privileged"] = json!(true);
            host["PidMode"] = json!("host");
        }
        let mut body = json!({
            "Image": spec.image,
            "Cmd": spec.cmd,
            "HostConfig": host,
        });
        if let Some((host_port, container_port)) = spec.publish {
            let key = format!("{container_port}/tcp");
            body["ExposedPorts"] = json!({ key.clone(): {} });
            body["HostConfig"]["PortBindings"] =
                json!({ key: [{ "HostPort": host_port.to_string() }] });
        }
        let created = self
            .call(
                "POST",
                &format!("/containers/create?name={}", spec.name),
                Some(body),
            )
            .await?;
        created
            .get("Id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::new(format!("create {}: no Id in {created}", spec.name)))
    }

    /// `POST /containers/{id}/start`.
    pub async fn start(&self, id: &str) -> Result<()> {
        self.call("POST", &format!("/containers/{id}/start"), None)
            .await
            .map(drop)
    }

    /// `GET /containers/json` (`all`: stopped ones too).
    pub async fn containers(&self, all: bool) -> Result<Vec<ContainerSummary>> {
        let list = self
            .call("GET", &format!("/containers/json?all={}", all as u8), None)
            .await?;
        let items = list
            .as_array()
            .ok_or_else(|| Error::new(format!("/containers/json: not a list: {list}")))?;
        Ok(items
            .iter()
            .map(|c| {
                let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                ContainerSummary {
                    id: s("Id"),
                    name: c
                        .get("Names")
                        .and_then(|n| n.get(0))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .trim_start_matches('/')
                        .to_owned(),
                    image: s("Image"),
                    state: s("State"),
                    status: s("Status"),
                }
            })
            .collect())
    }

    /// `GET /containers/{id}/json`.
    pub async fn inspect(&self, id: &str) -> Result<Value> {
        self.call("GET", &format!("/containers/{id}/json"), None)
            .await
    }

    /// Polls until the container named `name` is listed as `running`.
    pub async fn wait_running(&self, name: &str, deadline: Duration) -> Result<ContainerSummary> {
        let start = Instant::now();
        loop {
            let last = match self.containers(true).await {
                Ok(list) => match list.into_iter().find(|c| c.name == name) {
                    Some(c) if c.state == "running" => return Ok(c),
                    Some(c) => format!("it is {} ({})", c.state, c.status),
                    None => "it is not listed".to_owned(),
                },
                Err(e) => e.to_string(),
            };
            if start.elapsed() > deadline {
                return Err(Error::new(format!(
                    "container {name} not running after {:.0} s: {last}",
                    deadline.as_secs_f64()
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Runs a command in a running container (`docker exec`): exit code and output (stdout and
    /// stderr together).
    pub async fn exec(&self, id: &str, cmd: &[&str]) -> Result<(i64, String)> {
        let created = self
            .call(
                "POST",
                &format!("/containers/{id}/exec"),
                Some(json!({ "Cmd": cmd, "AttachStdout": true, "AttachStderr": true })),
            )
            .await?;
        let exec_id = created
            .get("Id")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::new(format!("exec in {id}: no Id in {created}")))?
            .to_owned();
        // The start answer is the raw multiplexed stream until the command ends.
        let (status, body) = self
            .request(
                "POST",
                &format!("/exec/{exec_id}/start"),
                Some("application/json"),
                Bytes::from(json!({ "Detach": false, "Tty": false }).to_string()),
            )
            .await?;
        if status != 200 {
            return Err(Error::new(format!(
                "exec {cmd:?} in {id}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        let output = demultiplex(&body);
        let inspected = self
            .call("GET", &format!("/exec/{exec_id}/json"), None)
            .await?;
        let code = inspected
            .get("ExitCode")
            .and_then(Value::as_i64)
            .ok_or_else(|| Error::new(format!("exec {cmd:?} in {id}: no ExitCode: {inspected}")))?;
        Ok((code, output))
    }
}

/// The payloads of Docker's multiplexed stream (8-byte frame headers: stream, 0, 0, 0, length).
fn demultiplex(mut raw: &[u8]) -> String {
    let mut out = Vec::new();
    while raw.len() >= 8 {
        let len = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]) as usize;
        let end = (8 + len).min(raw.len());
        out.extend_from_slice(&raw[8..end]);
        raw = &raw[end..];
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demultiplex_joins_frames() {
        let mut raw = vec![1, 0, 0, 0, 0, 0, 0, 3];
        raw.extend_from_slice(b"abc");
        raw.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 2]);
        raw.extend_from_slice(b"de");
        assert_eq!(demultiplex(&raw), "abcde");
    }
}
