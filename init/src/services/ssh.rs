//! Optional operator access: dropbear, supervised, on when at least one key is configured (the
//! EC2 key pair from IMDS, or `ssh.authorized_keys`). Its host key lives on the state volume, so
//! every replacement instance presents the same one (no "host key changed" after each spot
//! replacement). Root logins by key only; remote port forwarding off.

use super::supervisor::LaunchError;
use super::supervisor::ServiceSpec;
use crate::config::Ssh;
use crate::sys::{run, CommandError, CommandSpec, FileError, Output, Paths, System};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const HOST_KEY: &str = "dropbear_ed25519_host_key";

/// Where the host key lives: on the state volume when there is one, else on tmpfs.
pub fn key_dir(paths: &Paths, on_volume: bool) -> PathBuf {
    if on_volume {
        paths
            .p(crate::volume::layout::VOLUME_MOUNT)
            .join(".spotinit/ssh")
    } else {
        paths.p("/run/spotinit/ssh")
    }
}

/// The keys that may log in: the configured ones, then the key pair's (deduplicated).
pub fn authorized_keys(cfg: &Ssh, key_pair: Option<&str>) -> Vec<String> {
    let mut keys: Vec<String> = cfg
        .authorized_keys
        .iter()
        .map(|k| k.trim().to_string())
        .collect();
    if cfg.use_key_pair {
        if let Some(k) = key_pair.map(str::trim).filter(|k| !k.is_empty()) {
            if !keys.iter().any(|x| x == k) {
                keys.push(k.to_string());
            }
        }
    }
    keys
}

pub fn dropbear(paths: &Paths, host_key: &Path, port: u16) -> ServiceSpec {
    use caps::Capability::*;
    ServiceSpec::new(
        "sshd",
        CommandSpec::new("/usr/sbin/dropbear")
            // Foreground, log to stderr, no passwords, no remote forwarding.
            .args(["-F", "-E", "-s", "-k", "-p", &port.to_string(), "-r"])
            .arg(host_key.to_string_lossy())
            .output(super::docker::log_output(paths, "sshd"))
            // What a login server and an operator's shell (docker CLI, logs) need; no module
            // loading, no mounts, no raw I/O, no clock.
            .keep_caps(vec![
                CAP_NET_BIND_SERVICE,
                CAP_SETUID,
                CAP_SETGID,
                CAP_CHOWN,
                CAP_FOWNER,
                CAP_DAC_OVERRIDE,
                CAP_KILL,
                CAP_SYS_CHROOT,
                CAP_AUDIT_WRITE,
            ]),
    )
    .stop_timeout(Duration::from_secs(3))
}

/// Why SSH did not start.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    HostKey(#[from] CommandError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

/// Writes root's authorized_keys, makes the host key if there is none, starts dropbear.
/// Returns a line for the console with the host key's fingerprint.
pub async fn start<S: System + ?Sized>(
    sys: &S,
    paths: &Paths,
    supervisor: &super::Supervisor,
    cfg: &Ssh,
    keys: &[String],
    key_dir: &Path,
) -> Result<String, SshError> {
    let ssh_dir = paths.p("/root/.ssh");
    std::fs::create_dir_all(&ssh_dir).map_err(FileError::at("mkdir", &ssh_dir))?;
    let ak = ssh_dir.join("authorized_keys");
    std::fs::write(&ak, keys.join("\n") + "\n").map_err(FileError::at("write", &ak))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&ssh_dir, std::fs::Permissions::from_mode(0o700));
    let _ = std::fs::set_permissions(&ak, std::fs::Permissions::from_mode(0o600));

    std::fs::create_dir_all(key_dir).map_err(FileError::at("mkdir", key_dir))?;
    let host_key = key_dir.join(HOST_KEY);
    let made = if host_key.exists() {
        false
    } else {
        let gen = CommandSpec::new("/usr/bin/dropbearkey")
            .args(["-t", "ed25519", "-f"])
            .arg(host_key.to_string_lossy())
            .output(Output::Null);
        run(sys, &gen).await?;
        true
    };
    supervisor
        .launch(dropbear(paths, &host_key, cfg.port))
        .await?;
    Ok(format!(
        "dropbear on port {}, {} authorized key(s), host key {} ({})",
        cfg.port,
        keys.len(),
        host_key.display(),
        if made {
            "new"
        } else {
            "kept from an earlier instance"
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_merge_without_duplicates_and_respect_use_key_pair() {
        let cfg = Ssh {
            authorized_keys: vec!["ssh-ed25519 AAAA1 a".into()],
            ..Ssh::default()
        };
        assert_eq!(
            authorized_keys(&cfg, Some("ssh-ed25519 AAAA2 pair\n")),
            vec!["ssh-ed25519 AAAA1 a", "ssh-ed25519 AAAA2 pair"]
        );
        assert_eq!(authorized_keys(&cfg, Some("ssh-ed25519 AAAA1 a")).len(), 1);
        let no_pair = Ssh {
            use_key_pair: false,
            ..cfg
        };
        assert_eq!(
            authorized_keys(&no_pair, Some("ssh-ed25519 AAAA2 p")).len(),
            1
        );
        assert!(authorized_keys(&Ssh::default(), None).is_empty());
    }

    #[test]
    fn dropbear_keeps_few_capabilities_and_no_passwords() {
        let s = dropbear(&Paths::real(), Path::new("/k"), 22);
        let caps = s.command.keep_caps.unwrap();
        assert!(caps.contains(&caps::Capability::CAP_NET_BIND_SERVICE));
        assert!(!caps.contains(&caps::Capability::CAP_SYS_ADMIN));
        assert!(!caps.contains(&caps::Capability::CAP_SYS_MODULE));
        assert!(s.command.args.contains(&"-s".to_string()));
    }
}
