//! The real volume phase on EBS, step by step: select → attach → confirm → disk → filesystem →
//! mount → record. Progress is kept in the struct, so a retry resumes and a release after a
//! partial acquire undoes exactly what was done.

use super::attach;
use super::device::{io_timeout_files, DeviceWatcher, VolumeMatch};
use super::fs::{self, Decision, Origin};
use super::layout::{self, Record, RECORD_FORMAT};
use super::select::{self, FORMAT_DONE, FORMAT_STARTED};
use super::{pivot, Mounted, Step, VolumeError, VolumePhase};
use crate::cloud::tags;
use crate::cloud::{Ec2, Identity, VolumeInfo};
use crate::config::{self, VolumeMode};
use crate::console::human;
use crate::critical::{Critical, Finished};
use crate::sys::{MsFlags, Paths, System};
use nix::errno::Errno;
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
    critical: Critical,
    // Progress.
    volume_id: Option<String>,
    /// The volume as EC2 last described it: its tags say how it may be formatted.
    info: Option<VolumeInfo>,
    created: bool,
    attach_requested: bool,
    /// Read again after attaching: still the state's current home, no live move claim.
    confirmed: bool,
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
            critical: Critical::default(),
            volume_id: None,
            info: None,
            created: false,
            attach_requested: false,
            confirmed: false,
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

    fn mode(&self) -> String {
        config::variant_name(&self.cfg.mode)
    }

    /// Lets go of a volume that turned out not to be the state's home, so the next try
    /// chooses again.
    async fn let_go(&mut self, volume_id: &str) -> Result<(), VolumeError> {
        attach::detach(&*self.ec2, volume_id, &self.me, Duration::from_secs(60)).await?;
        crate::log!("volume: let go of {volume_id}");
        self.volume_id = None;
        self.info = None;
        self.created = false;
        self.attach_requested = false;
        self.confirmed = false;
        self.device = None;
        Ok(())
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

    /// Checks what is on the disk and makes it an ext4 we can mount; formats only what is
    /// provably empty ([`fs::decide`]). Returns whether it made a new filesystem.
    async fn prepare_filesystem(
        &mut self,
        volume_id: &str,
        device: &Path,
    ) -> Result<bool, VolumeError> {
        let dev = device.display().to_string();
        let unreadable = |e: std::io::Error| VolumeError::Device {
            volume: volume_id.into(),
            detail: format!("cannot read {dev}: {e}"),
        };
        let (size, content) = fs::probe(device).map_err(unreadable)?;
        let info = self.info.clone().unwrap_or_default();
        let unfinished_first_format = info
            .tag(tags::FORMAT)
            .is_some_and(|t| t.starts_with(FORMAT_STARTED))
            && info.snapshot_id.is_none();
        let origin = Origin {
            created_by_this_boot: self.created,
            unfinished_first_format,
        };
        match fs::decide(&content, origin, || fs::sample(device)).map_err(unreadable)? {
            Decision::Format(why) => {
                self.format(volume_id, device, size, &why).await?;
                Ok(true)
            }
            Decision::Check(ext4) => {
                let full = self.needs_full_check;
                crate::log!(
                    "volume: {volume_id} has ext4 '{}' ({} of {}){}; checking it{}",
                    ext4.label,
                    gib(ext4.size_bytes()),
                    gib(size),
                    if ext4.needs_recovery {
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
                let (sys, device_owned) = (self.sys.clone(), device.to_path_buf());
                let verdict = self
                    .critical
                    .run(&format!("e2fsck of {volume_id}"), async move {
                        fs::fsck(&*sys, &device_owned, full).await
                    })
                    .await;
                let verdict = match verdict {
                    Ok(v) => v,
                    // Nothing but an unfinished mkfs ever wrote to it: start that again.
                    Err(detail) if unfinished_first_format => {
                        self.format(
                            volume_id,
                            device,
                            size,
                            &format!("its first format by spotinit never finished and left a filesystem e2fsck rejects ({detail})"),
                        )
                        .await?;
                        return Ok(true);
                    }
                    Err(detail) => {
                        return Err(VolumeError::Fsck {
                            volume: volume_id.into(),
                            device: dev,
                            detail,
                        })
                    }
                };
                crate::log!(
                    "volume: filesystem {} in {}{}",
                    match verdict {
                        fs::Fsck::Clean => "clean",
                        fs::Fsck::Repaired => "repaired",
                    },
                    human(start.elapsed()),
                    if ext4.needs_recovery {
                        " (its journal was replayed)"
                    } else {
                        ""
                    }
                );
                self.needs_full_check = false;
                if unfinished_first_format {
                    // Its mkfs did finish; only the tag saying so was not written.
                    select::set_format_tag(&*self.ec2, volume_id, FORMAT_DONE).await?;
                }
                Ok(false)
            }
            Decision::Refuse(found) => Err(VolumeError::ForeignData {
                volume: volume_id.into(),
                device: dev,
                found,
            }),
        }
    }

    /// The first mkfs, between the `spotinit:format` tags `started` and `done`, run to the end
    /// even if a shutdown interrupts the boot.
    async fn format(
        &mut self,
        volume_id: &str,
        device: &Path,
        size: u64,
        why: &str,
    ) -> Result<(), VolumeError> {
        crate::log!(
            "volume: {volume_id} is empty ({}: {why}); creating ext4 labelled {}",
            gib(size),
            self.cfg.label
        );
        let start = Instant::now();
        select::set_format_tag(&*self.ec2, volume_id, &select::format_started(&self.me)).await?;
        let (sys, ec2) = (self.sys.clone(), self.ec2.clone());
        let (device, label, id) = (
            device.to_path_buf(),
            self.cfg.label.clone(),
            volume_id.to_string(),
        );
        self.critical
            .run(&format!("mkfs.ext4 of {volume_id}"), async move {
                fs::mkfs(&*sys, &device, &label)
                    .await
                    .map_err(|detail| VolumeError::Command {
                        step: Step::Format,
                        volume: id.clone(),
                        detail,
                    })?;
                select::set_format_tag(&*ec2, &id, FORMAT_DONE).await
            })
            .await?;
        crate::log!("volume: formatted in {}", human(start.elapsed()));
        Ok(())
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
        let mode = self.mode();
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
                if !r.mode.is_empty() && r.mode != mode {
                    return Err(record_err(format!(
                        "it holds state of volume.mode = \"{}\", but volume.mode is \"{mode}\": the state would not be where that mode looks. Set volume.mode = \"{}\"",
                        r.mode, r.mode
                    )));
                }
                // State that has been used lives in its directories; an empty directory in
                // their place would start Docker on nothing.
                let missing = layout::missing_state_dirs(&self.paths, &mode);
                if r.boot_count > 0 && !missing.is_empty() {
                    return Err(VolumeError::StateMissing {
                        volume: volume_id.into(),
                        missing,
                        lost_found: layout::lost_found_entries(&vol_mount),
                        boots: r.boot_count,
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
            None if fresh || layout::is_empty_fs(&vol_mount) => {
                // The state's directories exist before its first record, so a record always
                // means they did.
                if self.cfg.mode == VolumeMode::PersistedRoot {
                    self.seed_root(volume_id, &vol_mount).await?;
                } else {
                    layout::create_state_dirs(&self.paths, &mode).map_err(|e| {
                        record_err(format!("cannot create the state directories: {e}"))
                    })?;
                }
                Record {
                    format: RECORD_FORMAT,
                    storage_driver: self.storage_driver.clone(),
                    created_by: self.me.instance_id.clone(),
                    created_at: now.clone(),
                    ..Record::default()
                }
            }
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
        record.mode = mode;
        layout::write_record(&self.paths, &record).map_err(record_err)?;
        if self.cfg.mode != VolumeMode::PersistedRoot {
            for target in
                layout::bind_state_dirs(&*self.sys, &self.paths).map_err(sys_err(Step::Mount))?
            {
                if !self.mounts.contains(&target) {
                    self.mounts.push(target);
                }
            }
        }
        // Grow online when the volume was enlarged (ModifyVolume) since mkfs or the last grow.
        if let Ok((size, fs::Content::Ext4(info))) = fs::probe(device) {
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

    /// Persisted-root mode, a new state: the root is copied from the image before the first
    /// record is written.
    async fn seed_root(&self, volume_id: &str, vol_mount: &Path) -> Result<(), VolumeError> {
        let start = Instant::now();
        let seeded = pivot::seed(&*self.sys, &self.paths, vol_mount)
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
        Ok(())
    }

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
    async fn remount_read_only(&self, target: &Path) -> Result<(), String> {
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
                Err(e) => return Err(e.to_string()),
            }
        }
        let vol_mount = self.paths.p(layout::VOLUME_MOUNT);
        let all = crate::sys::mounts(&self.paths);
        match all.iter().rev().find(|m| m.mount_point == vol_mount) {
            Some(m) if !m.fs_read_only() => Err(format!(
                "{} is still read-write after remounting {} read-only",
                vol_mount.display(),
                target.display()
            )),
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
    async fn put_away(&mut self) -> Result<(), VolumeError> {
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
                    Err(detail) => {
                        if let Some(r) = &record {
                            self.mark_shutdown(r, false);
                        }
                        Err(VolumeError::StillMounted {
                            volume: self.vol(),
                            detail: format!("/ is on it and cannot be made read-only: {detail}"),
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
            Err(detail) => Err(VolumeError::StillMounted {
                volume: self.vol(),
                detail: format!(
                    "{}; making it read-only failed: {detail}",
                    if holders.is_empty() {
                        format!("{} is busy", vol_mount.display())
                    } else {
                        format!("still mounted: {}", holders.join(", "))
                    }
                ),
            }),
        }
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
                self.info = Some(s.volume.clone());
                s.volume.id
            }
        };
        // From here on a release must detach, even if the call below is interrupted.
        self.attach_requested = true;
        let a = attach::attach_exclusive(&*self.ec2, &volume_id, &self.cfg, &self.me).await?;
        self.needs_full_check |= a.forced;
        if !self.confirmed {
            match select::confirm_current(&*self.ec2, &volume_id, &self.me).await {
                Ok(info) => {
                    self.info = Some(info);
                    self.confirmed = true;
                }
                Err(e @ VolumeError::Superseded { .. }) => {
                    self.let_go(&volume_id).await?;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
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
        self.sys.sync();
        let start = Instant::now();
        if !self.mounts.is_empty() {
            // Never detach a volume that is still mounted read-write.
            self.put_away().await?;
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

    async fn finish_critical(&self, deadline: Option<Instant>) -> Finished {
        self.critical.finish(deadline).await
    }
}
