//! The spot lifecycle: watch IMDS for the interruption notice (and the rebalance
//! recommendation, and EC2's scheduled events), turn a notice into one shutdown request with
//! EC2's deadline, stop the
//! containers within the time left; keep recent snapshots of the state volume (on a rebalance
//! recommendation and on a schedule), pruning only spotinit's own; and hold the instance's
//! stable address (an Elastic IP re-associated from the dead predecessor).

use crate::cloud::tags;
use crate::cloud::{CloudError, Ec2, Identity, Metadata, SnapshotInfo, SnapshotState};
use crate::config::{AfterDrain, Config};
use crate::console::human;
use crate::machine::{Request, Then};
use crate::scheduled::{ScheduledEvents, CHECK_EVERY};
use crate::volume::attach::api;
use crate::volume::layout::parse_rfc3339;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// EC2 gives two minutes; a notice further out than this is read as this far (a time from
/// IMDS must never make an Instant overflow in the watcher).
const LONGEST_NOTICE: Duration = Duration::from_secs(3600);

/// The notice's time as an Instant (now, if it is already past or unreadable).
pub fn deadline_of(time: &str) -> Instant {
    let now = Instant::now();
    match parse_rfc3339(time).and_then(|t| t.duration_since(SystemTime::now()).ok()) {
        Some(left) => now + left.min(LONGEST_NOTICE),
        None => now,
    }
}

/// What the watcher hands on to the maintenance task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The rebalance recommendation, with its notice time.
    Rebalance(String),
}

/// Polls IMDS every `spot.poll_secs`. A notice is acted on once; a failing IMDS is reported
/// (once per streak) and never stops the watcher.
pub fn watch<M: Metadata + Clone>(
    meta: M,
    cfg: &Config,
    tx: mpsc::UnboundedSender<Request>,
    events: mpsc::UnboundedSender<Event>,
) {
    if !cfg.spot.watch {
        return;
    }
    let period = Duration::from_secs(cfg.spot.poll_secs);
    let drain_before_retirement = cfg.spot.drain_before_retirement;
    let then = match cfg.spot.after_drain {
        AfterDrain::Wait => Then::Wait,
        AfterDrain::Poweroff => Then::PowerOff,
    };
    tokio::spawn(async move {
        let mut failing = false;
        let mut rebalance_seen = false;
        let mut scheduled = ScheduledEvents::new(drain_before_retirement);
        let mut scheduled_read: Option<Instant> = None;
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
                    crate::notify::event(
                        "spot-notice",
                        format!(
                            "spot interruption notice: {} at {}; draining",
                            a.action, a.time
                        ),
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
            if scheduled_read.is_none_or(|t| t.elapsed() >= CHECK_EVERY) {
                scheduled_read = Some(Instant::now());
                match meta.scheduled_events().await {
                    Ok(events) => {
                        for line in scheduled.note(&events) {
                            crate::log!("{line}");
                            crate::notify::event("scheduled-event", line);
                        }
                    }
                    Err(e) => crate::log!("ec2: cannot read the scheduled events: {e}"),
                }
            }
            if let Some(req) = scheduled.due(SystemTime::now()) {
                crate::log!("ec2: {}; draining now", req.reason);
                let _ = tx.send(req);
                return;
            }
            if !rebalance_seen {
                if let Ok(Some(t)) = meta.rebalance().await {
                    rebalance_seen = true;
                    crate::log!("spot: rebalance recommendation at {t}: this instance is at elevated risk of interruption");
                    crate::notify::event(
                        "rebalance",
                        format!("rebalance recommendation at {t}: elevated risk of interruption"),
                    );
                    let _ = events.send(Event::Rebalance(t));
                }
            }
        }
    });
}

/// Snapshots of the state volume that spotinit takes and prunes. Pruning only ever looks at
/// snapshots tagged `spotinit:purpose=backup` for this volume: nobody else's are touched.
pub struct Snapshots<E: Ec2> {
    pub ec2: Arc<E>,
    pub volume_id: String,
    pub me: Identity,
    pub keep: u32,
}

impl<E: Ec2> Snapshots<E> {
    fn ours(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (tags::PURPOSE.to_string(), tags::PURPOSE_BACKUP.to_string()),
            (tags::VOLUME.to_string(), self.volume_id.clone()),
        ])
    }

    /// Starts a crash-consistent snapshot (EBS copies the volume as of now while the
    /// instance keeps running), then prunes.
    pub async fn take(&self, reason: &str) -> Result<String, CloudError> {
        let mut tags = self.ours();
        tags.insert(tags::REASON.into(), reason.into());
        tags.insert(tags::CREATED_BY.into(), self.me.instance_id.clone());
        let description = format!(
            "spotinit backup of {} from {} ({reason})",
            self.volume_id, self.me.instance_id
        );
        let id = api("CreateSnapshot", || {
            self.ec2
                .create_snapshot(&self.volume_id, &description, &tags)
        })
        .await?;
        crate::log!("snapshots: started {id} of {} ({reason})", self.volume_id);
        let deleted = self.prune().await?;
        if !deleted.is_empty() {
            crate::log!(
                "snapshots: deleted {} (keeping the newest {})",
                deleted.join(", "),
                self.keep
            );
        }
        Ok(id)
    }

    /// Deletes our completed snapshots beyond the newest `keep`. Returns what it deleted.
    pub async fn prune(&self) -> Result<Vec<String>, CloudError> {
        let filter = self.ours();
        let mut ours: Vec<SnapshotInfo> =
            api("DescribeSnapshots", || self.ec2.find_snapshots(&filter))
                .await?
                .into_iter()
                // Belt and braces: the filter asked EC2 for these tags; check them again here.
                .filter(|s| {
                    s.tags.get(tags::PURPOSE).map(String::as_str) == Some(tags::PURPOSE_BACKUP)
                        && s.tags.get(tags::VOLUME) == Some(&self.volume_id)
                })
                .collect();
        ours.sort_by(|a, b| b.start_time.cmp(&a.start_time).then(b.id.cmp(&a.id)));
        let mut deleted = Vec::new();
        for s in ours.iter().skip(self.keep as usize) {
            if s.state != SnapshotState::Completed {
                continue;
            }
            api("DeleteSnapshot", || self.ec2.delete_snapshot(&s.id)).await?;
            deleted.push(s.id.clone());
        }
        Ok(deleted)
    }
}

/// After the volume phase: a snapshot on each rebalance recommendation (if configured) and on
/// the configured schedule. Failures are logged; the next occasion tries again.
pub fn maintain<E: Ec2>(
    snapshots: Snapshots<E>,
    cfg: &Config,
    mut events: mpsc::UnboundedReceiver<Event>,
) {
    let on_rebalance = cfg.spot.snapshot_on_rebalance;
    let every = Duration::from_secs(cfg.snapshots.interval_minutes * 60);
    tokio::spawn(async move {
        let mut ticker = (every > Duration::ZERO).then(|| {
            let mut t = tokio::time::interval_at(Instant::now() + every, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            let reason = tokio::select! {
                Some(ev) = events.recv() => match ev {
                    Event::Rebalance(t) if on_rebalance => format!("rebalance recommendation {t}"),
                    Event::Rebalance(_) => continue,
                },
                _ = tick(&mut ticker) => "periodic".to_string(),
            };
            if let Err(e) = snapshots.take(&reason).await {
                crate::log!("snapshots: {e}");
            }
        }
    });
}

/// The next tick of the schedule, or never when there is none.
async fn tick(t: &mut Option<tokio::time::Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Associates the configured Elastic IP with this instance (taking it over from a dead
/// predecessor), so the service keeps its address across spot replacements.
pub async fn associate_address<E: Ec2>(ec2: &E, allocation_id: &str, me: &Identity) -> bool {
    match api("AssociateAddress", || {
        ec2.associate_address(allocation_id, &me.instance_id)
    })
    .await
    {
        Ok(assoc) => {
            crate::log!(
                "address: {allocation_id} now points at {} ({assoc})",
                me.instance_id
            );
            true
        }
        Err(e) => {
            crate::log!("address: cannot associate {allocation_id}: {e}; the service is not reachable at its stable address");
            false
        }
    }
}

/// `address.from_pool`: the Elastic IP of this host's slot (tagged with its pool and slot),
/// associated as a configured one is. None or several: said, and none associated.
pub async fn associate_slot_address<E: Ec2>(
    ec2: &E,
    slot: &crate::volume::Slot,
    me: &Identity,
) -> bool {
    let wanted = BTreeMap::from([
        (tags::POOL.to_string(), slot.pool.clone()),
        (tags::SLOT.to_string(), slot.number.to_string()),
    ]);
    let what = crate::cloud::describe_tags(&wanted);
    match api("DescribeAddresses", || ec2.find_addresses(&wanted)).await {
        Ok(found) => match found.as_slice() {
            [alloc] => associate_address(ec2, alloc, me).await,
            [] => {
                crate::log!("address: no Elastic IP is {what}: allocate one and tag it so to give slot {} its stable address", slot.number);
                false
            }
            several => {
                crate::log!(
                    "address: {} Elastic IPs are {what} ({}): tag only one so; none associated",
                    several.len(),
                    several.join(", ")
                );
                false
            }
        },
        Err(e) => {
            crate::log!("address: cannot look up the Elastic IP {what}: {e}; the service is not reachable at its stable address");
            false
        }
    }
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
        // A time far out does not overflow; it is capped.
        let far = deadline_of("9999-12-31T23:59:59Z");
        assert!(far.saturating_duration_since(Instant::now()) <= LONGEST_NOTICE);
        assert!(deadline_of("not a time") <= Instant::now());
    }
}
