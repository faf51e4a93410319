//! The real volume phase on EBS, step by step: select → modify → attach → confirm → disk →
//! filesystem → mount → record. Progress is kept in the struct, so a retry resumes and a release
//! after a partial acquire undoes exactly what was done.
//!
//! The struct and its progress are here; `phase` runs the steps in order (acquire, release),
//! `modify` brings the volume to the configured size and type, `disk` finds the disk and
//! prepares its filesystem, `mount` mounts it and keeps the record, `put_away` unmounts what
//! lives on it before the detach.

mod claim;
mod disk;
mod modify;
mod mount;
mod phase;
mod put_away;

use super::device::DeviceWatcher;
use super::{Mounted, Slot};
use crate::cloud::{Ec2, Identity, VolumeInfo};
use crate::config;
use crate::critical::Critical;
use crate::sys::{Paths, System};
use std::path::PathBuf;
use std::sync::Arc;

pub struct EbsVolume<E: Ec2, S: System> {
    ec2: Arc<E>,
    sys: Arc<S>,
    paths: Paths,
    cfg: config::Volume,
    storage_driver: String,
    me: Identity,
    devices: DeviceWatcher,
    critical: Critical,
    /// `volume.pool`: how long to wait for one of the pool's volumes to be free (the
    /// configured `live_holder_wait_secs`; in a pool no one volume's holder is waited for).
    pool_wait: std::time::Duration,
    // Progress.
    volume_id: Option<String>,
    /// The volume as EC2 last described it: its tags say how it may be formatted.
    info: Option<VolumeInfo>,
    created: bool,
    /// The pool volume's slot, once this instance holds it.
    slot: Option<Slot>,
    /// Brought to the configured size and type (or left as it is, with a warning).
    modified: bool,
    attach_requested: bool,
    /// The pool's claim attached the volume in this try: the attach step has nothing to do.
    attached_by_claim: bool,
    /// Read again after attaching: still the state's current home, no live move claim.
    confirmed: bool,
    needs_full_check: bool,
    device: Option<PathBuf>,
    /// What we mounted, in order (the volume, then the binds).
    mounts: Vec<PathBuf>,
    mounted: Option<Mounted>,
}

impl<E: Ec2, S: System> EbsVolume<E, S> {
    /// `devices` must be open before the first attach so the disk's arrival is seen.
    pub fn new(
        ec2: Arc<E>,
        sys: Arc<S>,
        paths: Paths,
        cfg: config::Volume,
        storage_driver: String,
        me: Identity,
        devices: DeviceWatcher,
    ) -> Self {
        let mut cfg = cfg;
        let pool_wait = std::time::Duration::from_secs(cfg.live_holder_wait_secs);
        if cfg.pool.is_some() {
            // A pool volume held by a live instance is that instance's: take another.
            cfg.live_holder_wait_secs = 0;
        }
        EbsVolume {
            ec2,
            sys,
            paths,
            cfg,
            storage_driver,
            me,
            devices,
            critical: Critical::default(),
            pool_wait,
            volume_id: None,
            info: None,
            created: false,
            slot: None,
            modified: false,
            attach_requested: false,
            attached_by_claim: false,
            confirmed: false,
            needs_full_check: false,
            device: None,
            mounts: Vec::new(),
            mounted: None,
        }
    }

    pub fn volume_id(&self) -> Option<&str> {
        self.volume_id.as_deref()
    }

    fn vol(&self) -> String {
        self.volume_id
            .clone()
            .unwrap_or_else(|| "(none yet)".into())
    }

    fn mode(&self) -> String {
        config::variant_name(&self.cfg.mode)
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}
