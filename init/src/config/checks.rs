//! What the schema cannot express: every value that reaches a file, a command, a system call or
//! the network has a strict form (an RFC 1123 host name, an NTP server `host[:port]`, one OpenSSH
//! key, EC2's tag limits, resource id and KMS key formats), every duration and count an upper
//! bound (so no arithmetic on it can overflow), and the Docker daemon's settings cannot undo the
//! container firewall or open the Engine API unauthenticated. Each problem is (dotted key, what
//! is wrong and what is expected); [`super::Config::load`] adds the source and the line.

use super::forms::{
    depth, has_control, is_device_name, is_hostname, is_kms_key, is_pem, is_region,
    is_registry_host, is_resource_id, is_url, shown, ssh_key_problem, time_server_problem,
};
use super::model::{Config, VolumeMode};

/// How deep `docker.daemon` may nest (daemon.json has no setting deeper than 4).
pub const MAX_DAEMON_DEPTH: usize = 16;
/// Tags of the user's on the volume; spotinit adds up to 8 of its own (EC2 allows 50).
pub const MAX_USER_TAGS: usize = 40;

/// (dotted key, lowest, highest, unit): every number a duration or a count comes from.
const BOUNDS: &[(&str, u64, u64, &str)] = &[
    ("network.dhcp_timeout_secs", 1, 600, "seconds"),
    ("volume.size_gib", 1, 65536, "GiB (EBS's largest volume)"),
    ("volume.iops", 100, 256_000, "IOPS"),
    ("volume.throughput_mibps", 125, 2000, "MiB/s"),
    ("volume.attach_timeout_secs", 10, 3600, "seconds"),
    (
        "volume.release_wait_secs",
        60,
        86400,
        "seconds (EC2 takes minutes to release a volume)",
    ),
    ("volume.live_holder_wait_secs", 0, 86400, "seconds"),
    ("volume.device_timeout_secs", 5, 3600, "seconds"),
    ("volume.snapshot_timeout_secs", 60, 86400, "seconds"),
    ("volume.pool_max", 0, 1000, "volumes"),
    ("docker.stop_timeout_secs", 1, 3600, "seconds"),
    ("docker.start_timeout_secs", 5, 3600, "seconds"),
    ("failure.retry_for_secs", 0, 604_800, "seconds (a week)"),
    ("failure.retry_interval_secs", 1, 3600, "seconds"),
    (
        "spot.poll_secs",
        1,
        5,
        "seconds (the notice gives two minutes at best)",
    ),
    ("snapshots.interval_minutes", 0, 43200, "minutes (30 days)"),
    ("snapshots.keep", 1, 1000, "snapshots"),
    ("time.sync_timeout_secs", 1, 600, "seconds"),
    ("notify.timeout_secs", 1, 60, "seconds"),
    ("ssh.port", 1, 65535, ""),
];

/// daemon.json keys spotinit sets itself.
const OWNED_DAEMON_KEYS: &[(&str, &str)] = &[
    (
        "data-root",
        "spotinit puts Docker's state on the state volume",
    ),
    ("storage-driver", "use docker.storage_driver"),
    ("containerd", "spotinit runs containerd"),
    ("exec-root", "spotinit sets it"),
    ("pidfile", "spotinit sets it"),
    ("tls", "use [docker.tls]"),
    ("tlsverify", "use [docker.tls]"),
    ("tlscacert", "use [docker.tls]"),
    ("tlscert", "use [docker.tls]"),
    ("tlskey", "use [docker.tls]"),
];

impl Config {
    /// Semantic checks the schema cannot express: (dotted key, what is wrong and expected).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        self.check_bounds(&mut p);
        self.check_volume(&mut p);
        self.check_docker(&mut p);
        self.check_names(&mut p);
        p.extend(super::containers::problems(&self.containers));
        p
    }

    fn check_bounds(&self, p: &mut Vec<(String, String)>) {
        let v = &self.volume;
        let values = [
            Some(self.network.dhcp_timeout_secs),
            Some(v.size_gib.into()),
            v.iops.map(u64::from),
            v.throughput_mibps.map(u64::from),
            Some(v.attach_timeout_secs),
            Some(v.release_wait_secs),
            Some(v.live_holder_wait_secs),
            Some(v.device_timeout_secs),
            Some(v.snapshot_timeout_secs),
            Some(v.pool_max.into()),
            Some(self.docker.stop_timeout_secs),
            Some(self.docker.start_timeout_secs),
            Some(self.failure.retry_for_secs),
            Some(self.failure.retry_interval_secs),
            Some(self.spot.poll_secs),
            Some(self.snapshots.interval_minutes),
            Some(self.snapshots.keep.into()),
            Some(self.time.sync_timeout_secs),
            Some(self.notify.timeout_secs),
            Some(self.ssh.port.into()),
        ];
        for ((key, lo, hi, unit), value) in BOUNDS.iter().zip(values) {
            if let Some(n) = value.filter(|n| !(*lo..=*hi).contains(n)) {
                let unit = if unit.is_empty() {
                    String::new()
                } else {
                    format!(" {unit}")
                };
                p.push((
                    key.to_string(),
                    format!("{n} is out of range ({lo} to {hi}{unit})"),
                ));
            }
        }
    }

    fn check_volume(&self, p: &mut Vec<(String, String)>) {
        let v = &self.volume;
        if v.mode != VolumeMode::None {
            if let Some(id) = &v.id {
                if !is_resource_id(id, "vol") {
                    p.push((
                        "volume.id".into(),
                        format!(
                            "'{}' is not a volume id (expected vol- followed by hex digits)",
                            shown(id)
                        ),
                    ));
                }
            } else if v.tags.is_empty() {
                p.push((
                    "volume.tags".into(),
                    "set volume.id or at least one tag to find the state volume by".into(),
                ));
            }
            if let Some(pool) = &v.pool {
                check_pool(v, pool, p);
            }
        }
        if v.tags.len() > MAX_USER_TAGS {
            p.push((
                "volume.tags".into(),
                format!("at most {MAX_USER_TAGS} tags (EC2 allows 50 per volume; spotinit adds its own)"),
            ));
        }
        for (k, val) in &v.tags {
            let problem = if k.is_empty() || k.chars().count() > 128 || val.chars().count() > 256 {
                Some("EC2 takes tag keys of 1 to 128 characters and values of at most 256".into())
            } else if crate::cloud::is_reserved_tag_key(k) {
                Some("tag keys starting with aws: are reserved for AWS; EC2 refuses them".into())
            } else if k.starts_with("spotinit:") {
                Some("tag keys starting with spotinit: are spotinit's own record of the volume's lineage".into())
            } else if has_control(k) || has_control(val) {
                Some("no control characters in tags".into())
            } else {
                None
            };
            if let Some(why) = problem {
                p.push((format!("volume.tags.{}", shown(k)), why));
            }
        }
        let types = ["gp3", "gp2", "io1", "io2", "st1", "sc1", "standard"];
        if !types.contains(&v.volume_type.as_str()) {
            p.push((
                "volume.type".into(),
                format!(
                    "'{}' is not an EBS volume type (expected one of {})",
                    shown(&v.volume_type),
                    types.join(", ")
                ),
            ));
        }
        if v.iops.is_some() && !["gp3", "io1", "io2"].contains(&v.volume_type.as_str()) {
            p.push((
                "volume.iops".into(),
                format!(
                    "only gp3, io1 and io2 volumes take iops, not {}",
                    shown(&v.volume_type)
                ),
            ));
        }
        if v.throughput_mibps.is_some() && v.volume_type != "gp3" {
            p.push((
                "volume.throughput_mibps".into(),
                format!(
                    "only gp3 volumes take a throughput, not {}",
                    shown(&v.volume_type)
                ),
            ));
        }
        if let Some(k) = &v.kms_key_id {
            if !v.encrypted {
                p.push((
                    "volume.kms_key_id".into(),
                    "a KMS key needs volume.encrypted = true".into(),
                ));
            } else if !is_kms_key(k) {
                p.push((
                    "volume.kms_key_id".into(),
                    "not a KMS key (expected a key id, mrk-..., alias/NAME, or the ARN of a key or an alias)".into(),
                ));
            }
        }
        if !is_device_name(&v.device) {
            p.push((
                "volume.device".into(),
                format!(
                    "'{}' is not a device name EC2 accepts for a data volume (e.g. /dev/sdf .. /dev/sdp, /dev/xvdf)",
                    shown(&v.device)
                ),
            ));
        }
        if v.label.is_empty() || v.label.len() > 16 || has_control(&v.label) {
            p.push((
                "volume.label".into(),
                "an ext4 label has 1 to 16 bytes, no control characters".into(),
            ));
        }
        if let Some(init) = &v.root_init {
            if v.mode != VolumeMode::PersistedRoot
                || !init.starts_with('/')
                || init.len() > 4096
                || has_control(init)
            {
                p.push((
                    "volume.root_init".into(),
                    "an absolute path, and only with volume.mode = \"persisted-root\"".into(),
                ));
            }
        }
    }

    fn check_docker(&self, p: &mut Vec<(String, String)>) {
        let d = &self.docker;
        for (k, why) in OWNED_DAEMON_KEYS {
            if d.daemon.contains_key(*k) {
                p.push((
                    format!("docker.daemon.{k}"),
                    format!("spotinit sets this daemon.json key itself ({why})"),
                ));
            }
        }
        for (k, v) in &d.daemon {
            if depth(v) > MAX_DAEMON_DEPTH {
                p.push((
                    format!("docker.daemon.{}", shown(k)),
                    format!(
                        "nests deeper than {MAX_DAEMON_DEPTH} levels; no daemon.json setting does"
                    ),
                ));
            }
        }
        if d.block_imds {
            let off = |key: &str| d.daemon.get(key) == Some(&toml::Value::Boolean(false));
            for key in ["iptables", "ip6tables"] {
                if off(key) {
                    p.push((
                        format!("docker.daemon.{key}"),
                        format!("with {key} off Docker does not send containers through the DOCKER-USER chain, where docker.block_imds keeps them from IMDS (the instance role's credentials). Set docker.block_imds = false to allow it knowingly"),
                    ));
                }
            }
            if let Some(b) = d.daemon.get("firewall-backend") {
                if b.as_str() != Some("iptables") {
                    p.push((
                        "docker.daemon.firewall-backend".into(),
                        "only the iptables backend has the DOCKER-USER chain docker.block_imds puts its rules in. Set docker.block_imds = false to use another knowingly".into(),
                    ));
                }
            }
        }
        let drivers = ["overlay2", "fuse-overlayfs", "btrfs", "zfs", "vfs"];
        if !drivers.contains(&d.storage_driver.as_str()) {
            p.push((
                "docker.storage_driver".into(),
                format!(
                    "'{}' is not a storage driver of Docker's (expected one of {})",
                    shown(&d.storage_driver),
                    drivers.join(", ")
                ),
            ));
        }
        self.check_docker_hosts(p);
        for (registry, pem) in &d.registry_cas {
            let key = format!("docker.registry_cas.\"{}\"", shown(registry));
            if !is_registry_host(registry) {
                p.push((key, "a registry's host name or address with an optional port (e.g. \"registry.example.com:5000\"), as it appears in image references".into()));
            } else if !is_pem(pem, "CERTIFICATE") {
                p.push((key, "a PEM CERTIFICATE block (-----BEGIN CERTIFICATE-----): the CA that signed the registry's certificate".into()));
            }
        }
    }

    /// `docker.daemon.hosts`: unix sockets, or TCP with TLS client authentication unless the
    /// loud opt-in says otherwise.
    fn check_docker_hosts(&self, p: &mut Vec<(String, String)>) {
        let d = &self.docker;
        let t = &d.tls;
        let inline = [&t.ca, &t.cert, &t.key];
        let given = inline.iter().filter(|x| x.is_some()).count();
        if t.on_volume && given > 0 {
            p.push((
                "docker.tls".into(),
                "either ca, cert and key, or on_volume = true: not both".into(),
            ));
        } else if given != 0 && given != 3 {
            p.push((
                "docker.tls".into(),
                "ca (the clients' CA), cert and key (the server's) go together".into(),
            ));
        }
        for (key, value, kind) in [
            ("docker.tls.ca", &t.ca, "CERTIFICATE"),
            ("docker.tls.cert", &t.cert, "CERTIFICATE"),
            ("docker.tls.key", &t.key, "PRIVATE KEY"),
        ] {
            if value.as_deref().is_some_and(|v| !is_pem(v, kind)) {
                p.push((key.into(), format!("a PEM {kind} block (-----BEGIN ...)")));
            }
        }
        let tls = t.on_volume || given == 3;
        let Some(hosts) = d.daemon.get("hosts") else {
            return;
        };
        let Some(hosts) = hosts.as_array() else {
            p.push((
                "docker.daemon.hosts".into(),
                "a list of addresses (unix:///path, tcp://host:port)".into(),
            ));
            return;
        };
        for h in hosts {
            let Some(h) = h.as_str() else {
                p.push((
                    "docker.daemon.hosts".into(),
                    "each entry an address string".into(),
                ));
                continue;
            };
            let tcp = h.strip_prefix("tcp://");
            if tcp.is_none() && !h.starts_with("unix://") && !h.starts_with("fd://") {
                p.push((
                    "docker.daemon.hosts".into(),
                    format!(
                        "'{}' is not an address (unix:///path, tcp://host:port)",
                        shown(h)
                    ),
                ));
            }
            if tcp.is_some() && !tls && !d.insecure_plain_tcp_api {
                p.push((
                    "docker.daemon.hosts".into(),
                    format!(
                        "'{}' would serve the Docker Engine API without TLS: anyone who reaches the port is root on the host. Configure [docker.tls] (client certificates; README: the Engine API over TCP), or set docker.insecure_plain_tcp_api = true if you really mean it",
                        shown(h)
                    ),
                ));
            }
        }
    }

    fn check_names(&self, p: &mut Vec<(String, String)>) {
        if let Some(h) = &self.hostname {
            if !is_hostname(h) {
                p.push((
                    "hostname".into(),
                    "an RFC 1123 host name: letters, digits and inner hyphens, dot-separated labels of at most 63, 64 in all".into(),
                ));
            }
        }
        if let Some(a) = &self.address.elastic_ip_allocation_id {
            if !is_resource_id(a, "eipalloc") {
                p.push((
                    "address.elastic_ip_allocation_id".into(),
                    format!(
                        "'{}' is not an allocation id (expected eipalloc-...)",
                        shown(a)
                    ),
                ));
            }
        }
        if self.address.from_pool {
            let problem = if self.volume.pool.is_none() {
                Some("an Elastic IP per slot needs volume.pool")
            } else if self.address.elastic_ip_allocation_id.is_some() {
                Some("either one Elastic IP (elastic_ip_allocation_id) or one per slot (from_pool)")
            } else {
                None
            };
            if let Some(why) = problem {
                p.push(("address.from_pool".into(), why.into()));
            }
        }
        if let Some(u) = &self.notify.webhook_url {
            if !u.starts_with("https://") || !is_url(u) {
                p.push((
                    "notify.webhook_url".into(),
                    format!("'{}' is not an https:// URL", shown(u)),
                ));
            }
        }
        if let Some(pem) = &self.notify.ca_pem {
            if !is_pem(pem, "CERTIFICATE") {
                p.push((
                    "notify.ca_pem".into(),
                    "a PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
                ));
            }
        }
        if self.ssh.authorized_keys.len() > 100 {
            p.push(("ssh.authorized_keys".into(), "at most 100 keys".into()));
        }
        for (i, k) in self.ssh.authorized_keys.iter().enumerate() {
            if let Some(why) = ssh_key_problem(k) {
                p.push((
                    "ssh.authorized_keys".into(),
                    format!("entry {}: {why}", i + 1),
                ));
            }
        }
        if self.time.servers.is_empty() || self.time.servers.len() > 8 {
            p.push((
                "time.servers".into(),
                "1 to 8 NTP servers: SigV4-signed EC2 calls fail with a clock 5 minutes off".into(),
            ));
        }
        for s in &self.time.servers {
            if let Some(why) = time_server_problem(s) {
                p.push(("time.servers".into(), why));
            }
        }
        for (key, url) in [
            ("imds_endpoint", &self.imds_endpoint),
            ("aws.ec2_endpoint", &self.aws.ec2_endpoint),
        ] {
            if let Some(u) = url {
                if !is_url(u) {
                    p.push((
                        key.into(),
                        format!("'{}' is not an http(s) URL with a host", shown(u)),
                    ));
                }
            }
        }
        if let Some(r) = &self.aws.region {
            if !is_region(r) {
                p.push((
                    "aws.region".into(),
                    format!("'{}' is not an AWS region (e.g. eu-west-1)", shown(r)),
                ));
            }
        }
        if let Some(i) = &self.network.interface {
            let ok = (1..=15).contains(&i.len())
                && i != "."
                && i != ".."
                && i.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !ok {
                p.push((
                    "network.interface".into(),
                    "an interface name: 1 to 15 letters, digits, '.', '_' or '-'".into(),
                ));
            }
        }
    }
}

/// The longest pool name: it names the host too (`<pool>-<slot>`, a 63-character DNS label).
pub const MAX_POOL_NAME: usize = 50;

/// `volume.pool`: a name that can prefix a host name, without `volume.id`, with a maximum when
/// spotinit may create the pool's volumes.
fn check_pool(v: &super::model::Volume, pool: &str, p: &mut Vec<(String, String)>) {
    let name_ok = !pool.is_empty()
        && pool.len() <= MAX_POOL_NAME
        && pool
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !pool.starts_with('-')
        && !pool.ends_with('-');
    if !name_ok {
        p.push((
            "volume.pool".into(),
            format!(
                "'{}' is not a pool name: 1 to {MAX_POOL_NAME} of a-z, 0-9 and - (not first or last), as it names the host (<pool>-<slot>)",
                shown(pool)
            ),
        ));
    }
    if v.id.is_some() {
        p.push((
            "volume.pool".into(),
            "a pool finds its volumes by tags: remove volume.id (or volume.pool)".into(),
        ));
    }
    if v.create && v.pool_max == 0 {
        p.push((
            "volume.pool_max".into(),
            "set the most volumes the pool may hold (1 to 1000), or volume.create = false".into(),
        ));
    }
}

#[cfg(test)]
#[path = "checks_tests.rs"]
mod tests;
