//! Scenario 17, a handover under capacity rebalancing: the replacement boots while the old
//! instance still runs and holds the volume (an Auto Scaling group launches it first and
//! terminates the old one later). It waits for the live holder instead of failing, and once the
//! old instance's drain lets the volume go it takes it within a few seconds, with every write
//! the service acknowledged. The handover (old instance's detach → new instance's ready) is
//! printed for the README.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_17_handover -- --nocapture`

use std::time::{Duration, Instant};

use crate::common::{expect, expect_clean_takeover, first_instance_with_counter, report, Writer};
use crate::common::{BOOT, STEP};
use spotworld::docker::Counter;
use spotworld::world::{InstanceSpec, UserData, World, WorldSettings};

#[tokio::test]
async fn a_replacement_waits_for_the_live_holder_and_takes_over_when_it_drains() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-17-handover"))
        .await
        .unwrap();
    let (a, counter, volume_id) = first_instance_with_counter(&world, "e2e-17").await;
    report("a: ready, counter deployed", t0);

    // The service is used throughout: remember the last increment it acknowledged.
    let writer = Writer::start(counter);

    let mut ud = UserData::new("e2e-17");
    ud.live_holder_wait_secs = 300;
    let b = world
        .launch(InstanceSpec::new("b", "us-east-1a").user_data(ud.to_toml()))
        .await
        .unwrap();
    let mut bc = b.console();
    let waiting = expect(
        &mut bc,
        &format!(
            "volume: {volume_id} is attached to {}, which is running",
            a.id
        ),
        BOOT,
    )
    .await;
    assert!(
        waiting.text.contains("Waiting up to 5 min"),
        "{}",
        waiting.text
    );
    assert!(writer.acked() > 0, "the service answered");
    report("b: waiting for the live holder", t0);

    // The group terminates the old instance: it drains and lets the volume go.
    let mut ac = a.console_from_now();
    a.powerdown().await.unwrap();
    let detached = expect(&mut ac, &format!("volume: {volume_id} detached in"), STEP).await;
    let detached_at = a.instant_of(&detached);
    a.wait_poweroff(STEP).await.unwrap();
    let last_acked = writer.acked();
    writer.stop().await;

    expect_clean_takeover(&b, &volume_id, &a.id).await;
    let mut bc = b.console();
    let attached = expect(&mut bc, &format!("volume: {volume_id} attached in"), STEP).await;
    let ready = b.wait_ready(BOOT).await.unwrap();
    let to_attach = b
        .instant_of(&attached)
        .saturating_duration_since(detached_at);
    let to_ready = b.instant_of(&ready).saturating_duration_since(detached_at);
    println!(
        "handover: a's detach → b attached {:.1} s, → b ready {:.1} s",
        to_attach.as_secs_f64(),
        to_ready.as_secs_f64()
    );
    assert!(
        to_attach < Duration::from_secs(10),
        "b attached {to_attach:?} after a's detach: the release was noticed late"
    );

    let counter = Counter {
        port: b.service_port().unwrap(),
    };
    let value = counter.wait_value(STEP).await.unwrap();
    assert!(
        value == last_acked || value == last_acked + 1,
        "b's counter is {value}; a acknowledged {last_acked} (at most one more was in flight)"
    );
    assert_eq!(counter.increment().await.unwrap(), value + 1);
    report("scenario 17", t0);
}
