//! Scenario 2, graceful interruption: a rebalance recommendation makes spotinit snapshot the
//! volume; then a spot interruption notice (two minutes) makes it stop the containers, Docker
//! and containerd, unmount and detach the volume well before the deadline; a new instance in
//! the same zone, booted from the pristine image, finds the volume, and the container comes back
//! by itself (`--restart always`) with the same counter. Both report to a webhook: each event
//! once, in order, with the instance's id.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_2_graceful_interruption -- --nocapture`

use std::time::{Duration, Instant};

use crate::common::{expect, expect_clean_takeover, first_instance_with_counter_as, report, STEP};
use spotworld::docker::Counter;
use spotworld::webhook::WebhookReceiver;
use spotworld::world::{InstanceSpec, UserData, World, WorldSettings};

#[tokio::test]
async fn a_spot_notice_drains_and_detaches_and_a_new_instance_resumes() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-2-graceful"))
        .await
        .unwrap();
    let webhook = WebhookReceiver::start().await.unwrap();
    let mut ud = UserData::new("e2e-2");
    ud.extra = webhook.notify_toml().unwrap();
    let (a, counter, volume_id) = first_instance_with_counter_as(&world, &ud).await;
    for want in 1..=3 {
        assert_eq!(counter.increment().await.unwrap(), want);
    }
    report("a: ready, counter at 3", t0);

    // A rebalance recommendation often comes first: spotinit snapshots the volume (the copy is
    // taken with the VM paused, crash-consistent as an EBS snapshot).
    let mut c = a.console_from_now();
    a.post_rebalance();
    expect(&mut c, "spot: rebalance recommendation at", STEP).await;
    let started = expect(&mut c, "snapshots: started snap-", STEP).await;
    assert!(
        started
            .text
            .contains(&format!("of {volume_id} (rebalance recommendation")),
        "{}",
        started.text
    );
    let snaps = world.snapshots().await.unwrap();
    let backup = snaps
        .iter()
        .find(|s| {
            s.volume_id == volume_id
                && s.tags.get("spotinit:purpose").map(String::as_str) == Some("backup")
        })
        .unwrap_or_else(|| panic!("no backup snapshot of {volume_id}: {snaps:?}"));
    assert!(world.ebs().snapshot_file(&backup.id).is_file());
    report("a: rebalance recommendation, snapshot taken", t0);

    // EC2 posts the notice two minutes ahead; spotinit polls IMDS every 2 s.
    let mut c = a.console_from_now();
    let notice_at = Instant::now();
    let deadline = notice_at + Duration::from_secs(120);
    a.post_spot_notice(Duration::from_secs(120));
    expect(&mut c, "spot: interruption notice: terminate", STEP).await;
    expect(&mut c, "shutting down: spot interruption notice", STEP).await;
    let stopped = expect(&mut c, "shutdown: 1 container stopped", STEP).await;
    expect(&mut c, "dockerd stopped", STEP).await;
    expect(&mut c, "containerd stopped", STEP).await;
    expect(&mut c, "volume: unmounted in", STEP).await;
    let detached = expect(&mut c, &format!("volume: {volume_id} detached in"), STEP).await;
    expect(&mut c, "shutdown: done in", STEP).await;
    expect(&mut c, "drained; waiting for EC2", STEP).await;
    let detached_at = a.instant_of(&detached);
    assert!(
        detached_at < deadline,
        "the volume was detached {:.1} s after the notice, past its two minutes",
        (detached_at - notice_at).as_secs_f64()
    );
    println!(
        "a: containers stopped at +{:.1} s, volume detached at +{:.1} s after the notice ({:.1} s before the deadline)",
        (a.instant_of(&stopped) - notice_at).as_secs_f64(),
        (detached_at - notice_at).as_secs_f64(),
        (deadline - detached_at).as_secs_f64()
    );
    // EC2 sees it too, and so can the next instance at once.
    let v = world.volume(&volume_id).await.unwrap();
    assert_eq!(v.state, "available", "{v:?}");
    // At (or before) the deadline EC2 takes the instance; it holds nothing any more.
    a.reclaim().await.unwrap();
    report("a: drained, detached, reclaimed", t0);

    // The successor: same zone, pristine image, Docker's API not even exposed. The container
    // comes back by itself, with its data.
    ud.docker_api = false;
    let b = world
        .launch(InstanceSpec::new("b", "us-east-1a").user_data(ud.to_toml()))
        .await
        .unwrap();
    expect_clean_takeover(&b, &volume_id, &a.id).await;
    let counter = Counter {
        port: b.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 3);
    assert_eq!(counter.increment().await.unwrap(), 4);
    let vols = world.volumes().await.unwrap();
    assert_eq!(vols.len(), 1, "{vols:?}");
    assert_eq!(vols[0].attachments[0].instance_id, b.id);

    // The webhook heard each event once, in order, from the instance it was about.
    let heard = |ev: &str| -> Vec<String> {
        webhook
            .received()
            .iter()
            .filter(|r| r.body["event"] == ev)
            .map(|r| r.body["instance"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let deadline = Instant::now() + STEP;
    while heard("boot-ready").len() < 2 {
        assert!(Instant::now() < deadline, "{:?}", webhook.received());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        webhook.delivered_events(),
        [
            "boot-ready",
            "rebalance",
            "spot-notice",
            "drain-done",
            "boot-ready"
        ]
    );
    assert_eq!(heard("boot-ready"), [a.id.clone(), b.id.clone()]);
    assert_eq!(heard("drain-done"), std::slice::from_ref(&a.id));
    let drained = webhook
        .received()
        .into_iter()
        .find(|r| r.body["event"] == "drain-done")
        .unwrap();
    assert!(
        drained.body["text"]
            .as_str()
            .unwrap()
            .contains("the state volume is free for the next instance"),
        "{}",
        drained.body
    );
    report("scenario 2", t0);
}
