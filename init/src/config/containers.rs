//! `[[containers]]`: the containers a host runs, declared with its configuration, so that a
//! launch with this user data has the service running on the first instance and on every
//! replacement. spotinit makes Docker's set match the declaration after dockerd is up
//! (`services::containers`); what may be declared, and the checks on it, are here.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// At most this many declared containers (each is a reconciliation at every boot).
pub const MAX_CONTAINERS: usize = 32;

/// One declared container. Everything it writes lives on the state volume: Docker's named
/// volumes are in `/var/lib/docker`, and bind mounts take their host side below `binds/` of
/// the state volume, never from the read-only, per-instance root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Container {
    /// Docker's container name: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most 64 characters.
    pub name: String,
    /// `[registry/]repository[:tag][@digest]`.
    pub image: String,
    /// Replaces the image's CMD.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Replaces the image's ENTRYPOINT.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// `[host-ip:]host-port:container-port[/tcp|/udp]`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Docker named volumes: `name:/path/in/container[:ro]`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// `dir:/path/in/container[:ro]`, `dir` a relative path below `binds/` on the state volume.
    #[serde(default)]
    pub binds: Vec<String>,
    #[serde(default)]
    pub restart: Restart,
    /// Docker's stop timeout for this container (SIGTERM, then SIGKILL).
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_secs: u64,
    /// `/dev/shm`'s size, for services that need more than Docker's 64 MiB (GitLab does).
    #[serde(default)]
    pub shm_size_mib: Option<u64>,
    #[serde(default)]
    pub hostname: Option<String>,
    /// Docker's log driver and its options (default: dockerd's own).
    #[serde(default)]
    pub log_driver: Option<String>,
    #[serde(default)]
    pub log_options: BTreeMap<String, String>,
}

fn default_stop_timeout() -> u64 {
    30
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Docker restarts it whenever it stops, and when dockerd starts.
    #[default]
    Always,
    UnlessStopped,
    OnFailure,
    No,
}

impl Restart {
    /// The Engine API's `RestartPolicy.Name`.
    pub fn docker_name(self) -> &'static str {
        match self {
            Restart::Always => "always",
            Restart::UnlessStopped => "unless-stopped",
            Restart::OnFailure => "on-failure",
            Restart::No => "no",
        }
    }
}

/// A Docker container or named-volume name.
pub fn is_docker_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && s.len() <= 64
}

/// A Docker image reference as the Engine API takes it: lower-case repository path components
/// (with `.`, `_`, `-` inside), an optional registry host with port, tag and digest.
pub fn is_image_reference(s: &str) -> bool {
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    if let Some(d) = digest {
        let ok = d.split_once(':').is_some_and(|(alg, hex)| {
            !alg.is_empty()
                && alg
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && hex.len() >= 32
                && hex.chars().all(|c| c.is_ascii_hexdigit())
        });
        if !ok {
            return false;
        }
    }
    // The tag follows the last ':' after the last '/' (a registry's port comes before a '/').
    let (path, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(t) = tag {
        let ok = (1..=128).contains(&t.len())
            && t.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return false;
        }
    }
    let mut parts = path.split('/').peekable();
    let mut first = true;
    while let Some(part) = parts.next() {
        let registry =
            first && parts.peek().is_some() && (part.contains(['.', ':']) || part == "localhost");
        first = false;
        let ok = if registry {
            let (host, port) = part.split_once(':').unwrap_or((part, "1"));
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        } else {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
                && part.starts_with(|c: char| c.is_ascii_alphanumeric())
                && part.ends_with(|c: char| c.is_ascii_alphanumeric())
        };
        if !ok {
            return false;
        }
    }
    !path.is_empty() && path.len() + tag.map_or(0, str::len) <= 255
}

/// `[host-ip:]host-port:container-port[/tcp|/udp]` → (host ip, host port, container port, proto).
pub fn parse_port(s: &str) -> Option<(Option<std::net::IpAddr>, u16, u16, &str)> {
    let (spec, proto) = match s.rsplit_once('/') {
        Some((spec, p)) if p == "tcp" || p == "udp" => (spec, p),
        Some(_) => return None,
        None => (s, "tcp"),
    };
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0);
    let (front, container) = spec.rsplit_once(':')?;
    let container = port(container)?;
    let (ip, host) = match front.rsplit_once(':') {
        Some((ip, host)) => {
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            (Some(ip.parse().ok()?), port(host)?)
        }
        None => (None, port(front)?),
    };
    Some((ip, host, container, proto))
}

/// `source:/absolute/target[:ro]` → (source, target, read-only).
pub fn parse_mount(s: &str) -> Option<(&str, &str, bool)> {
    let (rest, read_only) = match s.strip_suffix(":ro") {
        Some(r) => (r, true),
        None => (s.strip_suffix(":rw").unwrap_or(s), false),
    };
    let (source, target) = rest.split_once(':')?;
    let target_ok = target.starts_with('/')
        && !target.split('/').any(|c| c == "..")
        && !target
            .chars()
            .any(|c| c.is_control() || c == ':' || c == ',');
    (target_ok && !source.is_empty()).then_some((source, target, read_only))
}

/// A bind's host side: a relative path below `binds/` that cannot climb out of it.
pub fn is_bind_dir(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c))
}

/// The problems of the declared containers: (dotted key, what is wrong and expected).
pub fn problems(containers: &[Container]) -> Vec<(String, String)> {
    let mut p = Vec::new();
    if containers.len() > MAX_CONTAINERS {
        p.push((
            "containers".to_string(),
            format!("at most {MAX_CONTAINERS} declared containers"),
        ));
    }
    for (i, c) in containers.iter().enumerate() {
        let key = |field: &str| format!("containers[{i}].{field}");
        if !is_docker_name(&c.name) {
            p.push((
                key("name"),
                "a Docker container name: a letter or digit, then letters, digits, '_', '.' or '-'; at most 64".into(),
            ));
        } else if containers[..i].iter().any(|o| o.name == c.name) {
            p.push((key("name"), "declared twice: names are unique".into()));
        }
        if !is_image_reference(&c.image) {
            p.push((
                key("image"),
                "an image reference: [registry[:port]/]repository[:tag][@sha256:digest], repository in lower case".into(),
            ));
        }
        for (k, v) in &c.environment {
            let name_ok = !k.is_empty() && !k.contains('=') && !k.chars().any(char::is_control);
            if !name_ok || v.contains('\0') {
                p.push((
                    key("environment"),
                    "variable names without '=' or control characters; values without NUL".into(),
                ));
                break;
            }
        }
        for (n, port) in c.ports.iter().enumerate() {
            if parse_port(port).is_none() {
                p.push((
                    format!("{}[{n}]", key("ports")),
                    "[host-ip:]host-port:container-port[/tcp|/udp], ports 1-65535".into(),
                ));
            }
        }
        for (n, v) in c.volumes.iter().enumerate() {
            let ok = parse_mount(v).is_some_and(|(name, _, _)| is_docker_name(name));
            if !ok {
                p.push((
                    format!("{}[{n}]", key("volumes")),
                    "volume-name:/absolute/path[:ro], a Docker volume name (it lives in /var/lib/docker on the state volume)".into(),
                ));
            }
        }
        for (n, b) in c.binds.iter().enumerate() {
            let ok = parse_mount(b).is_some_and(|(dir, _, _)| is_bind_dir(dir));
            if !ok {
                p.push((
                    format!("{}[{n}]", key("binds")),
                    "dir:/absolute/path[:ro], dir a relative path below binds/ on the state volume (no '..', no leading '/')".into(),
                ));
            }
        }
        if !(1..=3600).contains(&c.stop_timeout_secs) {
            p.push((key("stop_timeout_secs"), "1 to 3600 seconds".into()));
        }
        if c.shm_size_mib.is_some_and(|m| !(1..=65536).contains(&m)) {
            p.push((key("shm_size_mib"), "1 to 65536 MiB".into()));
        }
        if c.hostname
            .as_deref()
            .is_some_and(|h| !super::forms::is_hostname(h))
        {
            p.push((key("hostname"), "an RFC 1123 host name".into()));
        }
        let arg_ok = |a: &Vec<String>| a.len() <= 256 && a.iter().all(|s| !s.contains('\0'));
        if c.command.as_ref().is_some_and(|a| !arg_ok(a))
            || c.entrypoint.as_ref().is_some_and(|a| !arg_ok(a))
        {
            p.push((
                key("command"),
                "at most 256 arguments, none with a NUL".into(),
            ));
        }
        if c.log_driver.as_deref().is_some_and(|d| !is_docker_name(d)) {
            p.push((
                key("log_driver"),
                "a log driver's name (json-file, local, awslogs, ...)".into(),
            ));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        for ok in [
            "busybox",
            "gitlab/gitlab-ce:17.5.1-ce.0",
            "registry.example.com:5000/team/app:v1",
            "10.0.2.2:5000/counter:1",
            "localhost/app",
            "ghcr.io/o/r@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "public.ecr.aws/docker/library/redis:7.4",
        ] {
            assert!(is_image_reference(ok), "{ok}");
        }
        for bad in [
            "",
            "Gitlab/ce",
            "app:",
            "app:-x",
            "a//b",
            "app name",
            "app@sha256:xyz",
            "host:99999/app",
            "app\n",
            "-app",
        ] {
            assert!(!is_image_reference(bad), "{bad:?}");
        }
    }

    #[test]
    fn ports_and_mounts() {
        assert_eq!(parse_port("80:80"), Some((None, 80, 80, "tcp")));
        assert_eq!(
            parse_port("127.0.0.1:8080:80/udp"),
            Some((Some("127.0.0.1".parse().unwrap()), 8080, 80, "udp"))
        );
        assert_eq!(
            parse_port("[::1]:2222:22"),
            Some((Some("::1".parse().unwrap()), 2222, 22, "tcp"))
        );
        for bad in ["80", "0:80", "80:70000", "80:80/sctp", "x:80:80", "80:80/"] {
            assert_eq!(parse_port(bad), None, "{bad}");
        }
        assert_eq!(parse_mount("data:/srv:ro"), Some(("data", "/srv", true)));
        assert_eq!(parse_mount("data:/srv"), Some(("data", "/srv", false)));
        assert_eq!(parse_mount("data:srv"), None);
        assert_eq!(parse_mount("data:/a/../b"), None);
        assert!(is_bind_dir("gitlab/config"));
        for bad in ["/etc", "../x", "a/../b", "a//b", "", "a b"] {
            assert!(!is_bind_dir(bad), "{bad}");
        }
    }

    fn counter() -> Container {
        toml::from_str(
            "name = \"counter\"\nimage = \"10.0.2.2:5000/counter:1\"\nports = [\"8080:8080\"]\n\
             volumes = [\"count:/data\"]\n",
        )
        .unwrap()
    }

    #[test]
    fn a_plain_declaration_has_defaults_and_no_problems() {
        let c = counter();
        assert_eq!(c.restart, Restart::Always);
        assert_eq!(c.stop_timeout_secs, 30);
        assert_eq!(problems(&[c]), vec![]);
    }

    #[test]
    fn the_readmes_gitlab_examples_load() {
        let readme = include_str!("../../../README.md");
        let examples: Vec<&str> = readme
            .split("<!-- gitlab-example")
            .skip(1)
            .map(|after| {
                after
                    .split("```toml\n")
                    .nth(1)
                    .and_then(|b| b.split("```").next())
                    .unwrap()
            })
            .collect();
        assert_eq!(examples.len(), 2, "the configuration's and the launch's");
        for block in examples {
            let cfg = match crate::config::Config::load("", Some(block), None) {
                Ok(c) => c,
                Err(errors) => panic!("{errors:?}\n{block}"),
            };
            let gitlab = &cfg.containers[0];
            assert_eq!(gitlab.name, "gitlab");
            assert_eq!(gitlab.volumes.len(), 3);
            assert_eq!(cfg.ssh.port, 2222);
        }
    }

    #[test]
    fn every_field_is_checked_by_key() {
        let mut c = counter();
        c.name = "bad name".into();
        c.image = "Bad".into();
        c.ports = vec!["8080".into()];
        c.volumes = vec!["../x:/data".into()];
        c.binds = vec!["/etc:/host-etc".into()];
        c.stop_timeout_secs = 0;
        c.hostname = Some("-x".into());
        let keys: Vec<String> = problems(&[c]).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "containers[0].name",
                "containers[0].image",
                "containers[0].ports[0]",
                "containers[0].volumes[0]",
                "containers[0].binds[0]",
                "containers[0].stop_timeout_secs",
                "containers[0].hostname",
            ]
        );
        let twice = problems(&[counter(), counter()]);
        assert_eq!(twice[0].0, "containers[1].name");
    }
}
