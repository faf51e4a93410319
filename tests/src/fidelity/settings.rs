//! How the simulated EC2 paces its transitions, and the names its messages use.

use std::time::Duration;

use crate::query::DEFAULT_ACCOUNT_ID;

/// How the simulated EC2 paces its transitions. The defaults are in the range real EC2 shows;
/// the release after a termination is much shorter than EC2's minutes so tests stay short.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `attaching` lasts at least this long (the attach hook runs inside it).
    pub attach_latency: Duration,
    /// `detaching` lasts at least this long (the detach hook runs inside it).
    pub detach_latency: Duration,
    /// A new volume is `creating` this long.
    pub volume_creation: Duration,
    /// A new snapshot is `pending` this long, its `progress` rising.
    pub snapshot_duration: Duration,
    /// A terminated instance is `shutting-down` this long, then `terminated`.
    pub shutting_down: Duration,
    /// After a termination, its volumes stay attached this long before they are `available`.
    pub release_after_termination: Duration,
    /// A ModifyVolume is `modifying` this long; the block device has its new size at the end.
    pub modification_modifying: Duration,
    /// Then `optimizing` this long (the volume is usable at its new size), then `completed`.
    pub modification_optimizing: Duration,
    /// How long after a modification started the next one is refused (EC2: six hours).
    pub modification_cooldown: Duration,
    /// The account in ARNs and error messages (moto's default).
    pub account_id: String,
    /// The role named in `UnauthorizedOperation` messages.
    pub role_name: String,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            attach_latency: Duration::from_secs(2),
            detach_latency: Duration::from_secs(1),
            volume_creation: Duration::from_secs(1),
            snapshot_duration: Duration::from_secs(3),
            shutting_down: Duration::from_secs(3),
            release_after_termination: Duration::from_secs(20),
            modification_modifying: Duration::from_secs(2),
            modification_optimizing: Duration::from_secs(4),
            modification_cooldown: Duration::from_secs(6 * 3600),
            account_id: DEFAULT_ACCOUNT_ID.to_string(),
            role_name: crate::imds::DEFAULT_ROLE_NAME.to_string(),
        }
    }
}
