//! The attached volume's disk: finding its block device, and making what is on it an ext4 to
//! mount (formatting only what is provably empty, around the `spotinit:format` tags).

use super::{gib, EbsVolume};
use crate::cloud::tags;
use crate::cloud::Ec2;
use crate::console::human;
use crate::sys::System;
use crate::volume::device::{io_timeout_files, DeviceError, VolumeMatch};
use crate::volume::fs::{self, Decision, Origin};
use crate::volume::select::{self, FORMAT_DONE, FORMAT_STARTED};
use crate::volume::{Step, VolumeError};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

impl<E: Ec2, S: System> EbsVolume<E, S> {
    pub(super) async fn find_disk(&mut self, volume_id: &str) -> Result<PathBuf, VolumeError> {
        if let Some(d) = &self.device {
            return Ok(d.clone());
        }
        let want = VolumeMatch::new(volume_id, &self.cfg.device);
        let start = Instant::now();
        let disk = self
            .devices
            .wait_for(&want, Duration::from_secs(self.cfg.device_timeout_secs))
            .await
            .map_err(|source| VolumeError::Device {
                volume: volume_id.into(),
                source,
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
    pub(super) async fn prepare_filesystem(
        &mut self,
        volume_id: &str,
        device: &Path,
    ) -> Result<bool, VolumeError> {
        let dev = device.display().to_string();
        let unreadable = |source| VolumeError::Device {
            volume: volume_id.into(),
            source: DeviceError::Unreadable {
                device: dev.clone(),
                source,
            },
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
                    Err(source) => {
                        return Err(VolumeError::Fsck {
                            volume: volume_id.into(),
                            device: dev,
                            source,
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
                    .map_err(|source| VolumeError::Command {
                        step: Step::Format,
                        volume: id.clone(),
                        source,
                    })?;
                select::set_format_tag(&*ec2, &id, FORMAT_DONE).await
            })
            .await?;
        crate::log!("volume: formatted in {}", human(start.elapsed()));
        Ok(())
    }
}
