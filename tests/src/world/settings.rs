//! What a world is made of: its name and the EC2 pacing of its fidelity layer.

use std::time::Duration;

use crate::fidelity::Settings;

/// Fidelity pacing for end-to-end runs: EC2's attach and detach latencies, a short volume
/// release after a termination (EC2 takes minutes; spotinit's wait is the same code either way).
pub fn e2e_settings() -> Settings {
    Settings {
        attach_latency: Duration::from_secs(2),
        detach_latency: Duration::from_secs(1),
        volume_creation: Duration::from_secs(1),
        snapshot_duration: Duration::from_secs(3),
        shutting_down: Duration::from_secs(3),
        release_after_termination: Duration::from_secs(15),
        ..Settings::default()
    }
}

/// What a world is made of.
#[derive(Clone, Debug)]
pub struct WorldSettings {
    /// Names the work directory `build/test-runs/<name>/` (emptied at start).
    pub name: String,
    pub fidelity: Settings,
    /// How long a detach may wait for the guest to let go of the device (the EBS bridge's deadline).
    pub detach_deadline: Duration,
}

impl WorldSettings {
    pub fn new(name: &str) -> WorldSettings {
        WorldSettings {
            name: name.to_owned(),
            fidelity: e2e_settings(),
            detach_deadline: crate::ebs::DEFAULT_DETACH_DEADLINE,
        }
    }
}
