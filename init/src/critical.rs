//! Work a shutdown must not cut off: a first `mkfs` (killed half-way, the volume would hold a
//! half-made filesystem) or an `e2fsck`. [`Critical::run`] runs it in a task of its own, so it
//! goes on when the boot that awaited it is interrupted (a spot notice drops the boot's future);
//! the drain calls [`Critical::finish`] before it stops every process.

use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio::time::Instant;

/// What is running, and a watch that turns true when it is done.
type Running = Vec<(String, watch::Receiver<bool>)>;

#[derive(Clone, Default)]
pub struct Critical {
    running: Arc<Mutex<Running>>,
}

/// How the drain's wait for critical work ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Finished {
    /// What was still running when the drain began, and finished before the deadline.
    pub finished: Vec<String>,
    /// What was still running at the deadline.
    pub cut_off: Vec<String>,
}

impl Critical {
    /// Runs `work` to completion even if the caller stops waiting for it.
    pub async fn run<T, F>(&self, what: &str, work: F) -> T
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let (done, watcher) = watch::channel(false);
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            running.retain(|(_, w)| !*w.borrow());
            running.push((what.to_string(), watcher));
        }
        let task = tokio::spawn(async move {
            let out = work.await;
            let _ = done.send(true);
            out
        });
        match task.await {
            Ok(out) => out,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only a runtime shutting down cancels it; nothing is left to answer to.
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits for what is still running, until `deadline` (none: as long as it takes).
    pub async fn finish(&self, deadline: Option<Instant>) -> Finished {
        let running: Running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .filter(|(_, w)| !*w.borrow())
            .collect();
        let mut out = Finished {
            finished: Vec::new(),
            cut_off: Vec::new(),
        };
        for (what, mut w) in running {
            let wait = w.wait_for(|done| *done);
            let ended = match deadline {
                Some(d) => tokio::time::timeout_at(d, wait).await.is_ok(),
                None => {
                    let _ = wait.await;
                    true
                }
            };
            if ended {
                out.finished.push(what);
            } else {
                out.cut_off.push(what);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn work_goes_on_when_its_caller_is_dropped_and_the_drain_waits_for_it() {
        let c = Critical::default();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let caller = c.run("mkfs.ext4 of vol-1", async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            d.store(true, Ordering::SeqCst);
        });
        // The boot is interrupted one second in.
        let _ = tokio::time::timeout(Duration::from_secs(1), caller).await;
        assert!(!done.load(Ordering::SeqCst));
        let f = c
            .finish(Some(Instant::now() + Duration::from_secs(10)))
            .await;
        assert!(done.load(Ordering::SeqCst));
        assert_eq!(f.finished, ["mkfs.ext4 of vol-1"]);
        assert!(f.cut_off.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_stops_waiting_at_its_deadline() {
        let c = Critical::default();
        let caller = c.run("e2fsck of vol-1", async {
            tokio::time::sleep(Duration::from_secs(600)).await;
        });
        let _ = tokio::time::timeout(Duration::from_secs(1), caller).await;
        let f = c
            .finish(Some(Instant::now() + Duration::from_secs(5)))
            .await;
        assert_eq!(f.cut_off, ["e2fsck of vol-1"]);
        // Finished work is not waited for again.
        let c2 = Critical::default();
        c2.run("quick", async {}).await;
        assert_eq!(c2.finish(None).await.finished, Vec::<String>::new());
    }
}
