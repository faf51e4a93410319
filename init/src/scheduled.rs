//! EC2's scheduled events of this instance (IMDS `events/maintenance/scheduled`): each new one is
//! reported once, with what it means for the state; before a retirement or a stop, if
//! `spot.drain_before_retirement`, the instance drains and powers off ten minutes ahead, so a
//! replacement (an Auto Scaling group's, or a persistent spot request's) takes the volume first.

use crate::cloud::documents::parse_event_time;
use crate::cloud::ScheduledEvent;
use crate::machine::{Request, Then};
use crate::volume::layout::rfc3339;
use std::collections::HashSet;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// How long before a retirement or a stop the drain starts: a drain takes seconds to a minute,
/// the replacement's boot about as long.
pub const RETIREMENT_LEAD: Duration = Duration::from_secs(600);
/// How often the events are read: EC2 schedules them days ahead.
pub const CHECK_EVERY: Duration = Duration::from_secs(60);

/// The events seen so far, and a drain waiting for its time.
#[derive(Default)]
pub struct ScheduledEvents {
    drain: bool,
    seen: HashSet<String>,
    pending: Option<Pending>,
}

struct Pending {
    drain_at: SystemTime,
    not_before: SystemTime,
    reason: String,
}

impl ScheduledEvents {
    pub fn new(drain_before_retirement: bool) -> Self {
        ScheduledEvents {
            drain: drain_before_retirement,
            ..ScheduledEvents::default()
        }
    }

    /// Takes in the events as read now; returns the console lines for the new ones.
    pub fn note(&mut self, events: &[ScheduledEvent]) -> Vec<String> {
        let mut lines = Vec::new();
        for e in events.iter().filter(|e| e.is_active()) {
            if !self.seen.insert(e.id.clone()) {
                continue;
            }
            let at = parse_event_time(&e.not_before);
            let when = at.map_or_else(|| e.not_before.clone(), rfc3339);
            let consequence = match (e.ends_the_instance(), self.drain, at) {
                (false, _, _) => "the instance keeps its state volume through it".to_string(),
                (true, false, _) => "EC2 will stop or terminate this instance then; set spot.drain_before_retirement = true to drain ahead of it".to_string(),
                (true, true, None) => format!("its time is unreadable ({:?}); not draining ahead of it", e.not_before),
                (true, true, Some(not_before)) => {
                    let drain_at = not_before.checked_sub(RETIREMENT_LEAD).unwrap_or(not_before);
                    let earlier = self.pending.as_ref().is_some_and(|p| p.drain_at <= drain_at);
                    if !earlier {
                        self.pending = Some(Pending {
                            drain_at,
                            not_before,
                            reason: format!("EC2 scheduled {} at {when} ({})", e.code, e.id),
                        });
                    }
                    format!("draining and powering off at {} (spot.drain_before_retirement)", rfc3339(drain_at))
                }
            };
            let description = if e.description.is_empty() {
                String::new()
            } else {
                format!(" ({})", e.description)
            };
            lines.push(format!(
                "ec2: scheduled event {} {}{description} at {when}: {consequence}",
                e.code, e.id
            ));
        }
        lines
    }

    /// The drain, once its time has come (once).
    pub fn due(&mut self, now: SystemTime) -> Option<Request> {
        if self.pending.as_ref()?.drain_at > now {
            return None;
        }
        let p = self.pending.take()?;
        // At most RETIREMENT_LEAD away once due.
        let left = p.not_before.duration_since(now).unwrap_or_default();
        Some(Request::new(p.reason, Then::PowerOff).with_deadline(Instant::now() + left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::layout::parse_rfc3339;

    fn event(id: &str, code: &str, at: &str, state: &str) -> ScheduledEvent {
        ScheduledEvent {
            id: id.into(),
            code: code.into(),
            description: "scheduled".into(),
            state: state.into(),
            not_before: at.into(),
        }
    }

    #[test]
    fn each_event_is_reported_once_and_a_retirement_drains_ten_minutes_ahead() {
        let mut s = ScheduledEvents::new(true);
        let reboot = event("e-1", "system-reboot", "21 Jan 2030 09:00:00 GMT", "active");
        let retire = event(
            "e-2",
            "instance-retirement",
            "21 Jan 2030 10:00:00 GMT",
            "active",
        );
        let canceled = event(
            "e-3",
            "instance-stop",
            "21 Jan 2030 08:00:00 GMT",
            "canceled",
        );
        let lines = s.note(&[reboot.clone(), retire.clone(), canceled]);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(
            lines[0],
            "ec2: scheduled event system-reboot e-1 (scheduled) at 2030-01-21T09:00:00Z: the instance keeps its state volume through it"
        );
        assert!(
            lines[1].ends_with(
                "draining and powering off at 2030-01-21T09:50:00Z (spot.drain_before_retirement)"
            ),
            "{}",
            lines[1]
        );
        assert!(s.note(&[reboot, retire]).is_empty(), "reported once");

        let t = |s: &str| parse_rfc3339(s).unwrap();
        assert!(s.due(t("2030-01-21T09:49:59Z")).is_none());
        let req = s.due(t("2030-01-21T09:50:00Z")).expect("the drain is due");
        assert_eq!(req.then, Then::PowerOff);
        assert!(
            req.reason
                .contains("instance-retirement at 2030-01-21T10:00:00Z"),
            "{}",
            req.reason
        );
        assert!(s.due(t("2030-01-21T09:55:00Z")).is_none(), "once");
    }

    #[test]
    fn without_the_setting_a_retirement_is_only_reported() {
        let mut s = ScheduledEvents::new(false);
        let lines = s.note(&[event(
            "e-9",
            "instance-stop",
            "1 Feb 2030 00:00:00 GMT",
            "active",
        )]);
        assert!(
            lines[0].contains("set spot.drain_before_retirement = true"),
            "{}",
            lines[0]
        );
        assert!(s
            .due(SystemTime::now() + Duration::from_secs(100 * 365 * 86400))
            .is_none());
    }
}
