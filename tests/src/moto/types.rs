//! What the typed helpers return: volumes, their attachments, instances and snapshots, as the
//! Describe* answers show them.

use std::collections::BTreeMap;

/// One EBS volume, as DescribeVolumes shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    pub id: String,
    pub zone: String,
    /// `creating`, `available`, `in-use`, `deleting`, ...
    pub state: String,
    pub size_gib: u64,
    pub snapshot_id: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub attachments: Vec<VolumeAttachment>,
}

/// One attachment of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeAttachment {
    pub instance_id: String,
    pub device: String,
    /// `attaching`, `attached`, `detaching`, `busy`.
    pub state: String,
    /// As EC2 writes it, e.g. `2026-11-26T03:38:40.000Z`.
    pub attach_time: Option<String>,
}

/// One instance, as DescribeInstances shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub zone: String,
    /// `pending`, `running`, `shutting-down`, `terminated`, `stopping`, `stopped`.
    pub state: String,
    pub state_code: u32,
    pub private_ip: Option<String>,
    /// The device names of its block device mapping (root device included).
    pub devices: Vec<String>,
}

/// One snapshot, as DescribeSnapshots shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub volume_id: String,
    /// `pending`, `completed`, `error`.
    pub state: String,
    /// E.g. `40%`.
    pub progress: String,
    pub owner_id: String,
    pub tags: BTreeMap<String, String>,
}
