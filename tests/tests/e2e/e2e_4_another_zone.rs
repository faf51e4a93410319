//! Scenario 4, another zone: the state volume lives in us-east-1a; the next instance is launched
//! in us-east-1b, where EBS cannot attach it. spotinit snapshots it, creates the copy in its own
//! zone with the same tags (and `spotinit:moved-from`), marks the old one superseded, and the
//! container comes back on the copy with the same counter. Then an instance back in us-east-1a
//! whose user data pins `volume.id` to the old volume — which sits right there, available and
//! stale — follows the `superseded-by` tag to the live copy instead, and moves that one back:
//! the counter it serves is the copy's, never the old volume's.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_4_another_zone -- --nocapture`

use std::time::Instant;

use crate::common::{expect, first_instance_with_counter, never, report, BOOT, STEP};
use spotworld::docker::Counter;
use spotworld::world::{InstanceSpec, UserData, World, WorldSettings};

#[tokio::test]
async fn the_volume_follows_the_instance_into_another_zone_through_a_snapshot() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-4-another-zone"))
        .await
        .unwrap();
    let (a, counter, old) = first_instance_with_counter(&world, "e2e-4").await;
    for want in 1..=3 {
        assert_eq!(counter.increment().await.unwrap(), want);
    }
    report("a: ready in us-east-1a, counter at 3", t0);

    // Stopped through the power button this time (EC2 stop/terminate): drained, powered off.
    let mut c = a.console_from_now();
    a.powerdown().await.unwrap();
    expect(&mut c, &format!("volume: {old} detached in"), STEP).await;
    assert!(a.wait_poweroff(STEP).await.unwrap(), "{}", a.diagnostics());
    a.reclaim().await.unwrap();
    report("a: drained and gone", t0);

    let mut ud = UserData::new("e2e-4");
    ud.docker_api = false;
    let d = world
        .launch(InstanceSpec::new("d", "us-east-1b").user_data(ud.to_toml()))
        .await
        .unwrap();
    let mut c = d.console();
    expect(
        &mut c,
        &format!("volume: {old} is in us-east-1a, this instance in us-east-1b: moving it here"),
        BOOT,
    )
    .await;
    let snap = expect(&mut c, &format!("of {old} started"), STEP).await;
    expect(&mut c, "completed in", STEP).await;
    let moved = expect(&mut c, &format!("volume: {old} now continues as "), STEP).await;
    let new = moved
        .text
        .split(" now continues as ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the new volume's id")
        .to_owned();
    expect(
        &mut c,
        &format!("state first recorded on {old} continues on {new}"),
        STEP,
    )
    .await;
    d.wait_ready(BOOT).await.unwrap();
    never(&d, "creating ext4");
    println!("d: {}\nd: {}", snap.text, moved.text);

    let counter = Counter {
        port: d.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 3);
    assert_eq!(counter.increment().await.unwrap(), 4);

    let vols = world.volumes().await.unwrap();
    assert_eq!(vols.len(), 2, "the old and the new volume: {vols:?}");
    let n = vols.iter().find(|v| v.id == new).expect("the new volume");
    let o = vols.iter().find(|v| v.id == old).expect("the old volume");
    assert_eq!(n.zone, "us-east-1b");
    assert_eq!(n.tags.get("Name").map(String::as_str), Some("e2e-4"));
    assert_eq!(
        n.tags.get("spotinit:moved-from").map(String::as_str),
        Some(old.as_str())
    );
    assert_eq!(n.attachments.len(), 1);
    assert_eq!(n.attachments[0].instance_id, d.id);
    assert!(n.snapshot_id.is_some(), "{n:?}");
    assert_eq!(o.zone, "us-east-1a");
    assert_eq!(
        o.tags.get("spotinit:superseded-by").map(String::as_str),
        Some(new.as_str())
    );
    assert_eq!(o.state, "available", "kept, not deleted: {o:?}");
    let snaps = world.snapshots().await.unwrap();
    assert!(
        snaps
            .iter()
            .any(|s| s.volume_id == old && Some(&s.id) == n.snapshot_id.as_ref()),
        "{snaps:?}"
    );
    report("d: the state moved to us-east-1b, counter at 4", t0);

    // Back in us-east-1a, pinned to the old volume's id.
    let mut c = d.console_from_now();
    d.powerdown().await.unwrap();
    expect(&mut c, &format!("volume: {new} detached in"), STEP).await;
    assert!(d.wait_poweroff(STEP).await.unwrap(), "{}", d.diagnostics());
    d.reclaim().await.unwrap();
    let mut ud = UserData::new("e2e-4");
    ud.docker_api = false;
    ud.volume_id = Some(old.clone());
    let e = world
        .launch(InstanceSpec::new("e", "us-east-1a").user_data(ud.to_toml()))
        .await
        .unwrap();
    let mut c = e.console();
    expect(
        &mut c,
        &format!("volume: {old} was moved to {new} in us-east-1b"),
        BOOT,
    )
    .await;
    expect(
        &mut c,
        &format!("volume: {new} is in us-east-1b, this instance in us-east-1a: moving it here"),
        STEP,
    )
    .await;
    let back = expect(&mut c, &format!("volume: {new} now continues as "), STEP).await;
    e.wait_ready(BOOT).await.unwrap();
    never(&e, "creating ext4");
    never(&e, &format!("volume: attaching {old} "));
    println!("e: {}", back.text);
    let counter = Counter {
        port: e.service_port().unwrap(),
    };
    assert_eq!(
        counter.wait_value(STEP).await.unwrap(),
        4,
        "the live state, not the old volume's 3"
    );
    assert_eq!(counter.increment().await.unwrap(), 5);
    report("scenario 4", t0);
}
