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

use std::future::Future;
use std::time::{Duration, Instant};

use spotworld::docker::{push_counter_image, Counter, COUNTER_VOLUME};
use spotworld::qemu::ConsoleLine;
use spotworld::registry::{PushedImage, Registry};
use spotworld::world::{phase_timings, InstanceSpec, SimInstance, UserData, World, WorldSettings};

const BOOT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(180);
const VOLUME_NAME: &str = "spotinit-demo";

struct Row {
    name: String,
    took: Duration,
    result: std::result::Result<String, String>,
}

struct Demo {
    t0: Instant,
    rows: Vec<Row>,
    verbose: bool,
}

impl Demo {
    fn say(&self, text: &str) {
        println!("[{:>6.1} s] {text}", self.t0.elapsed().as_secs_f64());
    }

    /// Runs one step: prints it, times it, records the outcome. `None` if it failed.
    async fn step<T>(
        &mut self,
        name: &str,
        f: impl Future<Output = Result<(T, String), String>>,
    ) -> Option<T> {
        self.say(&format!("▶ {name}"));
        let start = Instant::now();
        let result = f.await;
        let took = start.elapsed();
        let (value, result) = match result {
            Ok((v, detail)) => {
                self.say(&format!("✔ {name}: {detail} ({:.1} s)", took.as_secs_f64()));
                (Some(v), Ok(detail))
            }
            Err(e) => {
                self.say(&format!(
                    "✘ {name} FAILED after {:.1} s:\n{e}",
                    took.as_secs_f64()
                ));
                (None, Err(e))
            }
        };
        self.rows.push(Row {
            name: name.to_owned(),
            took,
            result,
        });
        value
    }

    /// Prints spotinit's lines about the volume, the spot notice and the drain as they arrive.
    fn narrate(&self, i: &SimInstance) {
        let mut c = i.console();
        let (name, t0, verbose) = (i.name.clone(), self.t0, self.verbose);
        tokio::spawn(async move {
            let interesting = [
                "spotinit: volume:",
                "spotinit: spot:",
                "spotinit: shutting down",
                "spotinit: shutdown:",
                "spotinit: BOOT FAILED",
                "spotinit: ready in",
                "spotinit: drained",
                "spotinit: containers:",
            ];
            while let Ok(l) = c
                .wait_until("any line", |_| true, Duration::from_secs(24 * 3600))
                .await
            {
                if verbose || interesting.iter().any(|m| l.text.contains(m)) {
                    let text = l.text.split("spotinit: ").nth(1).unwrap_or(&l.text);
                    println!(
                        "[{:>6.1} s]     {name} | {text}",
                        t0.elapsed().as_secs_f64()
                    );
                }
            }
        });
    }
}

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// The first console line containing `needle`.
fn find(i: &SimInstance, needle: &str) -> Option<ConsoleLine> {
    i.console()
        .lines()
        .into_iter()
        .find(|l| l.text.contains(needle))
}

async fn wait(i: &SimInstance, needle: &str, deadline: Duration) -> Result<ConsoleLine, String> {
    i.console().wait_for(needle, deadline).await.map_err(e)
}

/// Every instance's user data: the volume, the registry's CA, and the counter declared. The
/// Engine API stays on its unix socket: nothing is deployed through it.
fn user_data(registry: &Registry, counter: &PushedImage) -> Result<String, String> {
    let mut u = UserData::new(VOLUME_NAME);
    u.docker_api = false;
    u.extra = format!(
        "{}\n[[containers]]\nname = \"counter\"\nimage = \"{}\"\nports = [\"{}:80\"]\n\
         volumes = [\"{COUNTER_VOLUME}:/data\"]\nrestart = \"always\"\n",
        registry.registry_cas_toml().map_err(e)?,
        counter.reference,
        spotworld::world::SERVICE_PORT
    );
    Ok(u.to_toml())
}

/// Launches an instance from the pristine image with the demo's user data.
async fn launch(
    world: &World,
    name: &str,
    zone: &str,
    user_data: &str,
) -> Result<(SimInstance, String), String> {
    let i = world
        .launch(InstanceSpec::new(name, zone).user_data(user_data))
        .await
        .map_err(e)?;
    let detail = format!("{} running", i.id);
    Ok((i, detail))
}

/// Waits for the instance's ready line and reports it.
async fn ready(i: &SimInstance) -> Result<ConsoleLine, String> {
    i.wait_ready(BOOT).await.map_err(e)
}

/// Notice → drained and detached; EC2 then takes the instance. Returns the notice instant and
/// the detach line.
async fn interrupt(
    i: &SimInstance,
    volume_id: &str,
) -> Result<((Instant, ConsoleLine), String), String> {
    let mut c = i.console_from_now();
    let notice = Instant::now();
    i.post_spot_notice(Duration::from_secs(120));
    let detached = c
        .wait_for(&format!("volume: {volume_id} detached in"), STEP)
        .await
        .map_err(e)?;
    c.wait_for("shutdown: done in", STEP).await.map_err(e)?;
    let after = (i.instant_of(&detached) - notice).as_secs_f64();
    if after >= 120.0 {
        return Err(format!(
            "the volume was detached {after:.1} s after the notice: past the 2-minute deadline"
        ));
    }
    i.reclaim().await.map_err(e)?;
    Ok((
        (notice, detached),
        format!(
            "drained, {volume_id} detached {after:.1} s after the notice ({:.1} s before the deadline); EC2 took {}",
            120.0 - after,
            i.id
        ),
    ))
}

/// The counter on `i` must come back by itself with `want`; then one increment.
async fn same_count(i: &SimInstance, want: u64) -> Result<(u64, String), String> {
    let counter = Counter {
        port: i.service_port().map_err(e)?,
    };
    let got = counter.wait_value(STEP).await.map_err(e)?;
    if got != want {
        return Err(format!("the counter is {got}, expected {want}"));
    }
    let next = counter.increment().await.map_err(e)?;
    if next != want + 1 {
        return Err(format!("an increment gave {next}, expected {}", want + 1));
    }
    Ok((
        next,
        format!("the container came back by itself with count={got}; incremented to {next}"),
    ))
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

/// What the benchmark needs from the run.
#[derive(Default)]
struct Marks {
    notice_a: Option<(Instant, ConsoleLine)>,
    kill_b: Option<Instant>,
    notice_c: Option<(Instant, ConsoleLine)>,
    /// The fidelity layer's hold on a killed instance's volumes.
    release_delay: Duration,
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

/// The steps; stops at the first failure. Returns 0 if every step passed.
async fn scenario(
    d: &mut Demo,
    world: &World,
    user_data: &str,
    instances: &mut Vec<SimInstance>,
    marks: &mut Marks,
) -> i32 {
    // A: first boot, creates the volume.
    let Some(a) = d
        .step(
            "launch instance A in us-east-1a (pristine image)",
            launch(world, "A", "us-east-1a", user_data),
        )
        .await
    else {
        return 1;
    };
    d.narrate(&a);
    instances.push(a);
    let a = &instances[0];
    let Some(volume_id) = d
        .step(
            "A boots: creates, formats and mounts the state volume",
            async {
                let r = ready(a).await?;
                let created = find(a, "volume: created vol-").ok_or("A did not create a volume")?;
                find(a, "creating ext4").ok_or("A did not format the volume")?;
                let id = created
                    .text
                    .split("volume: created ")
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                Ok((
                    id.clone(),
                    format!("{id} created and formatted; {}", after_spotinit(&r)),
                ))
            },
        )
        .await
    else {
        return 1;
    };
    if d.step(
        "A pulls and starts the declared counter (from the user data, no API call)",
        async {
            let pulled = wait(a, "containers: pulled ", STEP).await?;
            let all = wait(a, "containers: all 1 declared running", STEP).await?;
            let tail = |l: &ConsoleLine, after: &str| {
                l.text.split(after).nth(1).unwrap_or("").trim().to_owned()
            };
            Ok((
                (),
                format!(
                    "pulled {}; running {}",
                    tail(&pulled, "containers: pulled "),
                    tail(&all, "declared running, ")
                ),
            ))
        },
    )
    .await
    .is_none()
    {
        return 1;
    }
    if d.step("increment the counter on A three times", async {
        let counter = Counter {
            port: a.service_port().map_err(e)?,
        };
        counter.wait_value(STEP).await.map_err(e)?;
        let mut v = 0;
        for _ in 0..3 {
            v = counter.increment().await.map_err(e)?;
        }
        if v != 3 {
            return Err(format!("the counter is {v}, expected 3"));
        }
        Ok((
            (),
            "count=3, each increment fsync'ed before the answer".into(),
        ))
    })
    .await
    .is_none()
    {
        return 1;
    }
    let Some(m) = d
        .step(
            "spot interruption notice on A (2 minutes)",
            interrupt(a, &volume_id),
        )
        .await
    else {
        return 1;
    };
    marks.notice_a = Some(m);

    // B: same zone, the container comes back by itself.
    let Some(b) = d
        .step(
            "launch instance B in us-east-1a (pristine image)",
            launch(world, "B", "us-east-1a", user_data),
        )
        .await
    else {
        return 1;
    };
    d.narrate(&b);
    instances.push(b);
    let b = &instances[1];
    if d.step("B boots on the same volume", async {
        let r = ready(b).await?;
        find(b, &format!("volume: found {volume_id}")).ok_or("B did not find the volume")?;
        if find(b, "creating ext4").is_some() {
            return Err("B formatted the volume".into());
        }
        Ok((
            (),
            format!(
                "found {volume_id}, filesystem clean; {}",
                after_spotinit(&r)
            ),
        ))
    })
    .await
    .is_none()
    {
        return 1;
    }
    if d.step("same counter on B", same_count(b, 3))
        .await
        .is_none()
    {
        return 1;
    }

    // Hard kill of B; C waits for the release.
    marks.kill_b = Some(Instant::now());
    if d.step(
        "kill B without warning (SIGKILL, EC2 terminates it)",
        async {
            b.kill_hard().await.map_err(e)?;
            Ok((
                (),
                format!("{} gone; EC2 holds {volume_id} for a while", b.id),
            ))
        },
    )
    .await
    .is_none()
    {
        return 1;
    }
    let Some(c) = d
        .step(
            "launch instance C in us-east-1a (pristine image)",
            launch(world, "C", "us-east-1a", user_data),
        )
        .await
    else {
        return 1;
    };
    d.narrate(&c);
    instances.push(c);
    let c = &instances[2];
    if d.step(
        "C waits for the release, checks the filesystem, boots",
        async {
            let released = wait(c, &format!("volume: {volume_id} released after"), BOOT).await?;
            let checked = wait(c, "volume: filesystem ", STEP).await?;
            let r = ready(c).await?;
            let how = checked
                .text
                .split("volume: filesystem ")
                .nth(1)
                .unwrap_or("")
                .to_owned();
            let rel = released.text.split(" released after ").nth(1).unwrap_or("");
            Ok((
                (),
                format!(
                    "released after {rel}, filesystem {how}; {}",
                    after_spotinit(&r)
                ),
            ))
        },
    )
    .await
    .is_none()
    {
        return 1;
    }
    if d.step("same counter on C", same_count(c, 4))
        .await
        .is_none()
    {
        return 1;
    }

    // C is interrupted; D in another zone.
    let Some(m) = d
        .step("spot interruption notice on C", interrupt(c, &volume_id))
        .await
    else {
        return 1;
    };
    marks.notice_c = Some(m);
    let Some(dd) = d
        .step(
            "launch instance D in us-east-1b (another zone)",
            launch(world, "D", "us-east-1b", user_data),
        )
        .await
    else {
        return 1;
    };
    d.narrate(&dd);
    instances.push(dd);
    let dd = &instances[3];
    if d.step(
        "D moves the volume into us-east-1b through a snapshot",
        async {
            let moved = wait(dd, &format!("volume: {volume_id} now continues as "), BOOT).await?;
            let r = ready(dd).await?;
            let new = moved
                .text
                .split(" now continues as ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("?")
                .to_owned();
            let v = world.volume(&new).await.map_err(e)?;
            if v.zone != "us-east-1b" {
                return Err(format!("{new} is in {}, not us-east-1b", v.zone));
            }
            Ok((
                (),
                format!(
                    "{volume_id} (us-east-1a) → snapshot → {new} (us-east-1b); {}",
                    after_spotinit(&r)
                ),
            ))
        },
    )
    .await
    .is_none()
    {
        return 1;
    }
    if d.step("same counter on D", same_count(dd, 5))
        .await
        .is_none()
    {
        return 1;
    }
    0
}

/// "ready 41.6 s after power-on" from spotinit's ready line.
fn after_spotinit(ready: &ConsoleLine) -> String {
    let since = ready
        .text
        .split("ready in ")
        .nth(1)
        .and_then(|s| s.split(" since").next())
        .unwrap_or("?");
    format!("ready {since} after power-on")
}

/// spotinit's resident memory once Docker is up, from the `ready` line ("its memory N kB").
fn spotinit_memory(ready: &ConsoleLine) -> String {
    ready
        .text
        .split("its memory ")
        .nth(1)
        .map(|s| s.trim_end_matches(')').to_owned())
        .unwrap_or_else(|| "?".into())
}

/// The summary table (and the benchmark); the exit status.
fn finish(
    d: &Demo,
    world: Option<&World>,
    instances: &[SimInstance],
    marks: &Marks,
    bench: bool,
) -> i32 {
    let failed = d.rows.iter().any(|r| r.result.is_err()) || d.rows.is_empty();
    println!("\nSummary");
    let width = d
        .rows
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(10);
    println!("  {:<width$}  {:>8}  result", "step", "took");
    println!(
        "  {}  {}  {}",
        "-".repeat(width),
        "-".repeat(8),
        "-".repeat(40)
    );
    for r in &d.rows {
        let (mark, text) = match &r.result {
            Ok(detail) => ("ok  ", detail.as_str()),
            Err(e) => ("FAIL", e.lines().next().unwrap_or("")),
        };
        println!(
            "  {:<width$}  {:>6.1} s  {mark} {text}",
            r.name,
            r.took.as_secs_f64()
        );
    }
    println!(
        "  {:<width$}  {:>6.1} s  {}",
        "total",
        d.t0.elapsed().as_secs_f64(),
        if failed {
            "FAILED"
        } else {
            "all checks passed"
        }
    );
    if let Some(w) = world {
        println!(
            "  console logs: {}/<instance>/console.log",
            w.dir().display()
        );
    }
    if bench {
        benchmark(instances, marks);
    }
    i32::from(failed)
}

fn benchmark(instances: &[SimInstance], marks: &Marks) {
    println!("\nBenchmark (this run; TCG on this machine)");
    println!("  boot to `spotinit: ready`:");
    for i in instances {
        match find(i, "spotinit: ready in") {
            Some(r) => {
                println!(
                "    {}  QEMU start → ready {:>6.1} s   (spotinit: {}; its resident memory {}){}",
                i.name,
                r.at.as_secs_f64(),
                after_spotinit(&r),
                spotinit_memory(&r),
                if i.name == "A" { "  (first boot: volume created and formatted)" } else { "" }
            )
            }
            None => println!("    {}  no ready line", i.name),
        }
    }
    println!("  spot notice → volume detached:");
    for (name, m, i) in [
        ("A", &marks.notice_a, instances.first()),
        ("C", &marks.notice_c, instances.get(2)),
    ] {
        if let (Some((at, detached)), Some(i)) = (m, i) {
            let seen = find(i, "spotinit: spot: interruption notice")
                .map(|l| format!("{:.1} s", (i.instant_of(&l) - *at).as_secs_f64()))
                .unwrap_or("?".into());
            let stopped = find(i, "shutdown: 1 container stopped in")
                .map(|l| format!("{:.1} s", (i.instant_of(&l) - *at).as_secs_f64()))
                .unwrap_or("?".into());
            println!(
                "    {name}  {:>6.1} s   (notice seen after {seen}, containers stopped after {stopped})",
                (i.instant_of(detached) - *at).as_secs_f64()
            );
        }
    }
    if let (Some(killed), Some(c)) = (marks.kill_b, instances.get(2)) {
        let released = find(c, "released after").map(|l| c.instant_of(&l) - killed);
        let ready = find(c, "spotinit: ready in").map(|l| c.instant_of(&l) - killed);
        println!(
            "  kill of B → C ready: {}   (of which until C saw the volume released: {}; EC2's \
             simulated release delay {:.0} s, spotinit looks every 5 s)",
            ready
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or("?".into()),
            released
                .map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or("?".into()),
            marks.release_delay.as_secs_f64()
        );
    }
    // spotinit's own phase timings, one column per instance.
    let timings: Vec<(String, Vec<(String, f64)>)> = instances
        .iter()
        .map(|i| (i.name.clone(), phase_timings(&i.console().lines())))
        .collect();
    let mut phases: Vec<String> = Vec::new();
    for (_, t) in &timings {
        for (p, _) in t {
            if !phases.contains(p) {
                phases.push(p.clone());
            }
        }
    }
    println!("  spotinit's phases (`phase X: done in Y`), seconds:");
    print!("    {:<24}", "phase");
    for (n, _) in &timings {
        print!("{n:>8}");
    }
    println!();
    for p in &phases {
        print!("    {p:<24}");
        for (_, t) in &timings {
            match t.iter().find(|(q, _)| q == p) {
                Some((_, s)) => print!("{s:>8.2}"),
                None => print!("{:>8}", "-"),
            }
        }
        println!();
    }
    // The drain, from the shutdown lines of the interrupted instances.
    for i in instances {
        let steps: Vec<String> = i
            .console()
            .lines()
            .iter()
            .filter_map(|l| l.text.split("spotinit: shutdown: ").nth(1))
            .map(str::to_owned)
            .collect();
        if !steps.is_empty() {
            println!("  {} drain: {}", i.name, steps.join("; "));
        }
    }
}
