//! The benchmark (`--bench`): boot to ready, notice to detached, kill to the successor's ready,
//! spotinit's phase timings and its drain.

use std::time::{Duration, Instant};

use spotworld::qemu::ConsoleLine;
use spotworld::world::{phase_timings, SimInstance};

use crate::console::{after_spotinit, find, spotinit_memory};

/// What the benchmark needs from the run.
#[derive(Default)]
pub struct Marks {
    pub notice_a: Option<(Instant, ConsoleLine)>,
    pub kill_b: Option<Instant>,
    pub notice_c: Option<(Instant, ConsoleLine)>,
    /// The fidelity layer's hold on a killed instance's volumes.
    pub release_delay: Duration,
}

pub fn benchmark(instances: &[SimInstance], marks: &Marks) {
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
