//! The machine-local steps of the boot: early mounts, hostname, loopback, kernel modules, and
//! the network through a supervised DHCP client.

use crate::services::{LaunchError, ServiceSpec, Supervisor};
use crate::sys::{
    Child, CommandError, CommandSpec, FileError, MountSpec, MsFlags, Paths, SysError, System,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// Why the early mounts or the network failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("ln -s {target} {link}: {source}")]
    Link {
        target: &'static str,
        link: &'static str,
        source: std::io::Error,
    },
    #[error("network interface {0} (network.interface) does not exist")]
    NoSuchInterface(String),
    #[error(
        "no network interface appeared (is the NIC driver, e.g. ena or virtio_net, in the image?)"
    )]
    NoInterface,
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("no DHCP lease on {iface} within {within} (network.dhcp_timeout_secs); see /var/log/spotinit/dhcp-{iface}.log")]
    NoLease { iface: String, within: String },
}

/// (fstype, source, target, flags, data) of every mount PID 1 makes before anything else.
pub fn early_mount_table() -> Vec<(
    &'static str,
    &'static str,
    &'static str,
    MsFlags,
    &'static str,
)> {
    let nsd = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let nsde = nsd | MsFlags::MS_NOEXEC;
    vec![
        ("proc", "proc", "/proc", nsde, ""),
        ("sysfs", "sysfs", "/sys", nsde, ""),
        // The cloud kernel does not mount devtmpfs by itself (DEVTMPFS_MOUNT is off).
        (
            "devtmpfs",
            "devtmpfs",
            "/dev",
            MsFlags::MS_NOSUID,
            "mode=0755",
        ),
        (
            "devpts",
            "devpts",
            "/dev/pts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "gid=5,mode=0620,ptmxmode=0666",
        ),
        ("tmpfs", "tmpfs", "/dev/shm", nsd, "mode=1777"),
        ("tmpfs", "tmpfs", "/run", nsd, "mode=0755"),
        ("tmpfs", "tmpfs", "/tmp", nsd, "mode=1777"),
        // The root is read-only: everything writable under /var is tmpfs until the volume
        // is bound over /var/lib/docker and /var/lib/containerd.
        ("tmpfs", "tmpfs", "/var", nsd, "mode=0755"),
        // dockerd 20.10 wrote /etc/docker/key.json; 26 writes nothing there, but it reads
        // registry CAs from /etc/docker/certs.d, which must be writable to be given.
        ("tmpfs", "tmpfs", "/etc/docker", nsd, "mode=0755"),
        // root's home: the operator's authorized_keys, shell history.
        ("tmpfs", "tmpfs", "/root", nsd, "mode=0700"),
        ("cgroup2", "cgroup2", "/sys/fs/cgroup", nsde, "nsdelegate"),
    ]
}

/// Makes the early mounts (skipping any already there, e.g. left by an initrd), and the
/// directories and links the read-only root cannot carry. Returns the mount points made.
pub fn early_mounts<S: System + ?Sized>(sys: &S, paths: &Paths) -> Result<Vec<PathBuf>, HostError> {
    let mut made = Vec::new();
    for (fstype, source, target, flags, data) in early_mount_table() {
        let already: Vec<PathBuf> = crate::sys::mounts(paths)
            .into_iter()
            .map(|m| m.mount_point)
            .collect();
        let path = paths.p(target);
        if already.contains(&path) {
            continue;
        }
        let _ = std::fs::create_dir_all(&path);
        sys.mount(&MountSpec::fs(fstype, source, path.clone(), flags, data))?;
        made.push(path);
    }
    let dirs = [
        "/var/lib/docker",
        "/var/lib/containerd",
        "/var/log/spotinit",
        "/var/tmp",
        "/var/cache",
        "/run/spotinit",
        "/run/spotinit/home",
        "/run/lock",
    ];
    for d in dirs {
        std::fs::create_dir_all(paths.p(d)).map_err(FileError::at("mkdir", d))?;
    }
    let links = [
        ("../run", "/var/run"),
        ("../run/lock", "/var/lock"),
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ];
    for (target, link) in links {
        let l = paths.p(link);
        if std::fs::symlink_metadata(&l).is_err() {
            std::os::unix::fs::symlink(target, &l).map_err(|source| HostError::Link {
                target,
                link,
                source,
            })?;
        }
    }
    Ok(made)
}

/// Modaliases of every device the kernel found (what udev's coldplug would load drivers for):
/// every `modalias` file under /sys/devices. Bus devices and class devices both (the power
/// button's input device is a class device, found nowhere under /sys/bus).
pub fn modaliases(paths: &Paths) -> Vec<String> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            // Not following symlinks: sysfs links (subsystem, driver, device) make cycles.
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() && depth < 16 {
                walk(&e.path(), depth + 1, out);
            } else if ft.is_file() && e.file_name() == "modalias" {
                if let Ok(a) = std::fs::read_to_string(e.path()) {
                    let a = a.trim();
                    if !a.is_empty() && !out.iter().any(|x| x == a) {
                        out.push(a.to_string());
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&paths.p("/sys/devices"), 0, &mut out);
    out.sort();
    out
}

/// Modules Docker asks for by name (the rest it gets through the kernel's request_module).
pub const DOCKER_MODULES: [&str; 4] = ["overlay", "br_netfilter", "veth", "nf_conntrack"];

/// `modprobe -a -b` for device aliases. Exit status 1 is normal: most platform and ACPI
/// aliases have no module, and modprobe says so for each. Not `-q`: with -q, -a stops at the
/// first such alias.
async fn modprobe_aliases<S: System + ?Sized>(sys: &S, aliases: &[String]) {
    let cmd = CommandSpec::new("/usr/sbin/modprobe")
        .args(["-a", "-b"])
        .args(aliases.iter().cloned())
        .output(crate::sys::Output::Null);
    let _ = crate::sys::run_code(sys, &cmd).await;
}

/// Loads drivers for present devices (network, input for the power button, ...). Without udev
/// nobody else does: a pass loads the drivers for the devices present, and those drivers can
/// reveal new devices (virtio_pci -> virtio_net; button -> an input device -> evdev), so passes
/// repeat until no new alias appears. A module that is missing is not fatal here.
/// `tried` holds aliases already given to modprobe (by [`load_network_drivers`]).
pub async fn load_device_drivers<S: System + ?Sized>(
    sys: &S,
    paths: &Paths,
    mut tried: Vec<String>,
) -> Result<String, HostError> {
    let given = tried.len();
    let mut passes = 0;
    loop {
        let fresh: Vec<String> = modaliases(paths)
            .into_iter()
            .filter(|a| !tried.contains(a))
            .collect();
        if fresh.is_empty() || passes == 5 {
            break;
        }
        passes += 1;
        modprobe_aliases(sys, &fresh).await;
        tried.extend(fresh);
    }
    Ok(format!(
        "{} device aliases in {passes} passes",
        tried.len() - given
    ))
}

/// Whether a modalias names a network device: PCI class 02 (a network controller: ENA, or
/// virtio-net's PCI function), virtio device 1 (net), or Xen's vif.
pub fn is_network_alias(alias: &str) -> bool {
    (alias.starts_with("pci:") && alias.contains("bc02"))
        || alias.starts_with("virtio:d00000001v")
        || alias == "xen:vif"
}

/// The network drivers before anything else, so DHCP starts while the rest of the coldplug
/// ([`load_device_drivers`]) runs. Repeats while a driver reveals another network device
/// (virtio_pci, a module on older kernels, shows the virtio NIC). Returns a console line and
/// the aliases tried.
pub async fn load_network_drivers<S: System + ?Sized>(
    sys: &S,
    paths: &Paths,
) -> Result<(String, Vec<String>), HostError> {
    let mut tried: Vec<String> = Vec::new();
    for _ in 0..3 {
        let fresh: Vec<String> = modaliases(paths)
            .into_iter()
            .filter(|a| is_network_alias(a) && !tried.contains(a))
            .collect();
        if fresh.is_empty() {
            break;
        }
        modprobe_aliases(sys, &fresh).await;
        tried.extend(fresh);
    }
    Ok((format!("{} network device aliases", tried.len()), tried))
}

/// Docker's modules, loading while the network, the configuration and the volume proceed:
/// nothing before Docker needs them. [`DockerModules::wait`] before starting Docker.
pub struct DockerModules(Result<Child, CommandError>);

impl DockerModules {
    pub fn start<S: System + ?Sized>(sys: &S) -> Self {
        let cmd = CommandSpec::new("/usr/sbin/modprobe")
            .args(["-a", "-q"])
            .args(DOCKER_MODULES);
        DockerModules(sys.spawn(&cmd).map_err(|source| CommandError::Start {
            command: cmd.display(),
            source,
        }))
    }

    /// A line for the console: loaded, or what went wrong (not fatal: Docker says what it
    /// lacks, and the kernel loads most of them on request anyway).
    pub async fn wait(self) -> String {
        match self.0 {
            Ok(child) => match child.wait().await {
                s if s.success() => format!("loaded {}", DOCKER_MODULES.join(" ")),
                s => format!(
                    "modprobe {} was {}",
                    DOCKER_MODULES.join(" "),
                    crate::sys::describe_exit(s)
                ),
            },
            Err(e) => e.to_string(),
        }
    }
}

/// The interface to configure: the configured one, else the first physical non-loopback one.
pub fn pick_interface(paths: &Paths, configured: Option<&str>) -> Option<String> {
    if let Some(i) = configured {
        return paths
            .p("/sys/class/net")
            .join(i)
            .exists()
            .then(|| i.to_string());
    }
    let mut names: Vec<String> = std::fs::read_dir(paths.p("/sys/class/net"))
        .ok()?
        .flatten()
        .filter(|e| e.path().join("device").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().next()
}

pub const DHCP_SCRIPT: &str = "/usr/lib/spotinit/udhcpc.script";

/// busybox udhcpc in the foreground, with only the capabilities a DHCP client needs.
pub fn dhcp_client(iface: &str, paths: &Paths) -> ServiceSpec {
    use caps::Capability::*;
    ServiceSpec::new(
        &format!("dhcp-{iface}"),
        CommandSpec::new("/bin/busybox")
            .args(["udhcpc", "-f", "-i", iface, "-s", DHCP_SCRIPT])
            // Discover 5 times 2 s apart, then pause 5 s: never give up, never spin.
            .args(["-t", "5", "-T", "2", "-A", "5", "-O", "mtu"])
            .output(crate::services::docker::log_output(
                paths,
                &format!("dhcp-{iface}"),
            ))
            .keep_caps(vec![CAP_NET_ADMIN, CAP_NET_RAW, CAP_NET_BIND_SERVICE]),
    )
    .stop_timeout(Duration::from_secs(3))
}

/// The lease the DHCP hook script wrote: key=value lines.
pub fn read_lease(path: &Path) -> Option<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(parse_lease(&text))
}

/// A lease file's `key=value` lines as pairs, values unquoted; lines without `=` are skipped.
pub fn parse_lease(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// Brings the network up: the interface (waiting for its driver), the DHCP client, the lease.
pub async fn network<S: System + ?Sized>(
    sys: &S,
    paths: &Paths,
    supervisor: &Supervisor,
    configured: Option<&str>,
    timeout: Duration,
) -> Result<String, HostError> {
    let start = Instant::now();
    let iface = loop {
        if let Some(i) = pick_interface(paths, configured) {
            break i;
        }
        if start.elapsed() > Duration::from_secs(20) {
            return Err(match configured {
                Some(i) => HostError::NoSuchInterface(i.to_string()),
                None => HostError::NoInterface,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    sys.interface_up(&iface)?;
    let lease_file = paths.p("/run/spotinit").join(format!("dhcp-{iface}.env"));
    let _ = std::fs::remove_file(&lease_file);
    supervisor.launch(dhcp_client(&iface, paths)).await?;
    loop {
        if let Some(lease) = read_lease(&lease_file) {
            let get = |k: &str| {
                lease
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            return Ok(format!(
                "{iface} {}/{} via {} (DHCP)",
                get("ip"),
                get("prefix"),
                get("router")
            ));
        }
        if start.elapsed() > timeout {
            return Err(HostError::NoLease {
                iface,
                within: crate::console::human(timeout),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A note when this is not a Nitro instance: the AMI is built for Nitro (UEFI, NVMe, ENA).
pub fn hypervisor_note(paths: &Paths) -> Option<String> {
    let t = std::fs::read_to_string(paths.p("/sys/hypervisor/type")).ok()?;
    (t.trim() == "xen").then(|| {
        "this is a Xen instance type; spotinit supports Nitro instance types only (NVMe EBS, ENA network): choose e.g. t3, m6i, c6i, r6i".to_string()
    })
}

/// The image's version stamp, one line for the console.
pub fn version_line(paths: &Paths) -> String {
    let stamp = std::fs::read_to_string(paths.p("/usr/lib/spotinit/version")).unwrap_or_default();
    let get = |k: &str| {
        stamp
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or("?")
            .to_string()
    };
    if stamp.is_empty() {
        format!(
            "spotinit {} (no image version stamp)",
            env!("CARGO_PKG_VERSION")
        )
    } else {
        format!(
            "spotinit {} (git {}), image {} built {}: kernel {}, docker {}, containerd {}, runc {}",
            env!("CARGO_PKG_VERSION"),
            get("git_commit"),
            get("image_id"),
            get("build_date"),
            get("kernel"),
            get("docker"),
            get("containerd"),
            get("runc")
        )
    }
}

#[cfg(test)]
#[path = "host_tests.rs"]
mod tests;
