//! Scenario 5, two instances race for one existing volume (say, a replacement launched while the
//! old instance still runs). Exactly one attaches and mounts it and starts Docker; the other sees
//! a live holder, retries for its `failure.retry_for_secs`, then fails closed: a clear console
//! message naming the holder, Docker never started on its bare root, powered off as its failure
//! policy says — and its release does not detach the winner's volume.
//!
//! Both VMs boot at once on two cores: slow, so the deadlines are generous.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_5_race -- --nocapture`

use std::time::Instant;

use crate::common::{never, powered_off_without_docker, ready_or_failed, report};
use spotworld::world::{InstanceSpec, UserData, World, WorldSettings, READY_MARKER};

#[tokio::test]
async fn two_instances_race_for_one_volume_and_exactly_one_gets_it() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-5-race"))
        .await
        .unwrap();
    let volume = world
        .create_volume("us-east-1a", 1, &[("Name", "e2e-5")])
        .await
        .unwrap();
    let mut ud = UserData::new("e2e-5");
    ud.docker_api = false;
    ud.retry_for_secs = 30;
    ud.retry_interval_secs = 5;
    let (one, two) = tokio::join!(
        world.launch(InstanceSpec::new("one", "us-east-1a").user_data(ud.to_toml())),
        world.launch(InstanceSpec::new("two", "us-east-1a").user_data(ud.to_toml())),
    );
    let (one, two) = (one.unwrap(), two.unwrap());
    let (o1, o2) = tokio::join!(ready_or_failed(&one), ready_or_failed(&two));
    report("both decided", t0);

    let (winner, loser, failure) = match (
        o1.text.contains(READY_MARKER),
        o2.text.contains(READY_MARKER),
    ) {
        (true, false) => (&one, &two, o2),
        (false, true) => (&two, &one, o1),
        (a, b) => panic!(
            "exactly one instance must get the volume; ready: one {a}, two {b}\n--- one:\n{}\n--- two:\n{}",
            one.diagnostics(),
            two.diagnostics()
        ),
    };
    println!(
        "winner {} ({}), loser {} ({})",
        winner.name, winner.id, loser.name, loser.id
    );
    println!("{}: {}", loser.name, failure.text);
    assert!(
        failure.text.contains(&format!(
            "state volume {volume} is attached to instance {}, which is running",
            winner.id
        )),
        "the failure must name the volume and its live holder: {}",
        failure.text
    );
    assert!(
        failure.text.contains("will not share it"),
        "{}",
        failure.text
    );
    // It retried for its window before giving up.
    let retries = loser
        .console()
        .lines()
        .iter()
        .filter(|l| l.text.contains("volume: trying again in"))
        .count();
    assert!(
        retries >= 2,
        "the loser should retry while the holder lives"
    );
    powered_off_without_docker(loser).await;
    never(loser, "/var/lib/docker and /var/lib/containerd are on it");

    // The winner has it, formatted by it, and keeps it after the loser's drain.
    let w = winner.console();
    assert!(w.contains("creating ext4"), "{}", winner.diagnostics());
    assert!(w.contains("phase dockerd: done"));
    let v = world.volume(&volume).await.unwrap();
    assert_eq!(v.state, "in-use", "{v:?}");
    assert_eq!(v.attachments.len(), 1, "{v:?}");
    assert_eq!(v.attachments[0].instance_id, winner.id);
    assert_eq!(v.attachments[0].state, "attached");
    // The loser's drain (it had asked for the volume) detached nothing of the winner's.
    let attaches: Vec<_> = world
        .fidelity()
        .requests()
        .into_iter()
        .filter(|r| r.action == "AttachVolume" && r.param("VolumeId") == Some(volume.as_str()))
        .collect();
    let won: Vec<_> = attaches.iter().filter(|r| r.status == 200).collect();
    assert_eq!(
        won.len(),
        1,
        "exactly one AttachVolume succeeded: {attaches:?}"
    );
    assert_eq!(won[0].param("InstanceId"), Some(winner.id.as_str()));
    report("scenario 5", t0);
}
