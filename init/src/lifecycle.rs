//! The spot lifecycle: watch IMDS for the interruption notice (and the rebalance
//! recommendation), turn a notice into one shutdown request with EC2's deadline, and stop the
//! containers within the time left.

use crate::boot::Machine;
use crate::cloud::Metadata;
use crate::config::{AfterDrain, Config};
use crate::console::human;
use crate::services::docker;
use crate::shutdown::{Request, Then};
use crate::sys::System;
use crate::volume::layout::parse_rfc3339;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Time kept back from the deadline for what follows the containers: containerd, sync,
/// unmount, DetachVolume and its confirmation.
pub const RESERVE: Duration = Duration::from_secs(20);

/// The notice's time as an Instant (now, if it is already past or unreadable).
pub fn deadline_of(time: &str) -> Instant {
    let now = Instant::now();
    match parse_rfc3339(time).and_then(|t| t.duration_since(SystemTime::now()).ok()) {
        Some(left) => now + left,
        None => now,
    }
}

/// Polls IMDS every `spot.poll_secs`. A notice is acted on once; a failing IMDS is reported
/// (once per streak) and never stops the watcher.
pub fn watch<M: Metadata + Clone>(meta: M, cfg: &Config, tx: mpsc::UnboundedSender<Request>) {
    if !cfg.spot.watch {
        return;
    }
    let period = Duration::from_secs(cfg.spot.poll_secs);
    let then = match cfg.spot.after_drain {
        AfterDrain::Wait => Then::Wait,
        AfterDrain::Poweroff => Then::PowerOff,
    };
    tokio::spawn(async move {
        let mut failing = false;
        let mut rebalance_seen = false;
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match meta.spot_action().await {
                Ok(Some(a)) => {
                    let deadline = deadline_of(&a.time);
                    crate::log!(
                        "spot: interruption notice: {} at {} ({} from now); draining",
                        a.action,
                        a.time,
                        human(deadline.saturating_duration_since(Instant::now()))
                    );
                    let req = Request::new(
                        format!("spot interruption notice ({} at {})", a.action, a.time),
                        then,
                    )
                    .with_deadline(deadline);
                    let _ = tx.send(req);
                    return;
                }
                Ok(None) => {
                    if failing {
                        crate::log!("spot: IMDS answers again");
                        failing = false;
                    }
                }
                Err(e) => {
                    if !failing {
                        crate::log!(
                            "spot: cannot read the interruption notice: {e} (still watching)"
                        );
                        failing = true;
                    }
                }
            }
            if !rebalance_seen {
                if let Ok(Some(t)) = meta.rebalance().await {
                    rebalance_seen = true;
                    crate::log!("spot: rebalance recommendation at {t}: this instance is at elevated risk of interruption");
                }
            }
        }
    });
}

/// Stops every running container through the Engine API with a timeout that fits before the
/// deadline (less [`RESERVE`]), all at once. Returns how many were running.
pub async fn stop_containers_before<S: System>(
    m: &Machine<S>,
    cfg: &Config,
    deadline: Instant,
) -> usize {
    let socket = m.paths.p(docker::DOCKER_SOCKET);
    let left = deadline.saturating_duration_since(Instant::now());
    let budget = left
        .saturating_sub(RESERVE)
        .min(Duration::from_secs(cfg.docker.stop_timeout_secs))
        .max(Duration::from_secs(1));
    let ids = match docker::running_containers(&socket).await {
        Ok(ids) => ids,
        Err(e) => {
            crate::log!("shutdown: cannot list containers: {e}");
            return 0;
        }
    };
    crate::log!(
        "shutdown: stopping {} containers with a {} stop timeout ({} left)",
        ids.len(),
        human(budget),
        human(left)
    );
    let handles: Vec<_> = ids
        .iter()
        .map(|id| {
            let (socket, id) = (socket.clone(), id.clone());
            tokio::spawn(async move {
                let path = format!("/containers/{id}/stop?t={}", budget.as_secs());
                docker::request(&socket, "POST", &path, budget + Duration::from_secs(10)).await
            })
        })
        .collect();
    for (h, id) in handles.into_iter().zip(&ids) {
        match h.await {
            Ok(Ok((code, _))) if code < 300 || code == 304 => {}
            Ok(Ok((code, body))) => {
                crate::log!(
                    "shutdown: stopping container {id}: HTTP {code} {}",
                    body.trim()
                )
            }
            Ok(Err(e)) => crate::log!("shutdown: stopping container {id}: {e}"),
            Err(_) => {}
        }
    }
    ids.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_follows_the_notice_time() {
        let in_two_minutes = SystemTime::now() + Duration::from_secs(120);
        let d = deadline_of(&crate::volume::layout::rfc3339(in_two_minutes));
        let left = d.saturating_duration_since(Instant::now());
        assert!(
            left > Duration::from_secs(115) && left <= Duration::from_secs(120),
            "{left:?}"
        );
        let past = deadline_of("2001-01-01T00:00:00Z");
        assert!(past <= Instant::now());
    }
}
