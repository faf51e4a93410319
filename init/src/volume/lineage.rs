//! A state volume's lineage as its tags record it (the move claim, superseded-by, the copies
//! made of it), and the EC2 calls that read and write it, shared by choosing a volume and moving it.

use super::attach::api;
use super::{Step, VolumeError};
use crate::cloud::tags;
use crate::cloud::{Ec2, Identity, VolumeInfo, VolumeState};
use crate::config;
use crate::console::human;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// How long a tag written to claim or to clear a claim is given before anyone relies on it:
/// EC2's reads are eventually consistent.
pub const SETTLE: Duration = Duration::from_secs(5);

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

    pub(super) fn of(v: &VolumeInfo) -> Option<MoveClaim> {
        v.tag(tags::MOVING).and_then(MoveClaim::parse)
    }
}

pub(super) fn superseded_by(v: &VolumeInfo) -> Option<&str> {
    v.tag(tags::SUPERSEDED_BY).filter(|s| !s.is_empty())
}

pub(super) fn select_err(err: crate::cloud::CloudError) -> VolumeError {
    VolumeError::Api {
        step: Step::Select,
        err,
    }
}

pub(super) async fn describe<E: Ec2>(ec2: &E, id: &str) -> Result<Option<VolumeInfo>, VolumeError> {
    api("DescribeVolumes", || ec2.describe_volume(id))
        .await
        .map_err(select_err)
}

/// Is this instance running (or about to)? A gone instance is not.
pub(super) async fn is_live<E: Ec2>(ec2: &E, instance: &str) -> Result<bool, VolumeError> {
    let i = api("DescribeInstances", || ec2.describe_instance(instance))
        .await
        .map_err(select_err)?;
    Ok(i.is_some_and(|i| i.state.is_live()))
}

/// The copies made of `source` (volumes tagged `spotinit:moved-from=<source>`), not deleted.
pub(super) async fn copies_of<E: Ec2>(
    ec2: &E,
    source: &str,
) -> Result<Vec<VolumeInfo>, VolumeError> {
    let filter = BTreeMap::from([(tags::MOVED_FROM.to_string(), source.to_string())]);
    api("DescribeVolumes", || ec2.find_volumes(&filter))
        .await
        .map_err(select_err)
}

/// Racing copies agree on one winner: the oldest, then the lowest id.
pub(super) fn oldest<'a>(
    copies: impl IntoIterator<Item = &'a VolumeInfo>,
) -> Option<&'a VolumeInfo> {
    copies
        .into_iter()
        .min_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)))
}

/// One token per creation attempt, reused by its retries (EC2 keeps tokens for 24 hours).
pub(super) fn client_token(me: &Identity) -> String {
    format!(
        "spotinit-{}-{:016x}",
        me.instance_id,
        crate::retry::random_u64()
    )
}

pub(super) fn now() -> String {
    super::layout::rfc3339(SystemTime::now())
}

/// Polls until the volume is `available` (after creation) or attached elsewhere.
pub(super) async fn wait_available<E: Ec2>(
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

pub(super) async fn tag<E: Ec2>(
    ec2: &E,
    id: &str,
    tags: &[(&str, &str)],
) -> Result<(), VolumeError> {
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

pub(super) async fn mark_superseded<E: Ec2>(
    ec2: &E,
    old: &str,
    new: &str,
) -> Result<(), VolumeError> {
    tag(
        ec2,
        old,
        &[(tags::SUPERSEDED_BY, new), (tags::SUPERSEDED_AT, &now())],
    )
    .await
}
