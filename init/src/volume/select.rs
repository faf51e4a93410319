//! Which volume: by id, or by tags in this region; create it when none exists and that is
//! allowed; follow it into this zone through a snapshot when it is elsewhere.
//!
//! Matches by tags: 0 → create (or fail if creation is off); 1 → that one; several → an error
//! naming them, except for one case spotinit itself leaves behind: a move that was interrupted
//! between tagging the new volume and marking the old one superseded. A volume carrying
//! `spotinit:moved-from=<old>` wins over `<old>`, and the old one is then marked.

use super::attach::{self, api};
use super::{Step, VolumeError};
use crate::cloud::ec2::describe_tags;
use crate::cloud::{Ec2, Identity, NewVolume, VolumeInfo};
use crate::config;
use crate::console::human;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

pub const TAG_CREATED_BY: &str = "spotinit:created-by";
pub const TAG_CREATED_AT: &str = "spotinit:created-at";
pub const TAG_MOVED_FROM: &str = "spotinit:moved-from";
pub const TAG_SUPERSEDED_BY: &str = "spotinit:superseded-by";
pub const TAG_SUPERSEDED_AT: &str = "spotinit:superseded-at";

/// The chosen volume, and whether this boot created it (blank by construction).
#[derive(Clone, Debug)]
pub struct Selected {
    pub volume: VolumeInfo,
    pub created: bool,
}

pub async fn select<E: Ec2>(
    ec2: &E,
    cfg: &config::Volume,
    me: &Identity,
) -> Result<Selected, VolumeError> {
    let mut selected = match &cfg.id {
        Some(id) => {
            let v = api("DescribeVolumes", || ec2.describe_volume(id))
                .await
                .map_err(|err| VolumeError::Api {
                    step: Step::Select,
                    err,
                })?
                .ok_or_else(|| VolumeError::NotFound {
                    what: format!("state volume {id} does not exist in {}", me.region),
                    fix:
                        "Check volume.id (and the region), or remove it to find the volume by tags"
                            .into(),
                })?;
            crate::log!(
                "volume: using {} ({}, {} GiB {}, {})",
                v.id,
                v.zone,
                v.size_gib,
                v.volume_type,
                v.state
            );
            Selected {
                volume: v,
                created: false,
            }
        }
        None => by_tags(ec2, cfg, me).await?,
    };
    if selected.volume.state == "creating" {
        selected.volume = wait_available(ec2, &selected.volume.id, Step::Create, cfg).await?;
    }
    if selected.volume.zone != me.zone {
        if !cfg.follow_across_zones {
            return Err(VolumeError::WrongZone {
                volume: selected.volume.id.clone(),
                zone: selected.volume.zone.clone(),
                ours: me.zone.clone(),
            });
        }
        selected = Selected {
            volume: move_here(ec2, &selected.volume, cfg, me).await?,
            created: false,
        };
    }
    Ok(selected)
}

async fn by_tags<E: Ec2>(
    ec2: &E,
    cfg: &config::Volume,
    me: &Identity,
) -> Result<Selected, VolumeError> {
    let what = format!("{} in {}", describe_tags(&cfg.tags), me.region);
    let found = api("DescribeVolumes", || ec2.find_volumes(&cfg.tags))
        .await
        .map_err(|err| VolumeError::Api {
            step: Step::Select,
            err,
        })?;
    let mut live: Vec<VolumeInfo> = found
        .into_iter()
        .filter(|v| !v.tags.contains_key(TAG_SUPERSEDED_BY))
        .collect();
    // A move interrupted after the new volume got the tags: the new one wins.
    let moved: Vec<(String, String)> = live
        .iter()
        .filter_map(|v| Some((v.tags.get(TAG_MOVED_FROM)?.clone(), v.id.clone())))
        .collect();
    for (old, new) in &moved {
        if live.iter().any(|v| &v.id == old) {
            crate::log!("volume: finishing an interrupted move: {old} is superseded by {new}");
            mark_superseded(ec2, old, new).await?;
            live.retain(|v| &v.id != old);
        }
    }
    match live.len() {
        0 if cfg.create => create(ec2, cfg, me).await,
        0 => Err(VolumeError::NotFound {
            what: format!("no state volume {what}, and volume.create = false"),
            fix: format!(
                "Create one in {} with these tags, or set volume.create = true to let spotinit create it",
                me.zone
            ),
        }),
        1 => {
            let v = live.remove(0);
            crate::log!(
                "volume: found {} {what} ({}, {} GiB {}, {})",
                v.id,
                v.zone,
                v.size_gib,
                v.volume_type,
                v.state
            );
            Ok(Selected {
                volume: v,
                created: false,
            })
        }
        _ => Err(VolumeError::Ambiguous {
            what,
            found: live
                .iter()
                .map(|v| {
                    let created = v
                        .tags
                        .get(TAG_CREATED_AT)
                        .map(|t| format!(", created {t}"))
                        .unwrap_or_default();
                    format!("{} ({}, {}{created})", v.id, v.zone, v.state)
                })
                .collect(),
        }),
    }
}

/// One token per creation attempt, reused by its retries (EC2 keeps tokens for 24 hours).
fn client_token(me: &Identity) -> String {
    format!(
        "spotinit-{}-{:016x}",
        me.instance_id,
        crate::retry::random_u64()
    )
}

fn now() -> String {
    super::layout::rfc3339(SystemTime::now())
}

async fn create<E: Ec2>(
    ec2: &E,
    cfg: &config::Volume,
    me: &Identity,
) -> Result<Selected, VolumeError> {
    let mut tags = cfg.tags.clone();
    tags.insert(TAG_CREATED_BY.into(), me.instance_id.clone());
    tags.insert(TAG_CREATED_AT.into(), now());
    let spec = NewVolume {
        zone: me.zone.clone(),
        size_gib: cfg.size_gib,
        volume_type: cfg.volume_type.clone(),
        iops: cfg.iops,
        throughput_mibps: cfg.throughput_mibps,
        encrypted: cfg.encrypted,
        kms_key_id: cfg.kms_key_id.clone(),
        snapshot_id: None,
        tags,
        client_token: Some(client_token(me)),
    };
    crate::log!(
        "volume: none {} exists; creating {} GiB {} in {}{}",
        describe_tags(&cfg.tags),
        cfg.size_gib,
        cfg.volume_type,
        me.zone,
        if cfg.encrypted { ", encrypted" } else { "" }
    );
    let v = api("CreateVolume", || ec2.create_volume(&spec))
        .await
        .map_err(|err| VolumeError::Api {
            step: Step::Create,
            err,
        })?;
    crate::log!("volume: created {}", v.id);
    let v = wait_available(ec2, &v.id, Step::Create, cfg).await?;
    Ok(Selected {
        volume: v,
        created: true,
    })
}

/// Polls until the volume is `available` (after creation) or attached elsewhere.
async fn wait_available<E: Ec2>(
    ec2: &E,
    id: &str,
    step: Step,
    cfg: &config::Volume,
) -> Result<VolumeInfo, VolumeError> {
    let start = Instant::now();
    let deadline = Duration::from_secs(cfg.attach_timeout_secs);
    loop {
        let v = api("DescribeVolumes", || ec2.describe_volume(id))
            .await
            .map_err(|err| VolumeError::Api { step, err })?;
        match v {
            Some(v) if v.state != "creating" => return Ok(v),
            Some(_) | None if start.elapsed() < deadline => {
                // DescribeVolumes is eventually consistent: a new volume may be missing briefly.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => {
                return Err(VolumeError::Timeout {
                    step,
                    volume: id.into(),
                    detail: format!("it was not available after {}", human(deadline)),
                })
            }
        }
    }
}

async fn mark_superseded<E: Ec2>(ec2: &E, old: &str, new: &str) -> Result<(), VolumeError> {
    let tags = BTreeMap::from([
        (TAG_SUPERSEDED_BY.to_string(), new.to_string()),
        (TAG_SUPERSEDED_AT.to_string(), now()),
    ]);
    api("CreateTags", || ec2.create_tags(old, &tags))
        .await
        .map_err(|err| VolumeError::Api {
            step: Step::Move,
            err,
        })
}

/// The seed's "snapshot and re-create in the other availability zone", automated. Order
/// matters for crash safety: the new volume gets the identifying tags (and `moved-from`)
/// before the old one is marked superseded, so an interruption never leaves zero volumes to
/// find (which would create a blank one) — at worst two, which `by_tags` resolves.
async fn move_here<E: Ec2>(
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
    // Never copy state that a live instance is still using; wait out a dead holder.
    let old = attach::wait_unheld(ec2, old, cfg, me).await?;
    let snap_tags = BTreeMap::from([
        ("spotinit:purpose".to_string(), "move".to_string()),
        ("spotinit:volume".to_string(), old.id.clone()),
        (TAG_CREATED_BY.to_string(), me.instance_id.clone()),
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
    let mut tags: BTreeMap<String, String> = old
        .tags
        .iter()
        .filter(|(k, _)| !k.starts_with("spotinit:"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    tags.insert(TAG_MOVED_FROM.into(), old.id.clone());
    tags.insert(TAG_CREATED_BY.into(), me.instance_id.clone());
    tags.insert(TAG_CREATED_AT.into(), now());
    let spec = NewVolume {
        zone: me.zone.clone(),
        size_gib: old.size_gib,
        volume_type: old.volume_type.clone(),
        iops: if ["gp3", "io1", "io2"].contains(&old.volume_type.as_str()) {
            old.iops
        } else {
            None
        },
        throughput_mibps: if old.volume_type == "gp3" {
            old.throughput_mibps
        } else {
            None
        },
        encrypted: old.encrypted,
        kms_key_id: old.kms_key_id.clone(),
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
    mark_superseded(ec2, &old.id, &new.id).await?;
    crate::log!(
        "volume: {} now continues as {} in {} (from snapshot {snap}, {}); {} is tagged {TAG_SUPERSEDED_BY}={}",
        old.id,
        new.id,
        me.zone,
        human(started.elapsed()),
        old.id,
        new.id
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
