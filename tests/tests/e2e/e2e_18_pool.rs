//! Scenario 18, a pool of volumes for an Auto Scaling group of N instances (`volume.pool`,
//! `volume.pool_max`). One scenario in four steps, to keep the VM time down:
//!
//! a. three blank volumes made ahead of the group: slots 1, 2, 3 of the pool, pool_max 4;
//! b. three instances launched at once each take a different volume (a loser of a race tries the
//!    next) and reach ready; none creates a volume;
//! c. a fourth finds none free and creates slot 4, tagged as the pool's;
//! d. one of the first three is hard-killed, and two instances are launched at once: exactly one
//!    waits out the dead holder and takes the freed volume (same volume, slot and state: boot 2,
//!    last on the killed instance); the other finds the pool at its maximum with every volume
//!    held by a live instance and fails closed (no Docker, powered off, no fifth volume, nothing
//!    attached to it).
//!
//! Up to five VMs boot or run at once on two cores: slow, so the deadlines are generous.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_18_pool -- --nocapture`

use std::collections::BTreeSet;
use std::time::Instant;

use crate::common::{
    expect, never, powered_off_without_docker, ready_or_failed, report, BOOT, STEP,
};
use spotworld::world::{
    one_volume_each, slot_of, InstanceSpec, LostRace, SimInstance, TookSlot, UserData, World,
    WorldSettings, BOOT_FAILED_MARKER, POOL_TAG, READY_MARKER, SLOT_TAG,
};

const POOL: &str = "runners";
/// The pool's `Name` tag (`volume.tags`), other than the pool's name so the two are not confused.
const NAME: &str = "e2e-18";
const ZONE: &str = "us-east-1a";
/// The start of the line an instance prints when it creates a volume of the pool.
const CREATING: &str = "no volume free here; creating slot";

/// The instance's took-slot line (printed once its volume is attached), in this zone.
async fn took_slot(i: &SimInstance) -> TookSlot {
    let line = expect(&mut i.console(), &TookSlot::marker(POOL), STEP).await;
    let took = TookSlot::parse(POOL, &line.text)
        .unwrap_or_else(|| panic!("{}: cannot read {line}", i.name));
    assert_eq!(took.zone, ZONE, "{}: {line}", i.name);
    took
}

/// The instance is named after its slot.
async fn expect_hostname(i: &SimInstance, slot: u32) {
    let hostname = format!("hostname: {POOL}-{slot} (pool {POOL} slot {slot})");
    expect(&mut i.console(), &hostname, STEP).await;
}

/// The races the instance lost, as its console tells them.
fn races_lost(i: &SimInstance) -> Vec<LostRace> {
    i.console()
        .lines()
        .iter()
        .filter_map(|l| LostRace::parse(POOL, &l.text))
        .collect()
}

/// Every `BOOT FAILED:` line of the instance, joined (a failure's text may take several).
fn boot_failure(i: &SimInstance) -> String {
    let lines: Vec<String> = i
        .console()
        .lines()
        .into_iter()
        .filter(|l| l.text.contains(BOOT_FAILED_MARKER))
        .map(|l| l.text)
        .collect();
    lines.join("\n")
}

/// Successful CreateVolume requests so far, the test's own included.
fn volumes_created(world: &World) -> usize {
    world
        .fidelity()
        .requests()
        .iter()
        .filter(|r| r.action == "CreateVolume" && r.status == 200)
        .count()
}

#[tokio::test]
async fn a_pool_gives_each_instance_its_own_volume_grows_to_its_maximum_then_fails_closed() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-18-pool"))
        .await
        .unwrap();

    // a. The pool as an operator makes it ahead of the group.
    let mut made = Vec::new();
    for slot in 1..=3 {
        made.push(
            world
                .create_pool_volume(ZONE, NAME, POOL, slot)
                .await
                .unwrap(),
        );
    }
    let created_by_the_test = volumes_created(&world);
    // live_holder_wait_secs stays 0 (UserData::new): a volume of a live instance is not waited for.
    let mut ud = UserData::new(NAME);
    ud.pool = Some(POOL.into());
    ud.pool_max = 4;
    ud.docker_api = false;
    let spec = |name: &str, ud: &UserData| InstanceSpec::new(name, ZONE).user_data(ud.to_toml());

    // b. Three instances at once: a volume each.
    let step = Instant::now();
    let first = world
        .launch_all(vec![spec("a", &ud), spec("b", &ud), spec("c", &ud)])
        .await
        .unwrap();
    for i in &first {
        let ready = match i.wait_ready(BOOT + BOOT).await {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        println!(
            "{}: ready {:.1} s after the launch",
            i.name,
            (i.instant_of(&ready) - step).as_secs_f64()
        );
    }
    report("b: three instances at once, all ready", step);
    let mut took = Vec::new();
    for i in &first {
        let t = took_slot(i).await;
        println!("{}: took slot {} ({})", i.name, t.slot, t.volume_id);
        expect_hostname(i, t.slot).await;
        never(i, CREATING);
        took.push(t);
    }
    let slots: BTreeSet<u32> = took.iter().map(|t| t.slot).collect();
    assert_eq!(slots, BTreeSet::from([1, 2, 3]), "{took:?}");
    let taken: BTreeSet<&str> = took.iter().map(|t| t.volume_id.as_str()).collect();
    let made_set: BTreeSet<&str> = made.iter().map(String::as_str).collect();
    assert_eq!(taken, made_set, "each took one of the pool's volumes");
    // A lost race names the instance that won it, with the volume that one took.
    for i in &first {
        for r in races_lost(i) {
            let winner = first.iter().position(|w| w.id == r.taken_by);
            let winner = winner.unwrap_or_else(|| panic!("{}: {r:?}: not ours", i.name));
            assert_ne!(first[winner].id, i.id, "{r:?}");
            assert_eq!(
                (r.volume_id.as_str(), r.slot),
                (took[winner].volume_id.as_str(), took[winner].slot),
                "{}: {r:?}",
                i.name
            );
            println!("{}: lost {} to {}", i.name, r.volume_id, first[winner].name);
        }
    }
    let first_ids: Vec<&str> = first.iter().map(|i| i.id.as_str()).collect();
    let volumes = world.pool_volumes(POOL).await.unwrap();
    assert_eq!(volumes.len(), 3, "{volumes:#?}");
    let held = one_volume_each(&volumes, &first_ids).unwrap_or_else(|e| panic!("{e}"));
    for (t, volume_id) in took.iter().zip(&held) {
        assert_eq!(&t.volume_id, volume_id, "the console and EC2 agree");
        let v = volumes.iter().find(|v| &v.id == volume_id).unwrap();
        assert_eq!(slot_of(v), Some(t.slot), "{v:?}");
    }
    assert_eq!(
        volumes_created(&world),
        created_by_the_test,
        "no instance created a volume while the pool had free ones"
    );

    // c. A fourth: none free, fewer than pool_max, so it creates slot 4.
    let step = Instant::now();
    let d = world.launch(spec("d", &ud)).await.unwrap();
    expect(
        &mut d.console(),
        &format!("volume: pool {POOL}: {CREATING} 4"),
        BOOT,
    )
    .await;
    let d_took = took_slot(&d).await;
    if let Err(e) = d.wait_ready(BOOT).await {
        panic!("{e}");
    }
    report("c: d created slot 4, ready", step);
    assert_eq!(d_took.slot, 4, "{d_took:?}");
    assert!(!made.contains(&d_took.volume_id), "{d_took:?}");
    expect_hostname(&d, 4).await;
    let volumes = world.pool_volumes(POOL).await.unwrap();
    assert_eq!(volumes.len(), 4, "{volumes:#?}");
    let new = volumes
        .iter()
        .find(|v| v.id == d_took.volume_id)
        .unwrap_or_else(|| {
            panic!(
                "{} is not tagged as the pool's: {volumes:#?}",
                d_took.volume_id
            )
        });
    assert_eq!(new.zone, ZONE, "{new:?}");
    assert_eq!(
        new.tags.get(SLOT_TAG).map(String::as_str),
        Some("4"),
        "{new:?}"
    );
    assert_eq!(
        new.tags.get(POOL_TAG).map(String::as_str),
        Some(POOL),
        "{new:?}"
    );
    // The pool is found by volume.tags too: without them the next instance would not see it.
    assert_eq!(
        new.tags.get("Name").map(String::as_str),
        Some(NAME),
        "{new:?}"
    );
    let created_after_c = volumes_created(&world);
    assert_eq!(
        created_after_c,
        created_by_the_test + 1,
        "one volume created"
    );
    let mut live: Vec<&SimInstance> = first.iter().chain([&d]).collect();
    let live_ids: Vec<&str> = live.iter().map(|i| i.id.as_str()).collect();
    one_volume_each(&volumes, &live_ids).unwrap_or_else(|e| panic!("{e}"));

    // d. One of the first three is lost without warning; two replacements come at once.
    let (killed, killed_took) = (&first[0], &took[0]);
    let step = Instant::now();
    killed.kill_hard().await.unwrap();
    live.retain(|i| i.id != killed.id);
    // EC2 still holds its volume for the dead instance.
    let v = world.volume(&killed_took.volume_id).await.unwrap();
    assert_eq!(v.attachments.len(), 1, "{v:?}");
    assert_eq!(v.attachments[0].instance_id, killed.id, "{v:?}");
    // The loser gives up within a minute or so (same user data for both, as in a group).
    let mut ud_pair = ud.clone();
    ud_pair.retry_for_secs = 20;
    ud_pair.retry_interval_secs = 5;
    let pair = world
        .launch_all(vec![spec("e", &ud_pair), spec("f", &ud_pair)])
        .await
        .unwrap();
    let (oe, of) = tokio::join!(ready_or_failed(&pair[0]), ready_or_failed(&pair[1]));
    report("d: e and f decided", step);
    let (winner, loser) = match (
        oe.text.contains(READY_MARKER),
        of.text.contains(READY_MARKER),
    ) {
        (true, false) => (&pair[0], &pair[1]),
        (false, true) => (&pair[1], &pair[0]),
        (e, f) => panic!(
            "exactly one of e and f must get the freed volume; ready: e {e}, f {f}\n--- e:\n{}\n--- f:\n{}",
            pair[0].diagnostics(),
            pair[1].diagnostics()
        ),
    };
    println!(
        "winner {} ({}), loser {} ({})",
        winner.name, winner.id, loser.name, loser.id
    );

    // The winner has the killed instance's volume, slot and state.
    let w_took = took_slot(winner).await;
    assert_eq!(
        &w_took, killed_took,
        "the same volume and slot as {}",
        killed.id
    );
    expect_hostname(winner, killed_took.slot).await;
    let record = expect(
        &mut winner.console(),
        "volume: record: boot 2 of this state",
        STEP,
    )
    .await;
    assert!(
        record
            .text
            .contains(&format!("last on {} (no clean shutdown", killed.id)),
        "{}",
        record.text
    );
    never(winner, "creating ext4");
    never(winner, CREATING);
    live.push(winner);

    // The loser failed closed: named the full pool, no Docker, powered off.
    let mut c = loser.console();
    expect(&mut c, "Docker was not started", STEP).await;
    let failure = boot_failure(loser);
    println!("{}: {failure}", loser.name);
    assert!(
        failure.contains(&format!("no volume of pool {POOL} is free")),
        "the failure must name the pool: {failure}"
    );
    assert!(
        failure.contains("volume.pool_max"),
        "the failure must name volume.pool_max: {failure}"
    );
    powered_off_without_docker(loser).await;
    never(loser, &TookSlot::marker(POOL));
    never(loser, CREATING);
    for r in races_lost(loser) {
        assert_eq!(
            (r.volume_id.as_str(), r.slot, r.taken_by.as_str()),
            (
                killed_took.volume_id.as_str(),
                killed_took.slot,
                winner.id.as_str()
            ),
            "{}: the only race to lose was for the freed volume, to the winner",
            loser.name
        );
        println!("{}: lost {} to {}", loser.name, r.volume_id, winner.name);
    }

    // EC2: still four volumes, each held by one live instance (the survivors kept theirs), none
    // created after slot 4, and nothing ever attached to the loser.
    let volumes = world.pool_volumes(POOL).await.unwrap();
    assert_eq!(volumes.len(), 4, "no fifth volume: {volumes:#?}");
    let live_ids: Vec<&str> = live.iter().map(|i| i.id.as_str()).collect();
    let held = one_volume_each(&volumes, &live_ids).unwrap_or_else(|e| panic!("{e}"));
    let expected: Vec<&str> = took[1..]
        .iter()
        .chain([&d_took, killed_took])
        .map(|t| t.volume_id.as_str())
        .collect();
    assert_eq!(
        held, expected,
        "b, c, d kept their volumes; the winner has a's"
    );
    assert_eq!(
        volumes_created(&world),
        created_after_c,
        "no CreateVolume succeeded after slot 4"
    );
    let attached_to_loser: Vec<_> = world
        .fidelity()
        .requests()
        .into_iter()
        .filter(|r| {
            r.action == "AttachVolume"
                && r.status == 200
                && r.param("InstanceId") == Some(loser.id.as_str())
        })
        .collect();
    assert!(attached_to_loser.is_empty(), "{attached_to_loser:?}");
    report("scenario 18", t0);
}
