//! Retries as a small builder: `Retry::new("AttachVolume vol-1").every(1s).max_delay(10s)
//! .for_at_most(60s).jitter().run(|attempt| ...)`. The operation says whether an error is worth
//! another try; the builder owns the waiting, the deadline and the console line between tries.

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// What an attempt returns on failure: try again, or stop now.
pub enum Attempt<E> {
    Retry(E),
    Fail(E),
}

#[derive(Clone, Debug)]
pub struct Retry {
    what: String,
    first_delay: Duration,
    max_delay: Duration,
    deadline: Duration,
    jitter: bool,
    quiet: bool,
}

/// Why a retried operation ended without success.
#[derive(Debug)]
pub enum RetryError<E> {
    /// The operation said this error is final.
    Failed(E),
    /// The deadline passed; the last error seen.
    TimedOut {
        last: E,
        after: Duration,
        attempts: u32,
    },
}

impl<E> RetryError<E> {
    pub fn into_inner(self) -> E {
        match self {
            RetryError::Failed(e) | RetryError::TimedOut { last: e, .. } => e,
        }
    }
}

impl Retry {
    pub fn new(what: impl Into<String>) -> Self {
        Retry {
            what: what.into(),
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
            deadline: Duration::from_secs(60),
            jitter: false,
            quiet: false,
        }
    }
    /// The delay after the first failure; it doubles up to `max_delay`.
    pub fn every(mut self, d: Duration) -> Self {
        self.first_delay = d;
        self
    }
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }
    pub fn for_at_most(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }
    /// Randomise each delay within [delay/2, delay] so many instances do not retry in step
    /// (AWS's advice for throttling).
    pub fn jitter(mut self) -> Self {
        self.jitter = true;
        self
    }
    /// No console line per retry (for polls whose progress is reported elsewhere).
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    /// The delay before attempt `n + 1` (n counts from 1).
    pub fn delay(&self, n: u32) -> Duration {
        let base = self
            .first_delay
            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
            .min(self.max_delay);
        if self.jitter {
            let half = base / 2;
            half + Duration::from_nanos(random_u64() % (half.as_nanos() as u64 + 1))
        } else {
            base
        }
    }

    pub async fn run<T, E, F, Fut>(&self, mut op: F) -> Result<T, RetryError<E>>
    where
        E: std::fmt::Display,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Attempt<E>>>,
    {
        let start = Instant::now();
        let mut attempt = 1;
        loop {
            match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(Attempt::Fail(e)) => return Err(RetryError::Failed(e)),
                Err(Attempt::Retry(e)) => {
                    let wait = self.delay(attempt);
                    let elapsed = start.elapsed();
                    if elapsed + wait > self.deadline {
                        return Err(RetryError::TimedOut {
                            last: e,
                            after: elapsed,
                            attempts: attempt,
                        });
                    }
                    if !self.quiet {
                        crate::log!(
                            "{}: {e}; retrying in {} (attempt {attempt}, {} left)",
                            self.what,
                            crate::console::human(wait),
                            crate::console::human(self.deadline.saturating_sub(elapsed))
                        );
                    }
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }
}

/// Cheap randomness for jitter, without another crate: the kernel's getrandom.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64;
    }
    u64::from_ne_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let r = Retry::new("x")
            .every(Duration::from_millis(100))
            .max_delay(Duration::from_millis(350));
        let d: Vec<_> = (1..=4).map(|n| r.delay(n).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 350, 350]);
    }

    #[test]
    fn jitter_stays_within_half_and_full() {
        let r = Retry::new("x").every(Duration::from_millis(400)).jitter();
        for _ in 0..100 {
            let d = r.delay(1);
            assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(400));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success() {
        let r = Retry::new("op").every(Duration::from_secs(1)).quiet();
        let out = r
            .run(|n| async move {
                if n < 3 {
                    Err(Attempt::Retry(format!("try {n}")))
                } else {
                    Ok(n)
                }
            })
            .await;
        assert_eq!(out.ok(), Some(3));
    }

    #[tokio::test(start_paused = true)]
    async fn final_error_stops_at_once() {
        let r = Retry::new("op").quiet();
        let mut calls = 0;
        let out: Result<(), _> = r
            .run(|_| {
                calls += 1;
                async { Err(Attempt::Fail("denied")) }
            })
            .await;
        assert!(matches!(out, Err(RetryError::Failed("denied"))));
        assert_eq!(calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline_with_the_last_error() {
        let r = Retry::new("op")
            .every(Duration::from_secs(2))
            .max_delay(Duration::from_secs(2))
            .for_at_most(Duration::from_secs(7))
            .quiet();
        let out: Result<(), _> = r.run(|n| async move { Err(Attempt::Retry(n)) }).await;
        match out {
            Err(RetryError::TimedOut { last, attempts, .. }) => {
                assert_eq!(last, 4);
                assert_eq!(attempts, 4);
            }
            _ => panic!("expected a timeout"),
        }
    }
}
