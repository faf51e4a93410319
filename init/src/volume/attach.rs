//! Owning the volume: attach it exclusively, handle a holder (live: wait for it to let go, then
//! refuse; dead: wait for EC2 to release it, then optionally force-detach), wait for `attached`,
//! and detach at shutdown.

use super::device::DeviceError;
use super::{Step, VolumeError};
use crate::cloud::{
    AttachmentState, CloudError, Ec2, ErrorKind, Identity, InstanceState, SnapshotState, VolumeInfo,
};
use crate::config;
use crate::console::human;
use crate::retry::Retry;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// One EC2 call, retried with jittered backoff while EC2 throttles or fails (RequestLimitExceeded,
/// 5xx, timeouts); any other error returns at once.
pub async fn api<T, F, Fut>(call: &str, f: F) -> Result<T, CloudError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CloudError>>,
{
    let retry = Retry::new(call)
        .every(Duration::from_millis(500))
        .max_delay(Duration::from_secs(20))
        .for_at_most(Duration::from_secs(180))
        .jitter();
    crate::cloud::with_retries(&retry, f).await
}

/// How the attach went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    /// The volume was force-detached from a dead holder: its filesystem needs a full check.
    pub forced: bool,
}

fn api_err(step: Step) -> impl Fn(CloudError) -> VolumeError {
    move |err| VolumeError::Api { step, err }
}

fn is_dead(state: &InstanceState) -> bool {
    matches!(
        state,
        InstanceState::ShuttingDown
            | InstanceState::Terminated
            | InstanceState::Stopping
            | InstanceState::Stopped
    )
}

async fn describe<E: Ec2>(ec2: &E, id: &str, step: Step) -> Result<VolumeInfo, VolumeError> {
    api("DescribeVolumes", || ec2.describe_volume(id))
        .await
        .map_err(api_err(step))?
        .ok_or_else(|| VolumeError::NotFound {
            what: format!("state volume {id} disappeared"),
            fix: "Someone deleted it; restore it from a snapshot".into(),
        })
}

/// The instance holding the volume (other than `me`), if any.
fn holder<'a>(v: &'a VolumeInfo, me: &Identity) -> Option<&'a crate::cloud::Attachment> {
    v.attachments
        .iter()
        .find(|a| a.instance_id != me.instance_id && a.state != AttachmentState::Detached)
}

/// A live instance (other than `me`) holding the volume is an error, at once.
pub async fn refuse_live_holder<E: Ec2>(
    ec2: &E,
    v: &VolumeInfo,
    me: &Identity,
) -> Result<(), VolumeError> {
    let Some(att) = holder(v, me) else {
        return Ok(());
    };
    let inst = api("DescribeInstances", || {
        ec2.describe_instance(&att.instance_id)
    })
    .await
    .map_err(api_err(Step::Attach))?;
    let state = inst.map_or(InstanceState::Terminated, |i| i.state);
    if is_dead(&state) {
        return Ok(());
    }
    Err(VolumeError::HeldByRunning {
        volume: v.id.clone(),
        holder: att.instance_id.clone(),
        state,
    })
}

/// How often the volume is read while another instance holds it: a handover is noticed within
/// this of the release (its attachment is gone from the volume). The holder's own state changes
/// less often and is read less often (a pool reads its holders' states as seldom).
const HOLDER_POLL: Duration = Duration::from_secs(1);
pub(super) const HOLDER_STATE_EVERY: Duration = Duration::from_secs(10);
/// How often a long wait says so on the console.
const WAIT_LINE_EVERY: Duration = Duration::from_secs(30);

/// Waits until no other instance holds the volume. A live holder is waited for up to
/// `live_holder_wait_secs` (then an error, retried per `[failure]`); a dead one for
/// `release_wait_secs`, then force-detached if configured.
pub async fn wait_unheld<E: Ec2>(
    ec2: &E,
    v: &VolumeInfo,
    cfg: &config::Volume,
    me: &Identity,
) -> Result<VolumeInfo, VolumeError> {
    let (v, _) = wait_unheld_forced(ec2, v, cfg, me).await?;
    Ok(v)
}

/// What is known of the instance holding the volume, and since when it is waited for.
struct Holder {
    id: String,
    state: InstanceState,
    read_at: Instant,
}

/// [`wait_unheld`], and whether a dead holder had to be force-detached (the filesystem then
/// needs a full check).
pub async fn wait_unheld_forced<E: Ec2>(
    ec2: &E,
    v: &VolumeInfo,
    cfg: &config::Volume,
    me: &Identity,
) -> Result<(VolumeInfo, bool), VolumeError> {
    let mut v = v.clone();
    let release_wait = Duration::from_secs(cfg.release_wait_secs);
    let live_wait = Duration::from_secs(cfg.live_holder_wait_secs);
    let mut live_since: Option<Instant> = None;
    let mut dead_since: Option<Instant> = None;
    let mut holder_seen: Option<Holder> = None;
    let mut last_line = Instant::now();
    let mut forced = false;
    loop {
        let Some(att) = holder(&v, me).cloned() else {
            if let Some(since) = dead_since.or(live_since) {
                crate::log!("volume: {} released after {}", v.id, human(since.elapsed()));
            }
            return Ok((v, forced));
        };
        let stale = holder_seen
            .as_ref()
            .is_none_or(|h| h.id != att.instance_id || h.read_at.elapsed() >= HOLDER_STATE_EVERY);
        if stale {
            let inst = api("DescribeInstances", || {
                ec2.describe_instance(&att.instance_id)
            })
            .await
            .map_err(api_err(Step::Attach))?;
            holder_seen = Some(Holder {
                id: att.instance_id.clone(),
                state: inst.map_or(InstanceState::Terminated, |i| i.state),
                read_at: Instant::now(),
            });
        }
        let state = holder_seen
            .as_ref()
            .map(|h| h.state.clone())
            .unwrap_or_default();
        if !is_dead(&state) {
            let since = *live_since.get_or_insert_with(|| {
                if !live_wait.is_zero() {
                    crate::log!(
                        "volume: {} is attached to {}, which is {state}: another live instance owns this state. Waiting up to {} (volume.live_holder_wait_secs) for it to let go, as an instance being replaced does when it drains",
                        v.id,
                        att.instance_id,
                        human(live_wait)
                    );
                }
                Instant::now()
            });
            if since.elapsed() >= live_wait {
                return Err(VolumeError::HeldByRunning {
                    volume: v.id.clone(),
                    holder: att.instance_id.clone(),
                    state,
                });
            }
            if last_line.elapsed() >= WAIT_LINE_EVERY {
                crate::log!(
                    "volume: {} still held by {} ({state}, attachment {}); waited {} of {}",
                    v.id,
                    att.instance_id,
                    att.state,
                    human(since.elapsed()),
                    human(live_wait)
                );
                last_line = Instant::now();
            }
        } else {
            let since = *dead_since.get_or_insert_with(|| {
                crate::log!(
                    "volume: {} is still attached to {} ({state}, attachment {}); waiting up to {} for EC2 to release it",
                    v.id,
                    att.instance_id,
                    att.state,
                    human(release_wait)
                );
                Instant::now()
            });
            if since.elapsed() >= release_wait {
                if !cfg.force_detach || forced {
                    return Err(VolumeError::NotReleased {
                        volume: v.id.clone(),
                        holder: att.instance_id.clone(),
                        state,
                        waited: since.elapsed(),
                    });
                }
                crate::log!(
                    "volume: force-detaching {} from {} ({state}) after {} (volume.force_detach); its filesystem gets a full check",
                    v.id,
                    att.instance_id,
                    human(since.elapsed())
                );
                api("DetachVolume", || {
                    ec2.detach_volume(&v.id, &att.instance_id, true)
                })
                .await
                .map_err(api_err(Step::Attach))?;
                forced = true;
                dead_since = Some(Instant::now());
            } else if last_line.elapsed() >= WAIT_LINE_EVERY {
                crate::log!(
                    "volume: {} still held by {} ({state}); waited {} of {}",
                    v.id,
                    att.instance_id,
                    human(since.elapsed()),
                    human(release_wait)
                );
                last_line = Instant::now();
            }
        }
        tokio::time::sleep(HOLDER_POLL).await;
        v = describe(ec2, &v.id, Step::Attach).await?;
    }
}

/// Attaches the volume to this instance and waits for `attached`. Called again after a failure,
/// it finds the volume already attached to us and just waits.
pub async fn attach_exclusive<E: Ec2>(
    ec2: &E,
    volume_id: &str,
    cfg: &config::Volume,
    me: &Identity,
) -> Result<Attached, VolumeError> {
    let deadline = Duration::from_secs(cfg.attach_timeout_secs);
    let mut forced_any = false;
    loop {
        let v = describe(ec2, volume_id, Step::Attach).await?;
        let mine = v
            .attachments
            .iter()
            .find(|a| a.instance_id == me.instance_id && a.state != AttachmentState::Detached);
        if mine.is_none() {
            let (v, forced) = wait_unheld_forced(ec2, &v, cfg, me).await?;
            forced_any |= forced;
            crate::log!(
                "volume: attaching {} to {} as {}",
                v.id,
                me.instance_id,
                cfg.device
            );
            match api("AttachVolume", || {
                ec2.attach_volume(&v.id, &me.instance_id, &cfg.device)
            })
            .await
            {
                Ok(_) => {}
                // Someone attached it between our look and our call: look again.
                Err(e) if e.kind == ErrorKind::InUse => {
                    crate::log!("volume: {e}; looking at who holds it");
                    continue;
                }
                Err(e) if e.kind == ErrorKind::IncorrectState => {
                    crate::log!("volume: {e}; waiting for it to settle");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
                Err(err) => {
                    return Err(VolumeError::Api {
                        step: Step::Attach,
                        err,
                    })
                }
            }
        }
        wait_attached(ec2, volume_id, me, deadline).await?;
        return Ok(Attached { forced: forced_any });
    }
}

/// How often the attachment is read while EC2 usually completes it (1-4 s), and from when on
/// it backs off to every 2 s. A doubling from the start read at 0.25, 0.75, 1.75 and 3.75 s and
/// so saw a 2 s attachment 1.5 s late; four reads a second for a few seconds are far below
/// EC2's request limits.
const ATTACH_POLL: Duration = Duration::from_millis(250);
const ATTACH_POLL_STEADY_FOR: Duration = Duration::from_secs(8);

/// The pause before the next read of the attachment, `elapsed` into the wait.
fn attach_poll_delay(elapsed: Duration, previous: Duration) -> Duration {
    if elapsed < ATTACH_POLL_STEADY_FOR {
        ATTACH_POLL
    } else {
        (previous * 2).min(Duration::from_secs(2))
    }
}

/// Polls until our attachment reads `attached`: often while EC2 usually finishes, then less.
async fn wait_attached<E: Ec2>(
    ec2: &E,
    volume_id: &str,
    me: &Identity,
    deadline: Duration,
) -> Result<(), VolumeError> {
    let start = Instant::now();
    let mut delay = ATTACH_POLL;
    loop {
        let v = describe(ec2, volume_id, Step::Attach).await?;
        let state = v
            .attachments
            .iter()
            .find(|a| a.instance_id == me.instance_id)
            .map(|a| a.state.clone());
        match state {
            Some(AttachmentState::Attached) => {
                crate::log!("volume: {volume_id} attached in {}", human(start.elapsed()));
                return Ok(());
            }
            Some(AttachmentState::Attaching) | Some(AttachmentState::Busy) => {}
            other => {
                return Err(VolumeError::Device {
                    volume: volume_id.into(),
                    source: DeviceError::Attachment {
                        instance: me.instance_id.clone(),
                        state: other
                            .as_ref()
                            .map_or("nothing", AttachmentState::as_str)
                            .into(),
                    },
                })
            }
        }
        if start.elapsed() > deadline {
            return Err(VolumeError::Timeout {
                step: Step::Attach,
                volume: volume_id.into(),
                detail: format!(
                    "still attaching after {} (EC2 usually needs 1-4 s)",
                    human(deadline)
                ),
            });
        }
        delay = attach_poll_delay(start.elapsed(), delay);
        tokio::time::sleep(delay).await;
    }
}

/// Detaches our attachment (always naming our instance) and waits until EC2 no longer shows it,
/// so the next instance can attach at once. Not attached is fine.
pub async fn detach<E: Ec2>(
    ec2: &E,
    volume_id: &str,
    me: &Identity,
    deadline: Duration,
) -> Result<Duration, VolumeError> {
    let start = Instant::now();
    let mut said = false;
    // EC2 can refuse a detach (IncorrectState) while DescribeVolumes still says attached: look
    // again after a growing pause, never in a tight loop.
    let mut pause = Duration::from_millis(500);
    'detach: loop {
        match api("DetachVolume", || {
            ec2.detach_volume(volume_id, &me.instance_id, false)
        })
        .await
        {
            Ok(_) => break,
            Err(e) if e.code.as_deref() == Some("InvalidAttachment.NotFound") => {
                return Ok(start.elapsed());
            }
            // Not attached — or still attaching (a shutdown that interrupted the boot right
            // after AttachVolume): EC2 refuses to detach until the attachment settles, and then
            // it would stay attached to us if we took the refusal for "not attached".
            Err(e) if e.kind == ErrorKind::IncorrectState => loop {
                let v = describe(ec2, volume_id, Step::Detach).await?;
                let ours = v.attachments.iter().find(|a| {
                    a.instance_id == me.instance_id && a.state != AttachmentState::Detached
                });
                match ours.map(|a| &a.state) {
                    None => return Ok(start.elapsed()),
                    Some(AttachmentState::Detaching) => break 'detach,
                    Some(AttachmentState::Attached) => {
                        if start.elapsed() > deadline {
                            return Err(VolumeError::Timeout {
                                step: Step::Detach,
                                volume: volume_id.into(),
                                detail: format!(
                                    "EC2 refused to detach it for {} although it is attached: {e}",
                                    human(deadline)
                                ),
                            });
                        }
                        crate::log!(
                            "volume: {e}, although {volume_id} reads attached; trying again in {}",
                            human(pause)
                        );
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                        continue 'detach;
                    }
                    Some(state) => {
                        if !said {
                            crate::log!(
                                "volume: {volume_id} is still {state} to this instance; detaching it once EC2 is done"
                            );
                            said = true;
                        }
                        if start.elapsed() > deadline {
                            return Err(VolumeError::Timeout {
                                step: Step::Detach,
                                volume: volume_id.into(),
                                detail: format!(
                                    "still {state} after {}, so it cannot be detached",
                                    human(deadline)
                                ),
                            });
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            },
            Err(err) => {
                return Err(VolumeError::Api {
                    step: Step::Detach,
                    err,
                })
            }
        }
    }
    loop {
        let v = describe(ec2, volume_id, Step::Detach).await?;
        let still = v
            .attachments
            .iter()
            .any(|a| a.instance_id == me.instance_id && a.state != AttachmentState::Detached);
        if !still {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            return Err(VolumeError::Timeout {
                step: Step::Detach,
                volume: volume_id.into(),
                detail: format!("still attached after {}", human(deadline)),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits for a snapshot to complete, with a progress line every 10 s or so.
pub async fn wait_snapshot<E: Ec2>(
    ec2: &E,
    snapshot: &str,
    volume: &str,
    deadline: Duration,
) -> Result<Duration, VolumeError> {
    let start = Instant::now();
    let mut last_line = Instant::now();
    loop {
        let s = api("DescribeSnapshots", || ec2.describe_snapshot(snapshot))
            .await
            .map_err(api_err(Step::Move))?;
        match s {
            Some(s) if s.state == SnapshotState::Completed => {
                crate::log!(
                    "volume: snapshot {snapshot} of {volume} completed in {}",
                    human(start.elapsed())
                );
                return Ok(start.elapsed());
            }
            Some(s) if s.state == SnapshotState::Error => {
                return Err(VolumeError::Timeout {
                    step: Step::Move,
                    volume: volume.into(),
                    detail: format!("snapshot {snapshot} failed (state error)"),
                })
            }
            Some(s) if last_line.elapsed() >= Duration::from_secs(10) => {
                crate::log!(
                    "volume: snapshot {snapshot} of {volume}: {} after {}",
                    if s.progress.is_empty() {
                        "pending"
                    } else {
                        &s.progress
                    },
                    human(start.elapsed())
                );
                last_line = Instant::now();
            }
            Some(_) | None => {}
        }
        if start.elapsed() > deadline {
            return Err(VolumeError::Timeout {
                step: Step::Move,
                volume: volume.into(),
                detail: format!(
                    "snapshot {snapshot} not completed after {}",
                    human(deadline)
                ),
            });
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attachment_is_read_often_while_ec2_usually_finishes_then_less() {
        // The reads of a 2 s attachment: one at most 250 ms after it completes.
        let (mut at, mut delay, mut reads) = (Duration::ZERO, ATTACH_POLL, Vec::new());
        while at < Duration::from_secs(3) {
            delay = attach_poll_delay(at, delay);
            at += delay;
            reads.push(at);
        }
        let seen = reads
            .iter()
            .find(|t| **t >= Duration::from_secs(2))
            .unwrap();
        assert!(*seen <= Duration::from_millis(2250), "{seen:?}");
        // A slow one backs off to every 2 s.
        let mut delay = ATTACH_POLL;
        for s in 8..14 {
            delay = attach_poll_delay(Duration::from_secs(s), delay);
        }
        assert_eq!(delay, Duration::from_secs(2));
    }
}
