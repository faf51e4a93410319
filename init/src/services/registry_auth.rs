//! Registry credentials for the declared containers' pulls, from a file on the state volume,
//! never from user data (which anyone with console or IMDS access can read):
//! `.spotinit/registry-auth.json`, in the form of Docker's own `~/.docker/config.json`
//! (`{"auths": {"registry.example.com": {"auth": "<base64 of user:password>"}}}`, or
//! `"username"` and `"password"` instead of `"auth"`), so a `docker login`'s file can be copied
//! there as it is.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Below the state volume's mount.
pub const AUTH_FILE: &str = ".spotinit/registry-auth.json";
/// How Docker names Docker Hub in its config file.
const DOCKER_HUB_KEYS: [&str; 3] = [
    "https://index.docker.io/v1/",
    "index.docker.io",
    "docker.io",
];

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64, padding optional; None on any other character.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The registry an image comes from, as Docker decides it: the first path component when it
/// looks like a host (a '.' or a ':', or `localhost`), else Docker Hub.
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// Why the credentials file cannot be used. Never quotes a secret.
#[derive(Debug, thiserror::Error)]
pub enum RegistryAuthError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Invalid {
        path: PathBuf,
        source: Box<RegistryAuthError>,
    },
    #[error("not JSON ({0})")]
    NotJson(#[source] serde_json::Error),
    #[error("no \"auths\" object (the form of Docker's config.json)")]
    NoAuths,
    #[error("{host}: \"auth\" is not base64 of user:password")]
    BadAuth { host: String },
    #[error("{host}: neither \"auth\" nor \"username\" and \"password\"")]
    NoCredentials { host: String },
}

/// Credentials by registry host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryAuth {
    by_registry: BTreeMap<String, (String, String)>,
}

impl RegistryAuth {
    /// The file's credentials; no file is no credentials. A file that cannot be read is an
    /// error naming it (the pulls that need it would fail less clearly).
    pub fn load(volume: &Path) -> Result<RegistryAuth, RegistryAuthError> {
        let path = volume.join(AUTH_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text).map_err(|e| RegistryAuthError::Invalid {
                path,
                source: Box::new(e),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RegistryAuth::default()),
            Err(source) => Err(RegistryAuthError::Read { path, source }),
        }
    }

    /// Docker's config.json form; messages never quote a secret.
    pub fn parse(text: &str) -> Result<RegistryAuth, RegistryAuthError> {
        let v: Value = serde_json::from_str(text).map_err(RegistryAuthError::NotJson)?;
        let auths = v["auths"].as_object().ok_or(RegistryAuthError::NoAuths)?;
        let mut by_registry = BTreeMap::new();
        for (host, entry) in auths {
            let bad_auth = || RegistryAuthError::BadAuth { host: host.clone() };
            let pair = if let Some(auth) = entry["auth"].as_str() {
                let decoded = base64_decode(auth)
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(bad_auth)?;
                let (u, p) = decoded.split_once(':').ok_or_else(bad_auth)?;
                (u.to_string(), p.to_string())
            } else {
                match (entry["username"].as_str(), entry["password"].as_str()) {
                    (Some(u), Some(p)) => (u.to_string(), p.to_string()),
                    _ => return Err(RegistryAuthError::NoCredentials { host: host.clone() }),
                }
            };
            let host = host
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/');
            let key = if DOCKER_HUB_KEYS
                .iter()
                .any(|k| k.trim_start_matches("https://").trim_end_matches('/') == host)
                || host == "index.docker.io/v1"
            {
                "docker.io".to_string()
            } else {
                host.to_string()
            };
            by_registry.insert(key, pair);
        }
        Ok(RegistryAuth { by_registry })
    }

    /// The registries with credentials (for the console: hosts only).
    pub fn registries(&self) -> Vec<&str> {
        self.by_registry.keys().map(String::as_str).collect()
    }

    /// The `X-Registry-Auth` header's value for pulling `image`, if its registry has
    /// credentials: base64 of `{"username", "password", "serveraddress"}`.
    pub fn header_for(&self, image: &str) -> Option<String> {
        let registry = registry_of(image);
        let (user, password) = self.by_registry.get(registry)?;
        let json = serde_json::json!({
            "username": user,
            "password": password,
            "serveraddress": registry,
        });
        Some(base64_encode(json.to_string().as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("user:pa55", "dXNlcjpwYTU1"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), coded);
            assert_eq!(base64_decode(coded).unwrap(), plain.as_bytes());
        }
        assert_eq!(base64_decode("a b"), None);
    }

    #[test]
    fn registries_as_docker_decides_them() {
        assert_eq!(registry_of("gitlab/gitlab-ce:17"), "docker.io");
        assert_eq!(registry_of("redis"), "docker.io");
        assert_eq!(registry_of("10.0.2.2:5000/counter:1"), "10.0.2.2:5000");
        assert_eq!(registry_of("ghcr.io/o/r"), "ghcr.io");
        assert_eq!(registry_of("localhost/app"), "localhost");
    }

    #[test]
    fn a_docker_config_gives_the_header_for_its_registries_only() {
        let auth = RegistryAuth::parse(
            r#"{"auths": {
                "10.0.2.2:5000": {"auth": "dXNlcjpwYTU1"},
                "https://index.docker.io/v1/": {"username": "hub", "password": "s3cret"}
            }}"#,
        )
        .unwrap();
        assert_eq!(auth.registries(), ["10.0.2.2:5000", "docker.io"]);
        let header = auth.header_for("10.0.2.2:5000/counter:1").unwrap();
        let json: Value = serde_json::from_slice(&base64_decode(&header).unwrap()).unwrap();
        assert_eq!(json["username"], "user");
        assert_eq!(json["password"], "pa55");
        assert_eq!(json["serveraddress"], "10.0.2.2:5000");
        assert!(auth.header_for("gitlab/gitlab-ce:17").is_some());
        assert_eq!(auth.header_for("ghcr.io/o/r"), None);
    }

    #[test]
    fn a_bad_file_is_named_without_its_secrets() {
        let e = RegistryAuth::parse(r#"{"auths": {"r.example": {"auth": "not base64!"}}}"#)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "r.example: \"auth\" is not base64 of user:password"
        );
        let e = RegistryAuth::parse(r#"{"auths": {"r.example": {"username": "u"}}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "r.example: neither \"auth\" nor \"username\" and \"password\""
        );
        assert_eq!(
            RegistryAuth::parse("{}").unwrap_err().to_string(),
            "no \"auths\" object (the form of Docker's config.json)"
        );
        let dir = std::env::temp_dir().join(format!("spotinit-regauth-{}", std::process::id()));
        assert_eq!(RegistryAuth::load(&dir).unwrap(), RegistryAuth::default());
        std::fs::create_dir_all(dir.join(".spotinit")).unwrap();
        std::fs::write(dir.join(AUTH_FILE), "{").unwrap();
        let e = RegistryAuth::load(&dir).unwrap_err();
        let json = serde_json::from_str::<Value>("{").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: not JSON ({json})", dir.join(AUTH_FILE).display())
        );
        let json = std::error::Error::source(&e)
            .and_then(std::error::Error::source)
            .expect("the JSON error is the source of the source");
        assert!(json.is::<serde_json::Error>());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
