//! The EC2-fidelity layer: an HTTP proxy in front of moto that adds what real EC2 does and moto
//! does not.
//!
//! moto accepts things EC2 refuses and makes every transition instant: attaching an attached
//! volume silently moves it, attaching across zones works, the same device twice works,
//! `DetachVolume` without `InstanceId` crashes it (HTTP 500), `TerminateInstances` frees the
//! attached volumes at once. This layer parses each request's `Action`, checks what EC2 checks,
//! forwards to moto, and overlays moto's answers with its own state (one mutex): attach and
//! detach latency (with the block-device hooks inside it), volumes `creating`, snapshots
//! `pending` with rising `progress`, instances `shutting-down` then `terminated` while their
//! volumes stay held, and injected faults. Guests under QEMU user networking reach it as
//! `10.0.2.2:PORT`.
//!
//! Error codes and messages are EC2's, with the wire captures they were taken from noted at each.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use crate::moto::{parse_snapshot, parse_volume, Ec2Client, Volume};
use crate::query::{
    child_text, format_time, http_response, items, parse_error_document, path_text, random_token,
    request_id, serve_loopback, xml_escape, Ec2Error, Filter, HttpResponse, Params, XmlEdits,
    DEFAULT_ACCOUNT_ID, EC2_XMLNS,
};
use crate::EbsHooks;

/// How the simulated EC2 paces its transitions. The defaults are in the range real EC2 shows;
/// the release after a termination is much shorter than EC2's minutes so tests stay short.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `attaching` lasts at least this long (the attach hook runs inside it).
    pub attach_latency: Duration,
    /// `detaching` lasts at least this long (the detach hook runs inside it).
    pub detach_latency: Duration,
    /// A new volume is `creating` this long.
    pub volume_creation: Duration,
    /// A new snapshot is `pending` this long, its `progress` rising.
    pub snapshot_duration: Duration,
    /// A terminated instance is `shutting-down` this long, then `terminated`.
    pub shutting_down: Duration,
    /// After a termination, its volumes stay attached this long before they are `available`.
    pub release_after_termination: Duration,
    /// The account in ARNs and error messages (moto's default).
    pub account_id: String,
    /// The role named in `UnauthorizedOperation` messages.
    pub role_name: String,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            attach_latency: Duration::from_secs(2),
            detach_latency: Duration::from_secs(1),
            volume_creation: Duration::from_secs(1),
            snapshot_duration: Duration::from_secs(3),
            shutting_down: Duration::from_secs(3),
            release_after_termination: Duration::from_secs(20),
            account_id: DEFAULT_ACCOUNT_ID.to_string(),
            role_name: crate::imds::DEFAULT_ROLE_NAME.to_string(),
        }
    }
}

/// A random number in [0, 1), for fault rates (the kernel's getrandom through std's hasher
/// seeds; good enough to spread faults, not for anything else).
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// A fault to inject into the next requests of one action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 503 `RequestLimitExceeded`.
    Throttle,
    /// HTTP 500 `InternalError`.
    ServerError,
    /// HTTP 503 `Unavailable`.
    Unavailable,
    /// HTTP 403 `UnauthorizedOperation`, naming the action.
    Unauthorized,
    /// HTTP 400 `IncorrectState`, as EC2 answers a call the resource's state does not allow
    /// yet (a DetachVolume while EC2 is still settling an attachment).
    IncorrectState,
}

/// One request as the layer saw it: from a client, or forwarded to moto.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub action: String,
    pub params: Vec<(String, String)>,
    /// The HTTP status answered.
    pub status: u16,
    /// The EC2 error code, when the answer was an error.
    pub code: Option<String>,
}

/// One attachment of a volume to an instance as EC2 (moto) holds it: from the moment an
/// AttachVolume reached moto until the volume was let go of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub volume: String,
    pub instance: String,
    pub device: String,
    pub from: Instant,
    /// `None` while it lasts.
    pub until: Option<Instant>,
    pub ended_by: Option<AttachmentEnd>,
}

/// How an attachment ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachmentEnd {
    /// A DetachVolume completed.
    Detached,
    /// A force-detach let go of it (busy, detaching, or held by a terminating instance).
    ForceDetached,
    /// The instance was terminated and EC2 released its volumes after the release delay.
    Released,
    /// The block-device side could not attach it: the attachment was undone.
    AttachFailed,
}

impl Attachment {
    /// Whether the two attachments were in force at a common instant (an open one lasts until
    /// `now`).
    pub fn overlaps(&self, other: &Attachment, now: Instant) -> bool {
        self.from < other.until.unwrap_or(now) && other.from < self.until.unwrap_or(now)
    }
}

impl Request {
    /// The first value of a parameter.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The fidelity layer, serving on 127.0.0.1; stops (with its background transitions) on drop.
pub struct Fidelity {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

struct Shared {
    moto: Ec2Client,
    hooks: Arc<dyn EbsHooks>,
    settings: Settings,
    state: Mutex<State>,
    /// Held across check-then-act sequences (validate, forward to moto, update the overlay), so
    /// two racing AttachVolume calls see each other: exactly one wins, as on EC2.
    mutations: tokio::sync::Mutex<()>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    generation: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Volumes in a transition moto does not model.
    volumes: HashMap<String, VolumePhase>,
    /// Volumes still `creating`, until the instant they are available.
    creating: HashMap<String, Instant>,
    /// Snapshots still `pending`: when they started, how long they take.
    snapshots: HashMap<String, (Instant, Duration)>,
    /// Instances being terminated.
    terminations: HashMap<String, Termination>,
    faults: HashMap<String, VecDeque<Fault>>,
    /// Faults that hit a share of an action's requests: (fault, share in 0..=1).
    fault_rates: HashMap<String, Vec<(Fault, f64)>>,
    denied: HashSet<String>,
    /// Access key id -> role session name (the instance id on EC2).
    callers: HashMap<String, String>,
    requests: Vec<Request>,
    moto_requests: Vec<Request>,
    /// Every attachment that reached moto, in the order they did.
    attachments: Vec<Attachment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum VolumePhase {
    Attaching {
        instance: String,
        device: String,
        generation: u64,
    },
    Detaching {
        instance: String,
        device: String,
        generation: u64,
    },
    /// The detach hook failed: the device is still in use in the guest. EC2 shows `busy` and
    /// keeps the volume until a force-detach (DetachVolume API reference: "Failure to do so can
    /// result in the volume becoming stuck in the busy state while detaching").
    Busy { instance: String, device: String },
    /// Attached to an instance that is being terminated, until EC2 lets go of it.
    Held { instance: String, device: String },
}

#[derive(Clone, Copy, Debug)]
struct Termination {
    shutting_down_until: Instant,
    release_at: Instant,
}

/// What DescribeVolumes shows for a volume, where it differs from moto.
#[derive(Default)]
struct VolumeView {
    status: Option<&'static str>,
    attachment: Option<&'static str>,
}

type Reply = Result<(u16, String), Ec2Error>;

impl Fidelity {
    /// Serves the layer on a free loopback port, in front of the moto at `moto_endpoint`.
    pub async fn start(
        moto_endpoint: &str,
        hooks: Arc<dyn EbsHooks>,
        settings: Settings,
    ) -> std::io::Result<Fidelity> {
        let shared = Arc::new(Shared {
            moto: Ec2Client::new(moto_endpoint),
            hooks,
            settings,
            state: Mutex::new(State::default()),
            mutations: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            generation: AtomicU64::new(1),
        });
        let handler_shared = shared.clone();
        let (addr, server) = serve_loopback(move |req| {
            let shared = handler_shared.clone();
            async move {
                // A task of its own, so a client that gives up (a timeout) cannot cut a request
                // in half, e.g. between moto's attach and the overlay's `attaching`.
                match tokio::spawn(shared.handle(req)).await {
                    Ok(response) => response,
                    Err(e) => {
                        eprintln!("spotworld fidelity: request handler failed: {e}");
                        let error = internal_error();
                        http_response(500, &[], error.document(&request_id()))
                    }
                }
            }
        })
        .await?;
        Ok(Fidelity {
            addr,
            shared,
            server,
        })
    }

    /// `http://127.0.0.1:PORT` (a guest reaches it as `http://10.0.2.2:PORT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A raw EC2 client talking to this layer (it sees what spotinit sees).
    pub fn client(&self) -> Ec2Client {
        Ec2Client::new(&self.endpoint())
    }

    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// The next `times` requests of `action` fail with `fault` (before any other check).
    pub fn inject(&self, action: &str, fault: Fault, times: usize) {
        let mut state = self.shared.lock();
        let queue = state.faults.entry(action.to_string()).or_default();
        queue.extend(std::iter::repeat_n(fault, times));
    }

    /// From now on a share (`rate`, 0 to 1) of the requests of `action`, chosen at random, fail
    /// with `fault` (throttling and 5xx under load, say). Several rates add up.
    pub fn inject_rate(&self, action: &str, fault: Fault, rate: f64) {
        self.shared
            .lock()
            .fault_rates
            .entry(action.to_string())
            .or_default()
            .push((fault, rate.clamp(0.0, 1.0)));
    }

    /// Ends every [`Fidelity::inject_rate`] (queued [`Fidelity::inject`] faults stay).
    pub fn clear_fault_rates(&self) {
        self.shared.lock().fault_rates.clear();
    }

    /// From now on every request of `action` gets `UnauthorizedOperation`, as with an IAM
    /// policy that lacks `ec2:<action>`.
    pub fn deny(&self, action: &str) {
        self.shared.lock().denied.insert(action.to_string());
    }

    /// Undoes [`Fidelity::deny`].
    pub fn allow(&self, action: &str) {
        self.shared.lock().denied.remove(action);
    }

    /// Names the caller using `access_key_id` in authorization errors (EC2 names an instance
    /// role's session after the instance: `assumed-role/<role>/<instance id>`).
    pub fn register_caller(&self, access_key_id: &str, session_name: &str) {
        self.shared
            .lock()
            .callers
            .insert(access_key_id.to_string(), session_name.to_string());
    }

    /// Every client request so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// Every request the layer sent to moto so far (its own checks excluded), in order.
    pub fn moto_requests(&self) -> Vec<Request> {
        self.shared.lock().moto_requests.clone()
    }

    /// Every attachment so far, in the order its AttachVolume reached moto: open until the
    /// detach completes, a force-detach lets go, or a termination's release frees the volume.
    /// Two attachments of one volume that overlap in time are what EC2 never allows.
    pub fn attachment_history(&self) -> Vec<Attachment> {
        self.shared.lock().attachments.clone()
    }

    /// Terminates `instance_id` as EC2 does after a spot interruption (the simulator calls this
    /// when it kills the VM): the block-device side forgets the instance at once, the instance
    /// is `shutting-down`, then `terminated`; its volumes stay attached (and `VolumeInUse` to
    /// others) until [`Settings::release_after_termination`] has passed or someone
    /// force-detaches them, then they are `available`.
    pub async fn terminate(&self, instance_id: &str) -> Result<(), String> {
        let _guard = self.shared.mutations.lock().await;
        self.shared
            .terminate_locked(instance_id, None)
            .await
            .map(drop)
            .map_err(|e| format!("terminate {instance_id}: {e}"))
    }
}

/// EC2 refuses a request whose SigV4 date stamp is more than 15 minutes from its own clock
/// (EC2 API reference, "Common client error codes": RequestExpired). So does the layer, against
/// the host's clock: a guest that signs with a wrong clock is refused as on EC2.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);

/// `20261126T051500Z` (the X-Amz-Date header) as a time.
pub fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    if s.len() != 16 || s.as_bytes()[8] != b'T' || !s.ends_with('Z') {
        return None;
    }
    let (y, mo, d, h, mi, se) = (
        n(0..4)?,
        n(4..6)?,
        n(6..8)?,
        n(9..11)?,
        n(11..13)?,
        n(13..15)?,
    );
    // Days from the civil date (Howard Hinnant's days_from_civil).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = if mo > 2 { mo - 3 } else { mo + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = u64::try_from(days * 86400 + h * 3600 + mi * 60 + se).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn clock_skew(t: SystemTime) -> Duration {
    let now = SystemTime::now();
    now.duration_since(t)
        .or_else(|_| t.duration_since(now))
        .unwrap_or_default()
}

impl Drop for Fidelity {
    fn drop(&mut self) {
        self.server.abort();
        for task in self
            .shared
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------------

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed)
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task).abort_handle();
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }

    async fn handle(self: Arc<Self>, req: hyper::Request<Bytes>) -> HttpResponse {
        let mut params = Params::parse(req.body());
        if let Some(query) = req.uri().query() {
            for (k, v) in Params::parse(query.as_bytes()).into_pairs() {
                params.push(k, v);
            }
        }
        let authorization = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let request_id = request_id();
        let action = params.action().unwrap_or("").to_string();
        let signed_at = req
            .headers()
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_amz_date);
        let reply = match signed_at.map(clock_skew) {
            Some(skew) if skew > MAX_CLOCK_SKEW => {
                Err(Ec2Error::new("RequestExpired", "Request has expired."))
            }
            _ => {
                self.dispatch(&action, &params, authorization.as_deref(), &request_id)
                    .await
            }
        };
        let (status, body) = match reply {
            Ok(reply) => reply,
            Err(error) => (error.status(), error.document(&request_id)),
        };
        let code = if status >= 400 {
            parse_error_document(&body).map(|e| e.code)
        } else {
            None
        };
        self.lock().requests.push(Request {
            action,
            params: params.into_pairs(),
            status,
            code,
        });
        http_response(
            status,
            &[
                ("content-type", "text/xml;charset=UTF-8"),
                ("server", "AmazonEC2"),
                ("x-amzn-requestid", &request_id),
            ],
            body,
        )
    }

    async fn dispatch(
        self: &Arc<Self>,
        action: &str,
        params: &Params,
        authorization: Option<&str>,
        request_id: &str,
    ) -> Reply {
        if action.is_empty() {
            return Err(Ec2Error::new(
                "MissingAction",
                "The request must contain the parameter Action",
            ));
        }
        self.check_faults(action, params, authorization)?;
        if matches!(
            action,
            "CreateTags" | "CreateVolume" | "CreateSnapshot" | "RunInstances"
        ) {
            Self::check_reserved_tags(params)?;
        }
        match action {
            "AttachVolume" => self.attach_volume(params, authorization).await,
            "DetachVolume" => self.detach_volume(params, authorization, request_id).await,
            "DescribeVolumes" => self.describe_volumes(params, authorization).await,
            "DescribeInstances" => self.describe_instances(params, authorization).await,
            "DescribeSnapshots" => self.describe_snapshots(params, authorization).await,
            "CreateVolume" => self.create_volume(params, authorization).await,
            "CreateSnapshot" => self.create_snapshot(params, authorization).await,
            "TerminateInstances" => self.terminate_instances(params, request_id).await,
            "DeleteVolume" => self.delete_volume(params, authorization).await,
            _ => self.forward(params, authorization).await,
        }
    }

    /// Denied actions and injected faults, before anything else (as IAM and throttling are).
    fn check_faults(
        &self,
        action: &str,
        params: &Params,
        authorization: Option<&str>,
    ) -> Result<(), Ec2Error> {
        let mut state = self.lock();
        let fault = if state.denied.contains(action) {
            Some(Fault::Unauthorized)
        } else {
            state
                .faults
                .get_mut(action)
                .and_then(VecDeque::pop_front)
                .or_else(|| {
                    let mut roll = random_unit();
                    state.fault_rates.get(action)?.iter().find_map(|(f, rate)| {
                        roll -= rate;
                        (roll < 0.0).then_some(*f)
                    })
                })
        };
        match fault {
            None => Ok(()),
            Some(Fault::Throttle) => Err(Ec2Error::new(
                "RequestLimitExceeded",
                "Request limit exceeded.",
            )),
            Some(Fault::ServerError) => Err(Ec2Error::new(
                "InternalError",
                "An internal error has occurred",
            )),
            Some(Fault::Unavailable) => Err(Ec2Error::new(
                "Unavailable",
                "The server is overloaded and can't handle the request.",
            )),
            Some(Fault::Unauthorized) => {
                Err(self.unauthorized(&state, action, params, authorization))
            }
            Some(Fault::IncorrectState) => Err(Ec2Error::new(
                "IncorrectState",
                format!(
                    "Volume '{}' is in the 'busy' state.",
                    params.get("VolumeId").unwrap_or("vol-?")
                ),
            )),
        }
    }

    /// EC2 refuses tag keys that start with `aws:` (any case) wherever a client sets tags:
    /// "Value ( aws:cloudformation:stack-name ) for parameter key is invalid. Tag keys starting
    /// with 'aws:' are reserved for internal use" (InvalidParameterValue; the wording in
    /// AndrewFarley/AWS-Automated-Daily-Instance-AMI-Snapshots#7). Resources made by AWS
    /// services carry such tags all the same.
    fn check_reserved_tags(params: &Params) -> Result<(), Ec2Error> {
        let reserved = params.iter().find(|(k, v)| {
            k.ends_with(".Key")
                && (k.starts_with("Tag.") || k.starts_with("TagSpecification."))
                && v.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("aws:"))
        });
        match reserved {
            Some((_, key)) => Err(Ec2Error::new(
                "InvalidParameterValue",
                format!(
                    "Value ( {key} ) for parameter key is invalid. Tag keys starting with 'aws:' are reserved for internal use"
                ),
            )),
            None => Ok(()),
        }
    }

    /// EC2's wording: "You are not authorized to perform this operation. User:
    /// arn:aws:sts::ACCOUNT:assumed-role/ROLE/i-... is not authorized to perform: ec2:ACTION on
    /// resource: ARN because no identity-based policy allows the ec2:ACTION action. Encoded
    /// authorization failure message: ...".
    fn unauthorized(
        &self,
        state: &State,
        action: &str,
        params: &Params,
        authorization: Option<&str>,
    ) -> Ec2Error {
        let (access_key, region) = credential_scope(authorization);
        let account = &self.settings.account_id;
        let session = state
            .callers
            .get(&access_key)
            .cloned()
            .unwrap_or(access_key);
        let resource = [
            ("VolumeId", "volume"),
            ("InstanceId", "instance"),
            ("InstanceId.1", "instance"),
            ("SnapshotId", "snapshot"),
        ]
        .iter()
        .find_map(|(param, kind)| {
            params
                .get(param)
                .map(|id| format!(" on resource: arn:aws:ec2:{region}:{account}:{kind}/{id}"))
        })
        .unwrap_or_default();
        Ec2Error::new(
            "UnauthorizedOperation",
            format!(
                "You are not authorized to perform this operation. User: \
                 arn:aws:sts::{account}:assumed-role/{}/{session} is not authorized to perform: \
                 ec2:{action}{resource} because no identity-based policy allows the ec2:{action} \
                 action. Encoded authorization failure message: {}",
                self.settings.role_name,
                random_token(96)
            ),
        )
    }

    /// Sends `params` to moto as they are; moto's answer, with its quirks smoothed.
    async fn forward(&self, params: &Params, authorization: Option<&str>) -> Reply {
        let action = params.action().unwrap_or("").to_string();
        let result = self.moto.send_raw(params.encode(), authorization).await;
        let (status, body) = match result {
            Ok((status, body)) => (status, body),
            Err(e) => {
                eprintln!("spotworld fidelity: {action}: moto unreachable: {e}");
                return Err(internal_error());
            }
        };
        let (status, body) = if status >= 400 {
            match parse_error_document(&body) {
                // moto formats some ids as Python sets: "The volume '{'vol-1'}' does not exist."
                Some(e) => (
                    status,
                    Ec2Error::new(e.code, e.message.replace("'{'", "'").replace("'}'", "'"))
                        .document(&request_id()),
                ),
                None => {
                    eprintln!(
                        "spotworld fidelity: {action}: moto answered HTTP {status} without an \
                         EC2 error document: {}",
                        body.chars().take(300).collect::<String>()
                    );
                    (500, internal_error().document(&request_id()))
                }
            }
        } else {
            (status, body)
        };
        self.lock().moto_requests.push(Request {
            action,
            params: params.pairs().to_vec(),
            status,
            code: if status >= 400 {
                parse_error_document(&body).map(|e| e.code)
            } else {
                None
            },
        });
        Ok((status, body))
    }

    /// Forwards a call the layer makes on its own behalf; the answer body, or the EC2 error.
    async fn moto_call(
        &self,
        action: &str,
        pairs: &[(&str, &str)],
        authorization: Option<&str>,
    ) -> Result<String, Ec2Error> {
        let mut params = Params::from_pairs([("Action", action), ("Version", "2016-11-15")]);
        for (k, v) in pairs {
            params.push(*k, *v);
        }
        let (status, body) = self.forward(&params, authorization).await?;
        if status >= 400 {
            return Err(parse_error_document(&body).unwrap_or_else(internal_error));
        }
        Ok(body)
    }

    async fn moto_volume(
        &self,
        volume_id: &str,
        authorization: Option<&str>,
    ) -> Result<Volume, Ec2Error> {
        let body = self
            .moto_call(
                "DescribeVolumes",
                &[("VolumeId.1", volume_id)],
                authorization,
            )
            .await
            .map_err(|e| {
                if e.code == "InvalidVolume.NotFound" {
                    volume_not_found(volume_id)
                } else {
                    e
                }
            })?;
        crate::moto::parse_volumes(&body)
            .ok()
            .and_then(|vs| vs.into_iter().find(|v| v.id == volume_id))
            .ok_or_else(|| volume_not_found(volume_id))
    }

    async fn moto_instance(
        &self,
        instance_id: &str,
        authorization: Option<&str>,
    ) -> Result<crate::moto::Instance, Ec2Error> {
        let not_found = || {
            Ec2Error::new(
                "InvalidInstanceID.NotFound",
                format!("The instance ID '{instance_id}' does not exist"),
            )
        };
        let body = self
            .moto_call(
                "DescribeInstances",
                &[("InstanceId.1", instance_id)],
                authorization,
            )
            .await
            .map_err(|e| {
                if e.code.starts_with("InvalidInstanceID") {
                    not_found()
                } else {
                    e
                }
            })?;
        crate::moto::parse_instances(&body)
            .ok()
            .and_then(|is| is.into_iter().find(|i| i.id == instance_id))
            .ok_or_else(not_found)
    }

    // -----------------------------------------------------------------------------------------
    // AttachVolume
    // -----------------------------------------------------------------------------------------

    async fn attach_volume(
        self: &Arc<Self>,
        params: &Params,
        authorization: Option<&str>,
    ) -> Reply {
        let volume_id = required(params, "VolumeId")?;
        let instance_id = required(params, "InstanceId")?;
        let device = required(params, "Device")?;
        if !valid_device_name(device) {
            // As EC2 words it (base2genomics/batchit#15).
            return Err(Ec2Error::new(
                "InvalidParameterValue",
                format!("Value ({device}) for parameter device is invalid. {device} is not a valid EBS device name."),
            ));
        }
        let _guard = self.mutations.lock().await;
        let volume = self.moto_volume(volume_id, authorization).await?;
        let instance = self.moto_instance(instance_id, authorization).await?;
        let now = Instant::now();
        {
            let state = self.lock();
            let instance_state = state
                .instance_view(instance_id, now)
                .map(|(name, _)| name)
                .unwrap_or(instance.state.as_str());
            // EC2 attaches to running and stopped instances only; its wording for the rest
            // (ansible-collections/amazon.aws#497): "Instance 'i-...' is not 'running'."
            if instance_state != "running" && instance_state != "stopped" {
                return Err(Ec2Error::new(
                    "IncorrectState",
                    format!("Instance '{instance_id}' is not 'running'."),
                ));
            }
            if state.creating.get(volume_id).is_some_and(|t| *t > now) {
                // jsmartin/raidformer#5, kubernetes/kubernetes#15058.
                return Err(Ec2Error::new(
                    "IncorrectState",
                    format!("{volume_id} is not 'available'."),
                ));
            }
            if !volume.attachments.is_empty() || state.volumes.contains_key(volume_id) {
                // hashicorp/terraform-provider-aws#8565, portworx/px-dev#42.
                return Err(Ec2Error::new(
                    "VolumeInUse",
                    format!("{volume_id} is already attached to an instance"),
                ));
            }
        }
        if volume.zone != instance.zone {
            // linuxkit/linuxkit#2388.
            return Err(Ec2Error::new(
                "InvalidVolume.ZoneMismatch",
                format!(
                    "The volume '{volume_id}' is not in the same availability zone as instance '{instance_id}'"
                ),
            ));
        }
        if instance.devices.iter().any(|d| d == device) {
            // nanovms/ops#1189.
            return Err(Ec2Error::new(
                "InvalidParameterValue",
                format!("Invalid value '{device}' for unixDevice. Attachment point {device} is already in use"),
            ));
        }
        let (status, body) = self.forward(params, authorization).await?;
        if status >= 400 {
            return Ok((status, body));
        }
        let generation = self.next_generation();
        {
            let mut state = self.lock();
            state.volumes.insert(
                volume_id.to_string(),
                VolumePhase::Attaching {
                    instance: instance_id.to_string(),
                    device: device.to_string(),
                    generation,
                },
            );
            state.attachments.push(Attachment {
                volume: volume_id.to_string(),
                instance: instance_id.to_string(),
                device: device.to_string(),
                from: Instant::now(),
                until: None,
                ended_by: None,
            });
        }
        let shared = self.clone();
        let (volume_id, instance_id) = (volume_id.to_string(), instance_id.to_string());
        self.spawn(async move {
            shared
                .finish_attach(volume_id, instance_id, generation, now)
                .await
        });
        // moto's answer already says `attaching`.
        Ok((status, body))
    }

    /// The device appears in the guest (the hook), then `attached` once the latency is over;
    /// if the hook fails the attachment goes away and the volume is `available` again.
    async fn finish_attach(
        self: Arc<Self>,
        volume_id: String,
        instance_id: String,
        generation: u64,
        started: Instant,
    ) {
        let result = self.hooks.attach(&instance_id, &volume_id).await;
        if result.is_ok() {
            tokio::time::sleep_until((started + self.settings.attach_latency).into()).await;
        }
        let _guard = self.mutations.lock().await;
        let ours = matches!(
            self.lock().volumes.get(&volume_id),
            Some(VolumePhase::Attaching { generation: g, .. }) if *g == generation
        );
        if !ours {
            // Overtaken (the instance was terminated meanwhile): that path owns the volume now.
            return;
        }
        match result {
            Ok(()) => {
                self.lock().volumes.remove(&volume_id);
            }
            Err(why) => {
                eprintln!(
                    "spotworld fidelity: attaching {volume_id} to {instance_id} failed in the \
                     block-device layer: {why}; the attachment is dropped and the volume is \
                     available again"
                );
                match self
                    .moto_call(
                        "DetachVolume",
                        &[("VolumeId", &volume_id), ("InstanceId", &instance_id)],
                        None,
                    )
                    .await
                {
                    Ok(_) => self.lock().end_attachment(
                        &volume_id,
                        &instance_id,
                        AttachmentEnd::AttachFailed,
                    ),
                    Err(e) => eprintln!("spotworld fidelity: undoing the attachment of {volume_id} in moto failed: {e}"),
                }
                self.lock().volumes.remove(&volume_id);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // DetachVolume
    // -----------------------------------------------------------------------------------------

    async fn detach_volume(
        self: &Arc<Self>,
        params: &Params,
        authorization: Option<&str>,
        request_id: &str,
    ) -> Reply {
        let volume_id = required(params, "VolumeId")?;
        let force = params.flag("Force");
        let _guard = self.mutations.lock().await;
        let volume = self.moto_volume(volume_id, authorization).await?;
        let Some(attachment) = volume.attachments.first().cloned() else {
            // The wire capture in kubernetes-sigs/aws-ebs-csi-driver#1801.
            return Err(Ec2Error::new(
                "IncorrectState",
                format!("Volume '{volume_id}' is in the 'available' state."),
            ));
        };
        let holder = attachment.instance_id.clone();
        if let Some(asked) = params.get("InstanceId") {
            if asked != holder {
                return Err(Ec2Error::new(
                    "InvalidAttachment.NotFound",
                    format!("Volume {volume_id} can not be detached from {asked} because it is not attached"),
                ));
            }
        }
        if let Some(asked) = params.get("Device") {
            if asked != attachment.device {
                return Err(Ec2Error::new(
                    "InvalidAttachment.NotFound",
                    format!("The volume {volume_id} is not attached to instance {holder} as device {asked}"),
                ));
            }
        }
        let answer = |status: &str| {
            detach_response(
                request_id,
                volume_id,
                &holder,
                &attachment.device,
                status,
                attachment.attach_time.as_deref(),
            )
        };
        let phase = self.lock().volumes.get(volume_id).cloned();
        match phase {
            Some(VolumePhase::Attaching { .. }) => Err(Ec2Error::new(
                "IncorrectState",
                format!("Volume '{volume_id}' is in the 'attaching' state."),
            )),
            Some(VolumePhase::Held { instance, .. }) if !force => {
                // What EC2 answers while the holder is being terminated
                // (hashicorp/terraform#18965); only a force-detach takes the volume earlier.
                Err(Ec2Error::new(
                    "IncorrectInstanceState",
                    format!(
                        "Unable to detach volume '{volume_id}' from instance '{instance}'. The \
                         instance is not in a state in which volumes can be detached."
                    ),
                ))
            }
            Some(VolumePhase::Held { instance, .. }) => {
                // Force: the dying instance's device is already gone (instance_gone), so EC2
                // just lets go of the volume.
                self.moto_call(
                    "DetachVolume",
                    &[("VolumeId", volume_id), ("InstanceId", &instance)],
                    authorization,
                )
                .await?;
                {
                    let mut state = self.lock();
                    state.volumes.remove(volume_id);
                    state.end_attachment(volume_id, &instance, AttachmentEnd::ForceDetached);
                }
                eprintln!(
                    "spotworld fidelity: {volume_id} force-detached from terminating {instance}"
                );
                Ok((200, answer("detaching")))
            }
            Some(VolumePhase::Detaching { .. }) | Some(VolumePhase::Busy { .. }) if force => {
                if let Err(why) = self.hooks.detach(&holder, volume_id).await {
                    eprintln!(
                        "spotworld fidelity: force-detach of {volume_id} from {holder}: the \
                         block-device layer still failed ({why}); EC2 lets go regardless"
                    );
                }
                self.moto_call(
                    "DetachVolume",
                    &[("VolumeId", volume_id), ("InstanceId", &holder)],
                    authorization,
                )
                .await?;
                {
                    let mut state = self.lock();
                    state.volumes.remove(volume_id);
                    state.end_attachment(volume_id, &holder, AttachmentEnd::ForceDetached);
                }
                Ok((200, answer("detaching")))
            }
            // Asking again while it is under way changes nothing.
            Some(VolumePhase::Detaching { .. }) => Ok((200, answer("detaching"))),
            Some(VolumePhase::Busy { .. }) => Ok((200, answer("busy"))),
            None => {
                let generation = self.next_generation();
                self.lock().volumes.insert(
                    volume_id.to_string(),
                    VolumePhase::Detaching {
                        instance: holder.clone(),
                        device: attachment.device.clone(),
                        generation,
                    },
                );
                let shared = self.clone();
                let (volume_id, holder2) = (volume_id.to_string(), holder.clone());
                self.spawn(
                    async move { shared.finish_detach(volume_id, holder2, generation).await },
                );
                Ok((200, answer("detaching")))
            }
        }
    }

    /// The device leaves the guest (the hook), the latency passes, then the detach reaches moto
    /// (always with the instance id: moto crashes without it) and the volume is `available`.
    async fn finish_detach(
        self: Arc<Self>,
        volume_id: String,
        instance_id: String,
        generation: u64,
    ) {
        let started = Instant::now();
        let result = self.hooks.detach(&instance_id, &volume_id).await;
        if result.is_ok() {
            tokio::time::sleep_until((started + self.settings.detach_latency).into()).await;
        }
        let _guard = self.mutations.lock().await;
        let device = match self.lock().volumes.get(&volume_id) {
            Some(VolumePhase::Detaching {
                device,
                generation: g,
                ..
            }) if *g == generation => device.clone(),
            // Overtaken (a force-detach or a termination): that path owns the volume now.
            _ => return,
        };
        match result {
            Ok(()) => {
                match self
                    .moto_call(
                        "DetachVolume",
                        &[("VolumeId", &volume_id), ("InstanceId", &instance_id)],
                        None,
                    )
                    .await
                {
                    Ok(_) => self.lock().end_attachment(
                        &volume_id,
                        &instance_id,
                        AttachmentEnd::Detached,
                    ),
                    Err(e) => eprintln!("spotworld fidelity: detaching {volume_id} from {instance_id} in moto failed: {e}"),
                }
                self.lock().volumes.remove(&volume_id);
            }
            Err(why) => {
                eprintln!(
                    "spotworld fidelity: detaching {volume_id} from {instance_id} failed in the \
                     block-device layer: {why}; the attachment is now 'busy' until a force-detach"
                );
                self.lock().volumes.insert(
                    volume_id,
                    VolumePhase::Busy {
                        instance: instance_id,
                        device,
                    },
                );
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Termination
    // -----------------------------------------------------------------------------------------

    /// Starts the termination of `instance_id` (the caller holds `mutations`). Returns the
    /// state the instance was in, or `None` if it was already terminating or terminated.
    async fn terminate_locked(
        self: &Arc<Self>,
        instance_id: &str,
        authorization: Option<&str>,
    ) -> Result<Option<(&'static str, u32)>, Ec2Error> {
        let instance = self.moto_instance(instance_id, authorization).await?;
        if self.lock().terminations.contains_key(instance_id) || instance.state == "terminated" {
            return Ok(None);
        }
        let previous = match instance.state.as_str() {
            "pending" => ("pending", 0),
            "stopping" => ("stopping", 64),
            "stopped" => ("stopped", 80),
            _ => ("running", 16),
        };
        let body = self
            .moto_call(
                "DescribeVolumes",
                &[
                    ("Filter.1.Name", "attachment.instance-id"),
                    ("Filter.1.Value.1", instance_id),
                ],
                authorization,
            )
            .await?;
        let attached = crate::moto::parse_volumes(&body).map_err(|e| {
            eprintln!("spotworld fidelity: unreadable DescribeVolumes answer: {e}");
            internal_error()
        })?;
        self.hooks.instance_gone(instance_id).await;
        let now = Instant::now();
        let termination = Termination {
            shutting_down_until: now + self.settings.shutting_down,
            release_at: now
                + self
                    .settings
                    .release_after_termination
                    .max(self.settings.shutting_down),
        };
        {
            let mut state = self.lock();
            for volume in &attached {
                for a in volume
                    .attachments
                    .iter()
                    .filter(|a| a.instance_id == instance_id)
                {
                    // Replaces any attaching/detaching phase: its task sees it was overtaken.
                    state.volumes.insert(
                        volume.id.clone(),
                        VolumePhase::Held {
                            instance: instance_id.to_string(),
                            device: a.device.clone(),
                        },
                    );
                }
            }
            state
                .terminations
                .insert(instance_id.to_string(), termination);
        }
        eprintln!(
            "spotworld fidelity: {instance_id} terminated; holding {} volume(s) for {:?}",
            attached.len(),
            termination.release_at - now
        );
        let shared = self.clone();
        let instance_id = instance_id.to_string();
        self.spawn(async move {
            tokio::time::sleep_until(termination.release_at.into()).await;
            let _guard = shared.mutations.lock().await;
            // Now moto may terminate it: that frees whatever is still attached.
            let released = shared
                .moto_call(
                    "TerminateInstances",
                    &[("InstanceId.1", &instance_id)],
                    None,
                )
                .await;
            let mut state = shared.lock();
            match released {
                Ok(_) => state.end_attachments_of(&instance_id, AttachmentEnd::Released),
                Err(e) => eprintln!(
                    "spotworld fidelity: TerminateInstances {instance_id} in moto failed: {e}"
                ),
            }
            state.volumes.retain(|_, phase| {
                !matches!(phase, VolumePhase::Held { instance, .. } if *instance == instance_id)
            });
            state.terminations.remove(&instance_id);
        });
        Ok(Some(previous))
    }

    async fn terminate_instances(self: &Arc<Self>, params: &Params, request_id: &str) -> Reply {
        let ids = params.list("InstanceId");
        if ids.is_empty() {
            return Err(missing("InstanceId"));
        }
        let _guard = self.mutations.lock().await;
        let mut items = String::new();
        for id in &ids {
            let previous = self.terminate_locked(id, None).await?;
            let now = Instant::now();
            let (prev_name, prev_code) = previous.unwrap_or_else(|| {
                self.lock()
                    .instance_view(id, now)
                    .unwrap_or(("terminated", 48))
            });
            let (name, code) = self
                .lock()
                .instance_view(id, now)
                .unwrap_or(("terminated", 48));
            items.push_str(&format!(
                "<item><instanceId>{id}</instanceId><currentState><code>{code}</code><name>{name}</name></currentState>\
                 <previousState><code>{prev_code}</code><name>{prev_name}</name></previousState></item>"
            ));
        }
        Ok((
            200,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<TerminateInstancesResponse xmlns=\"{EC2_XMLNS}\">\
                 <requestId>{request_id}</requestId><instancesSet>{items}</instancesSet></TerminateInstancesResponse>"
            ),
        ))
    }

    // -----------------------------------------------------------------------------------------
    // Create and delete
    // -----------------------------------------------------------------------------------------

    async fn create_volume(
        self: &Arc<Self>,
        params: &Params,
        authorization: Option<&str>,
    ) -> Reply {
        let now = Instant::now();
        if let Some(snapshot_id) = params.get("SnapshotId") {
            if self.lock().snapshot_progress(snapshot_id, now).is_some() {
                return Err(Ec2Error::new(
                    "IncorrectState",
                    format!("Snapshot '{snapshot_id}' is in the 'pending' state."),
                ));
            }
        }
        let _guard = self.mutations.lock().await;
        let (status, body) = self.forward(params, authorization).await?;
        if status >= 400 {
            return Ok((status, body));
        }
        let doc = roxmltree::Document::parse(&body).map_err(|e| unreadable("CreateVolume", e))?;
        let volume = parse_volume(doc.root_element()).map_err(|e| unreadable("CreateVolume", e))?;
        if let Err(why) = self
            .hooks
            .volume_created(&volume.id, volume.size_gib, volume.snapshot_id.as_deref())
            .await
        {
            eprintln!(
                "spotworld fidelity: the block-device layer could not create {} ({} GiB{}): {why}",
                volume.id,
                volume.size_gib,
                volume
                    .snapshot_id
                    .as_deref()
                    .map(|s| format!(" from {s}"))
                    .unwrap_or_default()
            );
            let _ = self
                .moto_call("DeleteVolume", &[("VolumeId", &volume.id)], authorization)
                .await;
            return Err(internal_error());
        }
        self.lock()
            .creating
            .insert(volume.id.clone(), now + self.settings.volume_creation);
        let mut edits = XmlEdits::new();
        edits.set_path_text(doc.root_element(), &["status"], "creating");
        Ok((status, edits.apply(&body)))
    }

    async fn create_snapshot(
        self: &Arc<Self>,
        params: &Params,
        authorization: Option<&str>,
    ) -> Reply {
        let _guard = self.mutations.lock().await;
        let (status, body) = self.forward(params, authorization).await?;
        if status >= 400 {
            return Ok((status, body));
        }
        let doc = roxmltree::Document::parse(&body).map_err(|e| unreadable("CreateSnapshot", e))?;
        let snapshot =
            parse_snapshot(doc.root_element()).map_err(|e| unreadable("CreateSnapshot", e))?;
        if let Err(why) = self
            .hooks
            .snapshot_created(&snapshot.id, &snapshot.volume_id)
            .await
        {
            eprintln!(
                "spotworld fidelity: the block-device layer could not snapshot {} as {}: {why}",
                snapshot.volume_id, snapshot.id
            );
            let _ = self
                .moto_call(
                    "DeleteSnapshot",
                    &[("SnapshotId", &snapshot.id)],
                    authorization,
                )
                .await;
            return Err(internal_error());
        }
        self.lock().snapshots.insert(
            snapshot.id.clone(),
            (Instant::now(), self.settings.snapshot_duration),
        );
        let mut edits = XmlEdits::new();
        edits.set_path_text(doc.root_element(), &["status"], "pending");
        edits.set_path_text(doc.root_element(), &["progress"], "0%");
        Ok((status, edits.apply(&body)))
    }

    async fn delete_volume(
        self: &Arc<Self>,
        params: &Params,
        authorization: Option<&str>,
    ) -> Reply {
        let volume_id = required(params, "VolumeId")?;
        let _guard = self.mutations.lock().await;
        let holder = self.lock().volumes.get(volume_id).map(|p| match p {
            VolumePhase::Attaching { instance, .. }
            | VolumePhase::Detaching { instance, .. }
            | VolumePhase::Busy { instance, .. }
            | VolumePhase::Held { instance, .. } => instance.clone(),
        });
        if let Some(instance) = holder {
            // nixops-aws#104 shows EC2's wording.
            return Err(Ec2Error::new(
                "VolumeInUse",
                format!("Volume {volume_id} is currently attached to {instance}"),
            ));
        }
        let reply = self.forward(params, authorization).await?;
        if reply.0 < 400 {
            self.lock().creating.remove(volume_id);
        }
        Ok(reply)
    }

    // -----------------------------------------------------------------------------------------
    // Describe
    // -----------------------------------------------------------------------------------------

    async fn describe_volumes(&self, params: &Params, authorization: Option<&str>) -> Reply {
        // Tag filters too: moto reads their values with Python's fnmatch, which has no
        // backslash escapes (EC2's `\*` for a literal `*`) and has `[...]` classes EC2 has not.
        let (ours, forwarded) = split_filters_by(params, |name| {
            matches!(name, "status" | "attachment.status") || name.starts_with("tag:")
        });
        let (status, body) = self.forward(&forwarded, authorization).await?;
        if status >= 400 {
            return Ok((status, body));
        }
        let doc =
            roxmltree::Document::parse(&body).map_err(|e| unreadable("DescribeVolumes", e))?;
        let now = Instant::now();
        let state = self.lock();
        let mut edits = XmlEdits::new();
        for item in items(doc.root_element(), &["volumeSet"]) {
            let id = child_text(item, "volumeId").unwrap_or("");
            let view = state.volume_view(id, now);
            let status = view
                .status
                .unwrap_or(child_text(item, "status").unwrap_or(""));
            if let Some(s) = view.status {
                edits.set_path_text(item, &["status"], s);
            }
            let mut attachment_states = Vec::new();
            for a in items(item, &["attachmentSet"]) {
                let s = view
                    .attachment
                    .unwrap_or(child_text(a, "status").unwrap_or(""));
                if let Some(s) = view.attachment {
                    edits.set_path_text(a, &["status"], s);
                }
                attachment_states.push(s);
            }
            let tags: Vec<(&str, &str)> = items(item, &["tagSet"])
                .into_iter()
                .map(|t| {
                    (
                        child_text(t, "key").unwrap_or(""),
                        child_text(t, "value").unwrap_or(""),
                    )
                })
                .collect();
            let keep = ours.iter().all(|f| match f.name.as_str() {
                "status" => f.matches(status),
                "attachment.status" => attachment_states.iter().any(|s| f.matches(s)),
                name => {
                    let key = name.trim_start_matches("tag:");
                    tags.iter().any(|(k, v)| *k == key && f.matches(v))
                }
            });
            if !keep {
                edits.remove(item);
            }
        }
        Ok((status, edits.apply(&body)))
    }

    async fn describe_instances(&self, params: &Params, authorization: Option<&str>) -> Reply {
        let (ours, forwarded) =
            split_filters(params, &["instance-state-name", "instance-state-code"]);
        let (status, body) = self.forward(&forwarded, authorization).await?;
        if status >= 400 {
            return Ok((status, body));
        }
        let doc =
            roxmltree::Document::parse(&body).map_err(|e| unreadable("DescribeInstances", e))?;
        let now = Instant::now();
        let state = self.lock();
        let mut edits = XmlEdits::new();
        for reservation in items(doc.root_element(), &["reservationSet"]) {
            let instances = items(reservation, &["instancesSet"]);
            let mut kept = 0;
            let mut removed = Vec::new();
            for instance in &instances {
                let id = child_text(*instance, "instanceId").unwrap_or("");
                let (name, code) = match state.instance_view(id, now) {
                    Some((name, code)) => {
                        edits.set_path_text(*instance, &["instanceState", "name"], name);
                        edits.set_path_text(
                            *instance,
                            &["instanceState", "code"],
                            &code.to_string(),
                        );
                        (name.to_string(), code.to_string())
                    }
                    None => (
                        path_text(*instance, &["instanceState", "name"])
                            .unwrap_or("")
                            .to_string(),
                        path_text(*instance, &["instanceState", "code"])
                            .unwrap_or("")
                            .to_string(),
                    ),
                };
                for mapping in items(*instance, &["blockDeviceMapping"]) {
                    let volume = path_text(mapping, &["ebs", "volumeId"]).unwrap_or("");
                    if let Some(s) = state.volume_view(volume, now).attachment {
                        edits.set_path_text(mapping, &["ebs", "status"], s);
                    }
                }
                let keep = ours.iter().all(|f| match f.name.as_str() {
                    "instance-state-name" => f.matches(&name),
                    _ => f.matches(&code),
                });
                if keep {
                    kept += 1;
                } else {
                    removed.push(*instance);
                }
            }
            if kept == 0 && !instances.is_empty() {
                edits.remove(reservation);
            } else {
                for instance in removed {
                    edits.remove(instance);
                }
            }
        }
        Ok((status, edits.apply(&body)))
    }

    async fn describe_snapshots(&self, params: &Params, authorization: Option<&str>) -> Reply {
        let (ours, mut forwarded) = split_filters(params, &["status", "progress"]);
        // moto ignores Owner and lists the snapshots behind its public AMIs too; EC2 filters.
        let owners = params.list("Owner");
        forwarded.remove_members("Owner");
        let (status, body) = self.forward(&forwarded, authorization).await?;
        if status >= 400 {
            return Ok((status, body));
        }
        let doc =
            roxmltree::Document::parse(&body).map_err(|e| unreadable("DescribeSnapshots", e))?;
        let now = Instant::now();
        let state = self.lock();
        let account = &self.settings.account_id;
        let mut edits = XmlEdits::new();
        for item in items(doc.root_element(), &["snapshotSet"]) {
            let id = child_text(item, "snapshotId").unwrap_or("");
            let owner = child_text(item, "ownerId").unwrap_or("");
            let owner_ok = owners.is_empty()
                || owners.iter().any(|o| match o.as_str() {
                    "self" => owner == account,
                    "amazon" | "aws-marketplace" => owner != account,
                    other => owner == other,
                });
            let (status, progress) = match state.snapshot_progress(id, now) {
                Some(percent) => {
                    let progress = format!("{percent}%");
                    edits.set_path_text(item, &["status"], "pending");
                    edits.set_path_text(item, &["progress"], &progress);
                    ("pending".to_string(), progress)
                }
                None => (
                    child_text(item, "status").unwrap_or("").to_string(),
                    child_text(item, "progress").unwrap_or("").to_string(),
                ),
            };
            let keep = owner_ok
                && ours.iter().all(|f| match f.name.as_str() {
                    "status" => f.matches(&status),
                    _ => f.matches(&progress),
                });
            if !keep {
                edits.remove(item);
            }
        }
        Ok((status, edits.apply(&body)))
    }
}

impl State {
    /// Closes the open attachment of `volume` to `instance`, now.
    fn end_attachment(&mut self, volume: &str, instance: &str, how: AttachmentEnd) {
        let now = Instant::now();
        for a in self
            .attachments
            .iter_mut()
            .filter(|a| a.until.is_none() && a.volume == volume && a.instance == instance)
        {
            a.until = Some(now);
            a.ended_by = Some(how);
        }
    }

    /// Closes every open attachment of `instance`, now.
    fn end_attachments_of(&mut self, instance: &str, how: AttachmentEnd) {
        let now = Instant::now();
        for a in self
            .attachments
            .iter_mut()
            .filter(|a| a.until.is_none() && a.instance == instance)
        {
            a.until = Some(now);
            a.ended_by = Some(how);
        }
    }

    /// The state and code DescribeInstances shows for an instance being terminated.
    fn instance_view(&self, instance_id: &str, now: Instant) -> Option<(&'static str, u32)> {
        let t = self.terminations.get(instance_id)?;
        Some(if now < t.shutting_down_until {
            ("shutting-down", 32)
        } else {
            ("terminated", 48)
        })
    }

    fn volume_view(&self, volume_id: &str, now: Instant) -> VolumeView {
        if self.creating.get(volume_id).is_some_and(|t| *t > now) {
            return VolumeView {
                status: Some("creating"),
                attachment: None,
            };
        }
        let attachment = match self.volumes.get(volume_id) {
            None => None,
            Some(VolumePhase::Attaching { .. }) => Some("attaching"),
            Some(VolumePhase::Detaching { .. }) => Some("detaching"),
            Some(VolumePhase::Busy { .. }) => Some("busy"),
            // While the instance shuts down its volumes are still attached; once it is
            // terminated EC2 "gradually disassociates" them (EC2 user guide, "Terminate your
            // instance"), which DescribeVolumes shows as `detaching` until they are available.
            Some(VolumePhase::Held { instance, .. }) => match self.instance_view(instance, now) {
                Some(("shutting-down", _)) => Some("attached"),
                _ => Some("detaching"),
            },
        };
        VolumeView {
            status: attachment.map(|_| "in-use"),
            attachment,
        }
    }

    /// The progress (0..=99) of a snapshot still pending, `None` once completed.
    fn snapshot_progress(&self, snapshot_id: &str, now: Instant) -> Option<u32> {
        let (started, duration) = self.snapshots.get(snapshot_id)?;
        let elapsed = now.saturating_duration_since(*started);
        if elapsed >= *duration {
            return None;
        }
        let percent = (elapsed.as_secs_f64() / duration.as_secs_f64() * 100.0) as u32;
        Some(percent.min(99))
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn required<'a>(params: &'a Params, key: &str) -> Result<&'a str, Ec2Error> {
    params
        .get(key)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| missing(key))
}

fn missing(key: &str) -> Ec2Error {
    Ec2Error::new(
        "MissingParameter",
        format!("The request must contain the parameter {key}"),
    )
}

fn volume_not_found(volume_id: &str) -> Ec2Error {
    // kubernetes-sigs/aws-ebs-csi-driver#1343.
    Ec2Error::new(
        "InvalidVolume.NotFound",
        format!("The volume '{volume_id}' does not exist."),
    )
}

fn internal_error() -> Ec2Error {
    Ec2Error::new("InternalError", "An internal error has occurred")
}

fn unreadable(action: &str, detail: impl std::fmt::Display) -> Ec2Error {
    eprintln!("spotworld fidelity: unreadable {action} answer from moto: {detail}");
    internal_error()
}

/// Splits the filters named in `ours` (which depend on state only this layer knows) from the
/// rest, which moto applies; returns them and the request to forward without them.
fn split_filters(params: &Params, ours: &[&str]) -> (Vec<Filter>, Params) {
    split_filters_by(params, |name| ours.contains(&name))
}

/// The filters whose name `ours` says the layer applies itself, and the request without them.
fn split_filters_by(params: &Params, ours: impl Fn(&str) -> bool) -> (Vec<Filter>, Params) {
    let (mine, theirs): (Vec<Filter>, Vec<Filter>) =
        params.filters().into_iter().partition(|f| ours(&f.name));
    let mut forwarded = params.clone();
    forwarded.set_filters(&theirs);
    (mine, forwarded)
}

/// `/dev/sd[b-z]`, `/dev/xvd[b-z]`, optionally a second letter or a partition number, as EC2
/// accepts for EBS on Linux.
fn valid_device_name(device: &str) -> bool {
    let rest = device
        .strip_prefix("/dev/sd")
        .or_else(|| device.strip_prefix("/dev/xvd"));
    let Some(rest) = rest else { return false };
    let letters = rest.chars().take_while(|c| c.is_ascii_lowercase()).count();
    let digits = &rest[letters..];
    (1..=2).contains(&letters) && digits.chars().all(|c| c.is_ascii_digit()) && digits.len() <= 2
}

/// The access key id and region of a SigV4 Authorization header
/// (`... Credential=AKID/20260101/us-east-1/ec2/aws4_request, ...`).
fn credential_scope(authorization: Option<&str>) -> (String, String) {
    let scope = authorization
        .and_then(|a| a.split("Credential=").nth(1))
        .and_then(|c| c.split([',', ' ']).next())
        .unwrap_or("");
    let mut parts = scope.split('/');
    let access_key = parts.next().filter(|s| !s.is_empty()).unwrap_or("unknown");
    let region = parts
        .nth(1)
        .filter(|s| !s.is_empty())
        .unwrap_or("us-east-1");
    (access_key.to_string(), region.to_string())
}

fn detach_response(
    request_id: &str,
    volume_id: &str,
    instance_id: &str,
    device: &str,
    status: &str,
    attach_time: Option<&str>,
) -> String {
    let attach_time = attach_time
        .map(str::to_string)
        .unwrap_or_else(|| format_time(SystemTime::now(), true));
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DetachVolumeResponse xmlns=\"{EC2_XMLNS}\">\
         <requestId>{}</requestId><volumeId>{}</volumeId><instanceId>{}</instanceId>\
         <device>{}</device><status>{}</status><attachTime>{}</attachTime></DetachVolumeResponse>",
        xml_escape(request_id),
        xml_escape(volume_id),
        xml_escape(instance_id),
        xml_escape(device),
        xml_escape(status),
        xml_escape(&attach_time)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        for ok in [
            "/dev/sdf",
            "/dev/xvdf",
            "/dev/sdba",
            "/dev/sda1",
            "/dev/xvdbb",
        ] {
            assert!(valid_device_name(ok), "{ok}");
        }
        for bad in [
            "/dev/foo",
            "sdf",
            "/dev/sd",
            "/dev/nvme1n1",
            "/dev/sdF",
            "/dev/sdabc",
        ] {
            assert!(!valid_device_name(bad), "{bad}");
        }
    }

    #[test]
    fn credential_scope_of_sigv4_headers() {
        assert_eq!(
            credential_scope(Some(
                "AWS4-HMAC-SHA256 Credential=ASIAXYZ/20260101/eu-west-1/ec2/aws4_request, SignedHeaders=host, Signature=00"
            )),
            ("ASIAXYZ".to_string(), "eu-west-1".to_string())
        );
        assert_eq!(
            credential_scope(None),
            ("unknown".to_string(), "us-east-1".to_string())
        );
    }

    #[test]
    fn snapshot_progress_rises_then_completes() {
        let mut state = State::default();
        let start = Instant::now();
        state
            .snapshots
            .insert("snap-1".into(), (start, Duration::from_secs(4)));
        assert_eq!(state.snapshot_progress("snap-1", start), Some(0));
        assert_eq!(
            state.snapshot_progress("snap-1", start + Duration::from_secs(1)),
            Some(25)
        );
        assert_eq!(
            state.snapshot_progress("snap-1", start + Duration::from_secs(4)),
            None
        );
        assert_eq!(state.snapshot_progress("snap-unknown", start), None);
    }

    #[test]
    fn held_volume_is_attached_while_shutting_down_then_detaching() {
        let mut state = State::default();
        let now = Instant::now();
        state.terminations.insert(
            "i-1".into(),
            Termination {
                shutting_down_until: now + Duration::from_secs(3),
                release_at: now + Duration::from_secs(20),
            },
        );
        state.volumes.insert(
            "vol-1".into(),
            VolumePhase::Held {
                instance: "i-1".into(),
                device: "/dev/sdf".into(),
            },
        );
        let early = state.volume_view("vol-1", now);
        assert_eq!(
            (early.status, early.attachment),
            (Some("in-use"), Some("attached"))
        );
        let late = state.volume_view("vol-1", now + Duration::from_secs(5));
        assert_eq!(
            (late.status, late.attachment),
            (Some("in-use"), Some("detaching"))
        );
        assert_eq!(state.instance_view("i-1", now), Some(("shutting-down", 32)));
        assert_eq!(
            state.instance_view("i-1", now + Duration::from_secs(5)),
            Some(("terminated", 48))
        );
    }
}

#[cfg(test)]
mod skew_tests {
    use super::*;

    #[test]
    fn amz_dates_parse_and_skew_is_measured() {
        let t = parse_amz_date("20261126T120000Z").unwrap();
        assert_eq!(
            t,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_694_400)
        );
        assert_eq!(parse_amz_date("2026-11-26T12:00:00Z"), None);
        let hours_ago = SystemTime::now() - Duration::from_secs(3 * 3600);
        assert!(clock_skew(hours_ago) > MAX_CLOCK_SKEW);
        assert!(clock_skew(SystemTime::now()) < Duration::from_secs(1));
    }
}
