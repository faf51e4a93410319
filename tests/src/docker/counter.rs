//! The counter service: its container (`docker run` as a spec), its deployment, and a client
//! for its HTTP answers.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::image::import_counter_image;
use super::{ContainerSpec, Docker, COUNTER_IMAGE};
use crate::qemu::{Error, Result};

/// The container's name.
pub const COUNTER_NAME: &str = "counter";
/// The named Docker volume holding the count.
pub const COUNTER_VOLUME: &str = "counter-data";

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
