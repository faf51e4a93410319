//! The state volume: find or create it, follow it across zones, own it exclusively, find its
//! disk, prepare the filesystem, mount it where Docker expects it, and give it back at shutdown.
//!
//! [`VolumePhase`] is what the boot sees; [`ebs::EbsVolume`] is the real one. Every failure is a
//! [`VolumeError`] that names the step, the volume and what the user can do, and says whether
//! trying again could help. None of them lets Docker start (see [`verify_docker_state`]).

pub mod attach;
pub mod device;
pub mod ebs;
pub mod fs;
pub mod layout;
mod lineage;
pub mod modify;
pub mod pivot;
pub mod pool;
pub mod select;
mod zone_move;

use crate::cloud::CloudError;
use crate::console::human;
use crate::sys::{Paths, SysError};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// The volume, mounted and bound into place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mounted {
    pub volume_id: String,
    pub device: PathBuf,
    pub record: layout::Record,
    /// The volume's place in its pool (`volume.pool`), which the host takes as its identity.
    pub slot: Option<Slot>,
}

/// A pool volume's identity: its pool and slot number. Whichever instance holds the volume is
/// that host: `<pool>-<number>` (or `<hostname>-<number>`), /run/spotinit/slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub pool: String,
    pub number: u32,
}

impl Slot {
    /// The host's name in this slot: the configured hostname (its first label), else the
    /// pool's name, with `-<number>`; a label stays within DNS's 63 characters.
    pub fn host_name(&self, configured: Option<&str>) -> String {
        let base = configured.unwrap_or(&self.pool);
        let (first, rest) = base
            .split_once('.')
            .map_or((base, None), |(f, r)| (f, Some(r)));
        let suffix = format!("-{}", self.number);
        let keep = first.len().min(63 - suffix.len());
        let label = format!("{}{suffix}", first[..keep].trim_end_matches('-'));
        match rest {
            Some(rest) => format!("{label}.{rest}"),
            None => label,
        }
    }
}

/// The boot's view of the volume phase.
pub trait VolumePhase: Send {
    /// Own the volume and mount it. May be called again after a retryable failure: it picks up
    /// where the last try stopped.
    fn acquire(&mut self) -> impl Future<Output = Result<Mounted, VolumeError>> + Send;
    /// After Docker stopped: mark the shutdown clean, unmount, detach. Safe to call when the
    /// acquire got only part of the way (or nowhere).
    fn release(&mut self) -> impl Future<Output = Result<(), VolumeError>> + Send;
    /// Before the drain stops every process: lets work that must not be cut off (a first mkfs,
    /// an fsck) finish, until `deadline`.
    fn finish_critical(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> impl Future<Output = crate::critical::Finished> + Send;
}

/// The step that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Select,
    Create,
    Move,
    Modify,
    Attach,
    Device,
    Probe,
    Format,
    Check,
    Mount,
    Record,
    Grow,
    Unmount,
    Detach,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Select => "find",
            Step::Create => "create",
            Step::Move => "move to this zone",
            Step::Modify => "modify",
            Step::Attach => "attach",
            Step::Device => "find its disk",
            Step::Probe => "read its disk",
            Step::Format => "format",
            Step::Check => "check its filesystem",
            Step::Mount => "mount",
            Step::Record => "check its record",
            Step::Grow => "grow its filesystem",
            Step::Unmount => "unmount",
            Step::Detach => "detach",
        })
    }
}

/// Why the state volume is not ready. Display gives the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// An EC2 call failed (after retries where retrying made sense).
    Api {
        step: Step,
        #[source]
        err: CloudError,
    },
    /// No such volume, or none tagged so and creation is off.
    NotFound { what: String, fix: String },
    /// Several volumes match the tags.
    Ambiguous { what: String, found: Vec<String> },
    /// No volume of the pool is free for this instance, and it may not create one.
    PoolFull {
        pool: String,
        /// Why no new volume: the pool is full, or creation is off.
        why_not_new: String,
        /// The pool's volumes and who holds them.
        held: Vec<String>,
        waited: Duration,
    },
    /// The volume is in another zone and following it is off.
    WrongZone {
        volume: String,
        zone: String,
        ours: String,
    },
    /// A live instance holds the volume.
    HeldByRunning {
        volume: String,
        holder: String,
        state: crate::cloud::InstanceState,
    },
    /// A dead instance still holds it after the release wait, and force-detach is off.
    NotReleased {
        volume: String,
        holder: String,
        state: crate::cloud::InstanceState,
        waited: Duration,
    },
    /// A wait ran past its deadline.
    Timeout {
        step: Step,
        volume: String,
        detail: String,
    },
    /// The disk did not appear, or could not be read.
    Device {
        volume: String,
        source: device::DeviceError,
    },
    /// The disk holds something that is not a filesystem we may use.
    ForeignData {
        volume: String,
        device: String,
        found: String,
    },
    /// e2fsck left errors.
    Fsck {
        volume: String,
        device: String,
        source: fs::FsError,
    },
    /// A command (mkfs, resize2fs) failed.
    Command {
        step: Step,
        volume: String,
        source: fs::FsError,
    },
    /// Persisted-root mode: copying the image's root onto the volume failed.
    Seed {
        volume: String,
        source: pivot::PivotError,
    },
    /// The kernel's device events could not be listened to (before the first attach).
    DeviceEvents(#[source] std::io::Error),
    /// A mount or unmount failed.
    Sys {
        step: Step,
        volume: String,
        #[source]
        err: SysError,
    },
    /// An ext4 filesystem with data but no spotinit record: not knowingly Docker's state.
    NoRecord { volume: String },
    /// The record names another Docker storage driver than configured.
    DriverMismatch {
        volume: String,
        recorded: String,
        configured: String,
    },
    /// The record is unreadable or belongs to another volume.
    Record {
        volume: String,
        source: layout::RecordError,
    },
    /// The `superseded-by` chain from a volume does not end at a volume that holds the state.
    Lineage { volume: String, detail: String },
    /// The volume was superseded (moved to another zone) after this instance chose it.
    Superseded { volume: String, by: String },
    /// A live instance is moving the volume into its zone.
    BeingMoved {
        volume: String,
        by: String,
        zone: String,
        since: String,
    },
    /// This instance's move lost a race to another instance's copy; its own copy was dropped.
    MoveLost {
        volume: String,
        copy: String,
        winner: String,
    },
    /// The source was taken by another instance while this one copied it; the copy was dropped.
    MoveAbandoned {
        volume: String,
        copy: String,
        why: String,
    },
    /// Something still holds the volume's filesystem read-write at shutdown: not detached.
    StillMounted {
        volume: String,
        /// What holds it, and that making it read-only failed.
        why: String,
        source: layout::ReadOnlyError,
    },
    /// The volume once held Docker state, and that state is not where it belongs.
    StateMissing {
        volume: String,
        missing: Vec<String>,
        lost_found: usize,
        boots: u64,
    },
}

impl VolumeError {
    /// Could trying again (after a while) succeed?
    pub fn retryable(&self) -> bool {
        match self {
            VolumeError::Api { err, .. } => {
                err.is_retryable()
                    || matches!(
                        err.kind,
                        crate::cloud::ErrorKind::InUse | crate::cloud::ErrorKind::IncorrectState
                    )
            }
            VolumeError::HeldByRunning { .. }
            | VolumeError::PoolFull { .. }
            | VolumeError::NotReleased { .. }
            | VolumeError::Timeout { .. }
            | VolumeError::Device { .. }
            | VolumeError::Superseded { .. }
            | VolumeError::BeingMoved { .. }
            | VolumeError::MoveLost { .. }
            | VolumeError::MoveAbandoned { .. } => true,
            _ => false,
        }
    }
}

impl fmt::Display for VolumeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VolumeError::Api { step, err } => write!(f, "cannot {step} the state volume: {err}"),
            VolumeError::NotFound { what, fix } => write!(f, "{what}. {fix}"),
            VolumeError::Ambiguous { what, found } => write!(
                f,
                "{what} matches {} volumes: {}. Keep one (delete or re-tag the others) or set volume.id",
                found.len(),
                found.join("; ")
            ),
            VolumeError::PoolFull { pool, why_not_new, held, waited } => write!(
                f,
                "no volume of pool {pool} is free for this instance{} ({}), and {why_not_new}. This instance will not run Docker without a state of its own: it takes a volume once an instance of the pool lets go of one; to run more instances at once, raise volume.pool_max",
                if waited.is_zero() {
                    String::new()
                } else {
                    format!(" after waiting {}", human(*waited))
                },
                if held.is_empty() {
                    "it has none".to_string()
                } else {
                    held.join("; ")
                }
            ),
            VolumeError::WrongZone { volume, zone, ours } => write!(
                f,
                "state volume {volume} is in {zone} but this instance is in {ours}. Launch in {zone}, or set volume.follow_across_zones = true to move it here through a snapshot"
            ),
            VolumeError::HeldByRunning { volume, holder, state } => write!(
                f,
                "state volume {volume} is attached to instance {holder}, which is {state}: another live instance owns this state, so this one will not share it. Stop or terminate {holder}; this instance takes the volume once EC2 releases it"
            ),
            VolumeError::NotReleased { volume, holder, state, waited } => write!(
                f,
                "state volume {volume} is still attached to instance {holder} ({state}) after waiting {}. EC2 usually releases it within minutes; set volume.force_detach = true to force it (the filesystem then gets a full check)",
                human(*waited)
            ),
            VolumeError::Timeout { step, volume, detail } => {
                write!(f, "cannot {step} state volume {volume}: {detail}")
            }
            VolumeError::Device { volume, source } => write!(
                f,
                "state volume {volume} is attached but its disk is not usable: {source}"
            ),
            VolumeError::ForeignData { volume, device, found } => write!(
                f,
                "state volume {volume} ({device}) holds {found}, not an ext4 filesystem. spotinit never formats a volume that holds anything: point volume.id/volume.tags at the right volume, or wipe this one yourself if its content is not needed"
            ),
            VolumeError::Fsck { volume, device, source } => write!(
                f,
                "the filesystem of state volume {volume} ({device}) needs repair: {source}. Attach it to another instance and run e2fsck -f on it"
            ),
            VolumeError::Command { step, volume, source } => {
                write!(f, "cannot {step} state volume {volume}: {source}")
            }
            VolumeError::DeviceEvents(e) => {
                write!(f, "cannot listen for kernel device events: {e}")
            }
            VolumeError::Seed { volume, source } => {
                write!(f, "cannot {} state volume {volume}: {source}", Step::Mount)
            }
            VolumeError::Sys { step, volume, err } => {
                write!(f, "cannot {step} state volume {volume}: {err}")
            }
            VolumeError::NoRecord { volume } => write!(
                f,
                "state volume {volume} has an ext4 filesystem with data but no spotinit record ({}), so it is not known to be this host's Docker state. If it is (for example Docker data from a manual setup), move that data into a directory named docker/ on it and create the record as the README explains",
                layout::RECORD
            ),
            VolumeError::DriverMismatch { volume, recorded, configured } => write!(
                f,
                "state volume {volume} holds Docker state made with the {recorded} storage driver, but docker.storage_driver is {configured}: Docker would not see the existing containers and images. Set docker.storage_driver = \"{recorded}\", or migrate (README: changing the storage driver)"
            ),
            VolumeError::Record { volume, source } => {
                write!(f, "state volume {volume}: {source}")
            }
            VolumeError::Lineage { volume, detail } => write!(
                f,
                "cannot tell which volume holds the state that began on {volume}: {detail}. Find the volume with the latest state and set volume.id to it (or tag only that one)"
            ),
            VolumeError::Superseded { volume, by } => write!(
                f,
                "state volume {volume} was moved to {by} while this instance took it; letting it go to follow the state to {by}"
            ),
            VolumeError::BeingMoved { volume, by, zone, since } => write!(
                f,
                "state volume {volume} is being moved into {zone} by instance {by} (since {since}); this instance will not use it meanwhile and looks again"
            ),
            VolumeError::MoveLost { volume, copy, winner } => write!(
                f,
                "another instance moved state volume {volume} at the same time; its copy {winner} continues the state, so this instance's copy {copy} was dropped (never used). Looking again"
            ),
            VolumeError::MoveAbandoned { volume, copy, why } => write!(
                f,
                "gave up moving state volume {volume}: {why}. The copy {copy} was dropped (never used); {volume} keeps the state"
            ),
            VolumeError::StillMounted { volume, why, source } => write!(
                f,
                "state volume {volume} is still mounted read-write ({why}: {source}), so it is not detached: detaching a live filesystem could tear it. EC2 releases it when this instance is gone, and the next instance replays its journal"
            ),
            VolumeError::StateMissing { volume, missing, lost_found, boots } => {
                write!(
                    f,
                    "state volume {volume} has held Docker state ({boots} boots by its record), but {} missing",
                    if missing.len() == 1 {
                        format!("{} is", missing[0])
                    } else {
                        format!("{} are", missing.join(" and "))
                    }
                )?;
                if *lost_found > 0 {
                    write!(
                        f,
                        "; lost+found/ holds {lost_found} entries (an fsck may have put it there)"
                    )?;
                }
                write!(
                    f,
                    ". Docker must not start on an empty directory in its place. Attach the volume to another instance, put the state back (from lost+found/, a snapshot or a backup), or point volume.id/volume.tags at the right volume"
                )
            }
        }
    }
}

/// Why Docker must not start on what is mounted: the golden rule does not hold.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{} is not mounted", .0.display())]
    NotMounted(PathBuf),
    #[error("the state volume is not mounted")]
    VolumeNotMounted,
    #[error("no root in mountinfo")]
    NoRoot,
    /// `target` is `mount`, not the volume's `dir/`.
    #[error("{} is {} {} from device {}, not {dir}/ of the state volume (device {volume_device})", target.display(), mount.fstype, mount.root, mount.device)]
    NotOnVolume {
        target: PathBuf,
        mount: Box<crate::sys::MountInfo>,
        dir: &'static str,
        volume_device: String,
    },
    #[error(transparent)]
    Record(#[from] layout::RecordError),
    #[error("the state volume has no record")]
    NoRecord,
    #[error("the record on the mounted volume (volume {volume}, instance {instance}) is not the one this boot wrote (volume {ours}, instance {our_instance})")]
    NotThisBoot {
        volume: String,
        instance: String,
        ours: String,
        our_instance: String,
    },
    #[error("the record says storage driver {recorded}, the configuration {configured}")]
    Driver {
        recorded: String,
        configured: String,
    },
}

/// The golden rule, checked in one place right before containerd starts: /var/lib/docker and
/// /var/lib/containerd are bind mounts of the state volume's directories, and the volume's
/// record is the one this boot wrote. Anything else and Docker does not start.
pub fn verify_docker_state(
    paths: &Paths,
    m: &Mounted,
    storage_driver: &str,
) -> Result<(), StateError> {
    let mounts = crate::sys::mounts(paths);
    let volume_mount = paths.p(layout::VOLUME_MOUNT);
    let vol = mounts
        .iter()
        .rev()
        .find(|i| i.mount_point == volume_mount)
        .ok_or(StateError::NotMounted(volume_mount.clone()))?;
    for (dir, target) in layout::BINDS {
        let target = paths.p(target);
        let bound = mounts
            .iter()
            .rev()
            .find(|i| i.mount_point == target)
            .ok_or_else(|| StateError::NotMounted(target.clone()))?;
        if bound.device != vol.device || bound.root != format!("/{dir}") {
            return Err(StateError::NotOnVolume {
                target,
                mount: Box::new(bound.clone()),
                dir,
                volume_device: vol.device.clone(),
            });
        }
    }
    check_record(paths, m, storage_driver)
}

/// The golden rule for persisted-root mode: "/" is `rootfs/` of the state volume (so
/// /var/lib/docker is on it) and the record is the one this boot wrote.
pub fn verify_persisted_root(
    paths: &Paths,
    m: &Mounted,
    storage_driver: &str,
) -> Result<(), StateError> {
    let mounts = crate::sys::mounts(paths);
    let vol = mounts
        .iter()
        .rev()
        .find(|i| i.mount_point == paths.p(layout::VOLUME_MOUNT))
        .ok_or(StateError::VolumeNotMounted)?;
    let root = mounts
        .iter()
        .rev()
        .find(|i| i.mount_point == paths.p("/"))
        .ok_or(StateError::NoRoot)?;
    if root.device != vol.device || root.root != format!("/{}", pivot::ROOTFS) {
        return Err(StateError::NotOnVolume {
            target: "/".into(),
            mount: Box::new(root.clone()),
            dir: pivot::ROOTFS,
            volume_device: vol.device.clone(),
        });
    }
    check_record(paths, m, storage_driver)
}

/// The record on the mounted volume is the one this boot wrote, with the configured driver.
fn check_record(paths: &Paths, m: &Mounted, storage_driver: &str) -> Result<(), StateError> {
    let record = layout::read_record(paths)?.ok_or(StateError::NoRecord)?;
    if record.volume_id != m.volume_id || record.last_instance != m.record.last_instance {
        return Err(StateError::NotThisBoot {
            volume: record.volume_id,
            instance: record.last_instance,
            ours: m.volume_id.clone(),
            our_instance: m.record.last_instance.clone(),
        });
    }
    if record.storage_driver != storage_driver {
        return Err(StateError::Driver {
            recorded: record.storage_driver,
            configured: storage_driver.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[path = "mod_tests.rs"]
mod tests;
