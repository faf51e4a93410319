//! [`EbsVolume`] as the boot's volume phase: acquire runs the steps in order and resumes where
//! a failed try stopped; release puts the volume away and detaches it.

use super::EbsVolume;
use crate::cloud::Ec2;
use crate::console::human;
use crate::critical::Finished;
use crate::sys::System;
use crate::volume::attach;
use crate::volume::select;
use crate::volume::{Mounted, VolumeError, VolumePhase};
use std::time::Duration;
use tokio::time::Instant;

impl<E: Ec2, S: System> EbsVolume<E, S> {
    /// Lets go of a volume that turned out not to be the state's home, so the next try
    /// chooses again.
    async fn let_go(&mut self, volume_id: &str) -> Result<(), VolumeError> {
        attach::detach(&*self.ec2, volume_id, &self.me, Duration::from_secs(60)).await?;
        crate::log!("volume: let go of {volume_id}");
        self.forget_volume();
        Ok(())
    }

    /// Forgets the chosen volume and the progress made on it (nothing was mounted), so the
    /// next try, or the pool's next volume, starts from the choice.
    pub(super) fn forget_volume(&mut self) {
        self.volume_id = None;
        self.info = None;
        self.created = false;
        self.slot = None;
        self.modified = false;
        self.attach_requested = false;
        self.confirmed = false;
        self.device = None;
    }
}

impl<E: Ec2, S: System> VolumePhase for EbsVolume<E, S> {
    async fn acquire(&mut self) -> Result<Mounted, VolumeError> {
        if let Some(m) = &self.mounted {
            return Ok(m.clone());
        }
        let pool = self.cfg.pool.clone();
        let volume_id = match (&self.volume_id, pool) {
            (Some(id), _) => id.clone(),
            (None, Some(pool)) => self.claim_from_pool(&pool).await?,
            (None, None) => {
                let s = select::select(&*self.ec2, &self.cfg, &self.me).await?;
                self.created = s.created;
                self.volume_id = Some(s.volume.id.clone());
                self.info = Some(s.volume.clone());
                s.volume.id
            }
        };
        if !std::mem::take(&mut self.attached_by_claim) {
            self.bring_to_config(&volume_id).await?;
            // From here on a release must detach, even if the call below is interrupted.
            self.attach_requested = true;
            let a = attach::attach_exclusive(&*self.ec2, &volume_id, &self.cfg, &self.me).await?;
            self.needs_full_check |= a.forced;
        }
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
