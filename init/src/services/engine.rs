//! A small client of the Docker Engine API over its unix socket, for the declared containers:
//! list, inspect an image, pull (streaming its progress), create, start, stop, remove. HTTP/1.0,
//! one connection per request, so an answer is never chunked and a pull's progress arrives as
//! lines until the daemon closes the connection.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Why a request failed: the daemon's own message when it gave one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No connection, a broken one, or no answer in time.
    #[error("{0}")]
    Transport(String),
    /// An HTTP status other than the expected, with the daemon's `message`.
    #[error("HTTP {code}: {message}")]
    Status { code: u16, message: String },
    /// A pull that reported an error in its stream (an unknown image, refused credentials).
    #[error("{0}")]
    Pull(String),
}

/// Percent-encodes everything but RFC 3986's unreserved characters (for path segments and
/// query values).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An image reference as a path segment, as Docker's own client sends it: '/', ':' and '@' kept
/// (the daemon matches `/images/{name:.*}/json`), anything else outside the unreserved set
/// encoded.
pub fn encode_image_path(image: &str) -> String {
    image
        .split(['/', ':', '@'])
        .map(encode)
        .zip(
            image
                .chars()
                .filter(|c| "/:@".contains(*c))
                .map(Some)
                .chain([None]),
        )
        .map(|(part, sep)| match sep {
            Some(c) => format!("{part}{c}"),
            None => part,
        })
        .collect()
}

/// `repo[:tag][@digest]` → (`fromImage`, `tag`) as `POST /images/create` takes them (the tag
/// `latest` when none is given, none with a digest).
pub fn pull_parameters(image: &str) -> (String, Option<String>) {
    if image.contains('@') {
        return (image.to_string(), None);
    }
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => {
            (image[..i].to_string(), Some(image[i + 1..].to_string()))
        }
        _ => (image.to_string(), Some("latest".to_string())),
    }
}

/// The daemon's `{"message": ...}`, or the body itself.
fn message_of(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().chars().take(300).collect())
}

/// A container as Docker lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Existing {
    pub id: String,
    /// Without the API's leading '/'.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Docker's state: created, running, restarting, exited, paused, dead.
    pub state: String,
}

/// Why Docker's container list is not one.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("container list: {0}")]
    Json(#[from] serde_json::Error),
    #[error("container list: not an array")]
    NotArray,
}

/// Docker's answer to `GET /containers/json?all=1`.
pub fn parse_containers(body: &str) -> Result<Vec<Existing>, ListError> {
    let v: Value = serde_json::from_str(body)?;
    let list = v.as_array().ok_or(ListError::NotArray)?;
    Ok(list
        .iter()
        .filter_map(|c| {
            Some(Existing {
                id: c["Id"].as_str()?.to_string(),
                name: c["Names"][0].as_str()?.trim_start_matches('/').to_string(),
                labels: c["Labels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                            .collect()
                    })
                    .unwrap_or_default(),
                state: c["State"].as_str().unwrap_or("").to_string(),
            })
        })
        .collect())
}

/// The Engine API at a unix socket.
#[derive(Clone, Debug)]
pub struct Engine {
    socket: PathBuf,
    /// For every request but a pull, which may take minutes and is bounded by its caller.
    timeout: Duration,
}

impl Engine {
    pub fn new(socket: &Path) -> Engine {
        Engine {
            socket: socket.to_owned(),
            timeout: Duration::from_secs(60),
        }
    }

    async fn connect(&self, what: &str) -> Result<UnixStream, EngineError> {
        UnixStream::connect(&self.socket)
            .await
            .map_err(|e| EngineError::Transport(format!("{what}: {}: {e}", self.socket.display())))
    }

    fn head(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> String {
        let mut h = format!("{method} {path} HTTP/1.0\r\nHost: docker\r\n");
        if !body.is_empty() {
            h.push_str("Content-Type: application/json\r\n");
        }
        for (k, v) in headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        h.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        h
    }

    /// One request; the status and the body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), EngineError> {
        let what = format!("{method} {}", path.split('?').next().unwrap_or(path));
        let exchange = async {
            let mut s = self.connect(&what).await?;
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let io = |e: std::io::Error| EngineError::Transport(format!("{what}: {e}"));
            s.write_all(Self::head(method, path, &[], body.as_bytes()).as_bytes())
                .await
                .map_err(io)?;
            s.write_all(body.as_bytes()).await.map_err(io)?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.map_err(io)?;
            let text = String::from_utf8_lossy(&buf);
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let code = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| EngineError::Transport(format!("{what}: not an HTTP answer")))?;
            Ok((code, body.to_string()))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| EngineError::Transport(format!("{what}: no answer within 60 s")))?
    }

    /// A call that must answer one of `ok`.
    async fn expect(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        ok: &[u16],
    ) -> Result<String, EngineError> {
        let (code, text) = self.call(method, path, body).await?;
        if ok.contains(&code) {
            Ok(text)
        } else {
            Err(EngineError::Status {
                code,
                message: message_of(&text),
            })
        }
    }

    /// Every container, running or not.
    pub async fn containers(&self) -> Result<Vec<Existing>, EngineError> {
        let body = self
            .expect("GET", "/containers/json?all=1", None, &[200])
            .await?;
        parse_containers(&body).map_err(|e| EngineError::Transport(e.to_string()))
    }

    /// Whether the image is in Docker's store (on the state volume: no network needed).
    pub async fn image_present(&self, image: &str) -> Result<bool, EngineError> {
        let (code, text) = self
            .call(
                "GET",
                &format!("/images/{}/json", encode_image_path(image)),
                None,
            )
            .await?;
        match code {
            200 => Ok(true),
            404 => Ok(false),
            code => Err(EngineError::Status {
                code,
                message: message_of(&text),
            }),
        }
    }

    /// Pulls `image`, calling `progress` with each status line the daemon streams (layer ids
    /// and "Downloading"/"Pull complete"...). `auth` is the `X-Registry-Auth` header's value.
    pub async fn pull(
        &self,
        image: &str,
        auth: Option<&str>,
        mut progress: impl FnMut(&Value),
    ) -> Result<(), EngineError> {
        let (from, tag) = pull_parameters(image);
        let mut path = format!("/images/create?fromImage={}", encode(&from));
        if let Some(t) = tag {
            path.push_str(&format!("&tag={}", encode(&t)));
        }
        let what = format!("pull {image}");
        let mut s = self.connect(&what).await?;
        let headers: Vec<(&str, &str)> = auth.map(|a| ("X-Registry-Auth", a)).into_iter().collect();
        let io = |e: std::io::Error| EngineError::Transport(format!("{what}: {e}"));
        s.write_all(Self::head("POST", &path, &headers, b"").as_bytes())
            .await
            .map_err(io)?;
        let mut lines = BufReader::new(s).lines();
        let status = lines.next_line().await.map_err(io)?.unwrap_or_default();
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| EngineError::Transport(format!("{what}: not an HTTP answer")))?;
        // The headers, up to the blank line.
        while let Some(l) = lines.next_line().await.map_err(io)? {
            if l.trim().is_empty() {
                break;
            }
        }
        let mut rest = String::new();
        while let Some(l) = lines.next_line().await.map_err(io)? {
            if code != 200 {
                rest.push_str(&l);
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&l) else {
                continue;
            };
            if let Some(e) = v["error"].as_str() {
                return Err(EngineError::Pull(e.to_string()));
            }
            progress(&v);
        }
        if code != 200 {
            return Err(EngineError::Status {
                code,
                message: message_of(&rest),
            });
        }
        Ok(())
    }

    /// Creates the container `name`; its id.
    pub async fn create(&self, name: &str, body: &Value) -> Result<String, EngineError> {
        let text = self
            .expect(
                "POST",
                &format!("/containers/create?name={}", encode(name)),
                Some(body),
                &[201],
            )
            .await?;
        serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["Id"].as_str().map(str::to_string))
            .ok_or_else(|| EngineError::Transport(format!("create {name}: no id in {text:?}")))
    }

    /// Starts it (already running is fine).
    pub async fn start(&self, id: &str) -> Result<(), EngineError> {
        self.expect(
            "POST",
            &format!("/containers/{}/start", encode(id)),
            None,
            &[204, 304],
        )
        .await
        .map(drop)
    }

    /// Stops it within `timeout` (then Docker kills it); already stopped is fine.
    pub async fn stop(&self, id: &str, timeout: Duration) -> Result<(), EngineError> {
        let path = format!("/containers/{}/stop?t={}", encode(id), timeout.as_secs());
        self.expect("POST", &path, None, &[204, 304])
            .await
            .map(drop)
    }

    /// Removes it (its anonymous volumes stay; named volumes are never part of it).
    pub async fn remove(&self, id: &str) -> Result<(), EngineError> {
        self.expect(
            "DELETE",
            &format!("/containers/{}", encode(id)),
            None,
            &[204],
        )
        .await
        .map(drop)
    }
}

/// A recording fake of the Engine API for tests: a unix socket that answers each request
/// through `answer(first line, body)` and records `first line[ auth=…] body`.
#[cfg(test)]
pub(crate) mod fake {
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub type Log = Arc<Mutex<Vec<String>>>;

    pub fn http(code: &str, body: &str) -> String {
        format!("HTTP/1.0 {code}\r\nContent-Type: application/json\r\n\r\n{body}")
    }

    pub fn daemon(
        name: &str,
        answer: impl Fn(&str, &str) -> String + Send + Sync + 'static,
    ) -> (PathBuf, Log) {
        let dir =
            std::env::temp_dir().join(format!("spotinit-engine-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let seen: Log = Arc::new(Mutex::new(Vec::new()));
        let (log, answer) = (seen.clone(), Arc::new(answer));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (log, answer) = (log.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let mut got = Vec::new();
                    // The head, then as much body as Content-Length says.
                    loop {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        got.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&got).to_string();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("Content-Length: "))
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                            if body.len() >= len {
                                let first = head.lines().next().unwrap_or("").to_string();
                                let auth = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("X-Registry-Auth: "))
                                    .map(|a| format!(" auth={a}"))
                                    .unwrap_or_default();
                                log.lock().unwrap().push(format!("{first}{auth} {body}"));
                                let reply = answer(&first, body);
                                let _ = s.write_all(reply.as_bytes()).await;
                                return;
                            }
                        }
                        if n == 0 {
                            return;
                        }
                    }
                });
            }
        });
        (socket, seen)
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
