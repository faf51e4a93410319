//! Scenario 14, a drain against what Docker leaves behind. On A run the counter and two
//! privileged helpers: one mounts a tmpfs below /var/lib/docker in the host's mount namespace
//! (as a container with host powers can), the other freezes dockerd (SIGSTOP), so at the spot
//! notice dockerd can neither list nor stop the containers and their overlay and shm mounts
//! stay on the volume. The drain caps dockerd's stop by the notice's deadline and kills it; then
//! it finds every mount that lives on the state volume in mountinfo, unmounts them deepest
//! first, marks the shutdown clean only once none is left, and detaches — well within the
//! notice. B takes the volume: the record says the shutdown was clean, the counter is intact.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_14_drain_leftovers -- --nocapture`

use std::time::{Duration, Instant};

use crate::common::{expect, expect_clean_takeover, report, BOOT, STEP};
use spotworld::docker::{counter_container, ContainerSpec, Counter};
use spotworld::world::{InstanceSpec, UserData, World, WorldSettings};

fn helper(name: &str, script: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        cmd: vec!["/bin/sh".into(), "-c".into(), script.into()],
        restart_always: false,
        volume: None,
        publish: None,
        host_powers: true,
        ..counter_container()
    }
}

#[tokio::test]
async fn the_drain_unmounts_what_docker_left_on_the_volume_and_detaches_it_clean() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-14-drain-leftovers"))
        .await
        .unwrap();
    // dockerd's own stop timeout (stop_timeout_secs + 15 s) is longer than the notice leaves.
    let ud = UserData::new("e2e-14")
        .to_toml()
        .replace("[docker]\n", "[docker]\nstop_timeout_secs = 30\n");
    let a = world
        .launch(InstanceSpec::new("a", "us-east-1a").user_data(ud))
        .await
        .unwrap();
    a.wait_ready(BOOT).await.unwrap();
    let docker = a.docker().unwrap();
    docker.wait_ping(STEP).await.unwrap();
    spotworld::docker::deploy_counter(&docker).await.unwrap();
    let counter = Counter {
        port: a.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 0);
    for want in 1..=3 {
        assert_eq!(counter.increment().await.unwrap(), want);
    }
    let volume = world.volumes().await.unwrap()[0].id.clone();

    // A mount in the host's namespace, on the volume, that no one will take down.
    let id = docker
        .create_container(&helper(
            "leftover",
            "nsenter -t 1 -m -- /bin/busybox sh -c 'mkdir -p /var/lib/docker/leftover && mount -t tmpfs leftover /var/lib/docker/leftover'",
        ))
        .await
        .unwrap();
    docker.start(&id).await.unwrap();
    let deadline = Instant::now() + STEP;
    loop {
        let c = docker.containers(true).await.unwrap();
        if c.iter()
            .any(|c| c.name == "leftover" && c.state == "exited")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leftover helper never finished: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // dockerd frozen: from here on the Engine API does not answer.
    let id = docker
        .create_container(&helper(
            "freezer",
            "sleep 2; kill -STOP $(pidof dockerd); exec sleep 100000",
        ))
        .await
        .unwrap();
    docker.start(&id).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    report(
        "a: counter at 3, a tmpfs left on the volume, dockerd frozen",
        t0,
    );

    let mut c = a.console_from_now();
    let notice = Instant::now();
    a.post_spot_notice(Duration::from_secs(50));
    expect(&mut c, "spot: interruption notice", STEP).await;
    expect(&mut c, "dockerd did not stop within", STEP).await;
    let left = expect(&mut c, "left on the state volume: ", STEP).await;
    println!("a: {}", left.text);
    assert!(
        left.text.contains("/var/lib/docker/leftover (tmpfs)"),
        "{}",
        left.text
    );
    assert!(left.text.contains("/merged (overlay)"), "{}", left.text);
    let detached = expect(&mut c, &format!("volume: {volume} detached in"), STEP).await;
    let took = a.instant_of(&detached).saturating_duration_since(notice);
    println!(
        "a: notice to detached in {:.1} s (notice given 50 s)",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(50), "{took:?}");
    assert!(
        !a.console().contains("could not release the state volume"),
        "{}",
        a.diagnostics()
    );
    a.reclaim().await.unwrap();
    report("a: drained", t0);

    let mut ud = UserData::new("e2e-14");
    ud.docker_api = false;
    let b = world
        .launch(InstanceSpec::new("b", "us-east-1a").user_data(ud.to_toml()))
        .await
        .unwrap();
    expect_clean_takeover(&b, &volume, &a.id).await;
    let counter = Counter {
        port: b.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 3);
    report("scenario 14", t0);
}
