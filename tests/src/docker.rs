//! A minimal Docker Engine API client over a forwarded TCP port — TLS with the test PKI's client
//! certificate ([`crate::tls`]), as a careful user reaches dockerd — and the test service: a
//! counter kept on a Docker volume, served by busybox httpd in an image made on the host.
//!
//! The image is a tarball built here from busybox-static's `/bin/busybox` (applet symlinks, a
//! CGI script, an entrypoint), imported through the API (`POST /images/create?fromSrc=-`, what
//! `docker import` does) or pushed to the world's registry ([`crate::registry`]) as its layer.
//!
//! The counter increments durably: new value to a temporary file, `sync FILE` (fsync), rename
//! over the old file, `sync -f` (syncfs: the rename is committed too), and only then the answer.
//! So every value the service answered survives a hard kill of the instance.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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

// ---------------------------------------------------------------------------------------------
// The counter service

/// The image the counter runs from.
pub const COUNTER_IMAGE: (&str, &str) = ("spotworld/counter", "1");
/// The container's name.
pub const COUNTER_NAME: &str = "counter";
/// The named Docker volume holding the count.
pub const COUNTER_VOLUME: &str = "counter-data";

/// The container's PID 1: busybox httpd in the foreground, stopped cleanly on SIGTERM (a bare
/// httpd as PID 1 of its namespace would ignore SIGTERM and be killed after the stop timeout).
const ENTRYPOINT: &str = "#!/bin/sh
httpd -f -p 80 -h /www &
pid=$!
trap 'kill $pid; wait $pid; exit 0' TERM INT
wait $pid
";

/// `/cgi-bin/increment`: the durable increment described at the top of this file.
const INCREMENT: &str = "#!/bin/sh
set -e
f=/data/count
n=$(cat $f 2>/dev/null || echo 0)
n=$((n + 1))
echo $n > $f.tmp
sync $f.tmp
mv $f.tmp $f
sync -f $f
printf 'Content-Type: text/plain\\r\\n\\r\\ncount=%s\\n' $n
";

/// `/cgi-bin/value`: the count without changing it.
const VALUE: &str = "#!/bin/sh
n=$(cat /data/count 2>/dev/null || echo 0)
printf 'Content-Type: text/plain\\r\\n\\r\\ncount=%s\\n' $n
";

/// The counter image as a tarball: busybox-static with its applets, the entrypoint, the CGI
/// scripts. Needs `/bin/busybox` to be statically linked (package busybox-static).
pub fn counter_image_tar() -> Result<Vec<u8>> {
    let busybox_path = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .ok_or_else(|| Error::new("no /bin/busybox: apt-get install busybox-static"))?;
    let busybox =
        std::fs::read(busybox_path).map_err(|e| Error::new(format!("read {busybox_path}: {e}")))?;
    if !is_static_elf(&busybox) {
        return Err(Error::new(format!(
            "{busybox_path} is dynamically linked and would not run in an empty image: \
             apt-get install busybox-static"
        )));
    }
    let list = std::process::Command::new(busybox_path)
        .arg("--list-full")
        .output()
        .map_err(|e| Error::new(format!("{busybox_path} --list-full: {e}")))?;
    let applets = String::from_utf8_lossy(&list.stdout).into_owned();
    let mut tar = Tar::default();
    for dir in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "www",
        "www/cgi-bin",
        "tmp",
        "data",
        "proc",
        "sys",
        "dev",
        "etc",
    ] {
        tar.dir(dir, if dir == "tmp" { 0o1777 } else { 0o755 });
    }
    tar.file("bin/busybox", 0o755, &busybox);
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet != "bin/busybox" {
            tar.symlink(applet, "/bin/busybox");
        }
    }
    tar.file("bin/serve", 0o755, ENTRYPOINT.as_bytes());
    tar.file("www/cgi-bin/increment", 0o755, INCREMENT.as_bytes());
    tar.file("www/cgi-bin/value", 0o755, VALUE.as_bytes());
    tar.file(
        "www/index.html",
        0o644,
        b"spotworld counter: /cgi-bin/increment, /cgi-bin/value\n",
    );
    tar.file("etc/passwd", 0o644, b"root:x:0:0:root:/:/bin/sh\n");
    tar.file("etc/group", 0o644, b"root:x:0:\n");
    Ok(tar.finish())
}

/// `docker run -d --name counter --restart always -v counter-data:/data -p 8080:80
/// spotworld/counter:1 /bin/serve`.
pub fn counter_container() -> ContainerSpec {
    ContainerSpec {
        name: COUNTER_NAME.into(),
        image: format!("{}:{}", COUNTER_IMAGE.0, COUNTER_IMAGE.1),
        cmd: vec!["/bin/serve".into()],
        restart_always: true,
        volume: Some((COUNTER_VOLUME.into(), "/data".into())),
        publish: Some((crate::world::SERVICE_PORT, 80)),
        host_powers: false,
    }
}

/// One more counter, `--restart always` like the first: its own name and its own Docker volume
/// (its count), published on `publish` (a guest port) or not at all.
pub fn counter_container_named(name: &str, volume: &str, publish: Option<u16>) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        volume: Some((volume.into(), "/data".into())),
        publish: publish.map(|p| (p, 80)),
        ..counter_container()
    }
}

/// Imports the counter image (`docker import` of [`counter_image_tar`]).
pub async fn import_counter_image(docker: &Docker) -> Result<String> {
    let tar = counter_image_tar()?;
    docker
        .import_image(tar, COUNTER_IMAGE.0, COUNTER_IMAGE.1)
        .await
}

/// Pushes the counter image to the test registry as `spotworld/counter:<tag>`.
pub async fn push_counter_image(
    registry: &crate::registry::Registry,
    tag: &str,
) -> Result<crate::registry::PushedImage> {
    let layer = counter_image_tar()?;
    registry
        .push(COUNTER_IMAGE.0, tag, &layer, &["/bin/serve"])
        .await
}

/// Imports the counter image, creates and starts the container. Returns the container id.
pub async fn deploy_counter(docker: &Docker) -> Result<String> {
    import_counter_image(docker).await?;
    let id = docker.create_container(&counter_container()).await?;
    docker.start(&id).await?;
    Ok(id)
}

/// The counter service at `127.0.0.1:<port>` (the instance's forwarded service port).
#[derive(Clone, Copy, Debug)]
pub struct Counter {
    pub port: u16,
}

impl Counter {
    /// Increments; the new value, answered only once it is on disk.
    pub async fn increment(&self) -> Result<u64> {
        self.get("/cgi-bin/increment").await
    }

    /// The value, unchanged.
    pub async fn value(&self) -> Result<u64> {
        self.get("/cgi-bin/value").await
    }

    /// Reads the value, retrying while the service is not answering (instance booting,
    /// container restarting) until `deadline`.
    pub async fn wait_value(&self, deadline: Duration) -> Result<u64> {
        let start = Instant::now();
        loop {
            match self.value().await {
                Ok(v) => return Ok(v),
                Err(e) if start.elapsed() > deadline => {
                    return Err(e.context(format!(
                        "the counter service did not answer within {:.0} s",
                        deadline.as_secs_f64()
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    async fn get(&self, path: &str) -> Result<u64> {
        let (status, body) = http_get(self.port, path, Duration::from_secs(60)).await?;
        let value = body
            .lines()
            .find_map(|l| l.trim().strip_prefix("count="))
            .and_then(|v| v.trim().parse().ok());
        match (status, value) {
            (200, Some(v)) => Ok(v),
            _ => Err(Error::new(format!(
                "GET 127.0.0.1:{}{path}: HTTP {status}: {}",
                self.port,
                body.trim()
            ))),
        }
    }
}

/// One HTTP/1.0 GET on `127.0.0.1:port`; the status and the body.
pub async fn http_get(port: u16, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let what = format!("GET 127.0.0.1:{port}{path}");
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: counter\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        conn.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::new(format!("{what}: no answer within {} s", timeout.as_secs())))?
        .map_err(|e| Error::new(format!("{what}: {e}")))?;
    // slirp accepts on the host side before the guest answers, and closes if nothing listens.
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::new(format!("{what}: no HTTP answer ({response:?})")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::new(format!("{what}: bad status line in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// An ELF file without a `PT_INTERP` program header runs without a dynamic loader.
fn is_static_elf(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        // p_type 3 = PT_INTERP.
        o + 4 <= b.len() && u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) != 3
    })
}

/// A ustar archive writer: directories, regular files, symlinks; owned by root, time 0.
#[derive(Default)]
struct Tar {
    out: Vec<u8>,
}

impl Tar {
    fn header(&mut self, name: &str, mode: u32, size: usize, kind: u8, link: &str) {
        assert!(
            name.len() < 100 && link.len() < 100,
            "tar name too long: {name}"
        );
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |h: &mut [u8; 512], off: usize, width: usize, v: u64| {
            let s = format!("{v:0w$o}", w = width - 1);
            h[off..off + width - 1].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, mode as u64);
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, size as u64);
        octal(&mut h, 136, 12, 0);
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        // The checksum is computed with its own field as spaces.
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        self.out.extend_from_slice(&h);
    }

    fn dir(&mut self, name: &str, mode: u32) {
        self.header(&format!("{name}/"), mode, 0, b'5', "");
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.header(name, mode, data.len(), b'0', "");
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.header(name, 0o777, 0, b'2', target);
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.extend(std::iter::repeat_n(0u8, 1024));
        self.out
    }
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

    /// The archive is one GNU tar reads: every entry, symlinks pointing at busybox.
    #[test]
    fn counter_image_is_a_valid_tar_with_the_applets() {
        let tar = counter_image_tar().expect("busybox-static is installed");
        assert_eq!(tar.len() % 512, 0);
        let dir = crate::moto::unique_temp_dir("spotworld-tar").unwrap();
        let file = dir.join("image.tar");
        std::fs::write(&file, &tar).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&file)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout).into_owned();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(listing.contains("bin/sh -> /bin/busybox"), "{listing}");
        assert!(listing.contains("bin/busybox"), "{listing}");
        assert!(listing.contains("www/cgi-bin/increment"), "{listing}");
        assert!(listing.contains("-rwxr-xr-x root/root"), "{listing}");
    }

    #[test]
    fn host_busybox_is_static() {
        let b = std::fs::read("/bin/busybox").unwrap();
        assert!(is_static_elf(&b));
        let dynamic = std::fs::read("/bin/ls").unwrap();
        assert!(!is_static_elf(&dynamic));
    }
}
