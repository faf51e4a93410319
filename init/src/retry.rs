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
    /// At most this many attempts, whatever time is left.
    max_attempts: Option<u32>,
    jitter: bool,
    quiet: bool,
    /// Says a retry in the caller's words instead of the default line.
    announce: Option<Announce>,
}

/// A retry line in the caller's words: (what, the error, the wait, the time left).
pub type Announce = fn(&str, &dyn std::fmt::Display, Duration, Duration);

/// Why a retried operation ended without success.
#[derive(Debug, thiserror::Error)]
pub enum RetryError<E> {
    /// The operation said this error is final.
    #[error(transparent)]
    Failed(E),
    /// The deadline passed; the last error seen.
    #[error("{last} (gave up after {} and {attempts} attempts)", crate::console::human(*after))]
    TimedOut {
        #[source]
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
            max_attempts: None,
            jitter: false,
            quiet: false,
            announce: None,
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
    /// Give up after `n` attempts even if the deadline is further (a bounded side job).
    pub fn at_most_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
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

    /// The line between tries in the caller's words.
    pub fn announce(mut self, f: Announce) -> Self {
        self.announce = Some(f);
        self
    }

    /// The delay before attempt `n + 1` (n counts from 1).
    pub fn delay(&self, n: u32) -> Duration {
        let base = doubling(self.first_delay, n, self.max_delay);
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
        let mut tries = self.start();
        loop {
            match op(tries.attempt).await {
                Ok(v) => return Ok(v),
                Err(Attempt::Fail(e)) => return Err(RetryError::Failed(e)),
                Err(Attempt::Retry(e)) => tries.wait_after(e).await?,
            }
        }
    }

    /// The same waits, deadline and lines for a caller that runs the attempts in its own loop
    /// (an operation that borrows mutably cannot be a closure returning a future).
    pub fn start(&self) -> Tries<'_> {
        Tries {
            retry: self,
            start: Instant::now(),
            attempt: 1,
        }
    }
}

/// Attempts under way, for [`Retry::start`].
pub struct Tries<'a> {
    retry: &'a Retry,
    start: Instant,
    attempt: u32,
}

impl Tries<'_> {
    /// After a failed attempt worth another: says so and waits, or gives the error back when
    /// the wait would pass the deadline.
    pub async fn wait_after<E: std::fmt::Display>(&mut self, e: E) -> Result<(), RetryError<E>> {
        let r = self.retry;
        let wait = r.delay(self.attempt);
        let elapsed = self.start.elapsed();
        let last_attempt = r.max_attempts.is_some_and(|n| self.attempt >= n);
        if last_attempt || elapsed + wait > r.deadline {
            return Err(RetryError::TimedOut {
                last: e,
                after: elapsed,
                attempts: self.attempt,
            });
        }
        let left = r.deadline.saturating_sub(elapsed);
        match r.announce {
            Some(say) => say(&r.what, &e, wait, left),
            None if !r.quiet => crate::log!(
                "{}: {e}; retrying in {} (attempt {}, {} left)",
                r.what,
                crate::console::human(wait),
                self.attempt,
                crate::console::human(left)
            ),
            None => {}
        }
        tokio::time::sleep(wait).await;
        self.attempt += 1;
        Ok(())
    }
}

/// `first`, doubled for each attempt after the first, capped at `max`: the delay before
/// attempt `n + 1`.
pub fn doubling(first: Duration, n: u32, max: Duration) -> Duration {
    first
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(max)
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
    async fn gives_up_after_its_attempts_before_the_deadline() {
        let r = Retry::new("op")
            .every(Duration::from_secs(1))
            .for_at_most(Duration::from_secs(3600))
            .at_most_attempts(3)
            .quiet();
        let start = Instant::now();
        let out: Result<(), _> = r.run(|n| async move { Err(Attempt::Retry(n)) }).await;
        match out {
            Err(RetryError::TimedOut { last, attempts, .. }) => {
                assert_eq!((last, attempts), (3, 3));
            }
            _ => panic!("expected to give up"),
        }
        // Waits of 1 s and 2 s between the three attempts, none after the last.
        assert_eq!(start.elapsed(), Duration::from_secs(3));
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
