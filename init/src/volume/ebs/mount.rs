//! Mounting the volume and keeping its record: the checks against what the record says, the
//! state directories (or the seeded persisted root), the binds, and the online grow.

use super::{gib, EbsVolume};
use crate::cloud::Ec2;
use crate::config::VolumeMode;
use crate::console::human;
use crate::sys::System;
use crate::volume::fs;
use crate::volume::layout::{self, Record, RecordError, RECORD_FORMAT};
use crate::volume::{pivot, Mounted, Step, VolumeError};
use std::path::Path;
use std::time::SystemTime;
use tokio::time::Instant;

impl<E: Ec2, S: System> EbsVolume<E, S> {
    /// Mount, check or start the record, bind into place, grow.
    pub(super) async fn mount_and_record(
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
        let record_err = |source| VolumeError::Record {
            volume: volume_id.into(),
            source,
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
                    return Err(record_err(RecordError::Mode {
                        recorded: r.mode,
                        configured: mode,
                    }));
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
                    layout::create_state_dirs(&self.paths, &mode)
                        .map_err(|e| record_err(RecordError::StateDirs(e)))?;
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
            slot: self.slot.clone(),
        })
    }

    /// Persisted-root mode, a new state: the root is copied from the image before the first
    /// record is written.
    async fn seed_root(&self, volume_id: &str, vol_mount: &Path) -> Result<(), VolumeError> {
        let start = Instant::now();
        let seeded = pivot::seed(&*self.sys, &self.paths, vol_mount)
            .await
            .map_err(|source| VolumeError::Seed {
                volume: volume_id.into(),
                source,
            })?;
        if seeded {
            crate::log!(
                "volume: seeded the persisted root on {volume_id} from the image in {}",
                human(start.elapsed())
            );
        }
        Ok(())
    }
}
