//! The narrator: each step printed, timed and recorded for the summary, and spotinit's console
//! lines about the volume and the drain printed as they come.

use std::future::Future;
use std::time::{Duration, Instant};

use spotworld::world::SimInstance;

pub struct Row {
    pub name: String,
    pub took: Duration,
    pub result: std::result::Result<String, String>,
}

pub struct Demo {
    pub t0: Instant,
    pub rows: Vec<Row>,
    pub verbose: bool,
}

impl Demo {
    pub fn say(&self, text: &str) {
        println!("[{:>6.1} s] {text}", self.t0.elapsed().as_secs_f64());
    }

    /// Runs one step: prints it, times it, records the outcome. `None` if it failed.
    pub async fn step<T>(
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
    pub fn narrate(&self, i: &SimInstance) {
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
