//! Scenario 1, first boot: no volume exists; spotinit creates it in the instance's zone, formats
//! it, mounts it and starts Docker on it. Proved from outside: after the instance drained on the
//! power button, the volume's backing file holds `docker/` (overlay2, the image, the container,
//! the named volume with the counter's value) and spotinit's record of a clean shutdown.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_1_first_boot -- --nocapture`

use std::time::Instant;

use crate::common::{expect, report, BOOT, STEP};
use spotworld::docker::{deploy_counter, Counter, COUNTER_VOLUME};
use spotworld::world::{debugfs, InstanceSpec, UserData, World, WorldSettings};

#[tokio::test]
async fn first_boot_creates_formats_and_mounts_the_volume_under_docker() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-1-first-boot"))
        .await
        .unwrap();
    assert!(world.volumes().await.unwrap().is_empty());
    let a = world
        .launch(InstanceSpec::new("a", "us-east-1a").user_data(UserData::new("e2e-1").to_toml()))
        .await
        .unwrap();
    let mut c = a.console();
    expect(&mut c, "creating 1 GiB gp3 in us-east-1a", BOOT).await;
    let blank = expect(&mut c, "creating ext4 labelled spotinit-state", STEP).await;
    assert!(blank.text.contains("is empty"), "{}", blank.text);
    expect(&mut c, "volume: formatted in", STEP).await;
    expect(
        &mut c,
        "/var/lib/docker and /var/lib/containerd are on it",
        STEP,
    )
    .await;
    expect(&mut c, "phase volume: done", STEP).await;
    // The golden rule's order: the volume first, then the daemons.
    expect(&mut c, "phase containerd: done", STEP).await;
    expect(&mut c, "phase dockerd: done", STEP).await;
    let ready = a.wait_ready(BOOT).await.unwrap();
    println!("a: {}", ready.text);
    report("boot to ready", t0);

    let vols = world.volumes().await.unwrap();
    assert_eq!(vols.len(), 1, "{vols:?}");
    let v = &vols[0];
    assert_eq!(v.zone, "us-east-1a");
    assert_eq!(v.size_gib, 1);
    assert_eq!(v.tags.get("Name").map(String::as_str), Some("e2e-1"));
    assert_eq!(
        v.tags.get("spotinit:created-by").map(String::as_str),
        Some(a.id.as_str())
    );
    assert_eq!(v.attachments.len(), 1, "{v:?}");
    assert_eq!(v.attachments[0].instance_id, a.id);
    assert_eq!(v.attachments[0].state, "attached");

    let docker = a.docker().unwrap();
    docker.wait_ping(STEP).await.unwrap();
    let info = docker.info().await.unwrap();
    assert_eq!(info["DockerRootDir"], "/var/lib/docker", "{info}");
    assert_eq!(info["Driver"], "overlay2", "{info}");
    deploy_counter(&docker).await.unwrap();
    let counter = Counter {
        port: a.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 0);
    assert_eq!(counter.increment().await.unwrap(), 1);
    assert_eq!(counter.increment().await.unwrap(), 2);
    report("container deployed and incremented", t0);

    // The power button: the one drain, then power-off.
    let mut c = a.console_from_now();
    a.powerdown().await.unwrap();
    expect(&mut c, "shutting down: ", STEP).await;
    expect(&mut c, "dockerd stopped", STEP).await;
    expect(&mut c, "volume: unmounted in", STEP).await;
    expect(&mut c, &format!("volume: {} detached in", v.id), STEP).await;
    expect(&mut c, "shutdown: state volume released", STEP).await;
    expect(&mut c, "powering off", STEP).await;
    assert!(
        a.wait_poweroff(STEP).await.unwrap(),
        "QEMU exit status after the guest powered off\n{}",
        a.diagnostics()
    );
    let v = world.volume(&v.id).await.unwrap();
    assert_eq!(v.state, "available", "{v:?}");
    assert!(v.attachments.is_empty(), "{v:?}");
    report("drained and detached", t0);

    // From outside: the ext4 on the backing file holds Docker's state and spotinit's record.
    let file = world.volume_file(&v.id);
    let top = debugfs(&file, "ls -p /").unwrap();
    for d in ["/docker/", "/containerd/", "/.spotinit/", "/lost+found/"] {
        assert!(top.contains(d), "no {d} at the volume's top:\n{top}");
    }
    let docker_dir = debugfs(&file, "ls -p /docker").unwrap();
    for d in ["/overlay2/", "/containers/", "/image/", "/volumes/"] {
        assert!(
            docker_dir.contains(d),
            "no {d} in the volume's docker/:\n{docker_dir}"
        );
    }
    let count = debugfs(
        &file,
        &format!("cat /docker/volumes/{COUNTER_VOLUME}/_data/count"),
    )
    .unwrap();
    assert_eq!(count.trim(), "2");
    let record = debugfs(&file, "cat /.spotinit/record.toml").unwrap();
    for want in [
        format!("volume_id = \"{}\"", v.id),
        format!("created_by = \"{}\"", a.id),
        format!("last_instance = \"{}\"", a.id),
        "storage_driver = \"overlay2\"".into(),
        "boot_count = 1".into(),
        "clean_shutdown = true".into(),
    ] {
        assert!(record.contains(&want), "record lacks {want:?}:\n{record}");
    }
    let stats = debugfs(&file, "stats").unwrap();
    assert!(
        stats.contains("Filesystem volume name:   spotinit-state"),
        "{stats}"
    );
    assert!(stats.contains("Filesystem state:         clean"), "{stats}");
    report("scenario 1", t0);
}
