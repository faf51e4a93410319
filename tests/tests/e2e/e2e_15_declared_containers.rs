//! Scenario 15, declared containers: the service comes from the user data, not from API calls.
//! A puts the counter image into Docker's store on the state volume (as a pull would). B boots
//! with the counter declared in `[[containers]]`: spotinit creates and starts it after `ready`
//! (no pull: the image is on the volume), and it counts. A container started by hand on B is
//! not spotinit's. After a spot notice, C with the same declaration keeps B's container (the
//! same id, its count), and leaves the hand-made one alone. D declares the counter with a new
//! environment value and a second container whose registry is down: the counter is replaced
//! (new id, same count: its named volume stays), the pull is retried on the console, and
//! Docker and the counter are unaffected.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e_15_declared_containers -- --nocapture`

mod common;

use std::time::{Duration, Instant};

use common::{expect, never, report, BOOT, STEP};
use spotworld::docker::{
    counter_container_named, import_counter_image, Counter, Docker, COUNTER_IMAGE,
};
use spotworld::qemu::ConsoleLine;
use spotworld::world::{InstanceSpec, SimInstance, UserData, World, WorldSettings};

const VOLUME: &str = "e2e-15";
/// An address where no registry answers (QEMU's host alias, a port nobody listens on).
const DOWN_IMAGE: &str = "10.0.2.2:9/missing:1";

/// The counter as `[[containers]]`, with `GREETING` set to `greeting`.
fn declared_counter(greeting: &str) -> String {
    format!(
        "[[containers]]\nname = \"counter\"\nimage = \"{}:{}\"\ncommand = [\"/bin/serve\"]\n\
         ports = [\"{}:80\"]\nvolumes = [\"counter-data:/data\"]\n\
         environment = {{ GREETING = \"{greeting}\" }}\nstop_timeout_secs = 10\n",
        COUNTER_IMAGE.0,
        COUNTER_IMAGE.1,
        spotworld::world::SERVICE_PORT
    )
}

fn user_data(declarations: &str) -> String {
    let mut ud = UserData::new(VOLUME);
    ud.extra = declarations.to_owned();
    ud.to_toml()
}

async fn launch(world: &World, name: &str, declarations: &str) -> SimInstance {
    world
        .launch(InstanceSpec::new(name, "us-east-1a").user_data(user_data(declarations)))
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
async fn declared_containers_are_created_kept_replaced_and_never_touched_otherwise() {
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-15-declared"))
        .await
        .unwrap();

    // A: the image into Docker's store on the state volume, then a clean power-off.
    let a = launch(&world, "a", "").await;
    a.wait_ready(BOOT).await.unwrap();
    let docker = a.docker().unwrap();
    docker.wait_ping(STEP).await.unwrap();
    import_counter_image(&docker).await.unwrap();
    let mut c = a.console_from_now();
    a.powerdown().await.unwrap();
    expect(&mut c, "powering off", STEP).await;
    a.wait_poweroff(STEP).await.unwrap();
    report("a: image on the volume", t0);

    // B: declared, created and started after ready, without a pull.
    let b = launch(&world, "b", &declared_counter("hello")).await;
    let mut c = b.console();
    let ready = expect(&mut c, "spotinit: ready in", BOOT).await;
    expect(
        &mut c,
        "containers: 1 declared: counter (spotworld/counter:1)",
        STEP,
    )
    .await;
    expect(&mut c, "containers: counter created and started", STEP).await;
    let all = expect(&mut c, "containers: all 1 declared running", STEP).await;
    assert!(position(&b, &ready) < position(&b, &all));
    never(&b, "containers: pulling");
    let counter = Counter {
        port: b.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 0);
    for want in 1..=3 {
        assert_eq!(counter.increment().await.unwrap(), want);
    }
    let docker = b.docker().unwrap();
    let b_id = counter_id(&docker).await;
    let env = docker.inspect(&b_id).await.unwrap()["Config"]["Env"].clone();
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e == "GREETING=hello"),
        "{env}"
    );
    // By hand, beside the declared one.
    let by_hand = docker
        .create_container(&counter_container_named("by-hand", "by-hand-data", None))
        .await
        .unwrap();
    docker.start(&by_hand).await.unwrap();
    report(
        "b: declared counter running at 3, one by hand beside it",
        t0,
    );

    // A spot notice; C with the same declaration keeps the container and its count.
    let mut c = b.console_from_now();
    b.post_spot_notice(Duration::from_secs(120));
    expect(&mut c, "detached in", STEP).await;
    let successor = launch(&world, "c", &declared_counter("hello")).await;
    let mut c = successor.console();
    let kept = expect(&mut c, "containers: counter (", BOOT).await;
    assert!(
        kept.text.contains(&b_id[..12]) && kept.text.contains("is as declared; kept"),
        "{}",
        kept.text
    );
    expect(&mut c, "containers: all 1 declared running", STEP).await;
    let counter = Counter {
        port: successor.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 3);
    let docker = successor.docker().unwrap();
    assert_eq!(counter_id(&docker).await, b_id);
    let hand = docker
        .containers(true)
        .await
        .unwrap()
        .into_iter()
        .find(|x| x.name == "by-hand")
        .expect("the hand-made container is still there");
    assert_eq!(hand.id, by_hand);
    never(&successor, "by-hand");
    report(
        "c: the same container (same id), count 3, the hand-made one untouched",
        t0,
    );

    // D: the declaration changed, and a second container's registry is down.
    let mut c = successor.console_from_now();
    successor.powerdown().await.unwrap();
    expect(&mut c, "powering off", STEP).await;
    successor.wait_poweroff(STEP).await.unwrap();
    let broken = format!("\n[[containers]]\nname = \"unreachable\"\nimage = \"{DOWN_IMAGE}\"\n");
    let d = launch(&world, "d", &(declared_counter("changed") + &broken)).await;
    let mut c = d.console();
    d.wait_ready(BOOT).await.unwrap();
    expect(
        &mut c,
        "was created from another declaration; replacing it",
        STEP,
    )
    .await;
    expect(&mut c, "containers: counter replaced", STEP).await;
    let retried = expect(&mut c, &format!("containers: pull {DOWN_IMAGE}: "), STEP).await;
    assert!(retried.text.contains("retrying in"), "{}", retried.text);
    let counter = Counter {
        port: d.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 3);
    assert_eq!(counter.increment().await.unwrap(), 4);
    let docker = d.docker().unwrap();
    let d_id = counter_id(&docker).await;
    assert_ne!(
        d_id, b_id,
        "the changed declaration should have replaced the container"
    );
    let env = docker.inspect(&d_id).await.unwrap()["Config"]["Env"].clone();
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e == "GREETING=changed"),
        "{env}"
    );
    never(&d, "BOOT FAILED");
    report(
        "d: replaced with the count kept; the unreachable registry retried",
        t0,
    );
}
