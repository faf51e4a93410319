//! The spot-persistence demo, narrated: state survives the loss of an instance.
//!
//! 1. Instance A boots from the pristine image in us-east-1a: no volume exists, spotinit creates
//!    and formats it, mounts it under Docker.
//! 2. The user data declares a counter service (`[[containers]]`, its count on a Docker volume):
//!    spotinit on A pulls its image from a registry (Debian's docker-registry on the host, TLS
//!    with a CA given in the user data), creates and starts it; it is incremented. No API call
//!    and no SSH: every instance gets the same user data.
//! 3. A spot interruption notice on A: it drains and detaches the volume; EC2 takes A.
//! 4. Instance B, same zone, pristine image: the container comes back by itself with the same
//!    count (spotinit finds it as declared and keeps it; no pull); incremented.
//! 5. B is killed without warning. Instance C waits for EC2 to release the volume, checks the
//!    filesystem, and has the same count; incremented.
//! 6. A notice on C; its successor D boots in us-east-1b: the volume follows through a
//!    snapshot; same count.
//!
//! Each step is printed with its duration, spotinit's own console lines about the volume and the
//! drain as they come, and a summary table at the end; the exit status is non-zero if any check
//! failed. `--bench` adds the benchmark: boot to ready, notice to detached, kill to the
//! successor's ready (the release delay apart), spotinit's phase timings. `--verbose` prints every
//! console line.
//!
//! Needs what the end-to-end tests need (the built image, QEMU, moto, busybox-static); run with
//! `cargo run --release -p spotworld --bin demo [-- --bench]` or `tests/demo.sh`.
//!
//! One file per part: the narrator (`narrator`), what the console says (`console`), the pieces
//! the steps share (`steps`), the scenario (`scenario`), the summary (`summary`) and the
//! benchmark (`bench`).

mod bench;
mod console;
mod narrator;
mod scenario;
mod steps;
mod summary;

use std::time::{Duration, Instant};

use spotworld::docker::push_counter_image;
use spotworld::registry::Registry;
use spotworld::world::{SimInstance, World, WorldSettings};

use bench::Marks;
use narrator::Demo;
use scenario::scenario;
use steps::user_data;
use summary::finish;

const BOOT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(180);
const VOLUME_NAME: &str = "spotinit-demo";

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    let verbose = args.iter().any(|a| a == "--verbose");
    if let Some(other) = args.iter().find(|a| *a != "--bench" && *a != "--verbose") {
        eprintln!("usage: demo [--bench] [--verbose] (unknown argument {other:?})");
        std::process::exit(2);
    }
    let mut d = Demo {
        t0: Instant::now(),
        rows: Vec::new(),
        verbose,
    };
    let code = run(&mut d, bench).await;
    std::process::exit(code);
}

async fn run(d: &mut Demo, bench: bool) -> i32 {
    println!("spotinit spot-persistence demo: state survives the loss of an instance");
    let Some(world) = d
        .step("start the world (moto + EC2 fidelity layer + EBS as files)", async {
            let w = World::start(WorldSettings::new("demo")).await.map_err(e)?;
            let detail = format!(
                "{}; EC2 releases a killed instance's volume after {:?} (real EC2: minutes); files in {}",
                w.image().version_line(),
                w.fidelity().settings().release_after_termination,
                w.dir().display()
            );
            Ok((w, detail))
        })
        .await
    else {
        return finish(d, None, &[], &Marks::default(), bench);
    };
    let mut instances: Vec<SimInstance> = Vec::new();
    let mut marks = Marks {
        release_delay: world.fidelity().settings().release_after_termination,
        ..Marks::default()
    };
    let Some((registry, counter)) = d
        .step(
            "start a registry on the host and push the counter image",
            async {
                let r = Registry::start(&world.dir().join("registry"))
                    .await
                    .map_err(e)?;
                let image = push_counter_image(&r, "1").await.map_err(e)?;
                let detail = format!(
                    "Debian's docker-registry at {} (TLS), {} pushed",
                    r.guest_address(),
                    image.reference
                );
                Ok(((r, image), detail))
            },
        )
        .await
    else {
        return finish(d, Some(&world), &[], &marks, bench);
    };
    let user_data = match user_data(&registry, &counter) {
        Ok(u) => u,
        Err(why) => {
            eprintln!("demo: the user data: {why}");
            return 1;
        }
    };
    let code = scenario(d, &world, &user_data, &mut instances, &mut marks).await;
    let code = code.max(finish(d, Some(&world), &instances, &marks, bench));
    drop(instances);
    code
}
