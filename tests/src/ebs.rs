//! EBS as block devices: each volume is a sparse backing file, a snapshot is a copy of it, and an
//! attachment is an NVMe controller hot-plugged into the instance's VM.
//!
//! [`EbsBridge`] implements [`EbsHooks`]: the fidelity layer keeps the API state and calls it so
//! the devices follow. Files live in one directory: `<vol-id>.img`, `<snap-id>.img`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::qemu::{PlugId, Vm, NVME_SERIAL_MAX};
use crate::{BoxFuture, EbsHooks};

const GIB: u64 = 1 << 30;
/// How long a detach waits for the guest to release the device. TCG on a shared machine is slow;
/// a guest that does not answer in this time is not going to.
pub const DEFAULT_DETACH_DEADLINE: Duration = Duration::from_secs(90);
/// How long `instance_gone` waits for a killed QEMU to exit (it has then closed every file).
const KILL_DEADLINE: Duration = Duration::from_secs(30);

/// The NVMe serial a volume shows in the guest: `vol` + the id without its hyphen, as on Nitro
/// (`vol-0123456789abcdef0` → `vol0123456789abcdef0`). Today's 17-hex-digit ids (moto's too) give
/// exactly 20 bytes, the most an NVMe serial holds; a longer id is refused rather than truncated,
/// since the guest matches volumes on it.
pub fn nvme_serial(volume_id: &str) -> Result<String, String> {
    let digits = volume_id
        .strip_prefix("vol-")
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_alphanumeric()))
        .ok_or_else(|| format!("{volume_id:?} is not a volume id (vol-<hex digits>)"))?;
    let serial = format!("vol{digits}");
    if serial.len() > NVME_SERIAL_MAX {
        return Err(format!(
            "volume id {volume_id} gives NVMe serial {serial} of {} bytes; NVMe serials hold at most \
             {NVME_SERIAL_MAX}",
            serial.len()
        ));
    }
    Ok(serial)
}

/// Where a volume is plugged. `plug` is `None` while the hot-plug is under way (the volume is
/// already claimed, so a concurrent attach fails).
struct Attachment {
    instance_id: String,
    plug: Option<PlugId>,
}

#[derive(Default)]
struct State {
    instances: HashMap<String, Arc<Vm>>,
    /// By volume id.
    attachments: HashMap<String, Attachment>,
}

/// Volumes and snapshots as files in one directory, attachments as hot-plugs into registered VMs.
pub struct EbsBridge {
    dir: PathBuf,
    detach_deadline: Duration,
    state: Mutex<State>,
}

impl EbsBridge {
    /// Keep volume and snapshot files in `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, String> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("create EBS directory {}: {e}", dir.display()))?;
        let dir = std::path::absolute(&dir)
            .map_err(|e| format!("EBS directory {}: {e}", dir.display()))?;
        Ok(EbsBridge {
            dir,
            detach_deadline: DEFAULT_DETACH_DEADLINE,
            state: Mutex::new(State::default()),
        })
    }

    /// How long a detach waits for the guest to let go of the device.
    pub fn with_detach_deadline(mut self, deadline: Duration) -> Self {
        self.detach_deadline = deadline;
        self
    }

    /// The backing file of a volume (it exists once `volume_created` ran). Inspect it from outside
    /// (`debugfs`, `dumpe2fs`) only while no VM has it plugged.
    pub fn volume_file(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.img"))
    }

    /// The frozen copy a snapshot is.
    pub fn snapshot_file(&self, snapshot_id: &str) -> PathBuf {
        self.dir.join(format!("{snapshot_id}.img"))
    }

    /// Attachments to `instance_id` go to this VM from now on.
    pub fn register_instance(&self, instance_id: &str, vm: Arc<Vm>) {
        self.lock().instances.insert(instance_id.to_owned(), vm);
    }

    /// Stop routing attachments to this instance's VM, and forget what it had plugged (the caller
    /// is done with the VM). Returns the VM if one was registered.
    pub fn forget_instance(&self, instance_id: &str) -> Option<Arc<Vm>> {
        let mut state = self.lock();
        state
            .attachments
            .retain(|_, a| a.instance_id != instance_id);
        state.instances.remove(instance_id)
    }

    /// The instance a volume is plugged into (or being plugged into).
    pub fn attached_to(&self, volume_id: &str) -> Option<String> {
        self.lock()
            .attachments
            .get(volume_id)
            .map(|a| a.instance_id.clone())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn checked_file(&self, kind: &str, id: &str) -> Result<PathBuf, String> {
        // Ids become file names: nothing that could leave the directory.
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(format!("{kind} id {id:?} is not a plain EC2 id"));
        }
        Ok(self.dir.join(format!("{id}.img")))
    }

    async fn create_volume(
        &self,
        volume_id: &str,
        size_gib: u64,
        snapshot_id: Option<&str>,
    ) -> Result<(), String> {
        let what = match snapshot_id {
            Some(s) => format!("create volume {volume_id} ({size_gib} GiB) from snapshot {s}"),
            None => format!("create volume {volume_id} ({size_gib} GiB)"),
        };
        let file = self
            .checked_file("volume", volume_id)
            .map_err(|e| format!("{what}: {e}"))?;
        if size_gib == 0 {
            return Err(format!("{what}: size must be at least 1 GiB"));
        }
        let size = size_gib
            .checked_mul(GIB)
            .ok_or_else(|| format!("{what}: size overflows"))?;
        if file.exists() {
            return Err(format!(
                "{what}: backing file {} already exists",
                file.display()
            ));
        }
        match snapshot_id {
            None => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&file)
                    .map_err(|e| format!("{what}: create {}: {e}", file.display()))?;
                // A hole of the volume's size: a fresh EBS volume reads as zeros.
                f.set_len(size)
                    .map_err(|e| format!("{what}: size {} to {size} bytes: {e}", file.display()))?;
            }
            Some(snapshot_id) => {
                let source = self
                    .checked_file("snapshot", snapshot_id)
                    .map_err(|e| format!("{what}: {e}"))?;
                let source_len = std::fs::metadata(&source)
                    .map_err(|e| format!("{what}: snapshot file {}: {e}", source.display()))?
                    .len();
                if size < source_len {
                    return Err(format!(
                        "{what}: the snapshot holds {source_len} bytes, more than the volume's {size}"
                    ));
                }
                copy_sparse(&source, &file)
                    .await
                    .map_err(|e| format!("{what}: {e}"))?;
                // EBS lets a volume be larger than its snapshot; the rest reads as zeros.
                if size > source_len {
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&file)
                        .map_err(|e| format!("{what}: open {}: {e}", file.display()))?;
                    f.set_len(size).map_err(|e| {
                        format!("{what}: grow {} to {size} bytes: {e}", file.display())
                    })?;
                }
            }
        }
        Ok(())
    }

    async fn create_snapshot(&self, snapshot_id: &str, volume_id: &str) -> Result<(), String> {
        let what = format!("snapshot {snapshot_id} of volume {volume_id}");
        let source = self
            .checked_file("volume", volume_id)
            .map_err(|e| format!("{what}: {e}"))?;
        let target = self
            .checked_file("snapshot", snapshot_id)
            .map_err(|e| format!("{what}: {e}"))?;
        if !source.is_file() {
            return Err(format!("{what}: no backing file {}", source.display()));
        }
        if target.exists() {
            return Err(format!("{what}: {} already exists", target.display()));
        }
        // An EBS snapshot is a point in time. A file copy of a volume being written is not (early
        // blocks would be older than late ones), so freeze the VM it is plugged into for the copy:
        // QMP `stop` drains in-flight I/O into the file. The guest sees a crash-consistent image,
        // as with EBS.
        let writer = {
            let state = self.lock();
            state
                .attachments
                .get(volume_id)
                .and_then(|a| state.instances.get(&a.instance_id))
                .filter(|vm| !vm.has_exited())
                .cloned()
        };
        if let Some(vm) = &writer {
            vm.pause()
                .await
                .map_err(|e| format!("{what}: pause the VM writing it: {e}"))?;
        }
        // Copy under a temporary name: a snapshot file is complete or absent.
        let partial = target.with_extension("img.partial");
        let copied = copy_sparse(&source, &partial).await;
        let resumed = match &writer {
            Some(vm) => vm
                .resume()
                .await
                .map_err(|e| format!("{what}: resume the VM: {e}")),
            None => Ok(()),
        };
        copied.map_err(|e| format!("{what}: {e}"))?;
        resumed?;
        std::fs::rename(&partial, &target).map_err(|e| {
            format!(
                "{what}: rename {} to {}: {e}",
                partial.display(),
                target.display()
            )
        })
    }

    /// Grows the backing file. A VM it is plugged into keeps the old size until its next
    /// attach: QEMU's NVMe namespace has no online resize.
    fn resize_volume(&self, volume_id: &str, size_gib: u64) -> Result<(), String> {
        let what = format!("resize volume {volume_id} to {size_gib} GiB");
        let file = self
            .checked_file("volume", volume_id)
            .map_err(|e| format!("{what}: {e}"))?;
        let size = size_gib
            .checked_mul(GIB)
            .ok_or_else(|| format!("{what}: size overflows"))?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .map_err(|e| format!("{what}: open {}: {e}", file.display()))?;
        let len = f
            .metadata()
            .map_err(|e| format!("{what}: {}: {e}", file.display()))?
            .len();
        if size < len {
            return Err(format!(
                "{what}: it has {len} bytes, and volumes do not shrink"
            ));
        }
        f.set_len(size)
            .map_err(|e| format!("{what}: size {} to {size} bytes: {e}", file.display()))
    }

    async fn attach_volume(&self, instance_id: &str, volume_id: &str) -> Result<(), String> {
        let what = format!("attach volume {volume_id} to instance {instance_id}");
        let file = self
            .checked_file("volume", volume_id)
            .map_err(|e| format!("{what}: {e}"))?;
        let serial = nvme_serial(volume_id).map_err(|e| format!("{what}: {e}"))?;
        if !file.is_file() {
            return Err(format!(
                "{what}: no backing file {} (was volume_created called?)",
                file.display()
            ));
        }
        let vm = {
            let mut state = self.lock();
            let vm =
                state.instances.get(instance_id).cloned().ok_or_else(|| {
                    format!("{what}: no VM is registered for instance {instance_id}")
                })?;
            if let Some(a) = state.attachments.get(volume_id) {
                return Err(format!(
                    "{what}: it is still plugged into instance {}",
                    a.instance_id
                ));
            }
            state.attachments.insert(
                volume_id.to_owned(),
                Attachment {
                    instance_id: instance_id.to_owned(),
                    plug: None,
                },
            );
            vm
        };
        match vm.hotplug_nvme(&file, &serial).await {
            Ok(plug) => {
                if let Some(a) = self.lock().attachments.get_mut(volume_id) {
                    a.plug = Some(plug);
                }
                Ok(())
            }
            Err(e) => {
                self.lock().attachments.remove(volume_id);
                Err(format!("{what}: {e}"))
            }
        }
    }

    async fn detach_volume(&self, instance_id: &str, volume_id: &str) -> Result<(), String> {
        let what = format!("detach volume {volume_id} from instance {instance_id}");
        let (vm, plug) = {
            let state = self.lock();
            let attachment = state
                .attachments
                .get(volume_id)
                .ok_or_else(|| format!("{what}: it is not plugged anywhere"))?;
            if attachment.instance_id != instance_id {
                return Err(format!(
                    "{what}: it is plugged into instance {}",
                    attachment.instance_id
                ));
            }
            let plug = attachment
                .plug
                .clone()
                .ok_or_else(|| format!("{what}: its hot-plug is still under way"))?;
            let vm = state.instances.get(instance_id).cloned();
            (vm, plug)
        };
        let Some(vm) = vm.filter(|vm| !vm.has_exited()) else {
            // The VM is gone, and the device with it.
            self.lock().attachments.remove(volume_id);
            return Ok(());
        };
        vm.unplug(&plug, self.detach_deadline)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        self.lock().attachments.remove(volume_id);
        Ok(())
    }

    async fn instance_killed(&self, instance_id: &str) {
        let vm = self.forget_instance(instance_id);
        if let Some(vm) = vm {
            // Make "nothing is plugged anywhere" true: once QEMU has exited, it has closed every
            // volume file and nothing writes to them any more.
            vm.kill();
            if let Err(e) = vm.wait_exit(KILL_DEADLINE).await {
                eprintln!("spotworld: instance {instance_id} gone but its QEMU did not exit: {e}");
            }
        }
    }
}

/// Copy a volume or snapshot file, keeping holes (and sharing blocks where the filesystem can).
async fn copy_sparse(source: &Path, target: &Path) -> Result<(), String> {
    let output = tokio::process::Command::new("cp")
        .arg("--sparse=always")
        .arg("--reflink=auto")
        .arg("--")
        .arg(source)
        .arg(target)
        .output()
        .await
        .map_err(|e| format!("run cp: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cp {} {}: {}: {}",
            source.display(),
            target.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

impl EbsHooks for EbsBridge {
    fn volume_created<'a>(
        &'a self,
        volume_id: &'a str,
        size_gib: u64,
        snapshot_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.create_volume(volume_id, size_gib, snapshot_id))
    }

    fn snapshot_created<'a>(
        &'a self,
        snapshot_id: &'a str,
        volume_id: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.create_snapshot(snapshot_id, volume_id))
    }

    fn volume_resized<'a>(
        &'a self,
        volume_id: &'a str,
        size_gib: u64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.resize_volume(volume_id, size_gib) })
    }

    fn attach<'a>(
        &'a self,
        instance_id: &'a str,
        volume_id: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.attach_volume(instance_id, volume_id))
    }

    fn detach<'a>(
        &'a self,
        instance_id: &'a str,
        volume_id: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.detach_volume(instance_id, volume_id))
    }

    fn instance_gone<'a>(&'a self, instance_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.instance_killed(instance_id))
    }
}

#[cfg(test)]
mod tests {
    use super::nvme_serial;

    #[test]
    fn serial_is_vol_and_the_id_without_its_hyphen() {
        assert_eq!(
            nvme_serial("vol-0123456789abcdef0").unwrap(),
            "vol0123456789abcdef0"
        );
        assert_eq!(nvme_serial("vol-12345678").unwrap(), "vol12345678");
    }

    #[test]
    fn serial_refuses_what_would_be_truncated_or_is_no_volume() {
        let err = nvme_serial("vol-0123456789abcdef01").unwrap_err();
        assert!(err.contains("21 bytes"), "{err}");
        assert!(nvme_serial("snap-0123").is_err());
        assert!(nvme_serial("vol-").is_err());
        assert!(nvme_serial("vol-../../etc").is_err());
    }
}
