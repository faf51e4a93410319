//! What a console says: a boot's volume story, the mounts it made, its outcome.

use std::time::{Duration, Instant};

use spotworld::qemu::ConsoleLine;
use spotworld::world::{SimInstance, BOOT_FAILED_MARKER, READY_MARKER};

use crate::Outcome;

/// One boot's volume story, from its console.
#[derive(Debug, Default)]
pub struct BootFacts {
    /// `volume: record: boot N` printed before the volume was mounted.
    pub record: Option<u64>,
    /// The volume in `volume: <id> mounted` (the record was written durably before it).
    pub mounted: Option<String>,
    pub formatted: bool,
    pub ready: bool,
    pub docker_started: bool,
}

impl BootFacts {
    pub fn of(i: &SimInstance) -> BootFacts {
        BootFacts::from_lines(&i.console().lines())
    }

    fn from_lines(lines: &[ConsoleLine]) -> BootFacts {
        let mut f = BootFacts::default();
        for l in lines {
            let t = &l.text;
            if let Some(n) = t
                .split("spotinit: volume: record: boot ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
            {
                f.record.get_or_insert(n);
            } else if let Some(v) = mounted_volume(t) {
                f.mounted.get_or_insert(v);
            } else if t.contains("creating ext4") {
                f.formatted = true;
            } else if t.contains(READY_MARKER) {
                f.ready = true;
            } else if t.contains("spotinit: phase containerd") {
                f.docker_started = true;
            }
        }
        f
    }

    /// The boot count this instance wrote to the state: its record line's, or 1 for a new
    /// record; `None` if it never mounted the volume.
    pub fn wrote_boot(&self) -> Option<u64> {
        self.mounted.as_ref().map(|_| self.record.unwrap_or(1))
    }
}

/// `vol-…` from spotinit's `volume: <id> mounted; …` line.
pub fn mounted_volume(text: &str) -> Option<String> {
    let rest = text.split("spotinit: volume: ").nth(1)?;
    let (id, _) = rest.split_once(" mounted; ")?;
    id.starts_with("vol-").then(|| id.to_owned())
}

/// A console line after which the guest no longer has the volume mounted read-write.
pub fn ends_mount(text: &str) -> bool {
    text.contains("spotinit: volume: unmounted in ")
        || text.contains("so it is detached consistent")
        || text.contains("spotinit: powering off")
        || text.contains("spotinit: rebooting")
}

/// A volume mounted in one guest, in host time.
pub struct Mount {
    pub volume: String,
    pub instance: String,
    pub from: Instant,
    pub until: Option<Instant>,
}

impl Mount {
    pub fn overlaps(&self, other: &Mount, now: Instant) -> bool {
        self.from < other.until.unwrap_or(now) && other.from < self.until.unwrap_or(now)
    }
}

pub fn spotinit_text(l: &ConsoleLine) -> &str {
    l.text.split("spotinit: ").nth(1).unwrap_or(&l.text)
}

/// The last line spotinit printed about its volume (where a kill found the victim).
pub fn last_volume_line(i: &SimInstance) -> String {
    i.console()
        .lines()
        .iter()
        .rev()
        .find(|l| l.text.contains("spotinit: volume: "))
        .map(|l| spotinit_text(l).to_owned())
        .unwrap_or_else(|| "(no volume line)".into())
}

/// Ready, or the boot failure, whichever comes first.
pub async fn outcome(i: &SimInstance, deadline: Duration) -> Outcome<ConsoleLine> {
    i.console()
        .wait_until(
            "ready or BOOT FAILED",
            |t| t.contains(READY_MARKER) || t.contains(BOOT_FAILED_MARKER),
            deadline,
        )
        .await
        .map_err(|x| format!("{} ({}): {x}", i.name, i.id))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn lines(texts: &[&str]) -> Vec<ConsoleLine> {
        texts
            .iter()
            .enumerate()
            .map(|(k, t)| ConsoleLine {
                at: Duration::from_secs(k as u64),
                text: (*t).to_owned(),
            })
            .collect()
    }

    // Lines as the image prints them (campaign and e2e consoles).
    pub(crate) const TAKEOVER: &[&str] = &[
        "[   9.367] spotinit: volume: vol-06523948ffa0ae8aa has ext4 'spotinit-state' (1.0 GiB of 1.0 GiB); checking it",
        "[   9.497] spotinit: volume: record: boot 3 of this state, last on i-4686f9990136fd41f (clean shutdown), created by i-463f62f71126d08f7 at 2026-11-29T22:13:54Z",
        "[   9.579] spotinit: volume: vol-06523948ffa0ae8aa mounted; /var/lib/docker and /var/lib/containerd are on it",
        "[  13.327] spotinit: phase containerd: done in 2.07 s",
        "[  21.857] spotinit: ready in 21.86 s since power-on (spotinit's part 19.13 s, its CPU time 180 ms, its memory 9644 kB)",
        "[  23.038] spotinit: volume: unmounted in 34 ms",
    ];

    #[test]
    fn a_takeover_reads_as_boot_three_mounted_and_ready() {
        let f = BootFacts::from_lines(&lines(TAKEOVER));
        assert_eq!(f.record, Some(3));
        assert_eq!(f.mounted.as_deref(), Some("vol-06523948ffa0ae8aa"));
        assert!(f.ready && f.docker_started && !f.formatted);
        assert_eq!(f.wrote_boot(), Some(3));
    }

    #[test]
    fn a_first_boot_writes_boot_one_and_a_killed_mkfs_writes_nothing() {
        let first = BootFacts::from_lines(&lines(&[
            "[  12.761] spotinit: volume: vol-53029a3764494151c is empty (1.0 GiB: first and last MiB all zeros, created by this boot); creating ext4 labelled spotinit-state",
            "[  13.025] spotinit: volume: vol-53029a3764494151c mounted; /var/lib/docker and /var/lib/containerd are on it",
        ]));
        assert!(first.formatted);
        assert_eq!(first.record, None);
        assert_eq!(first.wrote_boot(), Some(1));
        let killed = BootFacts::from_lines(&lines(&[
            "[  11.148] spotinit: volume: vol-c1d8d8b9a79185c24 is empty (1.0 GiB: first and last MiB all zeros, created by this boot); creating ext4 labelled spotinit-state",
        ]));
        assert_eq!(killed.wrote_boot(), None);
    }

    #[test]
    fn mount_lines_and_their_ends() {
        assert_eq!(
            mounted_volume(TAKEOVER[2]).as_deref(),
            Some("vol-06523948ffa0ae8aa")
        );
        assert_eq!(mounted_volume(TAKEOVER[0]), None);
        assert!(ends_mount(TAKEOVER[5]));
        assert!(ends_mount("[  34.230] spotinit: powering off"));
        // Docker's leftovers go first; the volume itself is unmounted later.
        assert!(!ends_mount(
            "spotinit: volume: unmounted 2 mounts left on the state volume: /var/lib/docker/leftover (tmpfs)"
        ));
    }

    #[test]
    fn intervals_overlap_only_when_they_share_an_instant() {
        let t = Instant::now();
        let m = |from: u64, until: Option<u64>| Mount {
            volume: "vol-1".into(),
            instance: "i".into(),
            from: t + Duration::from_secs(from),
            until: until.map(|u| t + Duration::from_secs(u)),
        };
        let now = t + Duration::from_secs(100);
        assert!(!m(0, Some(10)).overlaps(&m(10, None), now));
        assert!(m(0, Some(11)).overlaps(&m(10, Some(20)), now));
        assert!(m(0, None).overlaps(&m(50, Some(60)), now));
    }
}
