//! Moving a volume into this instance's zone through a snapshot, under the claim protocol that
//! `select`'s module docs describe: claim, copy, agree on one copy, mark the source superseded.

use super::attach::{self, api};
use super::lineage::{
    client_token, copies_of, describe, mark_superseded, now, oldest, superseded_by, tag,
    wait_available, MoveClaim, SETTLE,
};
use super::{Step, VolumeError};
use crate::cloud::tags;
use crate::cloud::{is_reserved_tag_key, AttachmentState, Ec2, Identity, NewVolume, VolumeInfo};
use crate::config;
use crate::console::human;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// Copies of a source made more than this before our own claim are leftovers of an earlier,
/// abandoned attempt, not a racing mover's.
const RACE_WINDOW: Duration = Duration::from_secs(600);

/// Withdraws our claim on `source` if it is still ours (best effort: a stale claim of a gone
/// instance is cleared by whoever takes the volume next).
async fn withdraw_claim<E: Ec2>(ec2: &E, source: &str, claim: &MoveClaim) {
    if let Ok(Some(v)) = describe(ec2, source).await {
        if MoveClaim::of(&v).as_ref() == Some(claim) {
            if let Err(e) = tag(ec2, source, &[(tags::MOVING, "")]).await {
                crate::log!("volume: could not withdraw the move claim on {source}: {e}");
            }
        }
    }
}

/// Drops a copy this instance made and never used: tagged superseded (so nobody takes it for
/// state, and the IAM policy lets it be deleted), then deleted.
async fn drop_copy<E: Ec2>(ec2: &E, copy: &str, continued_by: &str) {
    if let Err(e) = mark_superseded(ec2, copy, continued_by).await {
        crate::log!("volume: could not mark the dropped copy {copy}: {e}");
    }
    match api("DeleteVolume", || ec2.delete_volume(copy)).await {
        Ok(()) => crate::log!("volume: deleted the dropped copy {copy}"),
        Err(e) => crate::log!(
            "volume: could not delete the dropped copy {copy} ({e}); it is tagged {}={continued_by} and never held state: delete it",
            tags::SUPERSEDED_BY
        ),
    }
}

/// The seed's "snapshot and re-create in the other availability zone", automated, made
/// exclusive (module docs). The new volume gets the identifying tags before the old one is
/// marked superseded, so an interruption never leaves zero volumes to find.
pub(super) async fn move_here<E: Ec2>(
    ec2: &E,
    old: &VolumeInfo,
    cfg: &config::Volume,
    me: &Identity,
) -> Result<VolumeInfo, VolumeError> {
    let started = Instant::now();
    crate::log!(
        "volume: {} is in {}, this instance in {}: moving it here through a snapshot",
        old.id,
        old.zone,
        me.zone
    );
    // A live instance uses it: nothing to claim.
    attach::refuse_live_holder(ec2, old, me).await?;
    // 1. Claim it, give the claim time to be seen, and read it back.
    let claim = MoveClaim::new(me);
    tag(ec2, &old.id, &[(tags::MOVING, &claim.value())]).await?;
    tokio::time::sleep(SETTLE).await;
    let now_old = describe(ec2, &old.id)
        .await?
        .ok_or_else(|| VolumeError::NotFound {
            what: format!(
                "state volume {} disappeared while this instance moved it",
                old.id
            ),
            fix: "Someone deleted it; restore it from a snapshot".into(),
        })?;
    if let Some(by) = superseded_by(&now_old) {
        return Err(VolumeError::Superseded {
            volume: old.id.clone(),
            by: by.to_string(),
        });
    }
    match MoveClaim::of(&now_old) {
        Some(c) if c == claim => {}
        Some(c) => {
            return Err(VolumeError::BeingMoved {
                volume: old.id.clone(),
                by: c.instance,
                zone: c.zone,
                since: c.since,
            })
        }
        None => {
            return Err(VolumeError::MoveAbandoned {
                volume: old.id.clone(),
                copy: "(none yet)".into(),
                why: "its move claim was cleared by the instance that took it".into(),
            })
        }
    }
    // 2. Never copy state that a live instance is still using; wait out a dead holder.
    let old = match attach::wait_unheld(ec2, &now_old, cfg, me).await {
        Ok(v) => v,
        Err(e) => {
            withdraw_claim(ec2, &now_old.id, &claim).await;
            return Err(e);
        }
    };
    let snap_tags = BTreeMap::from([
        ("spotinit:purpose".to_string(), "move".to_string()),
        ("spotinit:volume".to_string(), old.id.clone()),
        (tags::CREATED_BY.to_string(), me.instance_id.clone()),
    ]);
    let description = format!(
        "spotinit: moving {} from {} to {} for {}",
        old.id, old.zone, me.zone, me.instance_id
    );
    let snap = api("CreateSnapshot", || {
        ec2.create_snapshot(&old.id, &description, &snap_tags)
    })
    .await
    .map_err(|err| VolumeError::Api {
        step: Step::Move,
        err,
    })?;
    crate::log!("volume: snapshot {snap} of {} started", old.id);
    attach::wait_snapshot(
        ec2,
        &snap,
        &old.id,
        Duration::from_secs(cfg.snapshot_timeout_secs),
    )
    .await?;
    // The user's tags come along, and spotinit's that name the state (its pool and slot);
    // spotinit's others describe the old volume's history, and AWS's (aws:cloudformation:...,
    // aws:backup:...) are reserved: EC2 refuses them in CreateVolume.
    let mut tags: BTreeMap<String, String> = old
        .tags
        .iter()
        .filter(|(k, _)| {
            (!k.starts_with("spotinit:") || tags::IDENTITY.contains(&k.as_str()))
                && !is_reserved_tag_key(k)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    tags.insert(tags::MOVED_FROM.into(), old.id.clone());
    tags.insert(tags::MOVE_CLAIM.into(), claim.value());
    tags.insert(tags::CREATED_BY.into(), me.instance_id.clone());
    tags.insert(tags::CREATED_AT.into(), now());
    let spec = NewVolume {
        zone: me.zone.clone(),
        spec: old.spec.for_copy(),
        snapshot_id: Some(snap.clone()),
        tags,
        client_token: Some(client_token(me)),
    };
    let new = api("CreateVolume", || ec2.create_volume(&spec))
        .await
        .map_err(|err| VolumeError::Api {
            step: Step::Move,
            err,
        })?;
    let new = wait_available(ec2, &new.id, Step::Move, cfg).await?;
    // 3. Racing movers (claims that crossed unseen) agree on the oldest copy.
    tokio::time::sleep(SETTLE).await;
    let since = new.created_ms.unwrap_or(i64::MAX) - RACE_WINDOW.as_millis() as i64;
    let racing = copies_of(ec2, &old.id).await?;
    let contenders = racing.iter().filter(|c| {
        c.id == new.id || (superseded_by(c).is_none() && c.created_ms.unwrap_or(0) >= since)
    });
    let winner = oldest(contenders)
        .map(|w| w.id.clone())
        .unwrap_or_else(|| new.id.clone());
    if winner != new.id {
        drop_copy(ec2, &new.id, &winner).await;
        return Err(VolumeError::MoveLost {
            volume: old.id.clone(),
            copy: new.id,
            winner,
        });
    }
    // Nobody may have taken the source meanwhile: the copy would miss what they wrote.
    let after = describe(ec2, &old.id).await?;
    let taken = match &after {
        None => Some("it was deleted".to_string()),
        Some(a) => {
            if let Some(h) = a
                .attachments
                .iter()
                .find(|x| x.state != AttachmentState::Detached)
            {
                Some(format!("instance {} attached it meanwhile", h.instance_id))
            } else if MoveClaim::of(a).as_ref() != Some(&claim) {
                Some("its move claim changed meanwhile".to_string())
            } else {
                None
            }
        }
    };
    if let Some(why) = taken {
        drop_copy(ec2, &new.id, &old.id).await;
        withdraw_claim(ec2, &old.id, &claim).await;
        return Err(VolumeError::MoveAbandoned {
            volume: old.id.clone(),
            copy: new.id,
            why,
        });
    }
    // 4. From here on the copy is the state.
    mark_superseded(ec2, &old.id, &new.id).await?;
    crate::log!(
        "volume: {} now continues as {} in {} (from snapshot {snap}, {}); {} is tagged {}={}",
        old.id,
        new.id,
        me.zone,
        human(started.elapsed()),
        old.id,
        tags::SUPERSEDED_BY,
        new.id
    );
    crate::notify::event(
        "zone-move",
        format!(
            "the state moved from {} to {} in {} (from snapshot {snap}, {})",
            old.id,
            new.id,
            me.zone,
            human(started.elapsed())
        ),
    );
    if cfg.delete_superseded {
        match api("DeleteVolume", || ec2.delete_volume(&old.id)).await {
            Ok(()) => crate::log!(
                "volume: deleted the superseded {} (volume.delete_superseded)",
                old.id
            ),
            Err(e) => crate::log!("volume: could not delete the superseded {}: {e}", old.id),
        }
    }
    Ok(new)
}
