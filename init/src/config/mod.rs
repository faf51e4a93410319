//! Configuration: one TOML schema, three sources. In order of precedence:
//! 1. the kernel command line, `spotinit.<dotted.key>=<value>` (tests and images set these);
//! 2. EC2 user data (TOML), fetched over IMDSv2;
//! 3. an optional file baked into the image, `/etc/spotinit/config.toml`;
//!
//! and built-in defaults for everything else. Every error names its source, the key and, for
//! TOML text, the line, and says what is expected. Unknown keys are errors: a typo must not
//! silently fall back to a default that could, say, create a second volume.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

pub const IMAGE_CONFIG: &str = "/etc/spotinit/config.toml";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// IMDS base URL; normally from the kernel command line of test images only.
    pub imds_endpoint: Option<String>,
    /// Hostname; default: the first label of the instance's `local-hostname` from IMDS.
    pub hostname: Option<String>,
    pub network: Network,
    pub aws: Aws,
    pub volume: Volume,
    pub docker: Docker,
    pub failure: Failure,
    pub spot: Spot,
    pub snapshots: Snapshots,
    pub address: Address,
    pub time: Time,
    pub ssh: Ssh,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// Interface to configure with DHCP; default: the first non-loopback device.
    pub interface: Option<String>,
    pub dhcp_timeout_secs: u64,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            interface: None,
            dhcp_timeout_secs: 60,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Aws {
    /// EC2 API endpoint override (private endpoints, tests). `AWS_ENDPOINT_URL_EC2` works too.
    pub ec2_endpoint: Option<String>,
    /// Region override; default: the instance's region from IMDS.
    pub region: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeMode {
    /// The volume holds /var/lib/docker and /var/lib/containerd.
    Docker,
    /// The volume holds a whole root filesystem; spotinit pivots into it.
    PersistedRoot,
    /// No volume: Docker's state is on tmpfs and dies with the instance (tests, stateless hosts).
    None,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Volume {
    pub mode: VolumeMode,
    /// Use exactly this volume (`vol-...`); `tags` are then only used when creating.
    pub id: Option<String>,
    /// Find the volume by these tags (all must match) in this region.
    pub tags: BTreeMap<String, String>,
    /// Create the volume when none matches.
    pub create: bool,
    pub size_gib: u32,
    #[serde(rename = "type")]
    pub volume_type: String,
    pub iops: Option<u32>,
    pub throughput_mibps: Option<u32>,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    /// The device name given to AttachVolume (what Xen instances show it as).
    pub device: String,
    /// ext4 label of a filesystem spotinit creates.
    pub label: String,
    /// Found in another zone: snapshot it and continue with a copy in this zone.
    pub follow_across_zones: bool,
    /// After following across zones, delete the old volume (default: keep it, tagged superseded).
    pub delete_superseded: bool,
    pub attach_timeout_secs: u64,
    /// How long to wait for EC2 to release a volume held by a stopped or terminated instance.
    pub release_wait_secs: u64,
    /// When that wait ends, force-detach (the filesystem then gets a full check).
    pub force_detach: bool,
    /// How long to wait for the attached volume's block device to appear.
    pub device_timeout_secs: u64,
    pub snapshot_timeout_secs: u64,
    /// persisted-root mode: exec this init of the persisted root instead of continuing the
    /// boot there (e.g. "/sbin/init" of a full distribution).
    pub root_init: Option<String>,
}

impl Default for Volume {
    fn default() -> Self {
        Volume {
            mode: VolumeMode::Docker,
            id: None,
            tags: BTreeMap::from([("Name".to_string(), "spotinit-state".to_string())]),
            create: true,
            size_gib: 20,
            volume_type: "gp3".into(),
            iops: None,
            throughput_mibps: None,
            encrypted: true,
            kms_key_id: None,
            device: "/dev/sdf".into(),
            label: "spotinit-state".into(),
            follow_across_zones: true,
            delete_superseded: false,
            attach_timeout_secs: 120,
            release_wait_secs: 600,
            force_detach: false,
            device_timeout_secs: 60,
            snapshot_timeout_secs: 3600,
            root_init: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Docker {
    /// Start containerd and dockerd (off: spotinit only provides the volume).
    pub enabled: bool,
    pub storage_driver: String,
    /// Extra daemon.json keys, passed through as given.
    pub daemon: toml::Table,
    /// How long containers get to stop at shutdown (dockerd's shutdown-timeout).
    pub stop_timeout_secs: u64,
    /// How long to wait for containerd's socket and dockerd's /_ping at boot.
    pub start_timeout_secs: u64,
    /// Keep containers on Docker's networks away from IMDS (the instance role's credentials).
    pub block_imds: bool,
}

impl Default for Docker {
    fn default() -> Self {
        Docker {
            enabled: true,
            storage_driver: "overlay2".into(),
            daemon: toml::Table::new(),
            stop_timeout_secs: 60,
            start_timeout_secs: 120,
            block_imds: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureAction {
    /// Power off, so a spot request or Auto Scaling group launches a replacement.
    Poweroff,
    Reboot,
    /// Stay up without Docker, for debugging on the console.
    Stay,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Failure {
    /// What to do when the boot cannot safely start Docker, after the retries below.
    pub action: FailureAction,
    /// Keep retrying a failure that may pass (volume held elsewhere, API errors) this long.
    pub retry_for_secs: u64,
    pub retry_interval_secs: u64,
}

impl Default for Failure {
    fn default() -> Self {
        Failure {
            action: FailureAction::Poweroff,
            retry_for_secs: 600,
            retry_interval_secs: 30,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterDrain {
    /// Wait for EC2 to take the instance (never power off early on our own).
    Wait,
    Poweroff,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Spot {
    /// Watch IMDS for the interruption notice and the rebalance recommendation.
    pub watch: bool,
    pub poll_secs: u64,
    /// On a rebalance recommendation, start a snapshot of the state volume.
    pub snapshot_on_rebalance: bool,
    pub after_drain: AfterDrain,
}

impl Default for Spot {
    fn default() -> Self {
        Spot {
            watch: true,
            poll_secs: 2,
            snapshot_on_rebalance: true,
            after_drain: AfterDrain::Wait,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Snapshots {
    /// Take a snapshot of the state volume this often; 0 = never.
    pub interval_minutes: u64,
    /// Keep this many of the snapshots spotinit made (older ones are deleted; others never).
    pub keep: u32,
}

impl Default for Snapshots {
    fn default() -> Self {
        Snapshots {
            interval_minutes: 0,
            keep: 3,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Address {
    /// Associate this Elastic IP (`eipalloc-...`) with the instance at boot.
    pub elastic_ip_allocation_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Time {
    /// NTP servers, `host` or `host:port` (`[v6]:port`). Default: the Amazon Time Sync Service.
    pub servers: Vec<String>,
    /// How long the boot waits for the first synchronisation before the first signed EC2 call.
    pub sync_timeout_secs: u64,
}

impl Default for Time {
    fn default() -> Self {
        Time {
            servers: vec!["169.254.169.123".into(), "[fd00:ec2::123]".into()],
            sync_timeout_secs: 15,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ssh {
    /// Public keys allowed to log in as root (besides the EC2 key pair's).
    pub authorized_keys: Vec<String>,
    /// Also allow the EC2 key pair the instance was launched with (from IMDS).
    pub use_key_pair: bool,
    pub port: u16,
}

impl Default for Ssh {
    fn default() -> Self {
        Ssh {
            authorized_keys: Vec::new(),
            use_key_pair: true,
            port: 22,
        }
    }
}

/// Where a piece of configuration came from, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    KernelCommandLine,
    UserData,
    ImageFile,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::KernelCommandLine => "kernel command line",
            Source::UserData => "user data",
            Source::ImageFile => IMAGE_CONFIG,
        })
    }
}

/// An invalid configuration: where, which key, what was expected.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigError {
    pub source: Source,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(l) = self.line {
            write!(f, ", line {l}")?;
        }
        if let Some(k) = &self.key {
            write!(f, ", key {k}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Configuration text as given by one source.
pub struct Text<'a> {
    pub source: Source,
    pub text: &'a str,
}

impl Config {
    /// Merges the sources (highest precedence last wins) over the defaults and validates.
    pub fn load(
        cmdline: &str,
        user_data: Option<&str>,
        image_file: Option<&str>,
    ) -> Result<Config, Vec<ConfigError>> {
        let mut merged = toml::Table::new();
        let mut errors = Vec::new();
        let texts = [
            image_file.map(|t| Text {
                source: Source::ImageFile,
                text: t,
            }),
            user_data.map(|t| Text {
                source: Source::UserData,
                text: t,
            }),
        ];
        for t in texts.into_iter().flatten() {
            match parse_text(&t) {
                Ok(table) => merge(&mut merged, table),
                Err(mut e) => errors.append(&mut e),
            }
        }
        match cmdline_table(cmdline) {
            Ok(table) => merge(&mut merged, table),
            Err(mut e) => errors.append(&mut e),
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let config: Config = match merged.clone().try_into() {
            Ok(c) => c,
            // Each text source was already checked alone, so this is a command-line value.
            Err(e) => {
                return Err(vec![ConfigError {
                    source: Source::KernelCommandLine,
                    line: None,
                    key: None,
                    message: toml_message(&e),
                }])
            }
        };
        let problems = config.problems();
        if problems.is_empty() {
            return Ok(config);
        }
        // Attribute each problem to the source that set the key, with its line if it is text.
        Err(problems
            .into_iter()
            .map(|(key, message)| {
                let (source, line) = origin(&key, cmdline, user_data, image_file);
                ConfigError {
                    source,
                    line,
                    key: Some(key),
                    message,
                }
            })
            .collect())
    }

    /// Semantic checks the schema cannot express: (dotted key, what is wrong and expected).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let v = &self.volume;
        if v.mode != VolumeMode::None {
            if let Some(id) = &v.id {
                if !is_resource_id(id, "vol") {
                    p.push((
                        "volume.id".into(),
                        format!("'{id}' is not a volume id (expected vol- followed by hex digits)"),
                    ));
                }
            } else if v.tags.is_empty() {
                p.push((
                    "volume.tags".into(),
                    "set volume.id or at least one tag to find the state volume by".into(),
                ));
            }
        }
        let types = ["gp3", "gp2", "io1", "io2", "st1", "sc1", "standard"];
        if !types.contains(&v.volume_type.as_str()) {
            p.push((
                "volume.type".into(),
                format!(
                    "'{}' is not an EBS volume type (expected one of {})",
                    v.volume_type,
                    types.join(", ")
                ),
            ));
        }
        if !(1..=65536).contains(&v.size_gib) {
            p.push((
                "volume.size_gib".into(),
                format!("{} is out of range (1 to 65536)", v.size_gib),
            ));
        }
        if v.iops.is_some() && !["gp3", "io1", "io2"].contains(&v.volume_type.as_str()) {
            p.push((
                "volume.iops".into(),
                format!(
                    "only gp3, io1 and io2 volumes take iops, not {}",
                    v.volume_type
                ),
            ));
        }
        if v.throughput_mibps.is_some() && v.volume_type != "gp3" {
            p.push((
                "volume.throughput_mibps".into(),
                format!("only gp3 volumes take a throughput, not {}", v.volume_type),
            ));
        }
        if v.kms_key_id.is_some() && !v.encrypted {
            p.push((
                "volume.kms_key_id".into(),
                "a KMS key needs volume.encrypted = true".into(),
            ));
        }
        if !is_device_name(&v.device) {
            p.push((
                "volume.device".into(),
                format!(
                    "'{}' is not a device name EC2 accepts for a data volume (e.g. /dev/sdf .. /dev/sdp, /dev/xvdf)",
                    v.device
                ),
            ));
        }
        if v.label.is_empty() || v.label.len() > 16 {
            p.push((
                "volume.label".into(),
                "an ext4 label has 1 to 16 characters".into(),
            ));
        }
        if let Some(init) = &v.root_init {
            if v.mode != VolumeMode::PersistedRoot || !init.starts_with('/') {
                p.push((
                    "volume.root_init".into(),
                    "an absolute path, and only with volume.mode = \"persisted-root\"".into(),
                ));
            }
        }
        if v.release_wait_secs < 60 {
            p.push((
                "volume.release_wait_secs".into(),
                "EC2 takes minutes to release a volume after a termination: use at least 60".into(),
            ));
        }
        let owned = [
            "data-root",
            "storage-driver",
            "containerd",
            "exec-root",
            "pidfile",
        ];
        for k in self.docker.daemon.keys() {
            if owned.contains(&k.as_str()) {
                p.push((
                    format!("docker.daemon.{k}"),
                    "spotinit sets this daemon.json key itself (use docker.storage_driver for the driver)".into(),
                ));
            }
        }
        let drivers = ["overlay2", "fuse-overlayfs", "btrfs", "zfs", "vfs"];
        if !drivers.contains(&self.docker.storage_driver.as_str()) {
            p.push((
                "docker.storage_driver".into(),
                format!(
                    "'{}' is not a storage driver Docker 20.10 has (expected one of {})",
                    self.docker.storage_driver,
                    drivers.join(", ")
                ),
            ));
        }
        if self.failure.retry_interval_secs == 0 {
            p.push((
                "failure.retry_interval_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if self.spot.poll_secs == 0 || self.spot.poll_secs > 5 {
            p.push((
                "spot.poll_secs".into(),
                "poll every 1 to 5 seconds: the notice gives two minutes at best".into(),
            ));
        }
        if let Some(a) = &self.address.elastic_ip_allocation_id {
            if !is_resource_id(a, "eipalloc") {
                p.push((
                    "address.elastic_ip_allocation_id".into(),
                    format!("'{a}' is not an allocation id (expected eipalloc-...)"),
                ));
            }
        }
        for (i, k) in self.ssh.authorized_keys.iter().enumerate() {
            let kind = k.split_whitespace().next().unwrap_or_default();
            if !(kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
            {
                p.push((
                    "ssh.authorized_keys".into(),
                    format!("entry {} is not an OpenSSH public key (expected \"ssh-ed25519 AAAA... comment\")", i + 1),
                ));
            }
        }
        if self.time.servers.is_empty() {
            p.push((
                "time.servers".into(),
                "at least one NTP server: SigV4-signed EC2 calls fail with a clock 5 minutes off"
                    .into(),
            ));
        }
        for (key, url) in [
            ("imds_endpoint", &self.imds_endpoint),
            ("aws.ec2_endpoint", &self.aws.ec2_endpoint),
        ] {
            if let Some(u) = url {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    p.push((key.into(), format!("'{u}' is not an http(s) URL")));
                }
            }
        }
        p
    }

    /// One line for the console: what this configuration will do.
    pub fn summary(&self) -> String {
        let v = &self.volume;
        let which = match (&v.mode, &v.id) {
            (VolumeMode::None, _) => return "no state volume: Docker state lives on tmpfs".into(),
            (_, Some(id)) => format!("volume {id}"),
            (_, None) => format!(
                "volume tagged {}",
                v.tags
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        let create = if v.create {
            format!(
                ", created if missing ({} GiB {}{})",
                v.size_gib,
                v.volume_type,
                if v.encrypted { ", encrypted" } else { "" }
            )
        } else {
            ", never created".into()
        };
        format!(
            "{which}{create}, mode {}, docker storage driver {}, on failure {}",
            variant_name(&v.mode),
            self.docker.storage_driver,
            variant_name(&self.failure.action)
        )
    }
}

/// The name a unit enum variant has in the TOML (`persisted-root`, `poweroff`).
pub fn variant_name<T: Serialize>(v: &T) -> String {
    toml::Value::try_from(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn is_resource_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|hex| {
            (8..=17).contains(&hex.len()) && hex.chars().all(|c| c.is_ascii_hexdigit())
        })
}

fn is_device_name(d: &str) -> bool {
    let tail = d
        .strip_prefix("/dev/sd")
        .or_else(|| d.strip_prefix("/dev/xvd"));
    matches!(tail, Some(t) if (1..=2).contains(&t.len()) && t.chars().all(|c| c.is_ascii_lowercase()) && t != "a")
}

/// Parses and checks one TOML text alone, so its errors carry its own line numbers.
fn parse_text(t: &Text<'_>) -> Result<toml::Table, Vec<ConfigError>> {
    let err = |line: Option<usize>, message: String| ConfigError {
        source: t.source,
        line,
        key: None,
        message,
    };
    let trimmed = t.text.trim_start();
    if trimmed.starts_with("#!") {
        return Err(vec![err(
            Some(1),
            "this is a shell script; spotinit reads its settings as TOML (see the configuration reference in the README)".into(),
        )]);
    }
    if trimmed.starts_with("#cloud-config") {
        return Err(vec![err(
            Some(1),
            "this is cloud-init configuration; spotinit has no cloud-init and reads TOML (see the configuration reference in the README)".into(),
        )]);
    }
    if let Err(e) = toml::from_str::<Config>(t.text) {
        let line = e.span().map(|s| line_of_offset(t.text, s.start));
        let mut message = toml_message(&e);
        if let Some(l) = line {
            if let Some(src) = t.text.lines().nth(l - 1) {
                message = format!("{message} (in: {})", src.trim());
            }
        }
        return Err(vec![err(line, message)]);
    }
    toml::from_str::<toml::Table>(t.text).map_err(|e| vec![err(None, toml_message(&e))])
}

fn toml_message(e: &toml::de::Error) -> String {
    e.message().trim().replace('\n', " ")
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Deep merge: tables merge key by key, anything else is replaced.
fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Splits a kernel command line into words, honouring double quotes as the kernel does.
pub fn cmdline_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// The `spotinit.*` keys of a kernel command line as a TOML table. A value is read as TOML
/// (numbers, booleans, arrays) when it parses as such, else as a string.
pub fn cmdline_table(cmdline: &str) -> Result<toml::Table, Vec<ConfigError>> {
    let mut table = toml::Table::new();
    let mut errors = Vec::new();
    for word in cmdline_words(cmdline) {
        let Some(rest) = word.strip_prefix("spotinit.") else {
            continue;
        };
        let (key, raw) = rest.split_once('=').unwrap_or((rest, "true"));
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            errors.push(ConfigError {
                source: Source::KernelCommandLine,
                line: None,
                key: Some(format!("spotinit.{key}")),
                message: "empty key segment".into(),
            });
            continue;
        }
        let mut nested = toml::Table::new();
        nested.insert(parts[parts.len() - 1].to_string(), value);
        for p in parts[..parts.len() - 1].iter().rev() {
            let mut t = toml::Table::new();
            t.insert(p.to_string(), toml::Value::Table(nested));
            nested = t;
        }
        // Check this key alone so the error names it.
        if let Err(e) = toml::Value::Table(nested.clone()).try_into::<Config>() {
            errors.push(ConfigError {
                source: Source::KernelCommandLine,
                line: None,
                key: Some(format!("spotinit.{key}")),
                message: toml_message(&e),
            });
            continue;
        }
        merge(&mut table, nested);
    }
    if errors.is_empty() {
        Ok(table)
    } else {
        Err(errors)
    }
}

/// Which source set a dotted key last (highest precedence), and on which line if it is text.
fn origin(
    key: &str,
    cmdline: &str,
    user_data: Option<&str>,
    image_file: Option<&str>,
) -> (Source, Option<usize>) {
    if cmdline_words(cmdline)
        .iter()
        .any(|w| w.starts_with(&format!("spotinit.{key}")))
    {
        return (Source::KernelCommandLine, None);
    }
    for (source, text) in [
        (Source::UserData, user_data),
        (Source::ImageFile, image_file),
    ] {
        if let Some(t) = text {
            if let Some(line) = line_of_key(t, key) {
                return (source, Some(line));
            }
        }
    }
    (Source::UserData, None)
}

/// Best effort: the line of `a.b.c` in TOML text (`[a.b]` then `c =`, `[a]` then `b.c =` or
/// `b = {.. c ..}`, or a top-level `a.b.c =`).
pub fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut section: Vec<String> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            let name = line.trim_matches(|c| c == '[' || c == ']').trim();
            section = name.split('.').map(|s| s.trim().to_string()).collect();
            if section.iter().map(String::as_str).eq(parts.iter().copied()) {
                return Some(i + 1);
            }
            continue;
        }
        let Some((lhs, _)) = line.split_once('=') else {
            continue;
        };
        let lhs: Vec<String> = lhs
            .trim()
            .split('.')
            .map(|s| s.trim().trim_matches('"').to_string())
            .collect();
        let full: Vec<&str> = section
            .iter()
            .map(String::as_str)
            .chain(lhs.iter().map(String::as_str))
            .collect();
        let n = full.len().min(parts.len());
        if parts[..n] == full[..n] {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_find_the_volume_by_name_tag() {
        let c = Config::load("", None, None).unwrap();
        assert_eq!(c.volume.tags.get("Name").unwrap(), "spotinit-state");
        assert!(c.volume.create);
        assert_eq!(c.docker.storage_driver, "overlay2");
        assert_eq!(c.failure.action, FailureAction::Poweroff);
    }

    #[test]
    fn precedence_is_cmdline_then_user_data_then_image_file() {
        let image = "[volume]\nsize_gib = 30\ntype = \"gp2\"\n";
        let user = "[volume]\nsize_gib = 40\n[volume.tags]\nName = \"gitlab\"\n";
        let cmdline =
            "console=ttyS0 spotinit.volume.size_gib=50 spotinit.imds_endpoint=http://10.0.2.2:8111";
        let c = Config::load(cmdline, Some(user), Some(image)).unwrap();
        assert_eq!(c.volume.size_gib, 50);
        assert_eq!(c.volume.volume_type, "gp2");
        assert_eq!(c.volume.tags.get("Name").unwrap(), "gitlab");
        assert_eq!(c.imds_endpoint.as_deref(), Some("http://10.0.2.2:8111"));
    }

    #[test]
    fn unknown_key_names_line_and_expected_keys() {
        let user = "[volume]\nsize_gib = 10\nsizee = 5\n";
        let e = Config::load("", Some(user), None).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].source, Source::UserData);
        assert_eq!(e[0].line, Some(3));
        assert!(e[0].message.contains("unknown field `sizee`"), "{}", e[0]);
        assert!(e[0].message.contains("size_gib"), "{}", e[0]);
    }

    #[test]
    fn wrong_type_names_line() {
        let user = "[docker]\nstop_timeout_secs = \"soon\"\n";
        let e = Config::load("", Some(user), None).unwrap_err();
        assert_eq!(e[0].line, Some(2));
        assert!(e[0].message.contains("invalid type"), "{}", e[0]);
    }

    #[test]
    fn malformed_toml_names_line() {
        let e = Config::load("", Some("[volume\nid = 1"), None).unwrap_err();
        assert_eq!(e[0].source, Source::UserData);
        assert_eq!(e[0].line, Some(1));
    }

    #[test]
    fn shell_script_user_data_is_explained() {
        let e = Config::load("", Some("#!/bin/bash\necho hi\n"), None).unwrap_err();
        assert!(e[0].message.contains("shell script"), "{}", e[0]);
    }

    #[test]
    fn semantic_problems_name_key_and_line() {
        let user = "[volume]\ntype = \"gp9\"\nsize_gib = 0\n[docker.daemon]\ndata-root = \"/x\"\n";
        let e = Config::load("", Some(user), None).unwrap_err();
        let keys: Vec<_> = e.iter().map(|e| e.key.clone().unwrap()).collect();
        assert!(keys.contains(&"volume.type".to_string()));
        assert!(keys.contains(&"volume.size_gib".to_string()));
        assert!(keys.contains(&"docker.daemon.data-root".to_string()));
        let t = e
            .iter()
            .find(|e| e.key.as_deref() == Some("volume.type"))
            .unwrap();
        assert_eq!(t.line, Some(2));
        assert!(t.message.contains("gp3"));
    }

    #[test]
    fn bad_cmdline_value_names_the_key() {
        let e = Config::load("spotinit.volume.size_gib=lots", None, None).unwrap_err();
        assert_eq!(e[0].source, Source::KernelCommandLine);
        assert_eq!(e[0].key.as_deref(), Some("spotinit.volume.size_gib"));
        let e = Config::load("spotinit.volume.sise=3", None, None).unwrap_err();
        assert!(e[0].message.contains("unknown field `sise`"));
    }

    #[test]
    fn cmdline_words_honour_quotes_and_types() {
        assert_eq!(
            cmdline_words("a \"b c\" d=\"e f\""),
            vec!["a", "b c", "d=e f"]
        );
        let t =
            cmdline_table("spotinit.volume.create=false spotinit.volume.tags.Name=x-y").unwrap();
        assert_eq!(t["volume"]["create"], toml::Value::Boolean(false));
        assert_eq!(
            t["volume"]["tags"]["Name"],
            toml::Value::String("x-y".into())
        );
    }

    #[test]
    fn volume_id_and_device_are_checked() {
        let e = Config::load(
            "",
            Some("[volume]\nid = \"volume-1\"\ndevice = \"/dev/sda\"\n"),
            None,
        )
        .unwrap_err();
        let keys: Vec<_> = e.iter().filter_map(|e| e.key.clone()).collect();
        assert_eq!(keys, vec!["volume.id", "volume.device"]);
        assert!(Config::load("", Some("[volume]\nid = \"vol-0123456789abcdef0\"\n"), None).is_ok());
    }

    #[test]
    fn line_of_key_finds_sections_and_dotted_keys() {
        let t = "hostname = \"h\"\n[volume]\nid = \"x\"\n[volume.tags]\nName = \"n\"\n";
        assert_eq!(line_of_key(t, "volume.id"), Some(3));
        assert_eq!(line_of_key(t, "volume.tags"), Some(4));
        assert_eq!(line_of_key(t, "volume.tags.Name"), Some(5));
        assert_eq!(line_of_key(t, "hostname"), Some(1));
        assert_eq!(
            line_of_key("volume.size_gib = 3", "volume.size_gib"),
            Some(1)
        );
    }
}
