//! Scenario 8, a spot notice with ten running containers: instance A runs ten counters, each
//! `--restart always` with its count on a Docker volume of its own, each incremented a different
//! number of times (counter k has k; every increment fsync'ed before its answer). Then the usual
//! two-minute notice: all ten containers get their graceful stop at once, Docker and containerd
//! stop, the volume is unmounted and detached — well within 30 s of the notice, here under TCG —
//! and a successor B, pristine image, brings all ten back by themselves with every count intact
//! (and each count on its own volume: counts 1..10 cannot be mixed up unseen).
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_8_notice_ten_containers -- --nocapture`

use std::time::{Duration, Instant};

use crate::common::{expect, expect_clean_takeover, never, report, BOOT, STEP};
use spotworld::docker::{counter_container_named, import_counter_image, Counter};
use spotworld::world::{
    parse_human, InstanceSpec, SimInstance, UserData, World, WorldSettings, DOCKER_API_PORT,
};

const CONTAINERS: u16 = 10;
/// Counter k (1..=10) is published on guest port 8080 + k.
const FIRST_PORT: u16 = 8081;
/// The bound for notice to detached, under TCG on this machine.
const DETACH_BOUND: Duration = Duration::from_secs(30);

fn name(k: u16) -> String {
    format!("counter-{k}")
}

fn spec(name: &str, ud: &UserData) -> InstanceSpec {
    let mut s = InstanceSpec::new(name, "us-east-1a").user_data(ud.to_toml());
    s.forward_ports = std::iter::once(DOCKER_API_PORT)
        .chain((0..CONTAINERS).map(|i| FIRST_PORT + i))
        .collect();
    s
}

fn counter(i: &SimInstance, k: u16) -> Counter {
    Counter {
        port: i.host_port(FIRST_PORT + k - 1).unwrap(),
    }
}

#[tokio::test]
async fn a_notice_with_ten_running_containers_detaches_in_time_and_loses_nothing() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-8-ten-containers"))
        .await
        .unwrap();
    let ud = UserData::new("e2e-8");
    let a = world.launch(spec("a", &ud)).await.unwrap();
    a.wait_ready(BOOT).await.unwrap();
    let docker = a.docker().unwrap();
    docker.wait_ping(STEP).await.unwrap();
    import_counter_image(&docker).await.unwrap();
    for k in 1..=CONTAINERS {
        let id = docker
            .create_container(&counter_container_named(
                &name(k),
                &format!("counter-data-{k}"),
                Some(FIRST_PORT + k - 1),
            ))
            .await
            .unwrap();
        docker.start(&id).await.unwrap();
    }
    report("a: ten counters started", t0);
    // Counter k is incremented k times; each answer comes only once the count is on disk.
    for k in 1..=CONTAINERS {
        let c = counter(&a, k);
        assert_eq!(c.wait_value(STEP).await.unwrap(), 0, "{}", name(k));
        for want in 1..=u64::from(k) {
            assert_eq!(c.increment().await.unwrap(), want, "{}", name(k));
        }
    }
    let running = docker.containers(false).await.unwrap();
    assert_eq!(running.len(), usize::from(CONTAINERS), "{running:?}");
    let volume_id = world.volumes().await.unwrap()[0].id.clone();
    report("a: 55 increments acknowledged across ten counters", t0);

    // The notice, two minutes ahead as EC2 gives it.
    let mut c = a.console_from_now();
    let notice_at = Instant::now();
    a.post_spot_notice(Duration::from_secs(120));
    let seen = expect(&mut c, "spot: interruption notice: terminate", STEP).await;
    let stopping = expect(&mut c, "shutdown: stopping 10 containers with a", STEP).await;
    let stopped = expect(&mut c, "shutdown: 10 containers stopped in", STEP).await;
    expect(&mut c, "shutdown: dockerd stopped in", STEP).await;
    expect(&mut c, "shutdown: containerd stopped in", STEP).await;
    expect(&mut c, "volume: unmounted in", STEP).await;
    let detached = expect(&mut c, &format!("volume: {volume_id} detached in"), STEP).await;
    expect(&mut c, "shutdown: done in", STEP).await;
    expect(&mut c, "drained; waiting for EC2", STEP).await;
    let took = a.instant_of(&detached) - notice_at;
    // EC2 shows it too (the fidelity layer's state, as DescribeVolumes answers).
    let v = world.volume(&volume_id).await.unwrap();
    assert_eq!(v.state, "available", "{v:?}");
    assert!(v.attachments.is_empty(), "{v:?}");
    // Graceful: each container ended on its SIGTERM (the counter's entrypoint exits at once),
    // so the stops took a fraction of their timeout; nothing was left to kill.
    let timeout = stopping
        .text
        .split("with a ")
        .nth(1)
        .and_then(parse_human)
        .expect("the stop timeout on the stopping line");
    let stop_took = stopped
        .text
        .split("stopped in ")
        .nth(1)
        .and_then(parse_human)
        .expect("a duration on the stopped line");
    assert!(
        stop_took < timeout / 2.0,
        "stopping the containers took {stop_took} s of their {timeout} s timeout: some were \
         not stopped by their SIGTERM\n{}",
        a.diagnostics()
    );
    never(&a, "shutdown: killing");
    never(&a, "dockerd stopped (killed)");
    never(&a, "stopping container ");
    println!(
        "a: notice seen at +{:.1} s, containers stopped at +{:.1} s ({stop_took:.2} s of a \
         {timeout:.0} s timeout), volume detached at +{:.1} s after the notice (bound {} s)",
        (a.instant_of(&seen) - notice_at).as_secs_f64(),
        (a.instant_of(&stopped) - notice_at).as_secs_f64(),
        took.as_secs_f64(),
        DETACH_BOUND.as_secs()
    );
    assert!(
        took < DETACH_BOUND,
        "notice to detached took {:.1} s, over {} s\n{}",
        took.as_secs_f64(),
        DETACH_BOUND.as_secs(),
        a.diagnostics()
    );
    a.reclaim().await.unwrap();
    report("a: drained, detached, reclaimed", t0);

    // B: nobody deploys anything; Docker brings the ten back by their restart policy.
    let b = world.launch(spec("b", &ud)).await.unwrap();
    expect_clean_takeover(&b, &volume_id, &a.id).await;
    let docker = b.docker().unwrap();
    docker.wait_ping(STEP).await.unwrap();
    for k in 1..=CONTAINERS {
        docker.wait_running(&name(k), STEP).await.unwrap();
        let value = counter(&b, k).wait_value(STEP).await.unwrap();
        assert_eq!(
            value,
            u64::from(k),
            "{} came back with {value}, {k} increments were acknowledged",
            name(k)
        );
    }
    assert_eq!(counter(&b, 10).increment().await.unwrap(), 11);
    let vols = world.volumes().await.unwrap();
    assert_eq!(vols.len(), 1, "{vols:?}");
    assert_eq!(vols[0].attachments[0].instance_id, b.id);
    report("scenario 8", t0);
}
