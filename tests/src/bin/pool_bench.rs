//! Benchmark: an Auto Scaling group of N instances launched at once on a pool of N volumes
//! (`volume.pool`), for N = 1, 3 and 5 by default (`--sizes 1,3,5` for others).
//!
//! For each N: a fresh pool of N blank volumes in one zone (slots 1..N, `pool_max` N, so an
//! instance that finds none free fails instead of creating one), N instances launched at once
//! with the same user data, and the time from the launch to each instance's `ready` and to the
//! last one's. Then every instance powers off (a drain each) before the next size. Every instance
//! must reach ready on a volume of its own, as its took-slot line, EC2's attachments and the
//! fidelity layer's attachment history all say, or the benchmark fails.
//!
//! The times include each instance formatting its blank volume and, with N > 1, the races for
//! one free volume (a loser tries the next), with N VMs sharing the machine's cores under TCG.
//!
//! Needs what the end-to-end tests need (the built image, QEMU, moto); run with
//! `cargo run --release -p spotworld --bin pool_bench [-- --sizes 1,3,5]`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use spotworld::world::{
    one_volume_each, InstanceSpec, LostRace, SimInstance, TookSlot, UserData, World, WorldSettings,
};

/// Five VMs booting at once on two cores take several times one boot.
const BOOT: Duration = Duration::from_secs(900);
const STEP: Duration = Duration::from_secs(180);
const ZONE: &str = "us-east-1a";

type Outcome<T> = std::result::Result<T, String>;

/// One instance's figures.
struct Ready {
    name: String,
    /// From the launch to its `ready` line, on the host's clock.
    secs: f64,
    slot: u32,
    races_lost: usize,
}

/// One size's instances, in launch order.
struct Run {
    size: u32,
    instances: Vec<Ready>,
}

impl Run {
    fn mean(&self) -> f64 {
        self.instances.iter().map(|r| r.secs).sum::<f64>() / self.instances.len() as f64
    }
    /// Until all are ready.
    fn max(&self) -> f64 {
        self.instances
            .iter()
            .map(|r| r.secs)
            .fold(f64::NAN, f64::max)
    }
    fn races_lost(&self) -> usize {
        self.instances.iter().map(|r| r.races_lost).sum()
    }
}

async fn one_size(world: &World, n: u32) -> Outcome<Run> {
    let pool = format!("bench-{n}");
    let name = format!("pool-bench-{n}");
    let mut made = Vec::new();
    for slot in 1..=n {
        made.push(
            world
                .create_pool_volume(ZONE, &name, &pool, slot)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let mut ud = UserData::new(&name);
    ud.pool = Some(pool.clone());
    ud.pool_max = n;
    ud.docker_api = false;
    let specs = (1..=n)
        .map(|k| InstanceSpec::new(&format!("p{n}-{k}"), ZONE).user_data(ud.to_toml()))
        .collect();
    let launched_at = Instant::now();
    // On an error the instances are dropped, which kills them.
    let instances = world.launch_all(specs).await.map_err(|e| e.to_string())?;
    let run = measure(world, &pool, &made, &instances, launched_at).await?;
    for i in &instances {
        i.powerdown()
            .await
            .map_err(|e| format!("{}: {e}", i.name))?;
    }
    for i in &instances {
        i.wait_poweroff(STEP)
            .await
            .map_err(|e| format!("{}: power-off: {e}", i.name))?;
    }
    Ok(run)
}

/// Waits for every instance's `ready`, then checks that each took its own volume of the pool.
async fn measure(
    world: &World,
    pool: &str,
    made: &[String],
    instances: &[SimInstance],
    launched_at: Instant,
) -> Outcome<Run> {
    let mut figures = Vec::new();
    let mut took = Vec::new();
    // One after another: each line has the time it arrived, whenever it is looked at.
    for i in instances {
        let ready = i.wait_ready(BOOT).await.map_err(|e| e.to_string())?;
        let lines = i.console().lines();
        let t = lines
            .iter()
            .find_map(|l| TookSlot::parse(pool, &l.text))
            .ok_or_else(|| {
                format!(
                    "{}: ready without a took-slot line\n{}",
                    i.name,
                    i.diagnostics()
                )
            })?;
        figures.push(Ready {
            name: i.name.clone(),
            secs: (i.instant_of(&ready) - launched_at).as_secs_f64(),
            slot: t.slot,
            races_lost: lines
                .iter()
                .filter(|l| LostRace::parse(pool, &l.text).is_some())
                .count(),
        });
        took.push(t.volume_id);
    }
    let distinct: BTreeSet<&String> = took.iter().collect();
    if distinct.len() != took.len() {
        return Err(format!("two instances took the same volume: {took:?}"));
    }
    if let Some(v) = took.iter().find(|v| !made.contains(v)) {
        return Err(format!(
            "{v} is not one of the pool's volumes {made:?} (pool_max should have stopped a creation)"
        ));
    }
    let volumes = world.pool_volumes(pool).await.map_err(|e| e.to_string())?;
    if volumes.len() != made.len() {
        return Err(format!(
            "the pool holds {} volumes, {} were made: {volumes:#?}",
            volumes.len(),
            made.len()
        ));
    }
    let ids: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
    let held = one_volume_each(&volumes, &ids)?;
    if held != took {
        return Err(format!(
            "EC2's attachments {held:?} are not what the consoles say {took:?}"
        ));
    }
    // Not even for a moment: an attachment EC2 granted while another instance held the volume.
    let history: Vec<_> = world
        .fidelity()
        .attachment_history()
        .into_iter()
        .filter(|a| made.contains(&a.volume))
        .collect();
    let now = Instant::now();
    for (k, a) in history.iter().enumerate() {
        for b in &history[k + 1..] {
            if a.volume == b.volume && a.instance != b.instance && a.overlaps(b, now) {
                return Err(format!(
                    "{} was attached to two instances at once: {a:?} and {b:?}",
                    a.volume
                ));
            }
        }
    }
    Ok(Run {
        size: made.len() as u32,
        instances: figures,
    })
}

fn parse_sizes(args: &[String]) -> Outcome<Vec<u32>> {
    const DEFAULT: [u32; 3] = [1, 3, 5];
    match args {
        [] => Ok(DEFAULT.to_vec()),
        [flag, list] if flag == "--sizes" => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("--sizes wants positive counts, not {n:?}"))
            })
            .collect(),
        _ => Err(format!("usage: pool_bench [--sizes 1,3,5] (got {args:?})")),
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes = match parse_sizes(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pool_bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&sizes).await {
        eprintln!("pool_bench: FAILED: {e}");
        std::process::exit(1);
    }
}

async fn run(sizes: &[u32]) -> Outcome<()> {
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("pool-bench"))
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "pool_bench: sizes {sizes:?}; {}",
        world.image().version_line()
    );
    let mut runs = Vec::new();
    for &n in sizes {
        println!(
            "[{:>6.1} s] {n} instance(s) at once on a pool of {n}",
            t0.elapsed().as_secs_f64()
        );
        let r = one_size(&world, n)
            .await
            .map_err(|e| format!("{n} instance(s): {e}"))?;
        for i in &r.instances {
            println!(
                "  {}: slot {}, ready {:.1} s after the launch ({} race(s) lost)",
                i.name, i.slot, i.secs, i.races_lost
            );
        }
        runs.push(r);
    }
    println!("\nlaunch → ready, seconds on the host's clock (TCG; N VMs share the cores):");
    println!("| instances | mean | all ready (max) | races lost |");
    println!("| ---: | ---: | ---: | ---: |");
    for r in &runs {
        println!(
            "| {} | {:.1} | {:.1} | {} |",
            r.size,
            r.mean(),
            r.max(),
            r.races_lost()
        );
    }
    println!(
        "total {:.0} s; console logs: {}/<instance>/console.log",
        t0.elapsed().as_secs_f64(),
        world.dir().display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_sizes(&[]).unwrap(), vec![1, 3, 5]);
        assert_eq!(
            parse_sizes(&args(&["--sizes", "2, 4"])).unwrap(),
            vec![2, 4]
        );
        assert!(parse_sizes(&args(&["--sizes", "1,0"])).is_err());
        assert!(parse_sizes(&args(&["--sizes"])).is_err());
        assert!(parse_sizes(&args(&["3"])).is_err());
    }

    #[test]
    fn mean_and_max() {
        let ready = |secs| Ready {
            name: String::new(),
            secs,
            slot: 1,
            races_lost: 1,
        };
        let r = Run {
            size: 3,
            instances: vec![ready(10.0), ready(30.0), ready(20.0)],
        };
        assert_eq!((r.mean(), r.max(), r.races_lost()), (20.0, 30.0, 3));
    }
}
