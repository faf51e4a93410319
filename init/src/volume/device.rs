//! Finding the block device of an attached EBS volume.
//!
//! On Nitro instances a volume is an NVMe namespace whose controller serial is `vol` + the
//! volume id without its hyphen (EC2's model string is "Amazon Elastic Block Store"; QEMU's is
//! its own, so we match on the serial only). On Xen instances it is the requested name with
//! `sd` turned into `xvd`. Hidden multipath nodes (`nvme0c0n1`) and partitions are ignored.
//!
//! A [`DeviceWatcher`] keeps the set of present disks, filled by one sysfs scan and then by
//! kernel uevents. A waiter is checked against that set and registered under the same lock
//! the event handler takes, so a hot-plug that lands before the wait is never missed (the
//! kata-containers agent pattern). Open the watcher before calling AttachVolume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Why the volume's disk is not usable.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device watcher stopped")]
    WatcherStopped,
    #[error(
        "no disk with NVMe serial {serial} or name {name} appeared within {}; disks present: {}",
        crate::console::human(*within),
        if present.is_empty() { "none".into() } else { present.join(", ") }
    )]
    NotSeen {
        serial: String,
        name: String,
        within: Duration,
        /// `nvme0n1 (serial ...)`, or the name alone.
        present: Vec<String>,
    },
    #[error("cannot read {device}: {source}")]
    Unreadable {
        device: String,
        source: std::io::Error,
    },
    #[error("its attachment to {instance} went to {state} while attaching")]
    Attachment { instance: String, state: String },
}

/// A kernel uevent, as far as we need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uevent {
    pub action: String,
    pub subsystem: String,
    pub devname: String,
    pub devtype: String,
}

/// Parses one `NETLINK_KOBJECT_UEVENT` message (`add@/devices/..\0ACTION=add\0KEY=value\0...`).
pub fn parse_uevent(buf: &[u8]) -> Option<Uevent> {
    let mut ev = Uevent {
        action: String::new(),
        subsystem: String::new(),
        devname: String::new(),
        devtype: String::new(),
    };
    for field in buf.split(|b| *b == 0) {
        let field = std::str::from_utf8(field).ok()?;
        if let Some((k, v)) = field.split_once('=') {
            match k {
                "ACTION" => ev.action = v.into(),
                "SUBSYSTEM" => ev.subsystem = v.into(),
                "DEVNAME" => ev.devname = v.trim_start_matches("/dev/").into(),
                "DEVTYPE" => ev.devtype = v.into(),
                _ => {}
            }
        }
    }
    (!ev.action.is_empty()).then_some(ev)
}

/// What identifies the volume's disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeMatch {
    /// `vol0123456789abcdef0`
    pub nvme_serial: String,
    /// `xvdf` (for a requested `/dev/sdf` or `/dev/xvdf`)
    pub xen_name: String,
}

impl VolumeMatch {
    pub fn new(volume_id: &str, requested_device: &str) -> Self {
        let name = requested_device.trim_start_matches("/dev/");
        let xen_name = match name.strip_prefix("sd") {
            Some(rest) => format!("xvd{rest}"),
            None => name.to_string(),
        };
        VolumeMatch {
            nvme_serial: volume_id.replace('-', ""),
            xen_name,
        }
    }

    pub fn matches(&self, disk: &Disk) -> bool {
        if disk.name.starts_with("nvme") {
            disk.serial.as_deref().map(str::trim) == Some(self.nvme_serial.as_str())
        } else {
            disk.name == self.xen_name
        }
    }
}

/// A whole disk the kernel shows in /sys/block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub name: String,
    pub serial: Option<String>,
    pub model: Option<String>,
}

/// `nvme0c0n1` is a hidden per-path node of a multipath namespace; only `nvme0n1` is usable.
pub fn is_hidden_nvme_path(name: &str) -> bool {
    name.strip_prefix("nvme").is_some_and(|rest| {
        let mut parts = rest.splitn(2, 'c');
        parts
            .next()
            .is_some_and(|a| a.chars().all(|c| c.is_ascii_digit()))
            && parts.next().is_some_and(|b| b.contains('n'))
    })
}

/// Reads what sysfs says about a disk; None for nodes we never use.
pub fn read_disk(sys_block: &Path, name: &str) -> Option<Disk> {
    if is_hidden_nvme_path(name) || name.starts_with("loop") || name.starts_with("ram") {
        return None;
    }
    let dir = sys_block.join(name);
    let attr = |a: &str| {
        std::fs::read_to_string(dir.join("device").join(a))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    Some(Disk {
        name: name.into(),
        serial: attr("serial"),
        model: attr("model"),
    })
}

/// The `queue/io_timeout` files that govern a disk: its own or, for the head of a multipath
/// NVMe namespace (`nvme0n1` of a controller that reports multi-controller support, as QEMU's
/// does), which is bio-based and has none, those of its paths (`nvme0c0n1`, ...). Empty when
/// there are none (then only the driver-wide `nvme_core.io_timeout` applies).
pub fn io_timeout_files(sys_block: &Path, disk: &str) -> Vec<PathBuf> {
    let own = sys_block.join(disk).join("queue/io_timeout");
    if own.exists() {
        return vec![own];
    }
    let Some((subsys, ns)) = disk
        .strip_prefix("nvme")
        .and_then(|rest| rest.split_once('n'))
    else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (ctrl, n) = name
                .strip_prefix(&format!("nvme{subsys}c"))?
                .split_once('n')?;
            let is_path = !ctrl.is_empty() && ctrl.chars().all(|c| c.is_ascii_digit()) && n == ns;
            Some(sys_block.join(&name).join("queue/io_timeout")).filter(|f| is_path && f.exists())
        })
        .collect();
    paths.sort();
    paths
}

/// Every disk in `sys_block` (normally /sys/block).
pub fn scan(sys_block: &Path) -> Vec<Disk> {
    let Ok(rd) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let mut v: Vec<Disk> = rd
        .flatten()
        .filter_map(|e| read_disk(sys_block, &e.file_name().to_string_lossy()))
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

struct Waiter {
    want: VolumeMatch,
    tx: oneshot::Sender<Disk>,
}

#[derive(Default)]
struct Seen {
    disks: HashMap<String, Disk>,
    waiters: Vec<Waiter>,
}

/// The present disks and the waits for one to appear.
#[derive(Clone)]
pub struct DeviceWatcher {
    sys_block: PathBuf,
    seen: Arc<Mutex<Seen>>,
}

impl DeviceWatcher {
    /// Starts from a sysfs scan, then follows `events` (netlink in production, a channel in
    /// tests). The caller must have started receiving events before the scan, which
    /// [`DeviceWatcher::open`] does.
    pub fn start(sys_block: PathBuf, mut events: mpsc::UnboundedReceiver<Uevent>) -> Self {
        let w = DeviceWatcher {
            sys_block,
            seen: Arc::new(Mutex::new(Seen::default())),
        };
        w.rescan();
        let w2 = w.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                w2.event(&ev);
            }
        });
        w
    }

    /// Netlink uevents (opened first) plus a scan of `root`/sys/block.
    pub fn open(paths: &crate::sys::Paths) -> std::io::Result<Self> {
        let rx = netlink::listen()?;
        Ok(Self::start(paths.p("/sys/block"), rx))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds what sysfs shows now (also a fallback if the netlink buffer ever overflowed).
    pub fn rescan(&self) {
        let disks = scan(&self.sys_block);
        let mut seen = self.lock();
        for d in disks {
            Self::offer(&mut seen, d);
        }
    }

    fn event(&self, ev: &Uevent) {
        if ev.subsystem != "block" || ev.devtype != "disk" || ev.devname.is_empty() {
            return;
        }
        match ev.action.as_str() {
            "add" | "change" => {
                if let Some(d) = read_disk(&self.sys_block, &ev.devname) {
                    let mut seen = self.lock();
                    Self::offer(&mut seen, d);
                }
            }
            "remove" => {
                self.lock().disks.remove(&ev.devname);
            }
            _ => {}
        }
    }

    fn offer(seen: &mut Seen, d: Disk) {
        let mut i = 0;
        while i < seen.waiters.len() {
            if seen.waiters[i].want.matches(&d) {
                let w = seen.waiters.swap_remove(i);
                let _ = w.tx.send(d.clone());
            } else {
                i += 1;
            }
        }
        seen.disks.insert(d.name.clone(), d);
    }

    pub fn disks(&self) -> Vec<Disk> {
        let mut v: Vec<Disk> = self.lock().disks.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Waits for the volume's disk. On timeout the error lists the disks that are present.
    pub async fn wait_for(
        &self,
        want: &VolumeMatch,
        deadline: Duration,
    ) -> Result<Disk, DeviceError> {
        let rx = {
            let mut seen = self.lock();
            if let Some(d) = seen.disks.values().find(|d| want.matches(d)) {
                return Ok(d.clone());
            }
            let (tx, rx) = oneshot::channel();
            seen.waiters.push(Waiter {
                want: want.clone(),
                tx,
            });
            rx
        };
        let mut rx = rx;
        let start = tokio::time::Instant::now();
        loop {
            // A periodic rescan covers a lost event; it offers to the same waiters.
            match tokio::time::timeout(Duration::from_secs(2), &mut rx).await {
                Ok(Ok(d)) => return Ok(d),
                Ok(Err(_)) => return Err(DeviceError::WatcherStopped),
                Err(_) if start.elapsed() >= deadline => {
                    let present = self
                        .disks()
                        .iter()
                        .map(|d| match &d.serial {
                            Some(s) => format!("{} (serial {s})", d.name),
                            None => d.name.clone(),
                        })
                        .collect();
                    return Err(DeviceError::NotSeen {
                        serial: want.nvme_serial.clone(),
                        name: want.xen_name.clone(),
                        within: deadline,
                        present,
                    });
                }
                Err(_) => self.rescan(),
            }
        }
    }
}

mod netlink {
    use crate::volume::device::{parse_uevent, Uevent};
    use nix::sys::socket::{
        bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    use std::os::fd::{AsRawFd, OwnedFd};
    use tokio::io::unix::AsyncFd;
    use tokio::sync::mpsc;

    /// Opens a kernel uevent socket and forwards block events. Events from the moment this
    /// returns are buffered by the kernel in the socket, so nothing after it is missed.
    pub fn listen() -> std::io::Result<mpsc::UnboundedReceiver<Uevent>> {
        let fd: OwnedFd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        // Group 1: events as the kernel sends them (not udev's re-broadcast).
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1))?;
        // SAFETY: `fd` is an open socket we own; the AsyncFd takes ownership of it, so it stays
        // open and is the same descriptor for the AsyncFd's whole life.
        let afd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let Ok(mut guard) = afd.readable().await else {
                    return;
                };
                match guard.try_io(|fd| {
                    recv(fd.get_ref().as_raw_fd(), &mut buf, MsgFlags::empty())
                        .map_err(std::io::Error::from)
                }) {
                    Ok(Ok(n)) => {
                        if let Some(ev) = parse_uevent(&buf[..n]) {
                            if tx.send(ev).is_err() {
                                return;
                            }
                        }
                    }
                    // ENOBUFS: events were dropped; the watcher's periodic rescan covers it.
                    Ok(Err(_)) => {}
                    Err(_would_block) => {}
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
