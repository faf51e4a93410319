//! What a campaign runs: the kinds of runs, and the moments a hard kill strikes.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Kill,
    Graceful,
    Race,
    Move,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Kill, Kind::Graceful, Kind::Race, Kind::Move];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Kill => "hard kill",
            Kind::Graceful => "spot notice",
            Kind::Race => "race",
            Kind::Move => "zone move",
        }
    }

    /// The world's directory and the lineages' Name tags.
    pub fn slug(self) -> &'static str {
        match self {
            Kind::Kill => "kills",
            Kind::Graceful => "graceful",
            Kind::Race => "races",
            Kind::Move => "moves",
        }
    }
}

/// When a hard kill strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    BeforeAttach,
    Attaching,
    FirstMkfs,
    Fsck,
    UnderWrites,
    MidDrain,
}

impl Moment {
    pub const CYCLE: [Moment; 6] = [
        Moment::BeforeAttach,
        Moment::Attaching,
        Moment::FirstMkfs,
        Moment::Fsck,
        Moment::UnderWrites,
        Moment::MidDrain,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Moment::BeforeAttach => "before attach",
            Moment::Attaching => "while attaching",
            Moment::FirstMkfs => "first mkfs",
            Moment::Fsck => "during fsck",
            Moment::UnderWrites => "under writes",
            Moment::MidDrain => "mid-drain",
        }
    }

    /// The moments that hit a booting instance rather than the holder.
    pub fn in_boot(self) -> bool {
        !matches!(self, Moment::UnderWrites | Moment::MidDrain)
    }

    /// The victim's console line to kill on (boot moments).
    pub fn is_marker(self, text: &str) -> bool {
        match self {
            Moment::BeforeAttach => {
                text.contains("spotinit: volume: found ")
                    || text.contains("spotinit: volume: using ")
            }
            Moment::Attaching => text.contains("spotinit: volume: attaching "),
            Moment::FirstMkfs => text.contains("creating ext4"),
            Moment::Fsck => text.contains("; checking it"),
            Moment::UnderWrites | Moment::MidDrain => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::tests::TAKEOVER;

    #[test]
    fn boot_moments_match_their_lines_only() {
        let found = "spotinit: volume: found vol-1 tagged Name=x in us-east-1 (us-east-1a, 1 GiB gp3, available)";
        assert!(Moment::BeforeAttach.is_marker(found));
        assert!(!Moment::Attaching.is_marker(found));
        assert!(Moment::Attaching.is_marker("spotinit: volume: attaching vol-1 to i-1 as /dev/sdf"));
        assert!(Moment::Fsck.is_marker(TAKEOVER[0]));
        assert!(!Moment::UnderWrites.is_marker(TAKEOVER[0]));
    }
}
