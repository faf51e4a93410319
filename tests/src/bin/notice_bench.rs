//! Benchmark: spot interruption notice → state volume detached, against the number of running
//! containers (1, 10 and 30 by default; other counts as arguments).
//!
//! For each count N, one instance boots from the image on a volume of its own, runs N counter
//! containers (`--restart always`, each with its own Docker volume), and gets EC2's two-minute
//! notice. The figures come from the instance's console, timed on the host: when spotinit saw
//! the notice, when the containers had stopped, when the volume was detached (spotinit's line,
//! written once EC2 reports the volume `available`). EC2's side is checked too: the volume must
//! be `available` with no attachment at the end, or the run fails.
//!
//! Needs what the end-to-end tests need (the built image, QEMU, moto, busybox-static); run with
//! `cargo run --release -p spotworld --bin notice_bench [-- 1 10 30]`.

use std::time::{Duration, Instant};

use spotworld::docker::{counter_container_named, import_counter_image};
use spotworld::qemu::ConsoleLine;
use spotworld::world::{parse_human, InstanceSpec, SimInstance, UserData, World, WorldSettings};

const BOOT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(300);
/// 30 containers' shims and dockerd's bookkeeping fit comfortably in this.
const MEMORY_MIB: u32 = 3072;

/// One run's figures, in seconds after the notice was posted.
struct Figures {
    containers: usize,
    seen: f64,
    stopped: f64,
    detached: f64,
    stop_timeout: f64,
}

type Outcome<T> = std::result::Result<T, String>;

async fn expect(
    i: &SimInstance,
    c: &mut spotworld::qemu::ConsoleCursor,
    needle: &str,
    deadline: Duration,
) -> Outcome<ConsoleLine> {
    c.wait_for(needle, deadline)
        .await
        .map_err(|e| format!("{}: {e}\n{}", i.name, i.diagnostics()))
}

async fn one_run(world: &World, n: usize) -> Outcome<Figures> {
    let ud = UserData::new(&format!("bench-notice-{n}"));
    let mut spec = InstanceSpec::new(&format!("n{n}"), "us-east-1a").user_data(ud.to_toml());
    spec.memory_mib = MEMORY_MIB;
    let i = world.launch(spec).await.map_err(|e| e.to_string())?;
    i.wait_ready(BOOT).await.map_err(|e| e.to_string())?;
    let docker = i.docker().map_err(|e| e.to_string())?;
    docker.wait_ping(STEP).await.map_err(|e| e.to_string())?;
    import_counter_image(&docker)
        .await
        .map_err(|e| e.to_string())?;
    for k in 1..=n {
        let spec = counter_container_named(&format!("counter-{k}"), &format!("count-{k}"), None);
        let id = docker
            .create_container(&spec)
            .await
            .map_err(|e| e.to_string())?;
        docker.start(&id).await.map_err(|e| e.to_string())?;
    }
    let running = docker.containers(false).await.map_err(|e| e.to_string())?;
    if running.len() != n {
        return Err(format!("{n} containers started, {} running", running.len()));
    }
    let volume_id = world
        .volumes()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|v| v.attachments.iter().any(|a| a.instance_id == i.id))
        .map(|v| v.id)
        .ok_or("no volume attached to the instance")?;

    let mut c = i.console_from_now();
    let notice_at = Instant::now();
    i.post_spot_notice(Duration::from_secs(120));
    let seen = expect(&i, &mut c, "spot: interruption notice: terminate", STEP).await?;
    let stopping = expect(
        &i,
        &mut c,
        &format!("shutdown: stopping {n} container"),
        STEP,
    )
    .await?;
    let plural = if n == 1 { "" } else { "s" };
    let stopped = expect(
        &i,
        &mut c,
        &format!("{n} container{plural} stopped in"),
        STEP,
    )
    .await?;
    let detached = expect(
        &i,
        &mut c,
        &format!("volume: {volume_id} detached in"),
        STEP,
    )
    .await?;
    expect(&i, &mut c, "drained; waiting for EC2", STEP).await?;
    let v = world.volume(&volume_id).await.map_err(|e| e.to_string())?;
    if v.state != "available" || !v.attachments.is_empty() {
        return Err(format!("EC2 does not show {volume_id} detached: {v:?}"));
    }
    let after = |l: &ConsoleLine| (i.instant_of(l) - notice_at).as_secs_f64();
    let figures = Figures {
        containers: n,
        seen: after(&seen),
        stopped: after(&stopped),
        detached: after(&detached),
        stop_timeout: stopping
            .text
            .split("with a ")
            .nth(1)
            .and_then(parse_human)
            .unwrap_or(f64::NAN),
    };
    i.reclaim().await.map_err(|e| e.to_string())?;
    Ok(figures)
}

#[tokio::main]
async fn main() {
    let mut counts = Vec::new();
    for a in std::env::args().skip(1) {
        match a.parse::<usize>() {
            Ok(n) if n > 0 => counts.push(n),
            _ => {
                eprintln!(
                    "usage: notice_bench [N...] (container counts, default 1 10 30; got {a:?})"
                );
                std::process::exit(2);
            }
        }
    }
    if counts.is_empty() {
        counts = vec![1, 10, 30];
    }
    let t0 = Instant::now();
    let world = match World::start(WorldSettings::new("bench-notice")).await {
        Ok(w) => w,
        Err(e) => {
            eprintln!("notice-bench: could not start the world: {e}");
            std::process::exit(1);
        }
    };
    let mut results = Vec::new();
    for &n in &counts {
        println!(
            "[{:>6.1} s] {n} container(s): boot, start, notice",
            t0.elapsed().as_secs_f64()
        );
        let r = one_run(&world, n).await;
        if let Err(e) = &r {
            eprintln!("notice-bench: {n} container(s): {e}");
        }
        results.push((n, r));
    }

    println!("\nBenchmark: spot notice → volume detached (TCG on this machine; seconds after the notice)");
    println!("  containers   notice seen   containers stopped   volume detached   (stop timeout)");
    let mut failed = false;
    for (n, r) in &results {
        match r {
            Ok(f) => println!(
                "  {:>10}   {:>9.1} s   {:>16.1} s   {:>13.1} s   ({:.0} s)",
                f.containers, f.seen, f.stopped, f.detached, f.stop_timeout
            ),
            Err(_) => {
                failed = true;
                println!("  {n:>10}   failed (see above)");
            }
        }
    }
    println!(
        "  total {:.0} s; console logs: {}/<instance>/console.log",
        t0.elapsed().as_secs_f64(),
        world.dir().display()
    );
    std::process::exit(i32::from(failed));
}
