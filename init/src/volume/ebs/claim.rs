//! `volume.pool`: taking one of the pool's volumes. In the order [`pool::plan`] gives: a free
//! one in this zone (attaching is the lock: a volume another instance attached first is that
//! instance's, and the next one is tried), one a dead instance held, a new one while the pool
//! has room, then a free one from another zone, moved here as a single volume would be. When
//! none is to be had, the pool is read again every few seconds for up to
//! `volume.live_holder_wait_secs` (an instance being replaced lets go when it drains).

use super::EbsVolume;
use crate::cloud::{tags, Ec2};
use crate::console::human;
use crate::sys::System;
use crate::volume::attach::{self, api};
use crate::volume::pool::{self, HolderStates, Member, View};
use crate::volume::select::{self, SETTLE};
use crate::volume::zone_move::move_here;
use crate::volume::{Slot, Step, VolumeError};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::time::Instant;

/// How often the pool is read again while none of its volumes is free.
const POOL_POLL: Duration = Duration::from_secs(2);
/// New volumes this instance may create and lose to racing creators before it stops creating.
const MAX_CREATIONS: u32 = 3;

impl<E: Ec2, S: System> EbsVolume<E, S> {
    /// Takes a volume of `pool`: on return it is attached to this instance, and its slot is
    /// this host's.
    pub(super) async fn claim_from_pool(&mut self, pool: &str) -> Result<String, VolumeError> {
        let start = Instant::now();
        let mut said_waiting = false;
        let mut said: BTreeSet<String> = BTreeSet::new();
        let mut creations = 0;
        let mut holders = HolderStates::default();
        loop {
            let (view, holding) =
                pool::read(&*self.ec2, &self.cfg, pool, &self.me, &mut holders).await?;
            for (id, why) in &view.passed_over {
                if said.insert(id.clone()) {
                    crate::log!("volume: pool {pool}: passing over {id}: {why}");
                }
            }
            let plan = pool::plan(&view, &holding, &self.cfg, &self.me);
            for m in &plan.here {
                if self.take(pool, m, false).await? {
                    return Ok(m.volume.id.clone());
                }
            }
            if let Some(slot) = plan.new_slot.filter(|_| creations < MAX_CREATIONS) {
                creations += 1;
                if let Some(id) = self.create_member(pool, slot, &view).await? {
                    return Ok(id);
                }
                continue;
            }
            for m in &plan.elsewhere {
                if let Some(id) = self.follow(pool, m).await? {
                    return Ok(id);
                }
            }
            let held: Vec<String> = plan
                .held
                .iter()
                .map(|(m, by)| format!("{} (slot {}) is {by}'s", m.volume.id, m.slot))
                .chain(
                    view.members
                        .iter()
                        .filter(|m| m.volume.zone != self.me.zone && !self.cfg.follow_across_zones)
                        .map(|m| {
                            format!(
                                "{} (slot {}) is in {}, and volume.follow_across_zones = false",
                                m.volume.id, m.slot, m.volume.zone
                            )
                        }),
                )
                .collect();
            if start.elapsed() >= self.pool_wait {
                let why_not_new = if !self.cfg.create {
                    "volume.create = false".to_string()
                } else {
                    format!(
                        "it holds {} volumes, its maximum (volume.pool_max = {})",
                        view.count, self.cfg.pool_max
                    )
                };
                return Err(VolumeError::PoolFull {
                    pool: pool.into(),
                    why_not_new,
                    held,
                    waited: self.pool_wait,
                });
            }
            if !said_waiting {
                crate::log!(
                    "volume: pool {pool}: no volume is free ({}); waiting up to {} (volume.live_holder_wait_secs) for an instance of the pool to let one go",
                    held.join("; "),
                    human(self.pool_wait)
                );
                said_waiting = true;
            }
            tokio::time::sleep(POOL_POLL).await;
        }
    }

    /// Attaches `m` unless another live instance has it (then: false, and nothing of it is
    /// kept here).
    async fn take(&mut self, pool: &str, m: &Member, created: bool) -> Result<bool, VolumeError> {
        let id = m.volume.id.clone();
        self.volume_id = Some(id.clone());
        self.info = Some(m.volume.clone());
        self.created = created;
        let attached = match self.bring_to_config(&id).await {
            Ok(()) => {
                self.attach_requested = true;
                attach::attach_exclusive(&*self.ec2, &id, &self.cfg, &self.me).await
            }
            Err(e) => Err(e),
        };
        match attached {
            Ok(a) => {
                self.needs_full_check |= a.forced;
                self.attached_by_claim = true;
                self.slot = Some(Slot::of(pool, m));
                crate::log!(
                    "volume: pool {pool}: took slot {} ({id} in {})",
                    m.slot,
                    m.volume.zone
                );
                Ok(true)
            }
            Err(VolumeError::HeldByRunning { holder, .. }) => {
                crate::log!(
                    "volume: pool {pool}: {id} (slot {}) was taken by {holder}; trying the next",
                    m.slot
                );
                self.forget_volume();
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates a volume in `slot` and takes it, unless a racing creator's volume keeps the slot
    /// (or fills the pool): then this one is deleted, never used, and the pool read again.
    async fn create_member(
        &mut self,
        pool: &str,
        slot: u32,
        view: &View,
    ) -> Result<Option<String>, VolumeError> {
        crate::log!(
            "volume: pool {pool}: no volume free here; creating slot {slot} ({} of at most {})",
            view.count + 1,
            self.cfg.pool_max
        );
        let mut tags = pool::filter(&self.cfg, pool);
        tags.insert(tags::SLOT.into(), slot.to_string());
        let new = select::create_tagged(&*self.ec2, &self.cfg, &self.me, tags)
            .await?
            .volume;
        // Racing creators decide alike which new volume stays, once EC2 shows them all.
        tokio::time::sleep(SETTLE).await;
        let mut holders = HolderStates::default();
        let (after, _) = pool::read(&*self.ec2, &self.cfg, pool, &self.me, &mut holders).await?;
        if let Err(why) = pool::kept_after_creation(&after, &new, slot, self.cfg.pool_max) {
            crate::log!(
                "volume: pool {pool}: deleting {}, which this instance has just created and never used: {why}",
                new.id
            );
            api("DeleteVolume", || self.ec2.delete_volume(&new.id))
                .await
                .map_err(|err| VolumeError::Api {
                    step: Step::Create,
                    err,
                })?;
            return Ok(None);
        }
        let id = new.id.clone();
        let m = Member { volume: new, slot };
        Ok(self.take(pool, &m, true).await?.then_some(id))
    }

    /// Moves a free volume of another zone here and takes the copy. Another instance moving
    /// or taking it first is no failure: the next one is tried.
    async fn follow(&mut self, pool: &str, m: &Member) -> Result<Option<String>, VolumeError> {
        crate::log!(
            "volume: pool {pool}: no volume free in {}; following slot {} ({} in {})",
            self.me.zone,
            m.slot,
            m.volume.id,
            m.volume.zone
        );
        match move_here(&*self.ec2, &m.volume, &self.cfg, &self.me).await {
            Ok(copy) => {
                let id = copy.id.clone();
                let m = Member {
                    volume: copy,
                    slot: m.slot,
                };
                Ok(self.take(pool, &m, false).await?.then_some(id))
            }
            Err(
                e @ (VolumeError::MoveLost { .. }
                | VolumeError::MoveAbandoned { .. }
                | VolumeError::BeingMoved { .. }
                | VolumeError::HeldByRunning { .. }),
            ) => {
                crate::log!("volume: pool {pool}: {e}; trying the next");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}
