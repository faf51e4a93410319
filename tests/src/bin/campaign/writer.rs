//! The writer: increments against whichever instance serves the state, and the highest value
//! acknowledged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spotworld::docker::Counter;
use tokio::sync::watch;

use crate::{Outcome, WRITE_PACE, WRITE_TIMEOUT};

/// Increments the counter a few times a second against the port it is pointed at and keeps the
/// highest value acknowledged; errors (an instance dying under it) are expected and ignored.
pub struct Writer {
    target: watch::Sender<Option<u16>>,
    acked: Arc<AtomicU64>,
    /// Held across each increment, so a pause can wait out the one in flight.
    attempt: Arc<tokio::sync::Mutex<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn start() -> Writer {
        let (target, mut rx) = watch::channel(None::<u16>);
        let acked = Arc::new(AtomicU64::new(0));
        let attempt = Arc::new(tokio::sync::Mutex::new(()));
        let task = {
            let (acked, attempt) = (acked.clone(), attempt.clone());
            tokio::spawn(async move {
                loop {
                    let Some(port) = *rx.borrow_and_update() else {
                        if rx.changed().await.is_err() {
                            return;
                        }
                        continue;
                    };
                    {
                        let _in_flight = attempt.lock().await;
                        // A pause may have come while waiting for the lock.
                        if *rx.borrow() == Some(port) {
                            let counter = Counter { port };
                            let increment = counter.increment();
                            if let Ok(Ok(v)) = tokio::time::timeout(WRITE_TIMEOUT, increment).await
                            {
                                acked.fetch_max(v, Ordering::SeqCst);
                            }
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(WRITE_PACE) => {}
                        changed = rx.changed() => if changed.is_err() { return },
                    }
                }
            })
        };
        Writer {
            target,
            acked,
            attempt,
            task,
        }
    }

    pub fn point_at(&self, port: u16) {
        self.target.send_replace(Some(port));
    }

    /// Stops writing; returns once no increment is in flight.
    pub async fn pause(&self) {
        self.target.send_replace(None);
        drop(self.attempt.lock().await);
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Waits until `n` more writes than now were acknowledged.
    pub async fn wait_for_writes(&self, n: u64, deadline: Duration) -> Outcome<()> {
        let (want, until) = (self.acked() + n, Instant::now() + deadline);
        while self.acked() < want {
            if Instant::now() > until {
                return Err(format!(
                    "the writer got {} of {n} writes acknowledged in {:.0} s",
                    n + self.acked() - want,
                    deadline.as_secs_f64()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// A new lineage starts its count from zero (call while paused).
    pub fn new_count(&self) {
        self.acked.store(0, Ordering::SeqCst);
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
