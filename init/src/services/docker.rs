//! containerd and dockerd: their command lines, dockerd's daemon.json, and the readiness checks
//! (containerd's socket accepts, the Engine API answers `/_ping`).

use super::supervisor::ServiceSpec;
use crate::config::Docker;
use crate::sys::{CommandError, CommandSpec, FileError, Output, Paths, System};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
pub const DOCKER_SOCKET: &str = "/run/docker.sock";
pub const DAEMON_JSON: &str = "/run/spotinit/daemon.json";
pub const DATA_ROOT: &str = "/var/lib/docker";
/// Where the Engine API's TLS files are written from user data.
pub const TLS_DIR: &str = "/run/spotinit/docker-tls";
/// Where they are taken from on the state volume (`docker.tls.on_volume`).
pub const VOLUME_TLS_DIR: &str = ".spotinit/docker-tls";
/// Where dockerd looks for a registry's CA, per registry (`<host:port>/ca.crt`).
pub const REGISTRY_CERTS_DIR: &str = "/etc/docker/certs.d";
pub const LOG_DIR: &str = "/var/log/spotinit";
const LOG_MAX_BYTES: u64 = 4 << 20;

/// Why Docker's files could not be made, or Docker did not come up.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("docker.tls.on_volume: cannot read {} on the state volume ({source}); put the clients' CA (ca.pem), the server's certificate (cert.pem) and key (key.pem) in {}/ on it", path.display(), VOLUME_TLS_DIR)]
    TlsUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("docker.tls.on_volume: {} is not PEM text", path.display())]
    TlsNotPem { path: PathBuf },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot write the CA of registry {registry} to {}: {source}", path.display())]
    RegistryCa {
        registry: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} did not accept connections within {within}", path.display())]
    NoSocket { path: PathBuf, within: String },
    #[error("the Docker Engine API on {} did not answer /_ping within {within}", socket.display())]
    NoPing { socket: PathBuf, within: String },
}

/// Why a request to the Engine API got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("connect {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("{method} {path}: {source}")]
    Io {
        method: String,
        path: String,
        source: std::io::Error,
    },
    #[error("{method} {path}: not an HTTP answer")]
    NotHttp { method: String, path: String },
    #[error("{method} {path}: no answer within {within}")]
    NoAnswer {
        method: String,
        path: String,
        within: String,
    },
    #[error("GET /containers/json: HTTP {code}")]
    ListStatus { code: u16 },
    #[error("GET /containers/json: {0}")]
    ListJson(#[source] serde_json::Error),
}

pub fn log_output(paths: &Paths, name: &str) -> Output {
    Output::Log {
        path: paths.p(LOG_DIR).join(format!("{name}.log")),
        max_bytes: LOG_MAX_BYTES,
    }
}

pub fn containerd(paths: &Paths) -> ServiceSpec {
    ServiceSpec::new(
        "containerd",
        CommandSpec::new("/usr/bin/containerd").output(log_output(paths, "containerd")),
    )
    .stop_timeout(Duration::from_secs(10))
}

pub fn dockerd(paths: &Paths, cfg: &Docker) -> ServiceSpec {
    ServiceSpec::new(
        "dockerd",
        CommandSpec::new("/usr/sbin/dockerd")
            .args([
                "--config-file",
                DAEMON_JSON,
                "--containerd",
                CONTAINERD_SOCKET,
            ])
            .output(log_output(paths, "dockerd")),
    )
    // dockerd stops containers within its shutdown-timeout; give it that and a margin.
    .stop_timeout(Duration::from_secs(cfg.stop_timeout_secs + 15))
}

/// The Engine API's TLS files: the clients' CA, the server's certificate and key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes the PEM text of `[docker.tls]` to tmpfs (the key readable by root only), or checks
/// the files on the state volume. None without TLS.
pub fn tls_files(paths: &Paths, cfg: &Docker) -> Result<Option<TlsFiles>, DockerError> {
    let t = &cfg.tls;
    if t.on_volume {
        let dir = paths
            .p(crate::volume::layout::VOLUME_MOUNT)
            .join(VOLUME_TLS_DIR);
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        for f in [&files.ca, &files.cert, &files.key] {
            let text = std::fs::read_to_string(f).map_err(|source| DockerError::TlsUnreadable {
                path: f.clone(),
                source,
            })?;
            if !text.trim_start().starts_with("-----BEGIN ") {
                return Err(DockerError::TlsNotPem { path: f.clone() });
            }
        }
        return Ok(Some(files));
    }
    let (Some(ca), Some(cert), Some(key)) = (&t.ca, &t.cert, &t.key) else {
        return Ok(None);
    };
    use std::os::unix::fs::OpenOptionsExt;
    let dir = paths.p(TLS_DIR);
    std::fs::create_dir_all(&dir).map_err(FileError::at("cannot write", &dir))?;
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    for (path, text, mode) in [
        (&files.ca, ca, 0o644),
        (&files.cert, cert, 0o644),
        (&files.key, key, 0o600),
    ] {
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(FileError::at("cannot write", path))?;
        std::io::Write::write_all(&mut f, text.as_bytes())
            .map_err(FileError::at("cannot write", path))?;
    }
    Ok(Some(files))
}

/// Writes each CA of `docker.registry_cas` where dockerd looks for it when it pulls from that
/// registry. The names were checked with the configuration (no `/`, no `..`). Returns how many.
pub fn write_registry_cas(paths: &Paths, cfg: &Docker) -> Result<usize, DockerError> {
    let certs = paths.p(REGISTRY_CERTS_DIR);
    for (registry, pem) in &cfg.registry_cas {
        let dir = certs.join(registry);
        let path = dir.join("ca.crt");
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, pem))
            .map_err(|source| DockerError::RegistryCa {
                registry: registry.clone(),
                path: path.clone(),
                source,
            })?;
    }
    Ok(cfg.registry_cas.len())
}

/// daemon.json: the keys spotinit owns, then the user's extra keys (validated not to clash).
pub fn daemon_json(cfg: &Docker, tls: Option<&TlsFiles>) -> serde_json::Value {
    let mut doc = serde_json::Map::new();
    for (k, v) in &cfg.daemon {
        doc.insert(k.clone(), toml_to_json(v));
    }
    doc.insert("data-root".into(), DATA_ROOT.into());
    doc.insert("storage-driver".into(), cfg.storage_driver.clone().into());
    doc.insert("exec-root".into(), "/run/docker".into());
    doc.insert("pidfile".into(), "/run/docker.pid".into());
    doc.insert("shutdown-timeout".into(), cfg.stop_timeout_secs.into());
    if let Some(t) = tls {
        doc.insert("tlsverify".into(), true.into());
        doc.insert("tlscacert".into(), t.ca.display().to_string().into());
        doc.insert("tlscert".into(), t.cert.display().to_string().into());
        doc.insert("tlskey".into(), t.key.display().to_string().into());
    }
    // Our own readiness check needs the unix socket, whatever else the user listens on.
    let unix = format!("unix://{DOCKER_SOCKET}");
    let mut hosts: Vec<serde_json::Value> = doc
        .get("hosts")
        .and_then(|h| h.as_array().cloned())
        .unwrap_or_default();
    if !hosts.iter().any(|h| h.as_str() == Some(unix.as_str())) {
        hosts.insert(0, unix.into());
    }
    doc.insert("hosts".into(), hosts.into());
    serde_json::Value::Object(doc)
}

fn toml_to_json(v: &toml::Value) -> serde_json::Value {
    match v {
        toml::Value::String(s) => s.clone().into(),
        toml::Value::Integer(i) => (*i).into(),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        toml::Value::Boolean(b) => (*b).into(),
        toml::Value::Datetime(d) => d.to_string().into(),
        toml::Value::Array(a) => a.iter().map(toml_to_json).collect(),
        toml::Value::Table(t) => t
            .iter()
            .map(|(k, v)| (k.clone(), toml_to_json(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    }
}

pub fn write_daemon_json(
    paths: &Paths,
    cfg: &Docker,
    tls: Option<&TlsFiles>,
) -> Result<PathBuf, FileError> {
    let path = paths.p(DAEMON_JSON);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(FileError::at("mkdir", dir))?;
    }
    let text = serde_json::to_string_pretty(&daemon_json(cfg, tls)).unwrap_or_default();
    std::fs::write(&path, text + "\n").map_err(FileError::at("write", &path))?;
    Ok(path)
}

/// The `tcp://` addresses the Engine API will listen on.
pub fn tcp_hosts(cfg: &Docker) -> Vec<String> {
    cfg.daemon
        .get("hosts")
        .and_then(|h| h.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|h| h.as_str()?.strip_prefix("tcp://").map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The iptables rules that keep containers on Docker's networks (the FORWARD path through
/// DOCKER-USER) away from IMDS: the link-local addresses, and the endpoint spotinit itself uses
/// when it is another one. Host-network containers share the host's stack and are not covered.
/// IPv6 also gets the rule in FORWARD itself: Docker 26 manages ip6tables only as an
/// experimental option, and without it nothing sends IPv6 traffic through DOCKER-USER.
pub fn imds_block_rules(imds_endpoint: Option<&str>) -> Vec<CommandSpec> {
    let rule = |tool: &str, chain: &str, dest: &str, port: Option<&str>| {
        let mut c =
            CommandSpec::new(format!("/usr/sbin/{tool}")).args(["-w", "-I", chain, "-d", dest]);
        if let Some(p) = port {
            c = c.args(["-p", "tcp", "--dport", p]);
        }
        c.args(["-j", "REJECT"]).output(Output::Null)
    };
    let mut rules = vec![
        rule("iptables", "DOCKER-USER", "169.254.169.254/32", None),
        rule("ip6tables", "DOCKER-USER", "fd00:ec2::254/128", None),
        rule("ip6tables", "FORWARD", "fd00:ec2::254/128", None),
    ];
    if let Some((host, port)) = imds_endpoint
        .and_then(|e| e.split_once("://").map(|(_, r)| r))
        .map(|r| r.split('/').next().unwrap_or(r))
        .and_then(|hp| hp.rsplit_once(':').or(Some((hp, "80"))))
    {
        if host.parse::<std::net::Ipv4Addr>().is_ok() && host != "169.254.169.254" {
            rules.push(rule(
                "iptables",
                "DOCKER-USER",
                &format!("{host}/32"),
                Some(port),
            ));
        }
    }
    rules
}

/// `iptables -w -N DOCKER-USER`: the chain Docker sends forwarded traffic through first. dockerd
/// makes it at start if it is missing and never deletes or changes rules already in it, so
/// spotinit makes it first and puts its rules in before dockerd starts — before dockerd restarts
/// the `--restart always` containers.
pub fn user_chain(tool: &str) -> CommandSpec {
    CommandSpec::new(format!("/usr/sbin/{tool}"))
        .args(["-w", "-N", "DOCKER-USER"])
        .output(Output::Null)
}

/// Installs [`imds_block_rules`] in the DOCKER-USER chain, made here if it does not exist yet
/// (call it before dockerd starts). The IPv6 rule may fail where the kernel has no IPv6
/// filtering; the IPv4 ones must not.
pub async fn block_imds<S: System + ?Sized>(
    sys: &S,
    imds_endpoint: Option<&str>,
    ipv6_containers: bool,
) -> Result<String, CommandError> {
    for tool in ["iptables", "ip6tables"] {
        // Fails when the chain exists already: fine.
        let _ = crate::sys::run(sys, &user_chain(tool)).await;
    }
    let mut done = Vec::new();
    let mut told_no_ipv6 = false;
    for rule in imds_block_rules(imds_endpoint) {
        let dest = rule.args[4].clone();
        match crate::sys::run(sys, &rule).await {
            Ok(()) if done.contains(&dest) => {}
            Ok(()) => done.push(dest),
            // Without docker.daemon.ipv6 containers have no IPv6 to reach fd00:ec2::254 with.
            Err(e) if rule.program.ends_with("ip6tables") && !ipv6_containers => {
                if !std::mem::replace(&mut told_no_ipv6, true) {
                    crate::log!("docker: no IPv6 IMDS rule ({e}); containers have no IPv6");
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done.join(", "))
}

/// Waits until a unix socket accepts connections.
pub async fn wait_for_socket(path: &Path, deadline: Duration) -> Result<Duration, DockerError> {
    let start = Instant::now();
    loop {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            return Err(DockerError::NoSocket {
                path: path.to_path_buf(),
                within: crate::console::human(deadline),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One Engine API request over the unix socket (HTTP/1.0, so the answer is never chunked).
/// Returns the status code and the body.
pub async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), RequestError> {
    let io = |source| RequestError::Io {
        method: method.into(),
        path: path.into(),
        source,
    };
    let exchange = async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|source| RequestError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        let req = format!("{method} {path} HTTP/1.0\r\nHost: docker\r\nContent-Length: 0\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(io)?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(io)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| RequestError::NotHttp {
                method: method.into(),
                path: path.into(),
            })?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| RequestError::NoAnswer {
            method: method.into(),
            path: path.into(),
            within: crate::console::human(timeout),
        })?
}

/// True when the Engine API answers `/_ping` with 200.
pub async fn ping(socket: &Path) -> bool {
    matches!(
        request(socket, "GET", "/_ping", Duration::from_secs(5)).await,
        Ok((200, _))
    )
}

/// Ids of the running containers.
pub async fn running_containers(socket: &Path) -> Result<Vec<String>, RequestError> {
    let (code, body) = request(socket, "GET", "/containers/json", Duration::from_secs(10)).await?;
    if code != 200 {
        return Err(RequestError::ListStatus { code });
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(RequestError::ListJson)?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["Id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Waits until the Engine API answers `/_ping`.
pub async fn wait_for_ping(socket: &Path, deadline: Duration) -> Result<Duration, DockerError> {
    let start = Instant::now();
    loop {
        if ping(socket).await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            return Err(DockerError::NoPing {
                socket: socket.to_path_buf(),
                within: crate::console::human(deadline),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
#[path = "docker_tests.rs"]
mod tests;
