//! `volume.pool` against the EC2 world in a box: instances of a group take the pool's volumes
//! exclusively without a coordinator (attaching is the lock), a replacement takes the slot its
//! predecessor left, new volumes are created only within the pool's maximum (racing creators
//! keep one per slot), and an instance with nothing to take fails closed, saying why.

use crate::common::{create_tagged, fast, tag, vcfg, World};
use crate::instance::Instance;
use spotinit::config;
use spotinit::volume::{Mounted, VolumeError, VolumePhase};
use std::collections::BTreeSet;
use std::time::Duration;

const POOL: &str = "runners";

fn pcfg(pool_max: u32) -> config::Volume {
    config::Volume {
        pool: Some(POOL.into()),
        pool_max,
        ..vcfg()
    }
}

/// Existing volumes of the pool in `zone`, with these slots.
async fn pool_of(w: &World, zone: &str, slots: &[u32]) -> Vec<String> {
    let api = w.fidelity.client();
    let mut ids = Vec::new();
    for slot in slots {
        let slot = slot.to_string();
        let tags = [
            ("Name", "spotinit-state"),
            ("spotinit:pool", POOL),
            ("spotinit:slot", slot.as_str()),
        ];
        ids.push(create_tagged(&api, zone, &tags).await);
    }
    ids
}

/// `n` instances of a group, each with a pool of at most `pool_max`, in us-east-1a.
async fn group_of(w: &World, n: usize, pool_max: u32) -> Vec<Instance> {
    let mut group = Vec::new();
    for _ in 0..n {
        group.push(w.instance("us-east-1a", pcfg(pool_max), "overlay2").await);
    }
    group
}

/// How many `action` requests EC2 carried out.
fn succeeded(w: &World, action: &str) -> usize {
    w.fidelity
        .requests()
        .iter()
        .filter(|r| r.action == action && r.status == 200)
        .count()
}

fn created(w: &World) -> usize {
    succeeded(w, "CreateVolume")
}

/// `n` instances of a group booting together, each of which must get a volume of the pool.
async fn ready_group(w: &World, n: usize, pool_max: u32) -> (Vec<Instance>, Vec<Mounted>) {
    let mut group = group_of(w, n, pool_max).await;
    let got = acquire_all(&mut group)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    (group, got)
}

/// The instances' volume phases at once (a group booting together), each on its own task.
async fn acquire_all(instances: &mut Vec<Instance>) -> Vec<Result<Mounted, VolumeError>> {
    let tasks: Vec<_> = instances
        .drain(..)
        .map(|mut i| {
            tokio::spawn(async move {
                let r = i.volume.acquire().await;
                (i, r)
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        instances.push(i);
        results.push(r);
    }
    results
}

fn slot_of(m: &Mounted) -> u32 {
    m.slot.as_ref().expect("a pool volume has a slot").number
}

#[tokio::test]
async fn instances_booting_together_take_different_volumes_then_a_replacement_takes_the_freed_slot()
{
    let w = World::start(fast()).await;
    let pool = pool_of(&w, "us-east-1a", &[1, 2, 3]).await;
    let (group, got) = ready_group(&w, 3, 3).await;
    let volumes: BTreeSet<&str> = got.iter().map(|m| m.volume_id.as_str()).collect();
    let slots: BTreeSet<u32> = got.iter().map(slot_of).collect();
    assert_eq!(volumes, pool.iter().map(String::as_str).collect());
    assert_eq!(slots, BTreeSet::from([1, 2, 3]));
    assert_eq!(created(&w), 3, "only the test's own three volumes");
    for (i, m) in group.iter().zip(&got) {
        let v = w.moto.client().describe_volume(&m.volume_id).await.unwrap();
        assert_eq!(v.attachments.len(), 1, "{v:?}");
        assert_eq!(v.attachments[0].instance_id, i.id);
        assert_eq!(
            tag(&v, "spotinit:slot"),
            Some(slot_of(m).to_string().as_str())
        );
        assert_eq!(i.record().volume_id, m.volume_id);
    }
    // The instance in slot 2 is terminated (a spot reclaim): its replacement waits for EC2 to
    // release that volume and takes it, the same slot, though the other two are held.
    let (gone, gone_m) = group
        .iter()
        .zip(&got)
        .find(|(_, m)| slot_of(m) == 2)
        .unwrap();
    w.fidelity.terminate(&gone.id).await.unwrap();
    let mut next = w.instance("us-east-1a", pcfg(3), "overlay2").await;
    let m = next.volume.acquire().await.unwrap();
    assert_eq!(m.volume_id, gone_m.volume_id);
    assert_eq!(slot_of(&m), 2);
    assert_eq!(next.record().boot_count, 2, "it continues that state");
    assert_eq!(created(&w), 3);
}

#[tokio::test]
async fn a_new_volume_takes_the_lowest_free_slot_and_beyond_the_maximum_the_boot_fails_closed() {
    let w = World::start(fast()).await;
    // Slots 1 and 3 exist: the new one is 2.
    pool_of(&w, "us-east-1a", &[1, 3]).await;
    let (group, got) = ready_group(&w, 3, 3).await;
    let slots: BTreeSet<u32> = got.iter().map(slot_of).collect();
    assert_eq!(slots, BTreeSet::from([1, 2, 3]));
    let new = got.iter().find(|m| slot_of(m) == 2).unwrap();
    let v = w
        .moto
        .client()
        .describe_volume(&new.volume_id)
        .await
        .unwrap();
    assert_eq!(tag(&v, "spotinit:pool"), Some(POOL));
    assert_eq!(tag(&v, "Name"), Some("spotinit-state"));
    assert_eq!(created(&w), 3);
    // A fourth: every volume is held by a live instance and the pool is at its maximum.
    let mut fourth = w.instance("us-east-1a", pcfg(3), "overlay2").await;
    let e = fourth.volume.acquire().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::PoolFull { .. }), "{msg}");
    assert!(e.retryable(), "an instance of the pool may let go");
    assert!(msg.contains("no volume of pool runners is free"), "{msg}");
    assert!(msg.contains("volume.pool_max = 3"), "{msg}");
    for i in &group {
        assert!(msg.contains(&i.id), "names the holders: {msg}");
    }
    assert_eq!(created(&w), 3, "nothing created beyond the maximum");
    assert!(fourth.fake.briefs().iter().all(|x| !x.starts_with("mount")));
    fourth.volume.release().await.unwrap();
    // Its release detached nothing of the others'.
    for (i, m) in group.iter().zip(&got) {
        let v = w.moto.client().describe_volume(&m.volume_id).await.unwrap();
        assert_eq!(v.attachments[0].instance_id, i.id);
    }
}

/// Two instances find the pool empty at once and both create slot 1: the older volume keeps
/// it, the other is deleted unused, and its creator takes slot 2 if the pool has room — or,
/// with room for one, fails closed.
#[tokio::test]
async fn racing_creators_keep_one_volume_per_slot() {
    for pool_max in [2, 1] {
        let w = World::start(fast()).await;
        let mut two = group_of(&w, 2, pool_max).await;
        let got = acquire_all(&mut two).await;
        let won: Vec<&Mounted> = got.iter().filter_map(|r| r.as_ref().ok()).collect();
        let slots: BTreeSet<u32> = won.iter().map(|m| slot_of(m)).collect();
        let left: Vec<_> = w
            .volumes()
            .await
            .into_iter()
            .filter(|v| v.state != "deleting" && v.state != "deleted")
            .collect();
        match pool_max {
            2 => {
                assert_eq!(slots, BTreeSet::from([1, 2]), "{got:?}");
                assert_eq!(left.len(), 2, "{left:?}");
            }
            _ => {
                assert_eq!(slots, BTreeSet::from([1]), "{got:?}");
                let e = got.iter().find_map(|r| r.as_ref().err()).unwrap();
                assert!(matches!(e, VolumeError::PoolFull { .. }), "{e}");
                assert_eq!(left.len(), 1, "{left:?}");
            }
        }
        let mut slot_tags: Vec<&str> = left
            .iter()
            .map(|v| tag(v, "spotinit:slot").unwrap())
            .collect();
        slot_tags.sort();
        slot_tags.dedup();
        assert_eq!(slot_tags.len(), left.len(), "one volume per slot: {left:?}");
        let creates = created(&w);
        let deletes = succeeded(&w, "DeleteVolume");
        println!("pool_max {pool_max}: {creates} created, {deletes} deleted");
        assert_eq!(creates - deletes, left.len());
    }
}

/// Capacity rebalancing with a pool: the replacement boots while every volume is held by a live
/// instance. It waits (reading the pool every 2 s, each holder's state at most every 10 s, so a
/// large group is not asked about at every look) and takes the volume the old instance lets go
/// of, within seconds of its release.
#[tokio::test]
async fn a_replacement_waits_for_a_full_pool_and_takes_the_released_slot() {
    let w = World::start(fast()).await;
    pool_of(&w, "us-east-1a", &[1, 2]).await;
    let (mut group, got) = ready_group(&w, 2, 2).await;
    let waiting_cfg = config::Volume {
        live_holder_wait_secs: 60,
        ..pcfg(2)
    };
    let replacement = w.instance("us-east-1a", waiting_cfg, "overlay2").await;
    let replacement_id = replacement.id.clone();
    let before = w.calls("DescribeInstances");
    let since = std::time::Instant::now();
    let mut volume = replacement.volume;
    let waiting = tokio::spawn(async move { volume.acquire().await.map(|m| (m, volume)) });
    // Long enough for several looks at the pool (every 2 s).
    let looks_before = w.calls("DescribeVolumes");
    assert!(
        crate::common::wait_until(Duration::from_secs(30), || w.calls("DescribeVolumes")
            >= looks_before + 4)
        .await,
        "the replacement does not look at the pool again"
    );
    assert!(!waiting.is_finished(), "it waits while both holders live");
    let asked = w.calls("DescribeInstances") - before;
    // Each holder's state once per 10 s (a slow machine may take longer for those looks);
    // reading it at every look would ask twice per look.
    let allowed = 2 * (1 + since.elapsed().as_secs() as usize / 10);
    assert!(
        asked <= allowed,
        "{asked} DescribeInstances for two holders in {:?}: at most {allowed}",
        since.elapsed()
    );
    // The instance in slot 1 is being replaced: it drains and lets go.
    let (old, old_m) = group
        .iter_mut()
        .zip(&got)
        .find(|(_, m)| slot_of(m) == 1)
        .unwrap();
    old.volume.release().await.unwrap();
    let (m, mut volume) = waiting
        .await
        .unwrap()
        .expect("the replacement takes slot 1");
    assert_eq!(m.volume_id, old_m.volume_id);
    assert_eq!(slot_of(&m), 1);
    let gap = w.handover_gap(&old.id, &replacement_id);
    println!("the replacement attached {gap:?} after the release");
    assert!(gap < Duration::from_secs(5), "noticed {gap:?} late");
    volume.release().await.unwrap();
}

/// None free in this zone and the pool full: a free volume of another zone is followed here
/// through a snapshot, and its copy keeps the pool and the slot (it is that state). An instance
/// in the old zone then finds the pool's one state held, not the superseded volume.
#[tokio::test]
async fn a_free_volume_of_another_zone_is_followed_and_its_copy_keeps_the_slot() {
    let w = World::start(fast()).await;
    let old = pool_of(&w, "us-east-1b", &[1]).await.remove(0);
    let mut here = w.instance("us-east-1a", pcfg(1), "overlay2").await;
    let m = here.volume.acquire().await.unwrap();
    assert_ne!(m.volume_id, old);
    assert_eq!(slot_of(&m), 1);
    let copy = w.moto.client().describe_volume(&m.volume_id).await.unwrap();
    assert_eq!(copy.zone, "us-east-1a");
    assert_eq!(tag(&copy, "spotinit:pool"), Some(POOL));
    assert_eq!(tag(&copy, "spotinit:slot"), Some("1"));
    assert_eq!(tag(&copy, "spotinit:moved-from"), Some(old.as_str()));
    let o = w.moto.client().describe_volume(&old).await.unwrap();
    assert_eq!(
        tag(&o, "spotinit:superseded-by"),
        Some(m.volume_id.as_str())
    );
    let mut there = w.instance("us-east-1b", pcfg(1), "overlay2").await;
    let e = there.volume.acquire().await.unwrap_err();
    assert!(matches!(e, VolumeError::PoolFull { .. }), "{e}");
    assert!(e.to_string().contains(&m.volume_id), "{e}");
}
