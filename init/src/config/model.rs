//! The configuration's schema: every section with its defaults, as serde reads it.

use super::containers::Container;
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
    pub notify: Notify,
    pub time: Time,
    pub ssh: Ssh,
    /// `[[containers]]`: what Docker runs, kept to this declaration after every boot.
    pub containers: Vec<Container>,
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
    /// A pool of state volumes for a group of instances: each instance takes one of the pool's
    /// volumes that no live instance holds (found by `tags` plus `spotinit:pool = <pool>`), and
    /// with it that volume's slot (its identity: hostname, /run/spotinit/slot).
    pub pool: Option<String>,
    /// The most volumes the pool may hold: a new one is created only below it.
    pub pool_max: u32,
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
    /// How long to wait for a live instance holding the volume to let it go (capacity
    /// rebalancing: the replacement boots while the old instance still runs). 0: fail at once,
    /// and [failure] retries.
    pub live_holder_wait_secs: u64,
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
            pool: None,
            pool_max: 0,
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
            live_holder_wait_secs: 600,
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
    /// TLS with client certificates for a `tcp://` address in `daemon.hosts`.
    pub tls: DockerTls,
    /// Serve the Engine API on plain TCP anyway: whoever reaches the port is root on the host.
    pub insecure_plain_tcp_api: bool,
    /// CAs of private registries, `"host:port" = PEM`: Docker trusts each one for that registry
    /// only (`/etc/docker/certs.d/<host:port>/ca.crt`). Public certificates, no secret.
    pub registry_cas: BTreeMap<String, String>,
}

/// The Engine API's TLS: the server's certificate and key, and the CA its clients' certificates
/// must be signed by (dockerd's `tlsverify`). PEM text here, or files on the state volume.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerTls {
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    /// `ca.pem`, `cert.pem` and `key.pem` from `.spotinit/docker-tls/` on the state volume
    /// (the key then never travels in user data).
    pub on_volume: bool,
}

impl DockerTls {
    pub fn configured(&self) -> bool {
        self.on_volume || (self.ca.is_some() && self.cert.is_some() && self.key.is_some())
    }
}

/// Never prints the key.
impl fmt::Debug for DockerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerTls")
            .field("ca", &self.ca.as_ref().map(|_| "(PEM)"))
            .field("cert", &self.cert.as_ref().map(|_| "(PEM)"))
            .field("key", &self.key.as_ref().map(|_| "(secret)"))
            .field("on_volume", &self.on_volume)
            .finish()
    }
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
            tls: DockerTls::default(),
            insecure_plain_tcp_api: false,
            registry_cas: BTreeMap::new(),
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
    /// When EC2 schedules the instance's retirement or stop: drain and power off ten minutes
    /// before it, so a replacement takes the state volume in time.
    pub drain_before_retirement: bool,
}

impl Default for Spot {
    fn default() -> Self {
        Spot {
            watch: true,
            poll_secs: 2,
            snapshot_on_rebalance: true,
            after_drain: AfterDrain::Wait,
            drain_before_retirement: false,
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
    /// With `volume.pool`: associate the Elastic IP of this host's slot, the one tagged
    /// `spotinit:pool = <pool>` and `spotinit:slot = <slot>`.
    pub from_pool: bool,
}

/// Where the spot lifecycle is reported (a Slack-compatible HTTPS webhook).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Notify {
    /// `https://...`: each event is POSTed as JSON with a `text` (Slack's incoming webhooks
    /// show it) and its fields.
    pub webhook_url: Option<String>,
    /// A CA to trust for the webhook besides the image's (a private endpoint), PEM.
    pub ca_pem: Option<String>,
    /// Per attempt; three attempts at most.
    pub timeout_secs: u64,
}

impl Default for Notify {
    fn default() -> Self {
        Notify {
            webhook_url: None,
            ca_pem: None,
            timeout_secs: 5,
        }
    }
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
