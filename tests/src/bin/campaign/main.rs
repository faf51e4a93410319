//! Benchmark of the promise "the state survives": a campaign of instance losses against the
//! world in a box, with EC2's timings (attach 3 s, detach 2 s, release 20 s after a
//! termination, snapshot 10 s, volume creation 2 s), and a table of what was lost.
//!
//! A counter service (it fsyncs before it answers) holds the state. A writer task increments it a
//! few times a second against whichever instance serves it and keeps the highest value
//! acknowledged; every loss is measured against that. One world per kind of run; one lineage of
//! state per world (a Name tag), each run's successor the next run's holder:
//!
//! - **hard kill** (`--kills`, 20): QEMU SIGKILLed, then EC2 terminates the instance and holds its
//!   volume 20 s. The moments cycle: before attach (a booting instance's "volume: found"), while
//!   attaching (0.2-2.5 s after "volume: attaching", inside EC2's attach latency), during the
//!   first mkfs (a new lineage), during fsck ("checking it"), under writes (2-10 s after the
//!   counter serves), in the middle of a drain (0-3 s after "shutting down"). For the boot
//!   moments the holder first lets go through the power button and a new instance is the victim.
//!   The successor boots in the same zone. Every run first waits for a few fresh acknowledged
//!   writes, so each failure has something to lose.
//! - **spot notice** (`--graceful`, 10): a two-minute notice under writes; the drain; the successor.
//! - **race** (`--races`, 10): the holder drains, two instances boot at once in its zone while
//!   EC2 throttles 20 % and fails 2 % of the volume calls: exactly one may reach ready, the other
//!   must fail closed (BOOT FAILED, Docker never started) and power off.
//! - **zone move** (`--moves`, 3): the holder drains and the successor boots in another zone (a
//!   snapshot and a copy); the last move is two instances in the two other zones at once: one
//!   wins, the other fails closed.
//!
//! Measured per run, from the successor and from outside: acknowledged writes lost (highest
//! acknowledged minus what the successor serves); Docker started on a wrong, stale or empty root
//! (a lower count, no counter although the lineage had one, a record line `boot N` not above
//! every earlier boot of the lineage, a mkfs or a new record on a lineage with state, a losing
//! racer that started Docker); the volume attached twice (overlapping attachments in the
//! fidelity layer's history) or mounted twice (overlapping `volume: <id> mounted` to
//! unmount/kill/power-off intervals on two consoles); state forks (more than one live,
//! unsuperseded volume of the lineage that an instance reached ready on); the worst time from the
//! kill (or the notice) to the successor's ready. A run whose expectations could not be checked
//! (a successor that never came up, a race with no single winner) is a failed run.
//!
//! Exit status: 1 if any loss column is non-zero, 3 if only runs failed, 2 for bad arguments.
//! Needs what the end-to-end tests need (the built image, QEMU, moto, busybox-static); under TCG
//! a run takes one to three minutes. Run:
//! `cargo run --release -p spotworld --bin campaign -- [--kills N] [--graceful N] [--races N] [--moves N]`;
//! consoles in `build/test-runs/campaign-<kind>/`.
//!
//! One file per part: the options (`options`), the kinds of runs and the moments of a kill
//! (`kinds`), the writer (`writer`), what a console says (`console`), a row of runs in one world
//! (`row`), its runs (`runs`) and the checks after each (`checks`), the results and the table
//! (`report`).

mod checks;
mod console;
mod kinds;
mod options;
mod report;
mod row;
mod runs;
mod writer;

use std::time::{Duration, Instant};

use spotworld::fidelity::Settings;
use spotworld::world::e2e_settings;

use kinds::Kind;
use options::{parse_options, USAGE};
use report::{RunResult, Tally};
use row::Row;

/// Power-on to ready, a release wait and two TCG guests sharing two cores included.
const BOOT: Duration = Duration::from_secs(480);
/// Any one step after a boot: a drain, a power-off, the counter coming back.
const STEP: Duration = Duration::from_secs(180);
const ZONES: [&str; 3] = ["us-east-1a", "us-east-1b", "us-east-1c"];
/// The calls spotinit makes about its volume, throttled and failed during races.
const FAULTY_ACTIONS: [&str; 8] = [
    "AttachVolume",
    "DetachVolume",
    "DescribeVolumes",
    "DescribeInstances",
    "CreateTags",
    "CreateVolume",
    "CreateSnapshot",
    "DescribeSnapshots",
];
/// Between two increments of the writer.
const WRITE_PACE: Duration = Duration::from_millis(300);
/// One increment that takes longer is abandoned (never acknowledged).
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// Acknowledged writes each run waits for before its failure.
const FRESH_WRITES: u64 = 5;
/// Racers give up soon: they are expected to lose.
const RACER_RETRY_SECS: u64 = 30;

type Outcome<T> = std::result::Result<T, String>;

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// EC2 as it paces itself, with a release after a termination at the short end of real life.
fn realistic_timings() -> Settings {
    Settings {
        attach_latency: Duration::from_secs(3),
        detach_latency: Duration::from_secs(2),
        volume_creation: Duration::from_secs(2),
        snapshot_duration: Duration::from_secs(10),
        release_after_termination: Duration::from_secs(20),
        ..e2e_settings()
    }
}

async fn run_row(kind: Kind, count: usize, t0: Instant) -> Vec<RunResult> {
    let mut results = Vec::new();
    let mut row = match Row::start(kind, t0).await {
        Ok(row) => Some(row),
        Err(x) => {
            eprintln!("campaign: {}: could not set up: {x}", kind.name());
            None
        }
    };
    for number in 1..=count {
        let r = match row.as_mut() {
            Some(row) => row.run(number, count).await,
            None => {
                let mut r = RunResult::new(kind, number, "-");
                r.failure = Some("not run: the world or its first instance failed".into());
                r
            }
        };
        println!("[{:>7.1} s] {}", t0.elapsed().as_secs_f64(), r.line());
        results.push(r);
    }
    results
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_options(&args) {
        Ok(o) => o,
        Err(x) => {
            if !x.is_empty() {
                eprintln!("campaign: {x}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let t0 = Instant::now();
    println!(
        "campaign: does the state survive? {} hard kills, {} spot notices, {} races, {} zone moves",
        opts.kills, opts.graceful, opts.races, opts.moves
    );
    let mut results = Vec::new();
    for kind in Kind::ALL {
        let count = match kind {
            Kind::Kill => opts.kills,
            Kind::Graceful => opts.graceful,
            Kind::Race => opts.races,
            Kind::Move => opts.moves,
        };
        if count > 0 {
            results.extend(run_row(kind, count, t0).await);
        }
    }

    let mut tallies: Vec<Tally> = Kind::ALL
        .iter()
        .map(|k| Tally::of(k.name(), results.iter().filter(|r| r.kind == *k)))
        .collect();
    tallies.push(Tally::of("**total**", results.iter()));
    println!(
        "\n| kind | runs | acknowledged writes lost | Docker on a wrong/stale/empty root | \
         attached twice | mounted twice | state forks | worst time to recovery | failed runs |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for t in &tallies {
        println!("{}", t.row());
    }
    let total = tallies.last().expect("the total row");
    let command: Vec<String> = std::env::args().collect();
    println!("\ncommand: {}", command.join(" "));
    println!(
        "wall time: {:.0} s ({:.1} min); consoles under build/test-runs/campaign-*/",
        t0.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64() / 60.0
    );
    let code = if total.losses() {
        1
    } else if total.failed > 0 {
        3
    } else {
        0
    };
    std::process::exit(code);
}
