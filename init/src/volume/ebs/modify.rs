//! Before the attach, once no other instance holds the volume: bring it to the configured size,
//! type, IOPS and throughput (ModifyVolume), and wait until EC2 lets it be used. The filesystem grows after the mount
//! (`mount`), when the disk shows the new size.
//!
//! A volume that cannot be modified (EC2's six-hour limit, a role without the permission, a
//! failed modification) is used as it is, with a warning: its state is intact, only smaller or
//! slower than asked, and refusing it would fail every replacement the same way.

use super::EbsVolume;
use crate::cloud::{CloudError, Ec2, ErrorKind, VolumeSpec};
use crate::console::human;
use crate::retry::doubling;
use crate::sys::System;
use crate::volume::{attach, modify, Step, VolumeError};
use std::time::Duration;
use tokio::time::Instant;

/// EC2 answers a modification in seconds to minutes before `optimizing`; beyond this the boot
/// stops and tries again.
const MODIFY_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How often a long wait says how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

impl<E: Ec2, S: System> EbsVolume<E, S> {
    pub(super) async fn bring_to_config(&mut self, volume_id: &str) -> Result<(), VolumeError> {
        if self.modified {
            return Ok(());
        }
        let Some(info) = self.info.clone() else {
            return Ok(());
        };
        let plan = modify::plan(&info.spec, &self.cfg);
        if let Some((has_gib, asked)) = plan.shrink_refused {
            crate::log!(
                "volume: {volume_id} has {has_gib} GiB and volume.size_gib asks for {asked}: EBS volumes cannot shrink, so it stays at {has_gib} GiB; set volume.size_gib = {has_gib} to match"
            );
        }
        if plan.change.is_none() {
            self.modified = true;
            return Ok(());
        }
        // Never change a volume another live instance owns: wait until nobody holds it, as the
        // attach would (no call at all when nobody does), and read what it is then.
        let (info, forced) =
            attach::wait_unheld_forced(&*self.ec2, &info, &self.cfg, &self.me).await?;
        self.needs_full_check |= forced;
        let has = info.spec.clone();
        self.info = Some(info);
        let Some(change) = modify::plan(&has, &self.cfg).change else {
            self.modified = true;
            return Ok(());
        };
        let what = modify::describe(&has, &change);
        crate::log!("volume: modifying {volume_id} to match [volume]: {what}");
        let start = Instant::now();
        match self.ec2.modify_volume(volume_id, &change).await {
            Ok(_) => {}
            // Begun by an instance that was interrupted: wait for it as for ours.
            Err(e) if e.code.as_deref() == Some("IncorrectModificationState") => {
                crate::log!("volume: {volume_id} is being modified already; waiting for it");
            }
            Err(e) => {
                self.modified = true;
                crate::log!("{}", not_modified(volume_id, &has, &e));
                return Ok(());
            }
        }
        self.wait_usable(volume_id, &has, start).await?;
        self.modified = true;
        Ok(())
    }

    /// Waits until the modification is `optimizing` or `completed` (EC2 refuses to attach a
    /// volume that is `modifying`).
    async fn wait_usable(
        &self,
        volume_id: &str,
        has: &VolumeSpec,
        start: Instant,
    ) -> Result<(), VolumeError> {
        let mut said = start;
        for n in 0.. {
            match self.ec2.volume_modification(volume_id).await {
                Ok(Some(m)) if m.state.is_usable() => {
                    crate::log!(
                        "volume: {volume_id} modified in {} (EC2: {}, {}%)",
                        human(start.elapsed()),
                        m.state,
                        m.progress
                    );
                    return Ok(());
                }
                Ok(Some(m)) if m.state == crate::cloud::ModificationState::Failed => {
                    crate::log!(
                        "volume: WARNING: EC2 could not modify {volume_id} ({}); continuing at {} GiB {}",
                        m.status_message.as_deref().unwrap_or("no reason given"),
                        has.size_gib,
                        has.volume_type
                    );
                    return Ok(());
                }
                Ok(m) => {
                    if said.elapsed() >= PROGRESS_EVERY {
                        said = Instant::now();
                        crate::log!(
                            "volume: {volume_id} still modifying ({}%, {})",
                            m.map_or(0, |m| m.progress),
                            human(start.elapsed())
                        );
                    }
                }
                Err(e) if e.is_retryable() => {}
                Err(e) if e.kind == ErrorKind::Unauthorized => {
                    // The attach waits for the modification instead (it is refused until then,
                    // and retried).
                    crate::log!(
                        "volume: WARNING: cannot follow the modification of {volume_id} ({e}). Add ec2:DescribeVolumesModifications to the instance role (README, IAM policy)"
                    );
                    return Ok(());
                }
                Err(err) => {
                    return Err(VolumeError::Api {
                        step: Step::Modify,
                        err,
                    })
                }
            }
            if start.elapsed() >= MODIFY_TIMEOUT {
                return Err(VolumeError::Timeout {
                    step: Step::Modify,
                    volume: volume_id.into(),
                    detail: format!(
                        "EC2 is still modifying it after {}; the next try waits again",
                        human(start.elapsed())
                    ),
                });
            }
            tokio::time::sleep(doubling(
                Duration::from_millis(500),
                n,
                Duration::from_secs(5),
            ))
            .await;
        }
        unreachable!("the wait returns from inside its loop")
    }
}

/// The warning for a modification EC2 refused: the cause, and the fix where there is one.
fn not_modified(volume_id: &str, has: &VolumeSpec, e: &CloudError) -> String {
    let now = format!("{} GiB {}", has.size_gib, has.volume_type);
    match e.code.as_deref() {
        Some("VolumeModificationRateExceeded") => format!(
            "volume: WARNING: EC2 modifies a volume at most once every six hours, and {volume_id} was modified less than six hours ago; it stays at {now} until a boot after that"
        ),
        _ if e.kind == ErrorKind::Unauthorized => format!(
            "volume: WARNING: cannot modify {volume_id} ({e}); it stays at {now}. Add ec2:ModifyVolume and ec2:DescribeVolumesModifications to the instance role (README, IAM policy)"
        ),
        _ => format!("volume: WARNING: cannot modify {volume_id} ({e}); it stays at {now}"),
    }
}
