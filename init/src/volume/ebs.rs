//! The real volume phase on EBS, step by step: select → attach → disk → filesystem → mount →
//! record. Progress is kept in the struct, so a retry resumes and a release after a partial
//! acquire undoes exactly what was done.

use super::attach;
use super::device::{io_timeout_files, DeviceWatcher, VolumeMatch};
use super::fs::{self, Content};
use super::layout::{self, Record, RECORD_FORMAT};
use super::{pivot, select, Mounted, Step, VolumeError, VolumePhase};
use crate::cloud::{Ec2, Identity};
use crate::config::{self, VolumeMode};
use crate::console::human;
use crate::sys::{Paths, System};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

pub struct EbsVolume<E: Ec2, S: System> {
    ec2: Arc<E>,
    sys: Arc<S>,
    paths: Paths,
    cfg: config::Volume,
    storage_driver: String,
    me: Identity,
    devices: DeviceWatcher,
    // Progress.
    volume_id: Option<String>,
    created: bool,
    attach_requested: bool,
    needs_full_check: bool,
    device: Option<PathBuf>,
    /// What we mounted, in order (the volume, then the binds).
    mounts: Vec<PathBuf>,
    mounted: Option<Mounted>,
}

impl<E: Ec2, S: System> EbsVolume<E, S> {
    /// `devices` must be open before the first attach so the disk's arrival is seen.
    pub fn new(
        ec2: Arc<E>,
        sys: Arc<S>,
        paths: Paths,
        cfg: config::Volume,
        storage_driver: String,
        me: Identity,
        devices: DeviceWatcher,
    ) -> Self {
        EbsVolume {
            ec2,
            sys,
            paths,
            cfg,
            storage_driver,
            me,
            devices,
            volume_id: None,
            created: false,
            attach_requested: false,
            needs_full_check: false,
            device: None,
            mounts: Vec::new(),
            mounted: None,
        }
    }

    pub fn volume_id(&self) -> Option<&str> {
        self.volume_id.as_deref()
    }

    fn vol(&self) -> String {
        self.volume_id
            .clone()
            .unwrap_or_else(|| "(none yet)".into())
    }

    async fn find_disk(&mut self, volume_id: &str) -> Result<PathBuf, VolumeError> {
        if let Some(d) = &self.device {
            return Ok(d.clone());
        }
        let want = VolumeMatch::new(volume_id, &self.cfg.device);
        let start = Instant::now();
        let disk = self
            .devices
            .wait_for(&want, Duration::from_secs(self.cfg.device_timeout_secs))
            .await
            .map_err(|detail| VolumeError::Device {
                volume: volume_id.into(),
                detail,
            })?;
        let path = self.paths.p("/dev").join(&disk.name);
        crate::log!(
            "volume: {volume_id} is {} (model {}, serial {}), seen in {}",
            path.display(),
            disk.model.as_deref().unwrap_or("?"),
            disk.serial.as_deref().unwrap_or("?"),
            human(start.elapsed())
        );
        // EBS advises an effectively infinite NVMe I/O timeout so a slow EBS moment is not
        // turned into I/O errors (the kernel command line sets it for the driver too).
        if disk.name.starts_with("nvme") {
            let files = io_timeout_files(&self.paths.p("/sys/block"), &disk.name);
            if files.is_empty() {
                crate::log!(
                    "volume: {} has no queue/io_timeout; the kernel command line's nvme_core.io_timeout applies",
                    disk.name
                );
            }
            for t in files {
                if let Err(e) = std::fs::write(&t, "4294967295") {
                    crate::log!("volume: cannot set {}: {e} (continuing)", t.display());
                }
            }
        }
        self.device = Some(path.clone());
        Ok(path)
    }

    async fn prepare_filesystem(
        &mut self,
        volume_id: &str,
        device: &Path,
    ) -> Result<bool, VolumeError> {
        let dev = device.display().to_string();
        let (size, content) = fs::probe(device).map_err(|e| VolumeError::Device {
            volume: volume_id.into(),
            detail: format!("cannot read {dev}: {e}"),
        })?;
        match content {
            Content::Blank => {
                crate::log!(
                    "volume: {volume_id} is blank ({}, first and last MiB all zeros{}); creating ext4 labelled {}",
                    gib(size),
                    if self.created { ", created by this boot" } else { "" },
                    self.cfg.label
                );
                let start = Instant::now();
                fs::mkfs(&*self.sys, device, &self.cfg.label)
                    .await
                    .map_err(|detail| VolumeError::Command {
                        step: Step::Format,
                        volume: volume_id.into(),
                        detail,
                    })?;
                crate::log!("volume: formatted in {}", human(start.elapsed()));
                Ok(true)
            }
            Content::Ext4(info) => {
                let full = self.needs_full_check;
                crate::log!(
                    "volume: {volume_id} has ext4 '{}' ({} of {}){}; checking it{}",
                    info.label,
                    gib(info.size_bytes()),
                    gib(size),
                    if info.needs_recovery {
                        ", journal needs replay"
                    } else {
                        ""
                    },
                    if full {
                        " fully (after a force-detach)"
                    } else {
                        ""
                    }
                );
                let start = Instant::now();
                let verdict = fs::fsck(&*self.sys, device, full).await.map_err(|detail| {
                    VolumeError::Fsck {
                        volume: volume_id.into(),
                        device: dev.clone(),
                        detail,
                    }
                })?;
                crate::log!(
                    "volume: filesystem {} in {}{}",
                    match verdict {
                        fs::Fsck::Clean => "clean",
                        fs::Fsck::Repaired => "repaired",
                    },
                    human(start.elapsed()),
                    if info.needs_recovery {
                        " (its journal was replayed)"
                    } else {
                        ""
                    }
                );
                self.needs_full_check = false;
                Ok(false)
            }
            Content::Other(what) => Err(VolumeError::ForeignData {
                volume: volume_id.into(),
                device: dev,
                found: format!("a {what} signature"),
            }),
            Content::Unknown => Err(VolumeError::ForeignData {
                volume: volume_id.into(),
                device: dev,
                found: "data without any signature spotinit knows".into(),
            }),
        }
    }

    /// Mount, check or start the record, bind into place, grow.
    async fn mount_and_record(
        &mut self,
        volume_id: &str,
        device: &Path,
        fresh: bool,
    ) -> Result<Mounted, VolumeError> {
        let sys_err = |step| {
            let volume = volume_id.to_string();
            move |err| VolumeError::Sys {
                step,
                volume: volume.clone(),
                err,
            }
        };
        let vol_mount = self.paths.p(layout::VOLUME_MOUNT);
        if !self.mounts.contains(&vol_mount) {
            layout::mount_volume(&*self.sys, &self.paths, device).map_err(sys_err(Step::Mount))?;
            self.mounts.push(vol_mount.clone());
        }
        let record_err = |detail: String| VolumeError::Record {
            volume: volume_id.into(),
            detail,
        };
        let previous = layout::read_record(&self.paths).map_err(record_err)?;
        let now = layout::rfc3339(SystemTime::now());
        let mut record = match previous {
            Some(r) => {
                if r.storage_driver != self.storage_driver {
                    return Err(VolumeError::DriverMismatch {
                        volume: volume_id.into(),
                        recorded: r.storage_driver,
                        configured: self.storage_driver.clone(),
                    });
                }
                if r.volume_id != volume_id {
                    crate::log!(
                        "volume: state first recorded on {} continues on {volume_id}",
                        r.volume_id
                    );
                }
                crate::log!(
                    "volume: record: boot {} of this state, last on {} ({}), created by {} at {}",
                    r.boot_count + 1,
                    r.last_instance,
                    if r.clean_shutdown {
                        "clean shutdown".to_string()
                    } else {
                        "no clean shutdown: the filesystem was checked above".to_string()
                    },
                    r.created_by,
                    r.created_at
                );
                r
            }
            None if fresh || layout::is_empty_fs(&vol_mount) => Record {
                format: RECORD_FORMAT,
                storage_driver: self.storage_driver.clone(),
                created_by: self.me.instance_id.clone(),
                created_at: now.clone(),
                ..Record::default()
            },
            None => {
                return Err(VolumeError::NoRecord {
                    volume: volume_id.into(),
                })
            }
        };
        record.volume_id = volume_id.into();
        record.last_instance = self.me.instance_id.clone();
        record.last_boot_at = now;
        record.boot_count += 1;
        record.clean_shutdown = false;
        layout::write_record(&self.paths, &record).map_err(record_err)?;
        if self.cfg.mode == VolumeMode::PersistedRoot {
            let start = Instant::now();
            let seeded = pivot::seed(&*self.sys, &self.paths, &vol_mount)
                .await
                .map_err(|e| VolumeError::Command {
                    step: Step::Mount,
                    volume: volume_id.into(),
                    detail: e.to_string(),
                })?;
            if seeded {
                crate::log!(
                    "volume: seeded the persisted root on {volume_id} from the image in {}",
                    human(start.elapsed())
                );
            }
        } else {
            for target in
                layout::bind_state_dirs(&*self.sys, &self.paths).map_err(sys_err(Step::Mount))?
            {
                if !self.mounts.contains(&target) {
                    self.mounts.push(target);
                }
            }
        }
        // Grow online when the volume was enlarged (ModifyVolume) since mkfs or the last grow.
        if let Ok((size, Content::Ext4(info))) = fs::probe(device) {
            if size > info.size_bytes() + (64 << 20) {
                crate::log!(
                    "volume: growing the filesystem from {} to {}",
                    gib(info.size_bytes()),
                    gib(size)
                );
                // Not fatal: the state is intact, only smaller than the volume. Stopping here
                // would make every replacement fail the same way.
                if let Err(e) = fs::grow(&*self.sys, device).await {
                    crate::log!(
                        "volume: WARNING: could not grow the filesystem ({e}); continuing at {}. Run resize2fs {} by hand",
                        gib(info.size_bytes()),
                        device.display()
                    );
                }
            }
        }
        Ok(Mounted {
            volume_id: volume_id.into(),
            device: device.to_path_buf(),
            record,
        })
    }

    fn unmount_all(&mut self) -> Result<(), VolumeError> {
        while let Some(target) = self.mounts.last().cloned() {
            let mut tries = 0;
            loop {
                match self.sys.umount(&target, false) {
                    Ok(()) => break,
                    Err(e) if e.errno == nix::errno::Errno::EBUSY && tries < 20 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) if e.errno == nix::errno::Errno::EINVAL => break, // not mounted
                    // Persisted root: "/" is on this volume and cannot be unmounted. Read-only
                    // is as clean: the journal is flushed and nothing writes any more.
                    Err(e)
                        if e.errno == nix::errno::Errno::EBUSY
                            && self.cfg.mode == VolumeMode::PersistedRoot =>
                    {
                        let ro = crate::sys::MsFlags::MS_REMOUNT | crate::sys::MsFlags::MS_RDONLY;
                        self.sys
                            .remount(&target, ro)
                            .map_err(|err| VolumeError::Sys {
                                step: Step::Unmount,
                                volume: self.vol(),
                                err,
                            })?;
                        crate::log!("volume: the persisted root is read-only now");
                        break;
                    }
                    Err(err) => {
                        return Err(VolumeError::Sys {
                            step: Step::Unmount,
                            volume: self.vol(),
                            err,
                        })
                    }
                }
            }
            self.mounts.pop();
        }
        Ok(())
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

impl<E: Ec2, S: System> VolumePhase for EbsVolume<E, S> {
    async fn acquire(&mut self) -> Result<Mounted, VolumeError> {
        if let Some(m) = &self.mounted {
            return Ok(m.clone());
        }
        let volume_id = match &self.volume_id {
            Some(id) => id.clone(),
            None => {
                let s = select::select(&*self.ec2, &self.cfg, &self.me).await?;
                self.created = s.created;
                self.volume_id = Some(s.volume.id.clone());
                s.volume.id
            }
        };
        // From here on a release must detach, even if the call below is interrupted.
        self.attach_requested = true;
        let a = attach::attach_exclusive(&*self.ec2, &volume_id, &self.cfg, &self.me).await?;
        self.needs_full_check |= a.forced;
        let device = self.find_disk(&volume_id).await?;
        let fresh = if self.mounts.is_empty() {
            self.prepare_filesystem(&volume_id, &device).await?
        } else {
            false
        };
        let m = self.mount_and_record(&volume_id, &device, fresh).await?;
        crate::log!(
            "volume: {volume_id} mounted; /var/lib/docker and /var/lib/containerd are on it"
        );
        self.mounted = Some(m.clone());
        Ok(m)
    }

    async fn release(&mut self) -> Result<(), VolumeError> {
        if let Some(m) = self.mounted.take() {
            let mut r = m.record;
            r.clean_shutdown = true;
            r.last_shutdown_at = layout::rfc3339(SystemTime::now());
            if let Err(e) = layout::write_record(&self.paths, &r) {
                crate::log!("volume: cannot mark the shutdown clean: {e}");
            }
        }
        self.sys.sync();
        let start = Instant::now();
        let had_mounts = !self.mounts.is_empty();
        // Never detach a volume that is still mounted: better a slow release than a torn disk.
        self.unmount_all()?;
        if had_mounts {
            crate::log!("volume: unmounted in {}", human(start.elapsed()));
        }
        self.device = None;
        if let (true, Some(id)) = (self.attach_requested, self.volume_id.clone()) {
            let took = attach::detach(&*self.ec2, &id, &self.me, Duration::from_secs(60)).await?;
            crate::log!("volume: {id} detached in {}", human(took));
            self.attach_requested = false;
        }
        Ok(())
    }
}
