//! The moto server process, and a raw EC2 Query client (no SDK) with typed helpers.
//!
//! The client speaks to any EC2 Query endpoint: moto itself, or the fidelity layer in front of
//! it (then it sees what spotinit sees).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::query::{
    child, child_text, items, parse_error_document, path_text, Ec2Error, Params,
    DEFAULT_ACCOUNT_ID, EC2_API_VERSION,
};

/// The AMI the test instances run (one moto knows).
pub const TEST_IMAGE_ID: &str = "ami-03cf127a";
/// The instance type of the test instances.
pub const TEST_INSTANCE_TYPE: &str = "t3.small";
/// An Authorization header moto accepts: it only reads the access key and the region of the
/// credential scope (us-east-1), and does not check the signature.
pub const TEST_AUTHORIZATION: &str = "AWS4-HMAC-SHA256 \
    Credential=AKIDTEST/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=00";

const INSTALL_HINT: &str = "install it with `pip install -r tests/requirements.txt`";
/// How long moto may take to answer its first EC2 request (it loads its AMI catalogue then).
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);
const PORT_ATTEMPTS: usize = 5;

// ---------------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------------

/// A running `moto_server` on a free loopback port; killed (with its process group) on drop.
pub struct MotoServer {
    child: Child,
    endpoint: String,
    dir: PathBuf,
}

impl MotoServer {
    /// Starts `moto_server -H 127.0.0.1 -p <free port>` and waits until it answers an EC2
    /// request (which also loads its EC2 backend, so later calls are fast).
    pub async fn start() -> Result<MotoServer, String> {
        let dir = unique_temp_dir("spotworld-moto")
            .map_err(|e| format!("moto: cannot create a temporary directory: {e}"))?;
        let log = dir.join("moto_server.log");
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port().map_err(|e| format!("moto: no free port: {e}"))?;
            match Self::start_on(port, &dir, &log).await {
                Ok(child) => {
                    return Ok(MotoServer {
                        child,
                        endpoint: format!("http://127.0.0.1:{port}"),
                        dir,
                    })
                }
                Err(StartError::PortTaken(e)) => last_error = e,
                Err(StartError::Fatal(e)) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(format!(
            "moto: could not bind a port in {PORT_ATTEMPTS} attempts; last: {last_error}"
        ))
    }

    async fn start_on(port: u16, dir: &Path, log: &Path) -> Result<Child, StartError> {
        let log_file = File::create(log).map_err(|e| {
            StartError::Fatal(format!("moto: cannot create {}: {e}", log.display()))
        })?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| StartError::Fatal(format!("moto: cannot dup log file: {e}")))?;
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            // Its own process group, so Drop can kill whatever it spawned with it.
            .process_group(0)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    StartError::Fatal(format!("moto_server is not on PATH: {INSTALL_HINT}"))
                } else {
                    StartError::Fatal(format!("moto: cannot run moto_server: {e}"))
                }
            })?;
        let client = Ec2Client::new(&format!("http://127.0.0.1:{port}"));
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let output = read_tail(log, 4000);
                if output.contains("Address already in use") {
                    return Err(StartError::PortTaken(format!("port {port}: {output}")));
                }
                if status.code() == Some(127) || output.contains("command not found") {
                    return Err(StartError::Fatal(format!(
                        "moto_server is not installed ({}): {INSTALL_HINT}",
                        output.trim()
                    )));
                }
                return Err(StartError::Fatal(format!(
                    "moto_server exited with {status} before answering; its log:\n{output}"
                )));
            }
            match client.call("DescribeAvailabilityZones", &[]).await {
                Ok(_) => return Ok(child),
                Err(e) if Instant::now() >= deadline => {
                    kill_group(&mut child);
                    return Err(StartError::Fatal(format!(
                        "moto_server on port {port} did not answer DescribeAvailabilityZones \
                         within {STARTUP_DEADLINE:?} (last error: {e}); its log:\n{}",
                        read_tail(log, 4000)
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A raw EC2 client talking to moto directly.
    pub fn client(&self) -> Ec2Client {
        Ec2Client::new(&self.endpoint)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        kill_group(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

enum StartError {
    PortTaken(String),
    Fatal(String),
}

fn kill_group(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: kill(2) with the negated pid of the group this child leads.
        unsafe {
            libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
        }
    }
    let _ = child.wait();
}

/// A port that was free a moment ago (moto binds it itself; the caller retries on a race).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A new, empty directory under the system temporary directory.
pub fn unique_temp_dir(prefix: &str) -> std::io::Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

fn read_tail(path: &Path, max: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    if text.len() > max {
        let mut start = text.len() - max;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text = text[start..].to_string();
    }
    text
}

// ---------------------------------------------------------------------------------------------
// The raw EC2 Query client
// ---------------------------------------------------------------------------------------------

/// Why an EC2 call failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// EC2 answered with an error document.
    Api {
        action: String,
        status: u16,
        error: Ec2Error,
    },
    /// No usable HTTP exchange (connection refused, reset, ...).
    Transport { action: String, detail: String },
    /// An answer that is neither a response nor an EC2 error document.
    Response { action: String, detail: String },
}

impl CallError {
    /// The EC2 error code, for API errors.
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::Api { error, .. } => Some(&error.code),
            _ => None,
        }
    }

    /// The EC2 error message, for API errors.
    pub fn message(&self) -> Option<&str> {
        match self {
            CallError::Api { error, .. } => Some(&error.message),
            _ => None,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Api {
                action,
                status,
                error,
            } => write!(f, "{action}: {} (HTTP {status})", error),
            CallError::Transport { action, detail } => write!(f, "{action}: transport: {detail}"),
            CallError::Response { action, detail } => {
                write!(f, "{action}: unexpected response: {detail}")
            }
        }
    }
}

impl std::error::Error for CallError {}

/// A raw EC2 Query client: form-encoded POSTs, XML answers.
#[derive(Clone)]
pub struct Ec2Client {
    endpoint: String,
    authorization: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// One EBS volume, as DescribeVolumes shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    pub id: String,
    pub zone: String,
    /// `creating`, `available`, `in-use`, `deleting`, ...
    pub state: String,
    pub size_gib: u64,
    pub snapshot_id: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub attachments: Vec<VolumeAttachment>,
}

/// One attachment of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeAttachment {
    pub instance_id: String,
    pub device: String,
    /// `attaching`, `attached`, `detaching`, `busy`.
    pub state: String,
    /// As EC2 writes it, e.g. `2026-11-26T03:38:40.000Z`.
    pub attach_time: Option<String>,
}

/// One instance, as DescribeInstances shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub zone: String,
    /// `pending`, `running`, `shutting-down`, `terminated`, `stopping`, `stopped`.
    pub state: String,
    pub state_code: u32,
    pub private_ip: Option<String>,
    /// The device names of its block device mapping (root device included).
    pub devices: Vec<String>,
}

/// One snapshot, as DescribeSnapshots shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub volume_id: String,
    /// `pending`, `completed`, `error`.
    pub state: String,
    /// E.g. `40%`.
    pub progress: String,
    pub owner_id: String,
    pub tags: BTreeMap<String, String>,
}

impl Ec2Client {
    /// A client for the EC2 Query endpoint `endpoint` (`http://127.0.0.1:PORT`).
    pub fn new(endpoint: &str) -> Ec2Client {
        Ec2Client {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            authorization: TEST_AUTHORIZATION.to_string(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Posts a form body with the given Authorization header; returns status and body as they
    /// came (the fidelity layer forwards requests with this).
    pub async fn send_raw(
        &self,
        body: String,
        authorization: Option<&str>,
    ) -> Result<(u16, String), String> {
        let request = hyper::Request::post(format!("{}/", self.endpoint))
            .header(
                hyper::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .header(
                hyper::header::AUTHORIZATION,
                authorization.unwrap_or(&self.authorization),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("cannot build request: {e}"))?;
        let response = self
            .http
            .request(request)
            .await
            .map_err(|e| format!("POST {}: {e}", self.endpoint))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer of {}: {e}", self.endpoint))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Calls `action` with `params` (Version is added); the XML answer, or the EC2 error.
    pub async fn call(&self, action: &str, params: &[(&str, &str)]) -> Result<String, CallError> {
        self.call_with(action, Params::from_pairs(params.iter().copied()))
            .await
    }

    /// Calls `action` with `params` built beforehand (Version is added).
    pub async fn call_with(&self, action: &str, params: Params) -> Result<String, CallError> {
        let mut p = Params::from_pairs([("Action", action), ("Version", EC2_API_VERSION)]);
        for (k, v) in params.into_pairs() {
            p.push(k, v);
        }
        self.call_params(&p).await
    }

    /// Calls with prepared parameters (which must hold Action and Version).
    pub async fn call_params(&self, params: &Params) -> Result<String, CallError> {
        let action = params.action().unwrap_or("?").to_string();
        let (status, body) = self
            .send_raw(params.encode(), None)
            .await
            .map_err(|detail| CallError::Transport {
                action: action.clone(),
                detail,
            })?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        match parse_error_document(&body) {
            Some(error) => Err(CallError::Api {
                action,
                status,
                error,
            }),
            None => Err(CallError::Response {
                action,
                detail: format!(
                    "HTTP {status}: {}",
                    body.chars().take(300).collect::<String>()
                ),
            }),
        }
    }

    /// Launches one `t3.small` of [`TEST_IMAGE_ID`] in `zone`; its instance id.
    pub async fn run_instance(&self, zone: &str) -> Result<String, CallError> {
        let xml = self
            .call(
                "RunInstances",
                &[
                    ("ImageId", TEST_IMAGE_ID),
                    ("InstanceType", TEST_INSTANCE_TYPE),
                    ("MinCount", "1"),
                    ("MaxCount", "1"),
                    ("Placement.AvailabilityZone", zone),
                ],
            )
            .await?;
        let instances = parse_instances(&xml).map_err(|detail| CallError::Response {
            action: "RunInstances".into(),
            detail,
        })?;
        instances
            .into_iter()
            .next()
            .map(|i| i.id)
            .ok_or_else(|| CallError::Response {
                action: "RunInstances".into(),
                detail: format!("no instance in the answer: {xml}"),
            })
    }

    /// TerminateInstances. Against moto the instance's volumes are free at once; against the
    /// fidelity layer they are held for its release delay, as on EC2.
    pub async fn terminate_instance(&self, instance_id: &str) -> Result<(), CallError> {
        self.call("TerminateInstances", &[("InstanceId.1", instance_id)])
            .await
            .map(drop)
    }

    pub async fn describe_volume(&self, volume_id: &str) -> Result<Volume, CallError> {
        let xml = self
            .call("DescribeVolumes", &[("VolumeId.1", volume_id)])
            .await?;
        let volumes = parse_volumes(&xml).map_err(|detail| CallError::Response {
            action: "DescribeVolumes".into(),
            detail,
        })?;
        volumes
            .into_iter()
            .find(|v| v.id == volume_id)
            .ok_or_else(|| CallError::Response {
                action: "DescribeVolumes".into(),
                detail: format!("{volume_id} missing from the answer"),
            })
    }

    /// Every volume (root volumes of the instances included).
    pub async fn describe_volumes_all(&self) -> Result<Vec<Volume>, CallError> {
        let xml = self.call("DescribeVolumes", &[]).await?;
        parse_volumes(&xml).map_err(|detail| CallError::Response {
            action: "DescribeVolumes".into(),
            detail,
        })
    }

    pub async fn describe_instance(&self, instance_id: &str) -> Result<Instance, CallError> {
        let xml = self
            .call("DescribeInstances", &[("InstanceId.1", instance_id)])
            .await?;
        let instances = parse_instances(&xml).map_err(|detail| CallError::Response {
            action: "DescribeInstances".into(),
            detail,
        })?;
        instances
            .into_iter()
            .find(|i| i.id == instance_id)
            .ok_or_else(|| CallError::Response {
                action: "DescribeInstances".into(),
                detail: format!("{instance_id} missing from the answer"),
            })
    }

    /// The snapshots this account owns (`Owner.1=self`). moto ignores `Owner` and also lists the
    /// snapshots behind its public AMIs, so the answer is filtered on the owner id here too.
    pub async fn describe_snapshots(&self) -> Result<Vec<Snapshot>, CallError> {
        let xml = self
            .call("DescribeSnapshots", &[("Owner.1", "self")])
            .await?;
        let snapshots = parse_snapshots(&xml).map_err(|detail| CallError::Response {
            action: "DescribeSnapshots".into(),
            detail,
        })?;
        Ok(snapshots
            .into_iter()
            .filter(|s| s.owner_id == DEFAULT_ACCOUNT_ID)
            .collect())
    }
}

fn parse_tags(node: roxmltree::Node) -> BTreeMap<String, String> {
    items(node, &["tagSet"])
        .into_iter()
        .filter_map(|t| {
            Some((
                child_text(t, "key")?.to_string(),
                child_text(t, "value").unwrap_or("").to_string(),
            ))
        })
        .collect()
}

fn required(node: roxmltree::Node, name: &str, what: &str) -> Result<String, String> {
    child_text(node, name)
        .map(str::to_string)
        .ok_or_else(|| format!("{what} without <{name}>"))
}

/// The volumes of a DescribeVolumes answer.
pub fn parse_volumes(xml: &str) -> Result<Vec<Volume>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid XML: {e}"))?;
    items(doc.root_element(), &["volumeSet"])
        .into_iter()
        .map(parse_volume)
        .collect()
}

/// A volume element (an `item` of `volumeSet`, or the root of a CreateVolume answer).
pub fn parse_volume(v: roxmltree::Node) -> Result<Volume, String> {
    let id = required(v, "volumeId", "volume")?;
    let attachments = items(v, &["attachmentSet"])
        .into_iter()
        .map(|a| {
            Ok(VolumeAttachment {
                instance_id: required(a, "instanceId", "attachment")?,
                device: child_text(a, "device").unwrap_or("").to_string(),
                state: required(a, "status", "attachment")?,
                attach_time: child_text(a, "attachTime").map(str::to_string),
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Volume {
        zone: required(v, "availabilityZone", &id)?,
        state: required(v, "status", &id)?,
        size_gib: child_text(v, "size")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{id}: no valid <size>"))?,
        snapshot_id: child_text(v, "snapshotId")
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        tags: parse_tags(v),
        attachments,
        id,
    })
}

/// The instances of a DescribeInstances or RunInstances answer.
pub fn parse_instances(xml: &str) -> Result<Vec<Instance>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid XML: {e}"))?;
    let root = doc.root_element();
    let mut nodes = items(root, &["instancesSet"]);
    for reservation in items(root, &["reservationSet"]) {
        nodes.extend(items(reservation, &["instancesSet"]));
    }
    nodes
        .into_iter()
        .map(|i| {
            let id = required(i, "instanceId", "instance")?;
            Ok(Instance {
                zone: path_text(i, &["placement", "availabilityZone"])
                    .ok_or_else(|| format!("{id}: no placement/availabilityZone"))?
                    .to_string(),
                state: path_text(i, &["instanceState", "name"])
                    .ok_or_else(|| format!("{id}: no instanceState/name"))?
                    .to_string(),
                state_code: path_text(i, &["instanceState", "code"])
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| format!("{id}: no valid instanceState/code"))?,
                private_ip: child_text(i, "privateIpAddress")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
                devices: items(i, &["blockDeviceMapping"])
                    .into_iter()
                    .filter_map(|m| child_text(m, "deviceName").map(str::to_string))
                    .collect(),
                id,
            })
        })
        .collect()
}

/// The snapshots of a DescribeSnapshots answer.
pub fn parse_snapshots(xml: &str) -> Result<Vec<Snapshot>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid XML: {e}"))?;
    items(doc.root_element(), &["snapshotSet"])
        .into_iter()
        .map(parse_snapshot)
        .collect()
}

/// A snapshot element (an `item` of `snapshotSet`, or the root of a CreateSnapshot answer).
pub fn parse_snapshot(s: roxmltree::Node) -> Result<Snapshot, String> {
    let id = required(s, "snapshotId", "snapshot")?;
    Ok(Snapshot {
        volume_id: child_text(s, "volumeId").unwrap_or("").to_string(),
        state: required(s, "status", &id)?,
        progress: child_text(s, "progress").unwrap_or("").to_string(),
        owner_id: child_text(s, "ownerId").unwrap_or("").to_string(),
        tags: parse_tags(s),
        id,
    })
}

/// The text of `<name>` directly under the root element of an answer (e.g. the `volumeId` of a
/// CreateVolume answer).
pub fn root_text(xml: &str, name: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    child(doc.root_element(), name).map(|n| n.text().unwrap_or("").to_string())
}
