//! EC2's states and spotinit's tag names, as types and constants: read from the API once, in
//! `cloud/`, and compared as variants everywhere else.

use std::fmt;

/// An enum of the states EC2 documents, each with its API string, and `Other` for one it adds
/// later (kept as EC2 said it, so messages still name it).
macro_rules! api_states {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum $name {
            $($variant,)+
            Other(String),
        }

        impl $name {
            /// The API's spelling.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)+
                    $name::Other(s) => s,
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $($text => $name::$variant,)+
                    other => $name::Other(other.to_owned()),
                }
            }
        }

        /// What EC2 did not say: an empty `Other`.
        impl Default for $name {
            fn default() -> Self {
                $name::Other(String::new())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

api_states! {
    /// A volume's state (`VolumeState`).
    VolumeState {
        Creating = "creating",
        Available = "available",
        InUse = "in-use",
        Deleting = "deleting",
        Deleted = "deleted",
        Error = "error",
    }
}

api_states! {
    /// An attachment's state (`VolumeAttachmentState`).
    AttachmentState {
        Attaching = "attaching",
        Attached = "attached",
        Detaching = "detaching",
        Detached = "detached",
        Busy = "busy",
    }
}

api_states! {
    /// An instance's state (`InstanceStateName`).
    InstanceState {
        Pending = "pending",
        Running = "running",
        ShuttingDown = "shutting-down",
        Terminated = "terminated",
        Stopping = "stopping",
        Stopped = "stopped",
    }
}

api_states! {
    /// A snapshot's state (`SnapshotState`).
    SnapshotState {
        Pending = "pending",
        Completed = "completed",
        Error = "error",
        Recoverable = "recoverable",
        Recovering = "recovering",
    }
}

api_states! {
    /// A volume modification's state (`VolumeModificationState`).
    ModificationState {
        Modifying = "modifying",
        Optimizing = "optimizing",
        Completed = "completed",
        Failed = "failed",
    }
}

impl ModificationState {
    /// The volume has its new size and type and may be attached (from `optimizing` on).
    pub fn is_usable(&self) -> bool {
        matches!(
            self,
            ModificationState::Optimizing | ModificationState::Completed
        )
    }
}

impl VolumeState {
    /// On its way out: not a volume to use or to wait for.
    pub fn is_going(&self) -> bool {
        matches!(self, VolumeState::Deleting | VolumeState::Deleted)
    }
}

impl InstanceState {
    /// Running or about to: a holder that may still write to the volume.
    pub fn is_live(&self) -> bool {
        matches!(self, InstanceState::Pending | InstanceState::Running)
    }
}

/// Tag keys spotinit writes: the lineage of the state volume and the snapshots it keeps. The
/// `spotinit:` prefix is refused in `volume.tags`, so users cannot forge them.
pub mod tags {
    pub const CREATED_BY: &str = "spotinit:created-by";
    pub const CREATED_AT: &str = "spotinit:created-at";
    pub const MOVED_FROM: &str = "spotinit:moved-from";
    pub const MOVE_CLAIM: &str = "spotinit:move-claim";
    pub const MOVING: &str = "spotinit:moving";
    pub const SUPERSEDED_BY: &str = "spotinit:superseded-by";
    pub const SUPERSEDED_AT: &str = "spotinit:superseded-at";
    pub const FORMAT: &str = "spotinit:format";
    pub const PURPOSE: &str = "spotinit:purpose";
    pub const VOLUME: &str = "spotinit:volume";
    pub const REASON: &str = "spotinit:reason";
    /// The value of [`PURPOSE`] on the snapshots spotinit takes (and alone may prune).
    pub const PURPOSE_BACKUP: &str = "backup";
    /// `volume.pool`: the pool a volume belongs to, and its slot in it (1, 2, ...).
    pub const POOL: &str = "spotinit:pool";
    pub const SLOT: &str = "spotinit:slot";
    /// spotinit's tags that say which state a volume is, not its history: a copy made by a
    /// zone move carries them, so the state keeps its slot.
    pub const IDENTITY: &[&str] = &[POOL, SLOT];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_and_print_as_the_api_spells_them() {
        for s in [
            "creating",
            "available",
            "in-use",
            "deleting",
            "deleted",
            "error",
        ] {
            assert_eq!(VolumeState::from(s).as_str(), s);
            assert!(
                !matches!(VolumeState::from(s), VolumeState::Other(_)),
                "{s}"
            );
        }
        assert_eq!(VolumeState::from("in-use"), VolumeState::InUse);
        assert_eq!(
            AttachmentState::from("detaching"),
            AttachmentState::Detaching
        );
        assert_eq!(
            InstanceState::from("shutting-down").to_string(),
            "shutting-down"
        );
        // A state EC2 adds later is kept as said.
        let new = SnapshotState::from("archived");
        assert_eq!(new, SnapshotState::Other("archived".into()));
        assert_eq!(new.to_string(), "archived");
        assert!(VolumeState::Deleting.is_going() && !VolumeState::Available.is_going());
        assert!(InstanceState::Pending.is_live() && !InstanceState::Stopped.is_live());
    }
}
