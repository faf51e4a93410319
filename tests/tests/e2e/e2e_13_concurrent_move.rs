//! Scenario 13, two zones move one volume at once: the state lives in us-east-1a; two instances
//! boot together in us-east-1b and us-east-1c, and both find the volume available in a zone that
//! is not theirs. Unchecked, each would snapshot it, make a copy and start Docker on it: two
//! live copies of one state, and every later boot refusing the pair as ambiguous. spotinit makes
//! the move exclusive (a claim on the source, read back; the oldest copy wins a race that slips
//! through): exactly one instance moves the volume and starts Docker with the counter as it was;
//! the other never starts Docker, says who is moving (then who holds) the state, and powers off.
//! One live volume remains, the old one tagged superseded by it.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_13_concurrent_move -- --nocapture`

use std::time::Instant;

use crate::common::{expect, first_instance_with_counter, never, report, BOOT, STEP};
use spotworld::docker::Counter;
use spotworld::qemu::ConsoleLine;
use spotworld::world::{
    InstanceSpec, SimInstance, UserData, World, WorldSettings, BOOT_FAILED_MARKER, READY_MARKER,
};

/// Ready, or the boot failure, whichever comes first.
async fn outcome(i: &SimInstance) -> ConsoleLine {
    i.console()
        .wait_until(
            "ready or BOOT FAILED",
            |t| t.contains(READY_MARKER) || t.contains(BOOT_FAILED_MARKER),
            BOOT + BOOT,
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn two_instances_moving_one_volume_from_two_zones_leave_exactly_one_live_copy() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-13-concurrent-move"))
        .await
        .unwrap();
    let (a, counter, old) = first_instance_with_counter(&world, "e2e-13").await;
    for want in 1..=3 {
        assert_eq!(counter.increment().await.unwrap(), want);
    }
    let mut c = a.console_from_now();
    a.powerdown().await.unwrap();
    expect(&mut c, &format!("volume: {old} detached in"), STEP).await;
    assert!(a.wait_poweroff(STEP).await.unwrap(), "{}", a.diagnostics());
    a.reclaim().await.unwrap();
    report(
        "a: counter at 3, drained, volume available in us-east-1a",
        t0,
    );

    let mut ud = UserData::new("e2e-13");
    ud.docker_api = false;
    ud.retry_for_secs = 60;
    ud.retry_interval_secs = 10;
    let (b, c) = tokio::join!(
        world.launch(InstanceSpec::new("b", "us-east-1b").user_data(ud.to_toml())),
        world.launch(InstanceSpec::new("c", "us-east-1c").user_data(ud.to_toml())),
    );
    let (b, c) = (b.unwrap(), c.unwrap());
    let (ob, oc) = tokio::join!(outcome(&b), outcome(&c));
    report("both decided", t0);
    let (winner, loser, failure) = match (
        ob.text.contains(READY_MARKER),
        oc.text.contains(READY_MARKER),
    ) {
        (true, false) => (&b, &c, oc),
        (false, true) => (&c, &b, ob),
        (x, y) => panic!(
            "exactly one instance must get the state; ready: b {x}, c {y}\n--- b:\n{}\n--- c:\n{}",
            b.diagnostics(),
            c.diagnostics()
        ),
    };
    println!(
        "winner {} in {}, loser {} in {}",
        winner.name, winner.zone, loser.name, loser.zone
    );
    println!("{}: {}", loser.name, failure.text);

    // The winner moved the state and has the counter as it was.
    let w = winner.console();
    assert!(
        w.contains(&format!("volume: {old} now continues as ")),
        "{}",
        winner.diagnostics()
    );
    never(winner, "creating ext4");
    let counter = Counter {
        port: winner.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 3);

    // The loser saw the move under way (or the moved state in use) and never started Docker.
    let l = loser.console();
    assert!(
        l.contains(&format!(
            "is being moved into {} by instance {}",
            winner.zone, winner.id
        )) || l.contains("moved state volume")
            || l.contains(&format!(
                "attached to instance {}, which is running",
                winner.id
            )),
        "{}",
        loser.diagnostics()
    );
    let mut lc = loser.console();
    expect(&mut lc, "Docker was not started", STEP).await;
    assert!(
        loser.wait_poweroff(STEP).await.unwrap(),
        "{}",
        loser.diagnostics()
    );
    never(loser, "phase containerd");
    never(loser, "/var/lib/docker and /var/lib/containerd are on it");

    // One live volume: the winner's copy; the old one superseded by it; nothing else.
    let vols = world.volumes().await.unwrap();
    let live: Vec<_> = vols
        .iter()
        .filter(|v| {
            v.tags.get("Name").map(String::as_str) == Some("e2e-13")
                && !v.tags.contains_key("spotinit:superseded-by")
                && v.state != "deleted"
        })
        .collect();
    assert_eq!(live.len(), 1, "{vols:#?}");
    let new = live[0];
    assert_eq!(new.zone, winner.zone);
    assert_eq!(new.attachments.len(), 1);
    assert_eq!(new.attachments[0].instance_id, winner.id);
    let o = vols.iter().find(|v| v.id == old).unwrap();
    assert_eq!(
        o.tags.get("spotinit:superseded-by").map(String::as_str),
        Some(new.id.as_str())
    );
    report("scenario 13", t0);
}
