//! Scenario 9, a spot notice during the boot: EC2 can post the notice while the instance is still
//! taking its volume. Here it comes as soon as A's console says it is attaching the volume, and
//! the simulated EC2 is slow to attach (10 s), so spotinit sees the notice while the attachment
//! is still in progress: the boot is interrupted, Docker never starts, and the drain still gives
//! the volume back — it waits for the attachment to settle and detaches it, naming A — so the
//! volume ends `available` for the successor, which then takes it at once.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_9_notice_during_boot -- --nocapture`

use std::time::{Duration, Instant};

use crate::common::{expect, never, report, BOOT, STEP};
use spotworld::world::{InstanceSpec, UserData, World, WorldSettings};

#[tokio::test]
async fn a_notice_during_the_volume_phase_interrupts_the_boot_and_still_detaches() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let mut settings = WorldSettings::new("e2e-9-notice-during-boot");
    // EC2 usually attaches in 1-4 s; a slow attachment keeps the window open for the notice.
    settings.fidelity.attach_latency = Duration::from_secs(10);
    let world = World::start(settings).await.unwrap();
    let mut ud = UserData::new("e2e-9");
    ud.docker_api = false;
    let a = world
        .launch(InstanceSpec::new("a", "us-east-1a").user_data(ud.to_toml()))
        .await
        .unwrap();
    let mut c = a.console();
    let attaching = expect(&mut c, "volume: attaching vol-", BOOT).await;
    let notice_at = Instant::now();
    a.post_spot_notice(Duration::from_secs(120));
    let volume_id = attaching
        .text
        .split("attaching ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("a volume id on the attaching line")
        .to_owned();
    println!("a: {}", attaching.text);

    expect(&mut c, "spot: interruption notice: terminate", STEP).await;
    let interrupted = expect(&mut c, "boot interrupted: spot interruption notice", STEP).await;
    expect(&mut c, "shutting down: spot interruption notice", STEP).await;
    let detached = expect(&mut c, &format!("volume: {volume_id} detached in"), STEP).await;
    expect(&mut c, "shutdown: done in", STEP).await;
    expect(&mut c, "drained; waiting for EC2", STEP).await;
    // Whatever the boot had reached, Docker was never started.
    for forbidden in [
        "phase containerd",
        "phase dockerd",
        "spotinit: ready",
        "BOOT FAILED",
    ] {
        never(&a, forbidden);
    }
    println!(
        "a: interrupted at +{:.1} s, volume detached at +{:.1} s after the notice",
        (a.instant_of(&interrupted) - notice_at).as_secs_f64(),
        (a.instant_of(&detached) - notice_at).as_secs_f64()
    );

    // EC2 agrees, and stays so: no late attachment completes behind the drain's back.
    let v = world.volume(&volume_id).await.unwrap();
    assert_eq!(v.state, "available", "{v:?}");
    tokio::time::sleep(world.fidelity().settings().attach_latency).await;
    let v = world.volume(&volume_id).await.unwrap();
    assert_eq!(v.state, "available", "{v:?}");
    assert!(v.attachments.is_empty(), "{v:?}");
    let requests = world.fidelity().requests();
    let detach = requests
        .iter()
        .filter(|r| r.action == "DetachVolume")
        .collect::<Vec<_>>();
    println!("fidelity: DetachVolume requests: {detach:?}");
    assert!(
        detach.iter().any(|r| r.status == 200
            && r.param("VolumeId") == Some(volume_id.as_str())
            && r.param("InstanceId") == Some(a.id.as_str())),
        "no successful DetachVolume of {volume_id} naming {}: {detach:?}",
        a.id
    );
    a.reclaim().await.unwrap();
    report(
        "a: interrupted during the volume phase, volume detached",
        t0,
    );

    // The successor takes it at once (no holder to wait for) and boots to ready on it.
    let b = world
        .launch(InstanceSpec::new("b", "us-east-1a").user_data(ud.to_toml()))
        .await
        .unwrap();
    let mut c = b.console();
    expect(&mut c, &format!("volume: found {volume_id}"), BOOT).await;
    expect(&mut c, &format!("volume: {volume_id} attached in"), STEP).await;
    b.wait_ready(BOOT).await.unwrap();
    never(&b, "is still attached to");
    report("scenario 9", t0);
}
