//! Scenario 15, declared containers: the service comes from the user data, not from API calls,
//! and its image from a real registry (Debian's docker-registry on the host, TLS with the test
//! CA given in `docker.registry_cas`). A boots with the counter declared in `[[containers]]`:
//! spotinit pulls it (the registry serves its layer once), creates and starts it after
//! `ready`, and it counts. A container started by hand on A is not spotinit's. After a spot
//! notice, B with the same declaration keeps A's container (the same id, its count) without a
//! pull (the image is on the state volume), and leaves the hand-made one alone. The registry
//! goes down; C declares the counter with a new environment value and a second container whose
//! image is not on the volume yet: the counter is replaced (new id, same count: its named
//! volume stays), the second pull is retried on the console while Docker and the counter run,
//! and once the registry is back the second container runs too.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_15_declared_containers -- --nocapture`

use std::time::{Duration, Instant};

use crate::common::{expect, never, report, BOOT, STEP};
use spotworld::docker::{counter_container_named, push_counter_image, Counter, Docker};
use spotworld::qemu::ConsoleLine;
use spotworld::registry::{PushedImage, Registry};
use spotworld::world::{InstanceSpec, SimInstance, UserData, World, WorldSettings};

const VOLUME: &str = "e2e-15";
/// The counter as `[[containers]]` from `image`, with `GREETING` set to `greeting`.
fn declared_counter(image: &PushedImage, greeting: &str) -> String {
    format!(
        "[[containers]]\nname = \"counter\"\nimage = \"{}\"\n\
         ports = [\"{}:80\"]\nvolumes = [\"counter-data:/data\"]\n\
         environment = {{ GREETING = \"{greeting}\" }}\nstop_timeout_secs = 10\n",
        image.reference,
        spotworld::world::SERVICE_PORT
    )
}

async fn launch(world: &World, registry: &Registry, name: &str, declarations: &str) -> SimInstance {
    let mut ud = UserData::new(VOLUME);
    ud.extra = registry.registry_cas_toml().unwrap() + declarations;
    world
        .launch(InstanceSpec::new(name, "us-east-1a").user_data(ud.to_toml()))
        .await
        .unwrap()
}

async fn counter_id(docker: &Docker) -> String {
    let all = docker.containers(true).await.unwrap();
    all.iter()
        .find(|c| c.name == "counter")
        .unwrap_or_else(|| panic!("no counter container: {all:?}"))
        .id
        .clone()
}

fn position(i: &SimInstance, l: &ConsoleLine) -> usize {
    i.console()
        .lines()
        .iter()
        .position(|x| x.text == l.text)
        .unwrap()
}

#[tokio::test]
async fn declared_containers_are_pulled_created_kept_replaced_and_never_touched_otherwise() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-15-declared"))
        .await
        .unwrap();
    let mut registry = Registry::start(&world.dir().join("registry"))
        .await
        .unwrap();
    let v1 = push_counter_image(&registry, "1").await.unwrap();
    let v2 = push_counter_image(&registry, "2").await.unwrap();
    report("registry: the counter pushed as :1 and :2", t0);

    // A: declared, pulled from the registry, created and started after ready.
    let a = launch(&world, &registry, "a", &declared_counter(&v1, "hello")).await;
    let mut c = a.console();
    let ready = expect(&mut c, "spotinit: ready in", BOOT).await;
    expect(
        &mut c,
        &format!("containers: 1 declared: counter ({})", v1.reference),
        STEP,
    )
    .await;
    expect(
        &mut c,
        &format!("containers: pulling {}", v1.reference),
        STEP,
    )
    .await;
    expect(
        &mut c,
        &format!("containers: pulled {} in", v1.reference),
        STEP,
    )
    .await;
    expect(&mut c, "containers: counter created and started", STEP).await;
    let all = expect(&mut c, "containers: all 1 declared running", STEP).await;
    assert!(position(&a, &ready) < position(&a, &all));
    assert_eq!(
        registry.layer_pulls(&v1).unwrap(),
        1,
        "one real pull of the layer"
    );
    let counter = Counter {
        port: a.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 0);
    for want in 1..=3 {
        assert_eq!(counter.increment().await.unwrap(), want);
    }
    let docker = a.docker().unwrap();
    let a_id = counter_id(&docker).await;
    let env = docker.inspect(&a_id).await.unwrap()["Config"]["Env"].clone();
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e == "GREETING=hello"),
        "{env}"
    );
    // By hand, beside the declared one.
    let mut spec = counter_container_named("by-hand", "by-hand-data", None);
    spec.image = v1.reference.clone();
    let by_hand = docker.create_container(&spec).await.unwrap();
    docker.start(&by_hand).await.unwrap();
    report(
        "a: declared counter pulled and running at 3, one by hand beside it",
        t0,
    );

    // A spot notice; B with the same declaration keeps the container and its count, no pull.
    let mut c = a.console_from_now();
    a.post_spot_notice(Duration::from_secs(120));
    expect(&mut c, "detached in", STEP).await;
    let b = launch(&world, &registry, "b", &declared_counter(&v1, "hello")).await;
    let mut c = b.console();
    let kept = expect(&mut c, "containers: counter (", BOOT).await;
    assert!(
        kept.text.contains(&a_id[..12]) && kept.text.contains("is as declared; kept"),
        "{}",
        kept.text
    );
    expect(&mut c, "containers: all 1 declared running", STEP).await;
    let counter = Counter {
        port: b.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 3);
    let docker = b.docker().unwrap();
    assert_eq!(counter_id(&docker).await, a_id);
    let hand = docker
        .containers(true)
        .await
        .unwrap()
        .into_iter()
        .find(|x| x.name == "by-hand")
        .expect("the hand-made container is still there");
    assert_eq!(hand.id, by_hand);
    never(&b, "by-hand");
    never(&b, "containers: pulling");
    assert_eq!(registry.layer_pulls(&v1).unwrap(), 1, "no pull on B");
    report(
        "b: the same container (same id), count 3, no pull, the hand-made one untouched",
        t0,
    );

    // C: the declaration changed, and a second container's image is not on the volume while
    // the registry is down.
    let mut c = b.console_from_now();
    b.powerdown().await.unwrap();
    expect(&mut c, "powering off", STEP).await;
    b.wait_poweroff(STEP).await.unwrap();
    registry.stop().await;
    let late = format!(
        "\n[[containers]]\nname = \"late\"\nimage = \"{}\"\nvolumes = [\"late-data:/data\"]\n",
        v2.reference
    );
    let declared = declared_counter(&v1, "changed") + &late;
    let c_instance = launch(&world, &registry, "c", &declared).await;
    let mut c = c_instance.console();
    c_instance.wait_ready(BOOT).await.unwrap();
    expect(
        &mut c,
        "was created from another declaration; replacing it",
        STEP,
    )
    .await;
    expect(&mut c, "containers: counter replaced", STEP).await;
    let mut retries = c_instance.console();
    let retried = expect(
        &mut retries,
        &format!("containers: pull {}: ", v2.reference),
        STEP,
    )
    .await;
    assert!(retried.text.contains("retrying in"), "{}", retried.text);
    let counter = Counter {
        port: c_instance.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 3);
    assert_eq!(counter.increment().await.unwrap(), 4);
    let docker = c_instance.docker().unwrap();
    let c_id = counter_id(&docker).await;
    assert_ne!(
        c_id, a_id,
        "the changed declaration should have replaced the container"
    );
    let env = docker.inspect(&c_id).await.unwrap()["Config"]["Env"].clone();
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e == "GREETING=changed"),
        "{env}"
    );
    report(
        "c: replaced with the count kept; the pull retried while the registry is down",
        t0,
    );

    // The registry is back: the retried pull succeeds and the second container runs.
    registry.resume().await.unwrap();
    // From the start: the retried pull may succeed before a cursor taken now would begin.
    let mut c = c_instance.console();
    expect(
        &mut c,
        &format!("containers: pulled {} in", v2.reference),
        STEP,
    )
    .await;
    expect(&mut c, "containers: late created and started", STEP).await;
    expect(&mut c, "containers: all 2 declared running", STEP).await;
    assert_eq!(counter.value().await.unwrap(), 4);
    never(&c_instance, "BOOT FAILED");
    report("c: the registry back, the second container running", t0);
}
