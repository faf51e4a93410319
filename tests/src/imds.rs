//! An IMDSv2 mock, one per simulated instance.
//!
//! Only IMDSv2: `PUT /latest/api/token` with `x-aws-ec2-metadata-token-ttl-seconds` (1..=21600)
//! gives a token and echoes the TTL header (aws-config refuses a token answer without it); every
//! GET needs a valid, unexpired `x-aws-ec2-metadata-token` or gets 401. A token request carrying
//! `X-Forwarded-For` gets 403, as on EC2 (the header marks a request that went through a proxy).
//!
//! What aws-config 1.13's `ImdsCredentialsProvider` requests (src/imds/credentials.rs): `GET
//! /latest/meta-data/iam/security-credentials/` for the role name (404 = "no role"), then `GET
//! /latest/meta-data/iam/security-credentials/<role>`; no `-extended` path. Its client
//! (src/imds/client.rs) retries 5xx and 401, not 400/403/404, and refreshes its token 120 s
//! before the TTL the token answer announced.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hyper::Request;
use serde_json::json;

use crate::moto::{TEST_IMAGE_ID, TEST_INSTANCE_TYPE};
use crate::query::{
    format_time, http_response, random_token, serve_loopback, HttpResponse, DEFAULT_ACCOUNT_ID,
};

/// The longest token TTL IMDS grants (6 hours).
pub const MAX_TOKEN_TTL_SECS: u64 = 21_600;
/// The role the mock's instances have.
pub const DEFAULT_ROLE_NAME: &str = "spotinit-test-role";

const TOKEN_PATH: &str = "/latest/api/token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Role credentials are valid this long after each request (EC2 rotates them well before).
const CREDENTIALS_VALIDITY: Duration = Duration::from_secs(6 * 3600);

/// Who the instance is: what its identity document and meta-data say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub instance_id: String,
    pub region: String,
    pub zone: String,
    pub account_id: String,
    pub image_id: String,
    pub instance_type: String,
    pub private_ip: String,
    pub local_hostname: String,
}

impl Identity {
    /// An identity for `instance_id` in `zone`, the rest as the test instances have it: the
    /// region is the zone without its letter, the private IP QEMU's user network gives the
    /// guest (10.0.2.15).
    pub fn new(instance_id: &str, zone: &str) -> Identity {
        let region = zone.trim_end_matches(|c: char| c.is_ascii_lowercase());
        let private_ip = "10.0.2.15";
        Identity {
            instance_id: instance_id.to_string(),
            region: region.to_string(),
            zone: zone.to_string(),
            account_id: DEFAULT_ACCOUNT_ID.to_string(),
            image_id: TEST_IMAGE_ID.to_string(),
            instance_type: TEST_INSTANCE_TYPE.to_string(),
            private_ip: private_ip.to_string(),
            local_hostname: format!("ip-{}.ec2.internal", private_ip.replace('.', "-")),
        }
    }
}

/// The instance role's temporary credentials, as the mock hands them out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleCredentials {
    pub role_name: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
}

struct State {
    identity: Identity,
    pending_time: SystemTime,
    user_data: Option<String>,
    spot_notice: Option<(String, SystemTime)>,
    rebalance: Option<SystemTime>,
    /// (event id, code, description, not before, state).
    scheduled_events: Vec<(String, String, String, SystemTime, String)>,
    public_keys: Vec<(String, String)>,
    role: Option<RoleCredentials>,
    failures_left: usize,
    max_token_ttl: u64,
    tokens: HashMap<String, Instant>,
    requests: HashMap<String, usize>,
}

/// An IMDSv2 endpoint for one instance on 127.0.0.1; stops when dropped.
pub struct ImdsMock {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl ImdsMock {
    /// Serves `identity` (and `user_data`, if any) on a free loopback port. The instance has
    /// the role [`DEFAULT_ROLE_NAME`] with credentials of its own.
    pub async fn start(identity: Identity, user_data: Option<String>) -> std::io::Result<ImdsMock> {
        let role = Some(RoleCredentials {
            role_name: DEFAULT_ROLE_NAME.to_string(),
            access_key_id: format!("ASIA{}", random_token(16).to_uppercase()),
            secret_access_key: random_token(40),
            token: format!("IQoJb3JpZ2luX2VjE{}", random_token(120)),
        });
        let state = Arc::new(Mutex::new(State {
            identity,
            pending_time: SystemTime::now(),
            user_data,
            spot_notice: None,
            rebalance: None,
            scheduled_events: Vec::new(),
            public_keys: Vec::new(),
            role,
            failures_left: 0,
            max_token_ttl: MAX_TOKEN_TTL_SECS,
            tokens: HashMap::new(),
            requests: HashMap::new(),
        }));
        let handler_state = state.clone();
        let (addr, server) = serve_loopback(move |req| {
            let response = handle(&handler_state, req);
            async move { response }
        })
        .await?;
        Ok(ImdsMock {
            addr,
            state,
            server,
        })
    }

    /// `http://127.0.0.1:PORT` (for `AWS_EC2_METADATA_SERVICE_ENDPOINT` or a guest forward).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Posts a spot interruption notice: `/latest/meta-data/spot/instance-action` answers
    /// `{"action": "<action>", "time": "<at>"}` (action `terminate`, `stop` or `hibernate`).
    pub fn post_spot_notice(&self, action: &str, at: SystemTime) {
        self.lock().spot_notice = Some((action.to_string(), at));
    }

    /// Posts a rebalance recommendation: `/latest/meta-data/events/recommendations/rebalance`
    /// answers `{"noticeTime": "<at>"}`.
    pub fn post_rebalance(&self, at: SystemTime) {
        self.lock().rebalance = Some(at);
    }

    /// Schedules an EC2 event (`instance-retirement`, `instance-stop`, `system-reboot`, ...):
    /// `/latest/meta-data/events/maintenance/scheduled` lists it as active. Returns its id.
    pub fn post_scheduled_event(
        &self,
        code: &str,
        description: &str,
        not_before: SystemTime,
    ) -> String {
        let id = format!("instance-event-{}", random_token(17).to_lowercase());
        self.lock().scheduled_events.push((
            id.clone(),
            code.to_string(),
            description.to_string(),
            not_before,
            "active".to_string(),
        ));
        id
    }

    /// Withdraws the spot notice and the rebalance recommendation (both 404 again).
    pub fn clear_notices(&self) {
        let mut state = self.lock();
        state.spot_notice = None;
        state.rebalance = None;
    }

    /// Sets (or, with `None`, removes: 404) the user data.
    pub fn set_user_data(&self, user_data: Option<String>) {
        self.lock().user_data = user_data;
    }

    /// Adds a public key (as `public-keys/N=name`), or replaces the key of that name.
    pub fn set_public_key(&self, name: &str, key: &str) {
        let mut state = self.lock();
        match state.public_keys.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = key.to_string(),
            None => state.public_keys.push((name.to_string(), key.to_string())),
        }
    }

    /// Gives the instance the role `name` (fresh credentials), or no role (`None`: the
    /// security-credentials listing answers 404, as for an instance without a profile).
    pub fn set_role(&self, name: Option<&str>) {
        self.lock().role = name.map(|name| RoleCredentials {
            role_name: name.to_string(),
            access_key_id: format!("ASIA{}", random_token(16).to_uppercase()),
            secret_access_key: random_token(40),
            token: format!("IQoJb3JpZ2luX2VjE{}", random_token(120)),
        });
    }

    /// The credentials the role currently hands out (`None` without a role).
    pub fn credentials(&self) -> Option<RoleCredentials> {
        self.lock().role.clone()
    }

    /// The next `n` requests (of any kind) get HTTP 500.
    pub fn fail_next(&self, n: usize) {
        self.lock().failures_left = n;
    }

    /// Caps the TTL granted to new tokens (and announced in the answer), so a test can make
    /// clients refresh their token. Real IMDS grants what is asked, up to 21600.
    pub fn set_max_token_ttl(&self, secs: u64) {
        self.lock().max_token_ttl = secs.clamp(1, MAX_TOKEN_TTL_SECS);
    }

    /// How many requests (any method, any outcome) came for `path` (query string excluded).
    pub fn requests(&self, path: &str) -> usize {
        self.lock().requests.get(path).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ImdsMock {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn text(status: u16, body: impl Into<Bytes>) -> HttpResponse {
    http_response(
        status,
        &[("content-type", "text/plain"), ("server", "EC2ws")],
        body,
    )
}

fn not_found() -> HttpResponse {
    text(404, NOT_FOUND_PAGE)
}

// The body real IMDS sends with a 404.
const NOT_FOUND_PAGE: &str = "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n\
<!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\
\t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n\
<html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n\
 <head>\n  <title>404 - Not Found</title>\n </head>\n <body>\n  <h1>404 - Not Found</h1>\n </body>\n</html>\n";

fn handle(state: &Mutex<State>, req: Request<Bytes>) -> HttpResponse {
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    let path = req.uri().path().to_string();
    *state.requests.entry(path.clone()).or_insert(0) += 1;
    if state.failures_left > 0 {
        state.failures_left -= 1;
        return text(500, "Internal Server Error");
    }
    let now = Instant::now();
    state.tokens.retain(|_, expiry| *expiry > now);

    if path == TOKEN_PATH {
        if req.method() != hyper::Method::PUT {
            return text(405, "Method Not Allowed");
        }
        if req.headers().contains_key("x-forwarded-for") {
            return text(403, "Forbidden");
        }
        let requested = req
            .headers()
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let ttl = match requested {
            Some(ttl @ 1..=MAX_TOKEN_TTL_SECS) => ttl.min(state.max_token_ttl),
            _ => return text(400, "Bad Request"),
        };
        let token = format!("AQAEA{}==", random_token(51));
        state
            .tokens
            .insert(token.clone(), now + Duration::from_secs(ttl));
        return http_response(
            200,
            &[
                ("content-type", "text/plain"),
                ("server", "EC2ws"),
                (TTL_HEADER, &ttl.to_string()),
            ],
            token,
        );
    }

    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(405, "Method Not Allowed");
    }
    let token_valid = req
        .headers()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| state.tokens.contains_key(t));
    if !token_valid {
        return text(401, "Unauthorized");
    }
    match answer(&state, &path) {
        Some(body) => text(200, body),
        None => not_found(),
    }
}

/// The body for a GET of `path`, or `None` for 404.
fn answer(state: &State, path: &str) -> Option<String> {
    let id = &state.identity;
    let meta = |rest: &str| format!("/latest/meta-data/{rest}");
    let body = match path {
        "/latest/dynamic/instance-identity/document" => identity_document(state),
        "/latest/user-data" => state.user_data.clone()?,
        "/latest/meta-data" | "/latest/meta-data/" => {
            let mut entries = vec![
                "ami-id",
                "events/",
                "hostname",
                "iam/",
                "instance-id",
                "instance-type",
                "local-hostname",
                "local-ipv4",
                "placement/",
            ];
            if !state.public_keys.is_empty() {
                entries.push("public-keys/");
            }
            if state.spot_notice.is_some() {
                entries.push("spot/");
            }
            entries.join("\n")
        }
        p if p == meta("instance-id") => id.instance_id.clone(),
        p if p == meta("ami-id") => id.image_id.clone(),
        p if p == meta("instance-type") => id.instance_type.clone(),
        p if p == meta("local-hostname") || p == meta("hostname") => id.local_hostname.clone(),
        p if p == meta("local-ipv4") => id.private_ip.clone(),
        p if p == meta("placement/") => "availability-zone\nregion".to_string(),
        p if p == meta("placement/availability-zone") => id.zone.clone(),
        p if p == meta("placement/region") => id.region.clone(),
        p if p == meta("spot/") => {
            state.spot_notice.as_ref()?;
            "instance-action\ntermination-time".to_string()
        }
        p if p == meta("spot/instance-action") => {
            let (action, at) = state.spot_notice.as_ref()?;
            // EC2's own formatting, spaces included.
            format!(
                "{{\"action\": \"{action}\", \"time\": \"{}\"}}",
                format_time(*at, false)
            )
        }
        // The older path: only for terminations.
        p if p == meta("spot/termination-time") => match state.spot_notice.as_ref()? {
            (action, at) if action == "terminate" => format_time(*at, false),
            _ => return None,
        },
        p if p == meta("events/") => "maintenance/\nrecommendations/".to_string(),
        p if p == meta("events/maintenance/") => "history\nscheduled".to_string(),
        // As the EC2 user guide shows it: pretty-printed, times as "21 Jan 2019 09:00:43 GMT",
        // `[]` when nothing is scheduled.
        p if p == meta("events/maintenance/scheduled") => {
            let items: Vec<String> = state
                .scheduled_events
                .iter()
                .map(|(id, code, description, at, event_state)| {
                    let end = *at + std::time::Duration::from_secs(3600);
                    format!(
                        "{{\n  \"NotBefore\" : \"{}\",\n  \"Code\" : \"{code}\",\n  \"Description\" : {},\n  \"EventId\" : \"{id}\",\n  \"NotAfter\" : \"{}\",\n  \"State\" : \"{event_state}\"\n}}",
                        event_time(*at),
                        serde_json::Value::String(description.clone()),
                        event_time(end)
                    )
                })
                .collect();
            format!("[ {} ]", items.join(", "))
        }
        p if p == meta("events/recommendations/") => "rebalance".to_string(),
        p if p == meta("events/recommendations/rebalance") => format!(
            "{{\"noticeTime\": \"{}\"}}",
            format_time(state.rebalance?, false)
        ),
        p if p == meta("iam/") => {
            state.role.as_ref()?;
            "info\nsecurity-credentials/".to_string()
        }
        p if p == meta("iam/info") => {
            let role = state.role.as_ref()?;
            serde_json::to_string_pretty(&json!({
                "Code": "Success",
                "LastUpdated": format_time(SystemTime::now(), false),
                "InstanceProfileArn": format!(
                    "arn:aws:iam::{}:instance-profile/{}", id.account_id, role.role_name),
                "InstanceProfileId": "AIPAQ3EGTESTPROFILE01",
            }))
            .expect("JSON of strings")
        }
        p if p == meta("iam/security-credentials/") || p == meta("iam/security-credentials") => {
            state.role.as_ref()?.role_name.clone()
        }
        p if p.starts_with(&meta("iam/security-credentials/")) => {
            let role = state.role.as_ref()?;
            if p[meta("iam/security-credentials/").len()..] != role.role_name {
                return None;
            }
            let now = SystemTime::now();
            serde_json::to_string_pretty(&json!({
                "Code": "Success",
                "LastUpdated": format_time(now, false),
                "Type": "AWS-HMAC",
                "AccessKeyId": role.access_key_id,
                "SecretAccessKey": role.secret_access_key,
                "Token": role.token,
                "Expiration": format_time(now + CREDENTIALS_VALIDITY, false),
            }))
            .expect("JSON of strings")
        }
        p if p == meta("public-keys/") || p == meta("public-keys") => {
            if state.public_keys.is_empty() {
                return None;
            }
            state
                .public_keys
                .iter()
                .enumerate()
                .map(|(i, (name, _))| format!("{i}={name}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        p if p.starts_with(&meta("public-keys/")) => {
            let rest = &p[meta("public-keys/").len()..];
            let (index, leaf) = rest.split_once('/').unwrap_or((rest, ""));
            let (_, key) = state.public_keys.get(index.parse::<usize>().ok()?)?;
            match leaf {
                "" => "openssh-key".to_string(),
                "openssh-key" => key.clone(),
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(body)
}

fn identity_document(state: &State) -> String {
    let id = &state.identity;
    // The fields EC2 writes (serde_json sorts them; EC2's order is nearly alphabetical too).
    let doc = json!({
        "accountId": id.account_id,
        "architecture": "x86_64",
        "availabilityZone": id.zone,
        "billingProducts": null,
        "devpayProductCodes": null,
        "marketplaceProductCodes": null,
        "imageId": id.image_id,
        "instanceId": id.instance_id,
        "instanceType": id.instance_type,
        "kernelId": null,
        "pendingTime": format_time(state.pending_time, false),
        "privateIp": id.private_ip,
        "ramdiskId": null,
        "region": id.region,
        "version": "2017-09-30",
    });
    serde_json::to_string_pretty(&doc).expect("JSON of strings")
}

/// IMDS's event time: "21 Jan 2019 09:00:43 GMT".
fn event_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // format_time gives "2019-01-21T09:00:43Z".
    let iso = format_time(t, false);
    let month: usize = iso[5..7].parse().unwrap_or(1);
    let day: u32 = iso[8..10].parse().unwrap_or(1);
    format!(
        "{day} {} {} {} GMT",
        MONTHS[month.clamp(1, 12) - 1],
        &iso[0..4],
        &iso[11..19]
    )
}
