//! A real image registry in the world: Debian's `docker-registry` (distribution 2.8) on the
//! host's loopback with TLS from the test PKI, which the guests reach as `10.0.2.2:<port>`
//! through QEMU's user network. Images get there by the registry's HTTP API (blob uploads and a
//! manifest), as `docker push` does; the registry's access log tells which blobs were pulled.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;

use crate::qemu::{Error, Result};

/// The host as the guests see it on QEMU's user network.
pub const GUEST_HOST: &str = "10.0.2.2";
/// Where Debian's package puts the binary.
const BINARY: &str = "/usr/bin/docker-registry";
/// One API call may take this long (a blob of a few MiB on loopback takes well under one).
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);
/// The registry answers `/v2/` within this after its start.
const START_DEADLINE: Duration = Duration::from_secs(30);

const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// A running registry. Stopped (killed) when dropped; its storage stays in its directory.
pub struct Registry {
    dir: PathBuf,
    port: u16,
    child: Option<tokio::process::Child>,
    tls: tokio_rustls::TlsConnector,
}

/// An image as pushed: its reference as the guests name it, and its layer's digest.
#[derive(Clone, Debug)]
pub struct PushedImage {
    /// `10.0.2.2:<port>/<repository>:<tag>`.
    pub reference: String,
    pub repository: String,
    pub layer_digest: String,
}

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

impl Registry {
    /// Starts a registry keeping its storage, configuration and log in `dir`, on a free port.
    pub async fn start(dir: &Path) -> Result<Registry> {
        if !Path::new(BINARY).is_file() {
            return Err(Error::new(format!(
                "no {BINARY}: apt-get install docker-registry (tests/setup.sh does)"
            )));
        }
        let pki = crate::tls::Pki::get().map_err(Error::new)?;
        std::fs::create_dir_all(dir.join("storage"))
            .map_err(|e| Error::new(format!("create {}: {e}", dir.display())))?;
        let config = pki.client_config().map_err(Error::new)?;
        // Free a moment ago: the registry binds it itself.
        let port = crate::moto::free_port()
            .map_err(|e| Error::new(format!("bind a loopback port: {e}")))?;
        let mut registry = Registry {
            dir: dir.to_path_buf(),
            port,
            child: None,
            tls: tokio_rustls::TlsConnector::from(config),
        };
        registry.write_config(pki)?;
        registry.resume().await?;
        Ok(registry)
    }

    /// `10.0.2.2:<port>`: the registry's name in image references and in `docker.registry_cas`.
    pub fn guest_address(&self) -> String {
        format!("{GUEST_HOST}:{}", self.port)
    }

    /// The user data's `[docker.registry_cas]` table: the guests' dockerd trusts the test CA
    /// for this registry.
    pub fn registry_cas_toml(&self) -> Result<String> {
        let pki = crate::tls::Pki::get().map_err(Error::new)?;
        Ok(format!(
            "[docker.registry_cas]\n\"{}\" = '''\n{}'''\n",
            self.guest_address(),
            pki.ca
        ))
    }

    fn write_config(&self, pki: &crate::tls::Pki) -> Result<()> {
        let write = |name: &str, text: &str| {
            let path = self.dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| Error::new(format!("write {}: {e}", path.display())))
        };
        write("server.pem", &pki.server_cert)?;
        write("server-key.pem", &pki.server_key)?;
        let d = self.dir.display();
        write(
            "config.yml",
            &format!(
                "version: 0.1\n\
                 log:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {d}/storage\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: spotworld\n  \
                 tls:\n    certificate: {d}/server.pem\n    key: {d}/server-key.pem\n",
                port = self.port
            ),
        )
    }

    /// Starts the registry process (again, after [`Registry::stop`]: the same port, the same
    /// storage) and waits until `/v2/` answers.
    pub async fn resume(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log_path = self.dir.join("registry.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::new(format!("open {}: {e}", log_path.display())))?;
        let err = log
            .try_clone()
            .map_err(|e| Error::new(format!("{}: {e}", log_path.display())))?;
        let child = tokio::process::Command::new(BINARY)
            .arg("serve")
            .arg(self.dir.join("config.yml"))
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::new(format!("start {BINARY}: {e}")))?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(Error::new(format!(
                        "{BINARY} exited at start ({status}); its log: {}",
                        log_path.display()
                    )));
                }
            }
            match self.call("GET", "/v2/", None, Bytes::new()).await {
                Ok((200, _, _)) => return Ok(()),
                Ok(_) | Err(_) if started.elapsed() < START_DEADLINE => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok((status, _, _)) => {
                    return Err(Error::new(format!("registry /v2/: HTTP {status}")))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Kills the registry: from now on nothing answers at its address.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<(u16, hyper::HeaderMap, Bytes)> {
        let what = format!("registry {method} {path} (127.0.0.1:{})", self.port);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, format!("127.0.0.1:{}", self.port))
            // distribution answers 404 for an OCI manifest to a client that does not accept one.
            .header(hyper::header::ACCEPT, MANIFEST_TYPE)
            .header(hyper::header::CONTENT_LENGTH, body.len());
        if let Some(ct) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, ct);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| Error::new(format!("{what}: {e}")))?;
        crate::tls::exchange(&self.tls, self.port, req, REQUEST_DEADLINE, &what).await
    }

    /// Uploads a blob unless the registry has it (`HEAD`, then `POST` an upload and `PUT` it
    /// whole with its digest).
    async fn push_blob(&self, repository: &str, data: &[u8]) -> Result<String> {
        let digest = digest(data);
        let blob = format!("/v2/{repository}/blobs/{digest}");
        if self.call("HEAD", &blob, None, Bytes::new()).await?.0 == 200 {
            return Ok(digest);
        }
        let uploads = format!("/v2/{repository}/blobs/uploads/");
        let (status, headers, body) = self.call("POST", &uploads, None, Bytes::new()).await?;
        let location = headers
            .get(hyper::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .filter(|_| status == 202)
            .ok_or_else(|| {
                Error::new(format!(
                    "registry POST {uploads}: HTTP {status} without a Location: {}",
                    String::from_utf8_lossy(&body)
                ))
            })?;
        // The Location may be absolute; the request goes to the same server either way.
        let path = match location.find("/v2/") {
            Some(i) => &location[i..],
            None => location,
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let put = format!("{path}{sep}digest={digest}");
        let (status, _, body) = self
            .call(
                "PUT",
                &put,
                Some("application/octet-stream"),
                Bytes::copy_from_slice(data),
            )
            .await?;
        if status != 201 {
            return Err(Error::new(format!(
                "registry PUT of blob {digest}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        Ok(digest)
    }

    /// Pushes a one-layer image: `layer` is an uncompressed tar of its root filesystem, `cmd`
    /// its command. Returns its reference as the guests name it.
    pub async fn push(
        &self,
        repository: &str,
        tag: &str,
        layer: &[u8],
        cmd: &[&str],
    ) -> Result<PushedImage> {
        let layer_digest = self.push_blob(repository, layer).await?;
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": { "Cmd": cmd },
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        })
        .to_string();
        let config_digest = self.push_blob(repository, config.as_bytes()).await?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": CONFIG_TYPE,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": LAYER_TYPE,
                "digest": layer_digest,
                "size": layer.len(),
            }],
        })
        .to_string();
        let path = format!("/v2/{repository}/manifests/{tag}");
        let (status, _, body) = self
            .call("PUT", &path, Some(MANIFEST_TYPE), Bytes::from(manifest))
            .await?;
        if status != 201 {
            return Err(Error::new(format!(
                "registry PUT {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        Ok(PushedImage {
            reference: format!("{}/{repository}:{tag}", self.guest_address()),
            repository: repository.to_owned(),
            layer_digest,
        })
    }

    /// How many times a client fetched this image's layer (answered 200), by the access log:
    /// one per real pull, none when the image was already in the client's store.
    pub fn layer_pulls(&self, image: &PushedImage) -> Result<usize> {
        let path = self.dir.join("registry.log");
        let log = std::fs::read_to_string(&path)
            .map_err(|e| Error::new(format!("read {}: {e}", path.display())))?;
        Ok(count_fetches(
            &log,
            &format!("/v2/{}/blobs/{}", image.repository, image.layer_digest),
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// Access-log lines (combined log format) of a `GET <path>` answered 200.
fn count_fetches(log: &str, path: &str) -> usize {
    let request = format!("\"GET {path} HTTP/");
    log.lines()
        .filter_map(|l| l.find(&request).map(|i| &l[i + request.len()..]))
        .filter(|rest| {
            rest.split_once("\" ")
                .is_some_and(|(_, after)| after.starts_with("200 "))
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real registry: a push is served back byte for byte, and a fetch is counted.
    #[tokio::test]
    async fn a_pushed_image_is_served_back_and_its_fetches_counted() {
        let dir = std::env::temp_dir().join(format!("spotworld-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut registry = Registry::start(&dir).await.unwrap();
        let layer = b"not really a tar, but the registry does not look".repeat(100);
        let image = registry
            .push("test/one", "1", &layer, &["/x"])
            .await
            .unwrap();
        assert_eq!(
            image.reference,
            format!("10.0.2.2:{}/test/one:1", registry.port)
        );
        assert_eq!(registry.layer_pulls(&image).unwrap(), 0);
        let (status, headers, manifest) = registry
            .call("GET", "/v2/test/one/manifests/1", None, Bytes::new())
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(headers[hyper::header::CONTENT_TYPE], MANIFEST_TYPE);
        let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        assert_eq!(manifest["layers"][0]["digest"], image.layer_digest.as_str());
        let blob = format!("/v2/test/one/blobs/{}", image.layer_digest);
        let (status, _, body) = registry
            .call("GET", &blob, None, Bytes::new())
            .await
            .unwrap();
        assert_eq!((status, &body[..]), (200, &layer[..]));
        // A second push of the same content uploads nothing new.
        registry
            .push("test/one", "2", &layer, &["/x"])
            .await
            .unwrap();
        // The access log is written as requests complete.
        let deadline = Instant::now() + Duration::from_secs(10);
        while registry.layer_pulls(&image).unwrap() != 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(registry.layer_pulls(&image).unwrap(), 1);
        // Stopped, nothing answers; resumed, the storage is still there.
        registry.stop().await;
        assert!(registry
            .call("GET", "/v2/", None, Bytes::new())
            .await
            .is_err());
        registry.resume().await.unwrap();
        let (status, _, _) = registry
            .call("HEAD", &blob, None, Bytes::new())
            .await
            .unwrap();
        assert_eq!(status, 200);
        drop(registry);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn digests_are_sha256_in_the_registrys_form() {
        assert_eq!(
            digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn only_fetches_answered_200_of_that_path_count() {
        let p = "/v2/spotworld/counter/blobs/sha256:ab";
        let log = format!(
            "127.0.0.1 - - [30/Nov/2026:05:00:00 +0000] \"GET {p} HTTP/1.1\" 200 4096 \"\" \"docker/26.1.5\"\n\
             127.0.0.1 - - [30/Nov/2026:05:00:01 +0000] \"HEAD {p} HTTP/1.1\" 200 0 \"\" \"docker/26.1.5\"\n\
             127.0.0.1 - - [30/Nov/2026:05:00:02 +0000] \"GET {p} HTTP/1.1\" 404 19 \"\" \"docker/26.1.5\"\n\
             127.0.0.1 - - [30/Nov/2026:05:00:03 +0000] \"GET {p}0 HTTP/1.1\" 200 1 \"\" \"docker/26.1.5\"\n\
             time=\"2026-11-30T05:00:04Z\" level=info msg=\"response completed\" http.request.uri=\"{p}\"\n\
             127.0.0.1 - - [30/Nov/2026:05:00:05 +0000] \"GET {p} HTTP/1.1\" 200 4096 \"\" \"docker/26.1.5\"\n"
        );
        assert_eq!(count_fetches(&log, p), 2);
    }
}
