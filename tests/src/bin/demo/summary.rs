//! The summary table at the end, and the exit status.

use spotworld::world::{SimInstance, World};

use crate::bench::{benchmark, Marks};
use crate::narrator::Demo;

/// The summary table (and the benchmark); the exit status.
pub fn finish(
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
