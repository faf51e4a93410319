//! Scenario 3, hard kill without warning: the instance is SIGKILLed while the counter is being
//! incremented as fast as it answers. EC2 holds the volume for a while after the termination;
//! the new instance waits for the release, checks the filesystem (the journal is replayed), and
//! every increment the service acknowledged — each one fsync'ed before the answer — is there.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_3_hard_kill -- --nocapture`

use std::time::{Duration, Instant};

use crate::common::{expect, first_instance_with_counter, never, report, Writer, BOOT, STEP};
use spotworld::docker::Counter;
use spotworld::world::{InstanceSpec, UserData, World, WorldSettings};

#[tokio::test]
async fn after_a_hard_kill_the_successor_waits_checks_and_has_every_fsynced_write() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-3-hard-kill"))
        .await
        .unwrap();
    let release = world.fidelity().settings().release_after_termination;
    let (a, counter, volume_id) = first_instance_with_counter(&world, "e2e-3").await;
    report("a: ready, counter deployed", t0);

    // Increment without pause; remember the last value the service acknowledged.
    let writer = Writer::start(counter);
    let until = Instant::now() + STEP;
    while writer.acked() < 5 {
        assert!(
            Instant::now() < until,
            "fewer than 5 increments in {STEP:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Kill in the middle of the stream: at most one increment is in flight. (The instant is
    // taken first: EC2's release clock starts after it.)
    let killed_at = Instant::now();
    a.kill_hard().await.unwrap();
    let last_acked = writer.acked();
    writer.stop().await;
    println!("a: killed with {last_acked} increments acknowledged");

    // EC2 still holds the volume for the dead instance.
    let v = world.volume(&volume_id).await.unwrap();
    assert_eq!(v.state, "in-use", "{v:?}");
    assert_eq!(v.attachments[0].instance_id, a.id, "{v:?}");

    let mut ud = UserData::new("e2e-3");
    ud.docker_api = false;
    let b = world
        .launch(InstanceSpec::new("b", "us-east-1a").user_data(ud.to_toml()))
        .await
        .unwrap();
    let mut c = b.console();
    expect(&mut c, &format!("volume: found {volume_id}"), BOOT).await;
    let waiting = expect(&mut c, &format!("is still attached to {}", a.id), STEP).await;
    assert!(waiting.text.contains("waiting up to"), "{}", waiting.text);
    let released = expect(&mut c, &format!("volume: {volume_id} released after"), STEP).await;
    let released_at = b.instant_of(&released);
    assert!(
        released_at >= killed_at + release,
        "released {:.1} s after the kill, before EC2's release delay of {release:?}",
        (released_at - killed_at).as_secs_f64()
    );
    let checking = expect(&mut c, "checking it", STEP).await;
    println!("b: {}", checking.text);
    expect(&mut c, "volume: filesystem ", STEP).await;
    let record = expect(&mut c, "volume: record: boot 2 of this state", STEP).await;
    assert!(
        record.text.contains("no clean shutdown"),
        "the record should say the last shutdown was not clean: {}",
        record.text
    );
    let ready = b.wait_ready(BOOT).await.unwrap();
    never(&b, "creating ext4");
    println!(
        "b: ready {:.1} s after the kill (EC2 released the volume after {:.1} s)",
        (b.instant_of(&ready) - killed_at).as_secs_f64(),
        (released_at - killed_at).as_secs_f64()
    );

    let counter = Counter {
        port: b.service_port().unwrap(),
    };
    let value = counter.wait_value(STEP).await.unwrap();
    println!(
        "b: the counter is {value}; {last_acked} increments were acknowledged before the kill"
    );
    assert!(
        value == last_acked || value == last_acked + 1,
        "after the kill the counter is {value}; {last_acked} increments were acknowledged \
         (each fsync'ed before its answer), at most one more was in flight"
    );
    assert_eq!(counter.increment().await.unwrap(), value + 1);
    report("scenario 3", t0);
}
