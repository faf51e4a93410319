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

use super::attach::{self, api};
use super::{Step, VolumeError};
use crate::cloud::tags;
use crate::cloud::{
    describe_tags, is_reserved_tag_key, AttachmentState, Ec2, Identity, NewVolume, VolumeInfo,
    VolumeState,
};
use crate::config;
use crate::console::human;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// `started by <instance> at <time>` while spotinit's first mkfs of a volume runs, `done`
/// after: a volume whose tag still says `started` never held anything but that mkfs.
pub const FORMAT_STARTED: &str = "started";
pub const FORMAT_DONE: &str = "done";

/// How long a tag written to claim or to clear a claim is given before anyone relies on it:
/// EC2's reads are eventually consistent.
pub const SETTLE: Duration = Duration::from_secs(5);
/// Copies of a source made more than this before our own claim are leftovers of an earlier,
/// abandoned attempt, not a racing mover's.
const RACE_WINDOW: Duration = Duration::from_secs(600);
/// A `superseded-by` chain longer than this is refused (a loop spotinit did not notice).
const MAX_CHAIN: usize = 64;

/// The chosen volume, and whether this boot created it (blank by construction).
#[derive(Clone, Debug)]
pub struct Selected {
    pub volume: VolumeInfo,
    pub created: bool,
}

/// Who is moving a volume, into which zone, since when: the value of `spotinit:moving`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveClaim {
    pub instance: String,
    pub zone: String,
    pub since: String,
}

impl MoveClaim {
    pub fn new(me: &Identity) -> MoveClaim {
        MoveClaim {
            instance: me.instance_id.clone(),
            zone: me.zone.clone(),
            since: now(),
        }
    }

    /// None for an empty (cleared) or malformed value.
    pub fn parse(value: &str) -> Option<MoveClaim> {
        let mut f = value.split_whitespace();
        let claim = MoveClaim {
            instance: f.next()?.to_string(),
            zone: f.next()?.to_string(),
            since: f.next()?.to_string(),
        };
        f.next().is_none().then_some(claim)
    }

    pub fn value(&self) -> String {
        format!("{} {} {}", self.instance, self.zone, self.since)
    }

    fn of(v: &VolumeInfo) -> Option<MoveClaim> {
        v.tag(tags::MOVING).and_then(MoveClaim::parse)
    }
}

fn superseded_by(v: &VolumeInfo) -> Option<&str> {
    v.tag(tags::SUPERSEDED_BY).filter(|s| !s.is_empty())
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

fn select_err(err: crate::cloud::CloudError) -> VolumeError {
    VolumeError::Api {
        step: Step::Select,
        err,
    }
}

async fn describe<E: Ec2>(ec2: &E, id: &str) -> Result<Option<VolumeInfo>, VolumeError> {
    api("DescribeVolumes", || ec2.describe_volume(id))
        .await
        .map_err(select_err)
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
        v.size_gib,
        v.volume_type,
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

/// Is this instance running (or about to)? A gone instance is not.
async fn is_live<E: Ec2>(ec2: &E, instance: &str) -> Result<bool, VolumeError> {
    let i = api("DescribeInstances", || ec2.describe_instance(instance))
        .await
        .map_err(select_err)?;
    Ok(i.is_some_and(|i| i.state.is_live()))
}

/// The copies made of `source` (volumes tagged `spotinit:moved-from=<source>`), not deleted.
async fn copies_of<E: Ec2>(ec2: &E, source: &str) -> Result<Vec<VolumeInfo>, VolumeError> {
    let filter = BTreeMap::from([(tags::MOVED_FROM.to_string(), source.to_string())]);
    api("DescribeVolumes", || ec2.find_volumes(&filter))
        .await
        .map_err(select_err)
}

/// Racing copies agree on one winner: the oldest, then the lowest id.
fn oldest<'a>(copies: impl IntoIterator<Item = &'a VolumeInfo>) -> Option<&'a VolumeInfo> {
    copies
        .into_iter()
        .min_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)))
}

/// A volume under a move claim: wait while the claimant lives; when it is gone (or it is us,
/// from an earlier try), finish its move if it left a copy, else keep the volume (the claim is
/// cleared by [`confirm_current`] once the volume is ours).
async fn resolve_move<E: Ec2>(
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

async fn by_tags<E: Ec2>(
    ec2: &E,
    cfg: &config::Volume,
    me: &Identity,
) -> Result<Selected, VolumeError> {
    let what = format!("{} in {}", describe_tags(&cfg.tags), me.region);
    let found = api("DescribeVolumes", || ec2.find_volumes(&cfg.tags))
        .await
        .map_err(select_err)?;
    let mut live: Vec<VolumeInfo> = Vec::new();
    let mut passed_over: Vec<String> = Vec::new();
    for v in &found {
        if let Some(by) = superseded_by(v) {
            passed_over.push(format!("{} (superseded by {by})", v.id));
        } else if let Some(why) = orphan_reason(v, &found) {
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
        let continued = resolve_move(ec2, s.clone(), me).await?;
        live.retain(|v| v.id != s.id && v.tag(tags::MOVED_FROM) != Some(s.id.as_str()));
        live.push(continued);
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
                        .get(tags::CREATED_AT)
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
    tags.insert(tags::CREATED_BY.into(), me.instance_id.clone());
    tags.insert(tags::CREATED_AT.into(), now());
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
            Some(v) if v.state != VolumeState::Creating => return Ok(v),
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

async fn tag<E: Ec2>(ec2: &E, id: &str, tags: &[(&str, &str)]) -> Result<(), VolumeError> {
    let tags: BTreeMap<String, String> = tags
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    api("CreateTags", || ec2.create_tags(id, &tags))
        .await
        .map_err(|err| VolumeError::Api {
            step: Step::Move,
            err,
        })
}

async fn mark_superseded<E: Ec2>(ec2: &E, old: &str, new: &str) -> Result<(), VolumeError> {
    tag(
        ec2,
        old,
        &[(tags::SUPERSEDED_BY, new), (tags::SUPERSEDED_AT, &now())],
    )
    .await
}

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
    // The user's tags come along; spotinit's own describe the old volume's history, and AWS's
    // (aws:cloudformation:..., aws:backup:...) are reserved: EC2 refuses them in CreateVolume.
    let mut tags: BTreeMap<String, String> = old
        .tags
        .iter()
        .filter(|(k, _)| !k.starts_with("spotinit:") && !is_reserved_tag_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    tags.insert(tags::MOVED_FROM.into(), old.id.clone());
    tags.insert(tags::MOVE_CLAIM.into(), claim.value());
    tags.insert(tags::CREATED_BY.into(), me.instance_id.clone());
    tags.insert(tags::CREATED_AT.into(), now());
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
