//! The layer's state beside moto's: transitions moto does not model (attaching, detaching,
//! busy, held by a terminating instance, creating, pending), faults, callers and what was
//! recorded, behind one mutex; and how Describe answers show it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::moto::Ec2Client;
use crate::EbsHooks;

use super::{Attachment, AttachmentEnd, Fault, Request, Settings};

pub(super) struct Shared {
    pub(super) moto: Ec2Client,
    pub(super) hooks: Arc<dyn EbsHooks>,
    pub(super) settings: Settings,
    pub(super) state: Mutex<State>,
    /// Held across check-then-act sequences (validate, forward to moto, update the overlay), so
    /// two racing AttachVolume calls see each other: exactly one wins, as on EC2.
    pub(super) mutations: tokio::sync::Mutex<()>,
    pub(super) tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    pub(super) generation: AtomicU64,
}

#[derive(Default)]
pub(super) struct State {
    /// Volumes in a transition moto does not model.
    pub(super) volumes: HashMap<String, VolumePhase>,
    /// Volumes still `creating`, until the instant they are available.
    pub(super) creating: HashMap<String, Instant>,
    /// Snapshots still `pending`: when they started, how long they take.
    pub(super) snapshots: HashMap<String, (Instant, Duration)>,
    /// Instances being terminated.
    pub(super) terminations: HashMap<String, Termination>,
    pub(super) faults: HashMap<String, VecDeque<Fault>>,
    /// Faults that hit a share of an action's requests: (fault, share in 0..=1).
    pub(super) fault_rates: HashMap<String, Vec<(Fault, f64)>>,
    pub(super) denied: HashSet<String>,
    /// Access key id -> role session name (the instance id on EC2).
    pub(super) callers: HashMap<String, String>,
    pub(super) requests: Vec<Request>,
    pub(super) moto_requests: Vec<Request>,
    /// Every attachment that reached moto, in the order they did.
    pub(super) attachments: Vec<Attachment>,
    /// Each volume's modifications, in the order they were made.
    pub(super) modifications: HashMap<String, Vec<Modification>>,
}

/// One ModifyVolume: `modifying` until `optimizing_at` and until the block device has its new
/// size, `optimizing` until `completed_at`, then `completed` (or `failed`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Modification {
    pub(super) started: Instant,
    pub(super) optimizing_at: Instant,
    pub(super) completed_at: Instant,
    pub(super) resized: bool,
    pub(super) failed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ModificationState {
    Modifying,
    Optimizing,
    Completed,
    Failed,
}

impl ModificationState {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            ModificationState::Modifying => "modifying",
            ModificationState::Optimizing => "optimizing",
            ModificationState::Completed => "completed",
            ModificationState::Failed => "failed",
        }
    }
}

impl Modification {
    pub(super) fn state(&self, now: Instant) -> ModificationState {
        if self.failed {
            ModificationState::Failed
        } else if now < self.optimizing_at || !self.resized {
            ModificationState::Modifying
        } else if now < self.completed_at {
            ModificationState::Optimizing
        } else {
            ModificationState::Completed
        }
    }

    /// 0 to 100 over the whole modification; 100 once it has ended either way.
    pub(super) fn progress(&self, now: Instant) -> u32 {
        match self.state(now) {
            ModificationState::Completed | ModificationState::Failed => 100,
            _ => {
                let total = self.completed_at.saturating_duration_since(self.started);
                let elapsed = now.saturating_duration_since(self.started);
                let percent = elapsed.as_secs_f64() / total.as_secs_f64().max(1e-9) * 100.0;
                (percent as u32).min(99)
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum VolumePhase {
    Attaching {
        instance: String,
        device: String,
        generation: u64,
    },
    Detaching {
        instance: String,
        device: String,
        generation: u64,
    },
    /// The detach hook failed: the device is still in use in the guest. EC2 shows `busy` and
    /// keeps the volume until a force-detach (DetachVolume API reference: "Failure to do so can
    /// result in the volume becoming stuck in the busy state while detaching").
    Busy { instance: String, device: String },
    /// Attached to an instance that is being terminated, until EC2 lets go of it.
    Held { instance: String, device: String },
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Termination {
    pub(super) shutting_down_until: Instant,
    pub(super) release_at: Instant,
}

/// What DescribeVolumes shows for a volume, where it differs from moto.
#[derive(Default)]
pub(super) struct VolumeView {
    pub(super) status: Option<&'static str>,
    pub(super) attachment: Option<&'static str>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed)
    }

    pub(super) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task).abort_handle();
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }
}

impl State {
    /// Closes the open attachment of `volume` to `instance`, now.
    pub(super) fn end_attachment(&mut self, volume: &str, instance: &str, how: AttachmentEnd) {
        let now = Instant::now();
        for a in self
            .attachments
            .iter_mut()
            .filter(|a| a.until.is_none() && a.volume == volume && a.instance == instance)
        {
            a.until = Some(now);
            a.ended_by = Some(how);
        }
    }

    /// Closes every open attachment of `instance`, now.
    pub(super) fn end_attachments_of(&mut self, instance: &str, how: AttachmentEnd) {
        let now = Instant::now();
        for a in self
            .attachments
            .iter_mut()
            .filter(|a| a.until.is_none() && a.instance == instance)
        {
            a.until = Some(now);
            a.ended_by = Some(how);
        }
    }

    /// The state and code DescribeInstances shows for an instance being terminated.
    pub(super) fn instance_view(
        &self,
        instance_id: &str,
        now: Instant,
    ) -> Option<(&'static str, u32)> {
        let t = self.terminations.get(instance_id)?;
        Some(if now < t.shutting_down_until {
            ("shutting-down", 32)
        } else {
            ("terminated", 48)
        })
    }

    pub(super) fn volume_view(&self, volume_id: &str, now: Instant) -> VolumeView {
        if self.creating.get(volume_id).is_some_and(|t| *t > now) {
            return VolumeView {
                status: Some("creating"),
                attachment: None,
            };
        }
        let attachment = match self.volumes.get(volume_id) {
            None => None,
            Some(VolumePhase::Attaching { .. }) => Some("attaching"),
            Some(VolumePhase::Detaching { .. }) => Some("detaching"),
            Some(VolumePhase::Busy { .. }) => Some("busy"),
            // While the instance shuts down its volumes are still attached; once it is
            // terminated EC2 "gradually disassociates" them (EC2 user guide, "Terminate your
            // instance"), which DescribeVolumes shows as `detaching` until they are available.
            Some(VolumePhase::Held { instance, .. }) => match self.instance_view(instance, now) {
                Some(("shutting-down", _)) => Some("attached"),
                _ => Some("detaching"),
            },
        };
        VolumeView {
            status: attachment.map(|_| "in-use"),
            attachment,
        }
    }

    /// The state of the volume's latest modification, if it has one.
    pub(super) fn modification_state(
        &self,
        volume_id: &str,
        now: Instant,
    ) -> Option<ModificationState> {
        Some(self.modifications.get(volume_id)?.last()?.state(now))
    }

    /// The progress (0..=99) of a snapshot still pending, `None` once completed.
    pub(super) fn snapshot_progress(&self, snapshot_id: &str, now: Instant) -> Option<u32> {
        let (started, duration) = self.snapshots.get(snapshot_id)?;
        let elapsed = now.saturating_duration_since(*started);
        if elapsed >= *duration {
            return None;
        }
        let percent = (elapsed.as_secs_f64() / duration.as_secs_f64() * 100.0) as u32;
        Some(percent.min(99))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_progress_rises_then_completes() {
        let mut state = State::default();
        let start = Instant::now();
        state
            .snapshots
            .insert("snap-1".into(), (start, Duration::from_secs(4)));
        assert_eq!(state.snapshot_progress("snap-1", start), Some(0));
        assert_eq!(
            state.snapshot_progress("snap-1", start + Duration::from_secs(1)),
            Some(25)
        );
        assert_eq!(
            state.snapshot_progress("snap-1", start + Duration::from_secs(4)),
            None
        );
        assert_eq!(state.snapshot_progress("snap-unknown", start), None);
    }

    #[test]
    fn a_modification_is_modifying_until_resized_then_optimizing_then_completed() {
        let start = Instant::now();
        let mut m = Modification {
            started: start,
            optimizing_at: start + Duration::from_secs(2),
            completed_at: start + Duration::from_secs(4),
            resized: false,
            failed: false,
        };
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(m.state(at(1)), ModificationState::Modifying);
        assert_eq!(m.progress(at(1)), 25);
        // The block device has not grown yet: still modifying past the planned time.
        assert_eq!(m.state(at(3)), ModificationState::Modifying);
        m.resized = true;
        assert_eq!(m.state(at(3)), ModificationState::Optimizing);
        assert_eq!(m.state(at(4)), ModificationState::Completed);
        assert_eq!(m.progress(at(4)), 100);
        m.failed = true;
        assert_eq!(m.state(at(1)), ModificationState::Failed);
    }

    #[test]
    fn held_volume_is_attached_while_shutting_down_then_detaching() {
        let mut state = State::default();
        let now = Instant::now();
        state.terminations.insert(
            "i-1".into(),
            Termination {
                shutting_down_until: now + Duration::from_secs(3),
                release_at: now + Duration::from_secs(20),
            },
        );
        state.volumes.insert(
            "vol-1".into(),
            VolumePhase::Held {
                instance: "i-1".into(),
                device: "/dev/sdf".into(),
            },
        );
        let early = state.volume_view("vol-1", now);
        assert_eq!(
            (early.status, early.attachment),
            (Some("in-use"), Some("attached"))
        );
        let late = state.volume_view("vol-1", now + Duration::from_secs(5));
        assert_eq!(
            (late.status, late.attachment),
            (Some("in-use"), Some("detaching"))
        );
        assert_eq!(state.instance_view("i-1", now), Some(("shutting-down", 32)));
        assert_eq!(
            state.instance_view("i-1", now + Duration::from_secs(5)),
            Some(("terminated", 48))
        );
    }
}
