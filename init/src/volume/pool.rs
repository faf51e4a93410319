//! A pool of state volumes for a group of instances (`volume.pool`): which of the pool's volumes
//! this instance may take, in which order, and when it may create one. There is no coordinator:
//! attaching is the lock (`ebs::claim` tries the next volume when another instance won it), and
//! a new volume keeps its slot only if no older volume has it and the pool is not full without it
//! (`kept_after_creation`), a rule every creator applies alike.
//!
//! Each volume carries its slot (`spotinit:slot`, 1, 2, ...), the identity the host takes with
//! it: a replacement that takes the volume of a killed instance is that instance again.

use super::attach::api;
use super::attach::HOLDER_STATE_EVERY;
use super::lineage::{select_err, MoveClaim};
use super::select::current;
use super::{Slot, VolumeError};
use crate::cloud::tags;
use crate::cloud::{AttachmentState, Ec2, Identity, InstanceState, VolumeInfo, VolumeState};
use crate::config;
use std::collections::BTreeMap;

/// A volume of the pool that holds a state, with its slot.
#[derive(Clone, Debug)]
pub struct Member {
    pub volume: VolumeInfo,
    pub slot: u32,
}

/// The pool as one DescribeVolumes shows it, sorted out.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// Usable: one state each, with a slot no older volume has; by slot.
    pub members: Vec<Member>,
    /// What counts toward `volume.pool_max`: every volume that is or may be a state.
    pub count: usize,
    /// Volumes not taken, with why (said on the console).
    pub passed_over: Vec<(String, String)>,
}

/// The tags that find the pool's volumes: the user's, and the pool's name.
pub fn filter(cfg: &config::Volume, pool: &str) -> BTreeMap<String, String> {
    let mut t = cfg.tags.clone();
    t.insert(tags::POOL.into(), pool.into());
    t
}

fn slot_of(v: &VolumeInfo) -> Option<u32> {
    v.tag(tags::SLOT)
        .and_then(|s| s.parse().ok())
        .filter(|n| *n >= 1)
}

fn age(v: &VolumeInfo) -> (Option<i64>, &str) {
    (v.created_ms, v.id.as_str())
}

/// Sorts out the states of the pool (each one volume, moves resolved). Two volumes with one
/// slot: the older keeps it; the newer is a blank leftover of a creation race (its creator
/// deletes it) unless it was ever formatted, and then it holds data under a slot that is not
/// its own, which only a person can sort out.
pub fn sort_out(states: Vec<VolumeInfo>) -> View {
    let mut view = View::default();
    let mut by_slot: BTreeMap<u32, Vec<VolumeInfo>> = BTreeMap::new();
    for v in states {
        match slot_of(&v) {
            Some(n) => by_slot.entry(n).or_default().push(v),
            None => {
                view.count += 1;
                view.passed_over.push((
                    v.id.clone(),
                    format!(
                        "it has no {} tag (a number from 1): tag it with a slot no other volume of the pool has to use it",
                        tags::SLOT
                    ),
                ));
            }
        }
    }
    for (slot, mut vs) in by_slot {
        vs.sort_by(|a, b| age(a).cmp(&age(b)));
        let mut vs = vs.into_iter();
        let first = vs.next().expect("grouped");
        for dup in vs {
            let why = if dup.tag(tags::FORMAT).is_none() {
                format!("a blank duplicate of slot {slot}, which the older {} has (a creation race); its creator deletes it", first.id)
            } else {
                view.count += 1;
                format!("it holds data but has slot {slot}, which the older {} has too: tag it with a free slot to use it", first.id)
            };
            view.passed_over.push((dup.id.clone(), why));
        }
        view.count += 1;
        view.members.push(Member {
            volume: first,
            slot,
        });
    }
    view
}

/// The lowest slot no volume of the pool has (a duplicate's slot is its member's).
pub fn lowest_free_slot(view: &View) -> u32 {
    (1..)
        .find(|n| view.members.iter().all(|m| m.slot != *n))
        .expect("unbounded")
}

/// Who holds a volume, as far as this instance is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holding {
    Free,
    /// Attached to this instance already (an earlier try of this boot).
    Mine,
    /// Held by an instance that is terminated or terminating: EC2 releases it (the attach
    /// waits for that).
    Dead(String),
    /// Held by an instance that is running, starting or stopped (or being moved by a live
    /// one): that instance's.
    Live(String),
}

/// Whose a volume attached to `instance` in `state` is. A stopped instance keeps its volumes
/// attached and takes them back when started: its volume is as much its own as a running
/// one's. Only a terminated (or terminating) instance's is released by EC2, to be waited out.
pub fn held_by(instance: &str, state: &InstanceState) -> Holding {
    match state {
        InstanceState::ShuttingDown | InstanceState::Terminated => Holding::Dead(instance.into()),
        _ => Holding::Live(instance.into()),
    }
}

/// What this instance may do, in order: take one of `here` (its own, free, then held by the
/// dead), else create `new_slot`, else follow one of `elsewhere` into its zone.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub here: Vec<Member>,
    pub new_slot: Option<u32>,
    pub elsewhere: Vec<Member>,
    /// Held by live instances: (member, holder).
    pub held: Vec<(Member, String)>,
}

pub fn plan(
    view: &View,
    holding: &BTreeMap<String, Holding>,
    cfg: &config::Volume,
    me: &Identity,
) -> Plan {
    let mut plan = Plan::default();
    let rank = |h: &Holding| match h {
        Holding::Mine => 0,
        Holding::Free => 1,
        Holding::Dead(_) => 2,
        Holding::Live(_) => 3,
    };
    let mut usable: Vec<(&Member, &Holding)> = Vec::new();
    for m in &view.members {
        let h = holding.get(&m.volume.id).unwrap_or(&Holding::Free);
        match h {
            Holding::Live(by) => plan.held.push((m.clone(), by.clone())),
            // Not usable until EC2 finishes creating it (its creator is about to take it).
            _ if m.volume.state == VolumeState::Creating => {}
            _ => usable.push((m, h)),
        }
    }
    usable.sort_by_key(|(m, h)| (rank(h), m.slot));
    for (m, _) in usable {
        if m.volume.zone == me.zone {
            plan.here.push(m.clone());
        } else if cfg.follow_across_zones {
            plan.elsewhere.push(m.clone());
        }
    }
    let below_max = view.count < cfg.pool_max as usize;
    if cfg.create && below_max {
        plan.new_slot = Some(lowest_free_slot(view));
    }
    plan
}

/// The states of the instances holding the pool's volumes (or moving them), as last read, each
/// taken as still true for [`HOLDER_STATE_EVERY`]: an instance waiting for a full pool reads the
/// volumes every few seconds, and reading every holder's state as often would cost one
/// DescribeInstances per instance of the group each time.
#[derive(Default)]
pub struct HolderStates(BTreeMap<String, (InstanceState, tokio::time::Instant)>);

impl HolderStates {
    async fn of<E: Ec2>(&mut self, ec2: &E, instance: &str) -> Result<InstanceState, VolumeError> {
        if let Some((s, at)) = self.0.get(instance) {
            if at.elapsed() < HOLDER_STATE_EVERY {
                return Ok(s.clone());
            }
        }
        let i = api("DescribeInstances", || ec2.describe_instance(instance))
            .await
            .map_err(select_err)?;
        let s = i.map_or(InstanceState::Terminated, |i| i.state);
        self.0
            .insert(instance.into(), (s.clone(), tokio::time::Instant::now()));
        Ok(s)
    }
}

/// Reads the pool: its states (moves resolved, superseded volumes and orphan copies passed
/// over) sorted out by slot, and who holds each.
pub async fn read<E: Ec2>(
    ec2: &E,
    cfg: &config::Volume,
    pool: &str,
    me: &Identity,
    holders: &mut HolderStates,
) -> Result<(View, BTreeMap<String, Holding>), VolumeError> {
    let wanted = filter(cfg, pool);
    let found = api("DescribeVolumes", || ec2.find_volumes(&wanted))
        .await
        .map_err(select_err)?;
    let current = current(ec2, &found, me).await?;
    let mut moving: BTreeMap<String, String> = BTreeMap::new();
    for e in current.being_moved {
        if let VolumeError::BeingMoved { volume, by, .. } = e {
            moving.insert(volume, by);
        }
    }
    let mut view = sort_out(current.live);
    // A state being moved by a live instance is that instance's; it still counts.
    view.count += moving.len();
    let mut holding = BTreeMap::new();
    for m in &view.members {
        let v = &m.volume;
        let claimant = match MoveClaim::of(v).filter(|c| c.instance != me.instance_id) {
            Some(c) if holders.of(ec2, &c.instance).await?.is_live() => Some(c.instance),
            _ => None,
        };
        let attached = v
            .attachments
            .iter()
            .find(|a| a.state != AttachmentState::Detached);
        let h = match (claimant, attached) {
            (Some(mover), _) => Holding::Live(mover),
            (None, None) => Holding::Free,
            (None, Some(a)) if a.instance_id == me.instance_id => Holding::Mine,
            (None, Some(a)) => held_by(&a.instance_id, &holders.of(ec2, &a.instance_id).await?),
        };
        holding.insert(v.id.clone(), h);
    }
    Ok((view, holding))
}

/// After creating `ours` with `slot`: keep it only if no older volume of the pool has the slot
/// and fewer than `pool_max` older volumes are in the pool. Every racing creator reads the same
/// volumes and so agrees which one stays.
pub fn kept_after_creation(
    view: &View,
    ours: &VolumeInfo,
    slot: u32,
    pool_max: u32,
) -> Result<(), String> {
    let older = |v: &VolumeInfo| age(v) < age(ours);
    if let Some(m) = view
        .members
        .iter()
        .find(|m| m.slot == slot && m.volume.id != ours.id && older(&m.volume))
    {
        return Err(format!("the older {} has slot {slot} too", m.volume.id));
    }
    let before = view
        .members
        .iter()
        .filter(|m| m.volume.id != ours.id && older(&m.volume))
        .count();
    if before >= pool_max as usize {
        return Err(format!(
            "{before} older volumes fill the pool (volume.pool_max = {pool_max})"
        ));
    }
    Ok(())
}

impl Slot {
    pub fn of(pool: &str, member: &Member) -> Slot {
        Slot {
            pool: pool.into(),
            number: member.slot,
        }
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
