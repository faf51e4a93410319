//! Which volume: by id (following where it moved), or by tags in this region; create it when
//! none exists and that is allowed; follow it into this zone through a snapshot when it is
//! elsewhere — and never two live copies of one state.
//!
//! The lineage is kept in tags. A move of volume S into zone Z:
//! 1. claims S: `spotinit:moving = "<instance> <zone> <time>"`, written, given [`SETTLE`] to be
//!    seen, read back (a live claim of someone else's is respected, not overwritten);
//! 2. waits until no live instance holds S, snapshots it, creates the copy C in Z tagged
//!    `spotinit:moved-from = S` and `spotinit:move-claim = <the claim>`;
//! 3. keeps C only if no other copy of S from the same moment is older (racing movers agree on
//!    the oldest), and only if S was neither attached nor its claim changed meanwhile; a dropped
//!    copy is tagged superseded (by the winner, or back by S) and deleted;
//! 4. marks S `spotinit:superseded-by = C`.
//!
//! Whoever chooses a volume obeys the tags: a superseded volume is followed (by id) or skipped
//! (by tags); a volume under a live claim is not used until the claim is gone; a claim whose
//! instance is gone is finished (its copy continues the state) when it left a copy, or cleared
//! by the instance that takes the volume back (so that copy can never be mistaken for the state
//! later). After attaching, [`confirm_current`] reads the volume once more before anything
//! writes to it.

use super::attach::api;
use super::lineage::{
    client_token, copies_of, describe, is_live, mark_superseded, now, oldest, select_err,
    superseded_by, tag, wait_available,
};
use super::zone_move::move_here;
use super::{Step, VolumeError};
use crate::cloud::tags;
use crate::cloud::{describe_tags, Ec2, Identity, NewVolume, VolumeInfo, VolumeSpec, VolumeState};
use crate::config;

pub use super::lineage::{MoveClaim, SETTLE};

/// `started by <instance> at <time>` while spotinit's first mkfs of a volume runs, `done`
/// after: a volume whose tag still says `started` never held anything but that mkfs.
pub const FORMAT_STARTED: &str = "started";
pub const FORMAT_DONE: &str = "done";

/// A `superseded-by` chain longer than this is refused (a loop spotinit did not notice).
const MAX_CHAIN: usize = 64;

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
        Some(id) => Selected {
            volume: by_id(ec2, id, me).await?,
            created: false,
        },
        None => by_tags(ec2, cfg, me).await?,
    };
    if selected.volume.state == VolumeState::Creating {
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

/// `volume.id`, and wherever the state went from there.
async fn by_id<E: Ec2>(ec2: &E, id: &str, me: &Identity) -> Result<VolumeInfo, VolumeError> {
    let first = describe(ec2, id)
        .await?
        .ok_or_else(|| VolumeError::NotFound {
            what: format!("state volume {id} does not exist in {}", me.region),
            fix: "Check volume.id (and the region), or remove it to find the volume by tags".into(),
        })?;
    let v = follow_chain(ec2, first).await?;
    let v = resolve_move(ec2, v, me).await?;
    if v.id != id {
        crate::log!(
            "volume: volume.id {id} was moved; its state continues on {} — set volume.id = \"{}\" to skip this lookup",
            v.id,
            v.id
        );
    }
    crate::log!(
        "volume: using {} ({}, {} GiB {}, {})",
        v.id,
        v.zone,
        v.spec.size_gib,
        v.spec.volume_type,
        v.state
    );
    Ok(v)
}

/// Follows `spotinit:superseded-by` to the volume that holds the state now. A link to a volume
/// that does not exist, or a loop, is refused: guessing could pick stale state.
pub async fn follow_chain<E: Ec2>(ec2: &E, first: VolumeInfo) -> Result<VolumeInfo, VolumeError> {
    let origin = first.id.clone();
    let mut seen = vec![first.id.clone()];
    let mut v = first;
    while let Some(next) = superseded_by(&v).map(str::to_string) {
        if seen.contains(&next) || seen.len() >= MAX_CHAIN {
            seen.push(next);
            return Err(VolumeError::Lineage {
                volume: origin,
                detail: format!(
                    "its spotinit:superseded-by tags go round in a loop: {}",
                    seen.join(" -> ")
                ),
            });
        }
        let n = describe(ec2, &next)
            .await?
            .filter(|n| !n.state.is_going())
            .ok_or_else(|| VolumeError::Lineage {
                volume: origin.clone(),
                detail: format!(
                    "{} is tagged spotinit:superseded-by={next}, but {next} does not exist",
                    v.id
                ),
            })?;
        crate::log!(
            "volume: {} was moved to {next} in {} ({}); following it",
            v.id,
            n.zone,
            v.tag(tags::SUPERSEDED_AT).unwrap_or("at an unknown time")
        );
        seen.push(next);
        v = n;
    }
    Ok(v)
}

/// A volume under a move claim: wait while the claimant lives; when it is gone (or it is us,
/// from an earlier try), finish its move if it left a copy, else keep the volume (the claim is
/// cleared by [`confirm_current`] once the volume is ours).
pub(super) async fn resolve_move<E: Ec2>(
    ec2: &E,
    v: VolumeInfo,
    me: &Identity,
) -> Result<VolumeInfo, VolumeError> {
    let Some(claim) = MoveClaim::of(&v) else {
        return Ok(v);
    };
    if claim.instance != me.instance_id && is_live(ec2, &claim.instance).await? {
        return Err(VolumeError::BeingMoved {
            volume: v.id,
            by: claim.instance,
            zone: claim.zone,
            since: claim.since,
        });
    }
    let copies = copies_of(ec2, &v.id).await?;
    let claim_value = claim.value();
    let made = copies.iter().filter(|c| {
        c.tag(tags::MOVE_CLAIM) == Some(claim_value.as_str()) && superseded_by(c).is_none()
    });
    match oldest(made) {
        None => Ok(v),
        Some(copy) => {
            crate::log!(
                "volume: finishing the move of {} that instance {} began at {}: its copy {} in {} continues the state",
                v.id,
                claim.instance,
                claim.since,
                copy.id,
                copy.zone
            );
            mark_superseded(ec2, &v.id, &copy.id).await?;
            Ok(copy.clone())
        }
    }
}

/// Why a volume found by tags is not a candidate: a copy that never held the state.
fn orphan_reason(c: &VolumeInfo, found: &[VolumeInfo]) -> Option<String> {
    let source_id = c.tag(tags::MOVED_FROM)?;
    match found.iter().find(|v| v.id == source_id) {
        Some(source) => match superseded_by(source) {
            Some(winner) if winner != c.id => Some(format!(
                "a copy of {source_id}, which continues as {winner}"
            )),
            Some(_) => None,
            None => {
                let claim = source.tag(tags::MOVING).unwrap_or_default();
                (c.tag(tags::MOVE_CLAIM) != Some(claim) || claim.is_empty()).then(|| {
                    format!("a copy of {source_id} from a move that was abandoned; {source_id} kept the state")
                })
            }
        },
        // The source is gone (volume.delete_superseded): the oldest copy is its successor.
        None => {
            let siblings = found.iter().filter(|v| {
                v.tag(tags::MOVED_FROM) == Some(source_id) && superseded_by(v).is_none()
            });
            let winner = oldest(siblings)?;
            (winner.id != c.id).then(|| {
                format!(
                    "a copy of {source_id} that lost a move race to {}",
                    winner.id
                )
            })
        }
    }
}

/// The volumes found by tags that hold a state, one per state: superseded volumes and orphan
/// copies are passed over (and said so), and a move under way or interrupted is resolved to the
/// volume that continues it.
pub(super) struct Current {
    pub live: Vec<VolumeInfo>,
    /// Passed over, with why.
    pub passed_over: Vec<String>,
    /// States a live instance is moving into its zone: not to be used meanwhile.
    pub being_moved: Vec<VolumeError>,
}

pub(super) async fn current<E: Ec2>(
    ec2: &E,
    found: &[VolumeInfo],
    me: &Identity,
) -> Result<Current, VolumeError> {
    let mut live: Vec<VolumeInfo> = Vec::new();
    let mut passed_over: Vec<String> = Vec::new();
    let mut being_moved = Vec::new();
    for v in found {
        if let Some(by) = superseded_by(v) {
            passed_over.push(format!("{} (superseded by {by})", v.id));
        } else if let Some(why) = orphan_reason(v, found) {
            crate::log!(
                "volume: ignoring {} in {}: {why}. It never held this state's latest data: delete it",
                v.id,
                v.zone
            );
            passed_over.push(format!("{} ({why})", v.id));
        } else {
            live.push(v.clone());
        }
    }
    // A move under way or interrupted: the source and its copy are one state.
    let sources: Vec<VolumeInfo> = live
        .iter()
        .filter(|s| {
            live.iter()
                .any(|c| c.tag(tags::MOVED_FROM) == Some(s.id.as_str()))
        })
        .cloned()
        .collect();
    for s in sources {
        let continued = resolve_move(ec2, s.clone(), me).await;
        live.retain(|v| v.id != s.id && v.tag(tags::MOVED_FROM) != Some(s.id.as_str()));
        match continued {
            Ok(v) => live.push(v),
            Err(e @ VolumeError::BeingMoved { .. }) => being_moved.push(e),
            Err(e) => return Err(e),
        }
    }
    Ok(Current {
        live,
        passed_over,
        being_moved,
    })
}

async fn by_tags<E: Ec2>(
    ec2: &E,
    cfg: &config::Volume,
    me: &Identity,
) -> Result<Selected, VolumeError> {
    let what = format!("{} in {}", describe_tags(&cfg.tags), me.region);
    let found = api("DescribeVolumes", || ec2.find_volumes(&cfg.tags))
        .await
        .map_err(select_err)?;
    let Current {
        mut live,
        passed_over,
        being_moved,
    } = current(ec2, &found, me).await?;
    if let Some(e) = being_moved.into_iter().next() {
        return Err(e);
    }
    match live.len() {
        0 if !passed_over.is_empty() => Err(VolumeError::Lineage {
            volume: passed_over.join(", "),
            detail: format!(
                "every volume {what} is superseded or an abandoned copy, and none of them leads to a volume that holds the state; spotinit will not create an empty one in its place"
            ),
        }),
        0 if cfg.create => create(ec2, cfg, me).await,
        0 => Err(VolumeError::NotFound {
            what: format!("no state volume {what}, and volume.create = false"),
            fix: format!(
                "Create one in {} with these tags, or set volume.create = true to let spotinit create it",
                me.zone
            ),
        }),
        1 => {
            let v = resolve_move(ec2, live.remove(0), me).await?;
            crate::log!(
                "volume: found {} {what} ({}, {} GiB {}, {})",
                v.id,
                v.zone,
                v.spec.size_gib,
                v.spec.volume_type,
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
                        .get(tags::CREATED_AT)
                        .map(|t| format!(", created {t}"))
                        .unwrap_or_default();
                    format!("{} ({}, {}{created})", v.id, v.zone, v.state)
                })
                .collect(),
        }),
    }
}

async fn create<E: Ec2>(
    ec2: &E,
    cfg: &config::Volume,
    me: &Identity,
) -> Result<Selected, VolumeError> {
    crate::log!("volume: none {} exists", describe_tags(&cfg.tags));
    create_tagged(ec2, cfg, me, cfg.tags.clone()).await
}

/// Creates a volume as configured, in this zone, with `tags` and spotinit's creation tags.
pub(super) async fn create_tagged<E: Ec2>(
    ec2: &E,
    cfg: &config::Volume,
    me: &Identity,
    mut tags: std::collections::BTreeMap<String, String>,
) -> Result<Selected, VolumeError> {
    tags.insert(tags::CREATED_BY.into(), me.instance_id.clone());
    tags.insert(tags::CREATED_AT.into(), now());
    let spec = NewVolume {
        zone: me.zone.clone(),
        spec: VolumeSpec {
            size_gib: cfg.size_gib,
            volume_type: cfg.volume_type.clone(),
            iops: cfg.iops,
            throughput_mibps: cfg.throughput_mibps,
            encrypted: cfg.encrypted,
            kms_key_id: cfg.kms_key_id.clone(),
        },
        snapshot_id: None,
        tags,
        client_token: Some(client_token(me)),
    };
    crate::log!(
        "volume: creating {} GiB {} in {}{}",
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

/// Sets the volume's `spotinit:format` tag (around its first mkfs).
pub async fn set_format_tag<E: Ec2>(ec2: &E, id: &str, value: &str) -> Result<(), VolumeError> {
    tag(ec2, id, &[(tags::FORMAT, value)])
        .await
        .map_err(|e| match e {
            VolumeError::Api { err, .. } => VolumeError::Api {
                step: Step::Format,
                err,
            },
            e => e,
        })
}

/// `started by <instance> at <now>`.
pub fn format_started(me: &Identity) -> String {
    format!("{FORMAT_STARTED} by {} at {}", me.instance_id, now())
}

/// After attaching and before anything writes to it: the volume is still the state's current
/// home. Superseded meanwhile: an error (the caller lets go and chooses again). Under a live move
/// claim: an error to retry (the mover gives up when it sees our attachment). Under the claim
/// of an instance that is gone: the claim is cleared, and given [`SETTLE`] to be seen, so the
/// copy that instance may have begun can never pass for the state.
pub async fn confirm_current<E: Ec2>(
    ec2: &E,
    id: &str,
    me: &Identity,
) -> Result<VolumeInfo, VolumeError> {
    let v = describe(ec2, id)
        .await?
        .ok_or_else(|| VolumeError::NotFound {
            what: format!("state volume {id} disappeared"),
            fix: "Someone deleted it; restore it from a snapshot".into(),
        })?;
    if let Some(by) = superseded_by(&v) {
        return Err(VolumeError::Superseded {
            volume: id.into(),
            by: by.into(),
        });
    }
    if let Some(claim) = MoveClaim::of(&v) {
        if claim.instance != me.instance_id && is_live(ec2, &claim.instance).await? {
            return Err(VolumeError::BeingMoved {
                volume: id.into(),
                by: claim.instance,
                zone: claim.zone,
                since: claim.since,
            });
        }
        crate::log!(
            "volume: clearing the move claim of instance {} ({} since {}), which is gone: {id} keeps the state",
            claim.instance,
            claim.zone,
            claim.since
        );
        tag(ec2, id, &[(tags::MOVING, "")]).await?;
        tokio::time::sleep(SETTLE).await;
    }
    Ok(v)
}

#[cfg(test)]
#[path = "select_tests.rs"]
mod tests;
