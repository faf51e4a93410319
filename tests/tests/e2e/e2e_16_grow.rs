//! Scenario 16, a volume that grows with the configuration: the state was created at 1 GiB; the
//! next instance's user data asks for 2. spotinit modifies the volume before attaching it (EC2
//! goes `modifying`, then `optimizing`, when the disk has its new size), grows the filesystem
//! after the mount, and the counter keeps its count. A later instance that asks for less is told
//! that EBS volumes do not shrink, and boots on the volume as it is.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_16_grow -- --nocapture`

use std::time::Instant;

use crate::common::{expect, first_instance_with_counter, never, report};
use crate::common::{BOOT, STEP};
use spotworld::docker::Counter;
use spotworld::world::{debugfs, InstanceSpec, SimInstance, UserData, World, WorldSettings};

const GIB: u64 = 1 << 30;

#[tokio::test]
async fn a_larger_size_in_the_user_data_grows_the_volume_and_its_filesystem_with_the_data() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-16-grow"))
        .await
        .unwrap();
    let (a, counter, volume_id) = first_instance_with_counter(&world, "e2e-16").await;
    for n in 1..=3 {
        assert_eq!(counter.increment().await.unwrap(), n);
    }
    assert_eq!(world.volume(&volume_id).await.unwrap().size_gib, 1);
    power_off(&a).await;
    report("a: 1 GiB, counter at 3, powered off", t0);

    let mut ud = UserData::new("e2e-16");
    ud.size_gib = 2;
    let b = world
        .launch(InstanceSpec::new("b", "us-east-1a").user_data(ud.to_toml()))
        .await
        .unwrap();
    let mut c = b.console();
    expect(
        &mut c,
        &format!("volume: modifying {volume_id} to match [volume]: size 1 → 2 GiB"),
        BOOT,
    )
    .await;
    let modified = expect(&mut c, &format!("volume: {volume_id} modified in"), STEP).await;
    assert!(
        modified.text.contains("(EC2: optimizing") || modified.text.contains("(EC2: completed"),
        "attached only once EC2 allows it: {}",
        modified.text
    );
    expect(&mut c, &format!("volume: {volume_id} attached in"), STEP).await;
    expect(
        &mut c,
        "volume: growing the filesystem from 1.0 GiB to 2.0 GiB",
        STEP,
    )
    .await;
    b.wait_ready(BOOT).await.unwrap();
    never(&b, "creating ext4");
    never(&b, "could not grow the filesystem");
    let counter = Counter {
        port: b.service_port().unwrap(),
    };
    assert_eq!(
        counter.wait_value(STEP).await.unwrap(),
        3,
        "the data is intact"
    );
    assert_eq!(counter.increment().await.unwrap(), 4);
    assert_eq!(world.volume(&volume_id).await.unwrap().size_gib, 2);
    let modifications: Vec<_> = world
        .fidelity()
        .requests()
        .into_iter()
        .filter(|r| r.action == "ModifyVolume")
        .collect();
    assert_eq!(modifications.len(), 1, "{modifications:?}");
    assert_eq!(modifications[0].status, 200, "{modifications:?}");
    power_off(&b).await;
    report("b: grown to 2 GiB, counter at 4, powered off", t0);

    // The filesystem fills the 2 GiB disk (a few MiB of slack for the last group).
    let file = world.volume_file(&volume_id);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 * GIB);
    let stats = debugfs(&file, "stats").unwrap();
    let field = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in debugfs stats:\n{stats}"))
    };
    let fs_bytes = field("Block count:") * field("Block size:");
    assert!(
        fs_bytes > 2 * GIB - (64 << 20) && fs_bytes <= 2 * GIB,
        "the filesystem has {fs_bytes} bytes on a 2 GiB volume"
    );

    // Asking for less: told why it cannot be, and the boot goes on with the volume as it is.
    let mut ud = UserData::new("e2e-16");
    ud.size_gib = 1;
    let s = world
        .launch(InstanceSpec::new("smaller", "us-east-1a").user_data(ud.to_toml()))
        .await
        .unwrap();
    let mut c = s.console();
    let refused = expect(&mut c, "EBS volumes cannot shrink", BOOT).await;
    assert!(
        refused.text.contains(&format!(
            "{volume_id} has 2 GiB and volume.size_gib asks for 1"
        )),
        "{}",
        refused.text
    );
    s.wait_ready(BOOT).await.unwrap();
    never(&s, "volume: modifying");
    let counter = Counter {
        port: s.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 4);
    let modify_calls = world
        .fidelity()
        .requests()
        .iter()
        .filter(|r| r.action == "ModifyVolume")
        .count();
    assert_eq!(modify_calls, 1, "no second ModifyVolume for a smaller size");
    report("scenario 16", t0);
}

async fn power_off(i: &SimInstance) {
    let mut c = i.console_from_now();
    i.powerdown().await.unwrap();
    expect(&mut c, "powering off", STEP).await;
    i.wait_poweroff(STEP).await.unwrap();
}
