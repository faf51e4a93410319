//! Putting the volume away before it is detached: unmount what lives on it, record the
//! shutdown, and make the filesystem read-only when something still holds it.

use super::EbsVolume;
use crate::cloud::Ec2;
use crate::config::VolumeMode;
use crate::sys::{MsFlags, System};
use crate::volume::layout::{self, ReadOnlyError, Record};
use crate::volume::VolumeError;
use nix::errno::Errno;
use std::path::Path;
use std::time::{Duration, SystemTime};

impl<E: Ec2, S: System> EbsVolume<E, S> {
    /// Unmounts a mount point, waiting out a brief EBUSY (a process just killed). Not mounted
    /// is fine.
    async fn umount_patiently(&self, target: &Path) -> Result<(), crate::sys::SysError> {
        let mut tries = 0;
        loop {
            match self.sys.umount(target, false) {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.errno, Errno::EINVAL | Errno::ENOENT) => return Ok(()),
                Err(e) if e.errno == Errno::EBUSY && tries < 30 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes the volume's filesystem read-only for every mount of it, and checks it is.
    async fn remount_read_only(&self, target: &Path) -> Result<(), ReadOnlyError> {
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        let mut tries = 0;
        loop {
            match self.sys.remount(target, flags) {
                Ok(()) => break,
                // A file still open for writing (a log just closing): a moment.
                Err(e) if e.errno == Errno::EBUSY && tries < 30 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let vol_mount = self.paths.p(layout::VOLUME_MOUNT);
        let all = crate::sys::mounts(&self.paths);
        match all.iter().rev().find(|m| m.mount_point == vol_mount) {
            Some(m) if !m.fs_read_only() => Err(ReadOnlyError::StillWritable {
                volume_mount: vol_mount,
                target: target.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    fn mark_shutdown(&self, record: &Record, clean: bool) {
        let mut r = record.clone();
        r.clean_shutdown = clean;
        r.last_shutdown_at = layout::rfc3339(SystemTime::now());
        if let Err(e) = layout::write_record(&self.paths, &r) {
            crate::log!("volume: cannot record the shutdown: {e}");
        }
    }

    /// Unmounts everything that lives on the volume, deepest first (what Docker left too), marks
    /// the record clean once nothing else is mounted on it, then unmounts the volume itself. A
    /// persisted root cannot be unmounted: it is remounted read-only after the record. Whatever
    /// cannot be unmounted, a read-only filesystem is as safe to detach; if even that fails the
    /// volume is not detached (an error).
    pub(super) async fn put_away(&mut self) -> Result<(), VolumeError> {
        let vol_mount = self.paths.p(layout::VOLUME_MOUNT);
        let root = self.paths.p("/");
        let all = crate::sys::mounts(&self.paths);
        let Some(device) = all
            .iter()
            .rev()
            .find(|m| m.mount_point == vol_mount)
            .map(|m| m.device.clone())
        else {
            self.mounts.clear();
            return Ok(());
        };
        let others = |all: &[crate::sys::MountInfo]| -> Vec<crate::sys::MountInfo> {
            layout::mounts_on_volume(all, &self.paths, &device)
                .into_iter()
                .filter(|m| m.mount_point != vol_mount && m.mount_point != root)
                .collect()
        };
        let mut left_behind = Vec::new();
        for m in others(&all) {
            if !self.mounts.contains(&m.mount_point) {
                left_behind.push(format!("{} ({})", m.mount_point.display(), m.fstype));
            }
            if let Err(e) = self.umount_patiently(&m.mount_point).await {
                crate::log!("volume: {e}");
            }
        }
        if !left_behind.is_empty() {
            crate::log!(
                "volume: unmounted {} left on the state volume: {}",
                crate::console::count(left_behind.len(), "mount"),
                left_behind.join(", ")
            );
        }
        let remaining = others(&crate::sys::mounts(&self.paths));
        let record = self.mounted.take().map(|m| m.record);
        let persisted = self.cfg.mode == VolumeMode::PersistedRoot;
        if remaining.is_empty() {
            // Nothing else can write to it now: the shutdown is clean.
            if let Some(r) = &record {
                self.mark_shutdown(r, true);
            }
            self.sys.sync();
            if persisted {
                return match self.remount_read_only(&root).await {
                    Ok(()) => {
                        crate::log!("volume: the persisted root is read-only now");
                        let _ = self.sys.umount(&vol_mount, false);
                        self.mounts.clear();
                        Ok(())
                    }
                    Err(source) => {
                        if let Some(r) = &record {
                            self.mark_shutdown(r, false);
                        }
                        Err(VolumeError::StillMounted {
                            volume: self.vol(),
                            why: "/ is on it and cannot be made read-only".into(),
                            source,
                        })
                    }
                };
            }
            match self.umount_patiently(&vol_mount).await {
                Ok(())
                    if !crate::sys::mounts(&self.paths)
                        .iter()
                        .any(|m| m.device == device) =>
                {
                    self.mounts.clear();
                    return Ok(());
                }
                Ok(()) => crate::log!(
                    "volume: {} is unmounted but its filesystem is still mounted elsewhere",
                    vol_mount.display()
                ),
                Err(e) => crate::log!("volume: {e}"),
            }
        }
        // Something still holds it. A read-only filesystem is consistent on the disk.
        let holders: Vec<String> = others(&crate::sys::mounts(&self.paths))
            .iter()
            .map(|m| format!("{} ({})", m.mount_point.display(), m.fstype))
            .collect();
        let target = if persisted { &root } else { &vol_mount };
        match self.remount_read_only(target).await {
            Ok(()) => {
                crate::log!(
                    "volume: could not unmount everything on it ({}); its filesystem is read-only now, so it is detached consistent",
                    if holders.is_empty() {
                        "the volume itself".to_string()
                    } else {
                        holders.join(", ")
                    }
                );
                self.mounts.clear();
                Ok(())
            }
            Err(source) => Err(VolumeError::StillMounted {
                volume: self.vol(),
                why: format!(
                    "{}; making it read-only failed",
                    if holders.is_empty() {
                        format!("{} is busy", vol_mount.display())
                    } else {
                        format!("still mounted: {}", holders.join(", "))
                    }
                ),
                source,
            }),
        }
    }
}
