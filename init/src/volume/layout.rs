//! The state volume's layout and its mounts. The volume is mounted once at
//! `/run/spotinit/volume`; its `docker/` and `containerd/` directories are bind-mounted over
//! `/var/lib/docker` and `/var/lib/containerd` before either daemon starts (a mount below
//! /var/lib/docker made after dockerd started is lost to it). A small record,
//! `.spotinit/record.toml`, says whose state this is and how the last shutdown went.

use crate::sys::{MountSpec, MsFlags, Paths, SysError, System};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const VOLUME_MOUNT: &str = "/run/spotinit/volume";
pub const RECORD: &str = ".spotinit/record.toml";
pub const RECORD_FORMAT: u32 = 1;

/// Directories on the volume and where they are bound.
pub const BINDS: [(&str, &str); 2] = [
    ("docker", "/var/lib/docker"),
    ("containerd", "/var/lib/containerd"),
];

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    pub format: u32,
    pub volume_id: String,
    pub storage_driver: String,
    pub created_by: String,
    pub created_at: String,
    pub last_instance: String,
    pub last_boot_at: String,
    pub boot_count: u64,
    pub clean_shutdown: bool,
    pub last_shutdown_at: String,
    /// `docker` or `persisted-root`: where on the volume the state lives (empty in records
    /// written before spotinit kept it).
    pub mode: String,
}

pub fn record_path(paths: &Paths) -> PathBuf {
    paths.p(VOLUME_MOUNT).join(RECORD)
}

/// Why the record cannot be read or written, or does not fit this boot.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{} is damaged: {}", path.display(), source.message())]
    Damaged {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Serialize(#[source] toml::ser::Error),
    #[error("it holds state of volume.mode = \"{recorded}\", but volume.mode is \"{configured}\": the state would not be where that mode looks. Set volume.mode = \"{recorded}\"")]
    Mode {
        recorded: String,
        configured: String,
    },
    #[error("cannot create the state directories: {0}")]
    StateDirs(#[source] std::io::Error),
}

/// The record's text as a [`Record`]; the error's `message()` says what is wrong with it.
/// Missing keys take their defaults: records written by older versions lack the newer keys.
pub fn parse_record(text: &str) -> Result<Record, toml::de::Error> {
    toml::from_str(text)
}

pub fn read_record(paths: &Paths) -> Result<Option<Record>, RecordError> {
    let path = record_path(paths);
    match std::fs::read_to_string(&path) {
        Ok(t) => parse_record(&t)
            .map(Some)
            .map_err(|e| RecordError::Damaged {
                path,
                source: Box::new(e),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RecordError::Read { path, source }),
    }
}

/// Writes the record durably: temp file, fsync, rename, fsync the directory.
pub fn write_record(paths: &Paths, r: &Record) -> Result<(), RecordError> {
    let p = record_path(paths);
    let dir = p.parent().unwrap_or(Path::new("/"));
    let tmp = dir.join("record.toml.tmp");
    let text = toml::to_string(r).map_err(RecordError::Serialize)?;
    let io = |source| RecordError::Write {
        path: p.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &p).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

/// Why the volume's filesystem could not be made read-only.
#[derive(Debug, thiserror::Error)]
pub enum ReadOnlyError {
    #[error(transparent)]
    Remount(#[from] SysError),
    #[error("{} is still read-write after remounting {} read-only", volume_mount.display(), target.display())]
    StillWritable {
        volume_mount: PathBuf,
        target: PathBuf,
    },
}

/// True when a filesystem root holds nothing but an empty `lost+found` (a fresh mkfs). A
/// `lost+found` with entries is what an fsck leaves of lost files: not empty.
pub fn is_empty_fs(root: &Path) -> bool {
    std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten().all(|e| {
                (e.file_name() == "lost+found" && lost_found_entries(root) == 0)
                    || e.file_name() == ".spotinit"
            })
        })
        .unwrap_or(false)
}

/// How many entries the filesystem's `lost+found` holds.
pub fn lost_found_entries(root: &Path) -> usize {
    std::fs::read_dir(root.join("lost+found"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

/// The directories on the volume that hold the state in `mode` (docker, persisted-root).
pub fn state_dirs(mode: &str) -> &'static [&'static str] {
    if mode == "persisted-root" {
        &[super::pivot::ROOTFS]
    } else {
        &["docker", "containerd"]
    }
}

/// Creates the state directories on a new state's volume, durably, before its first record:
/// from then on a record always means they existed.
pub fn create_state_dirs(paths: &Paths, mode: &str) -> std::io::Result<()> {
    let vol = paths.p(VOLUME_MOUNT);
    if mode != "persisted-root" {
        for dir in state_dirs(mode) {
            std::fs::create_dir_all(vol.join(dir))?;
        }
    }
    std::fs::File::open(&vol)?.sync_all()
}

/// Which of the state directories are missing on the mounted volume.
pub fn missing_state_dirs(paths: &Paths, mode: &str) -> Vec<String> {
    let vol = paths.p(VOLUME_MOUNT);
    state_dirs(mode)
        .iter()
        .filter(|d| !vol.join(d).is_dir())
        .map(|d| format!("{d}/"))
        .collect()
}

/// Everything that lives on the state volume: every mount of its filesystem (`device`,
/// major:minor), everything mounted below where it or its directories are mounted (container
/// overlays, their shm and netns mounts, anything a container left), and overlays made of
/// directories on it. Deepest first, so each can be unmounted in this order.
pub fn mounts_on_volume(
    all: &[crate::sys::MountInfo],
    paths: &Paths,
    device: &str,
) -> Vec<crate::sys::MountInfo> {
    let roots: Vec<PathBuf> = std::iter::once(VOLUME_MOUNT)
        .chain(BINDS.iter().map(|(_, t)| *t))
        .map(|p| paths.p(p))
        .collect();
    let under = |p: &Path| roots.iter().any(|r| p.starts_with(r));
    let mut on: Vec<(usize, crate::sys::MountInfo)> = all
        .iter()
        .enumerate()
        .filter(|(_, m)| {
            m.device == device || under(&m.mount_point) || m.overlay_dirs().iter().any(|d| under(d))
        })
        .map(|(i, m)| (i, m.clone()))
        .collect();
    on.sort_by(|(ia, a), (ib, b)| {
        let depth = |m: &crate::sys::MountInfo| m.mount_point.components().count();
        depth(b).cmp(&depth(a)).then(ib.cmp(ia))
    });
    on.into_iter().map(|(_, m)| m).collect()
}

/// Mounts the volume's filesystem at [`VOLUME_MOUNT`].
pub fn mount_volume<S: System + ?Sized>(
    sys: &S,
    paths: &Paths,
    device: &Path,
) -> Result<PathBuf, SysError> {
    let target = paths.p(VOLUME_MOUNT);
    std::fs::create_dir_all(&target)
        .map_err(|e| SysError::io("mkdir", target.display().to_string(), &e))?;
    sys.mount(&MountSpec::fs(
        "ext4",
        &device.to_string_lossy(),
        target.clone(),
        MsFlags::MS_NOATIME,
        "",
    ))?;
    Ok(target)
}

/// Binds the volume's state directories into place (they exist: the record says so). Returns
/// the bind targets.
pub fn bind_state_dirs<S: System + ?Sized>(
    sys: &S,
    paths: &Paths,
) -> Result<Vec<PathBuf>, SysError> {
    let vol = paths.p(VOLUME_MOUNT);
    let mut done = Vec::new();
    for (dir, target) in BINDS {
        let src = vol.join(dir);
        let dst = paths.p(target);
        std::fs::create_dir_all(&dst)
            .map_err(|e| SysError::io("mkdir", dst.display().to_string(), &e))?;
        sys.mount(&MountSpec::bind(src, dst.clone()))?;
        done.push(dst);
    }
    Ok(done)
}

/// RFC 3339 UTC time, without a date crate.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (fractions allowed) into a SystemTime.
pub fn parse_rfc3339(s: &str) -> Option<std::time::SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (h, mi, se) = (n(11..13)?, n(14..16)?, n(17..19)?);
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = if mo > 2 { mo - 3 } else { mo + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86400 + h * 3600 + mi * 60 + se;
    u64::try_from(secs)
        .ok()
        .map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn time_round_trips() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_694_400); // 2026-11-26T12:00:00Z
        assert_eq!(rfc3339(t), "2026-11-26T12:00:00Z");
        assert_eq!(parse_rfc3339("2026-11-26T12:00:00Z"), Some(t));
        assert_eq!(parse_rfc3339("2026-11-26T12:00:00.000Z"), Some(t));
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    fn mi(line: &str) -> crate::sys::MountInfo {
        crate::sys::parse_mountinfo(line).remove(0)
    }

    #[test]
    fn everything_on_the_volume_deepest_first() {
        let all = [
            mi("22 1 259:2 / / ro - erofs /dev/nvme0n1p2 ro"),
            mi("30 22 0:25 / /run rw - tmpfs tmpfs rw"),
            mi("40 30 259:5 / /run/spotinit/volume rw - ext4 /dev/nvme1n1 rw"),
            mi("41 22 259:5 /docker /var/lib/docker rw - ext4 /dev/nvme1n1 rw"),
            mi("42 22 259:5 /containerd /var/lib/containerd rw - ext4 /dev/nvme1n1 rw"),
            mi("50 41 0:60 / /var/lib/docker/overlay2/abc/merged rw - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/A,upperdir=/var/lib/docker/overlay2/abc/diff,workdir=/var/lib/docker/overlay2/abc/work"),
            mi("51 41 0:61 / /var/lib/docker/containers/abc/mounts/shm rw - tmpfs shm rw"),
            mi("52 30 0:4 net:[4026532] /run/docker/netns/abc rw - nsfs nsfs rw"),
            mi("53 30 0:62 / /run/containerd/io.containerd.runtime.v2.task/moby/abc/rootfs rw - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/A,upperdir=/var/lib/docker/overlay2/abc/diff,workdir=/var/lib/docker/overlay2/abc/work"),
            mi("54 22 259:5 /docker/volumes /mnt/elsewhere rw - ext4 /dev/nvme1n1 rw"),
        ];
        let on = mounts_on_volume(&all, &Paths::real(), "259:5");
        let points: Vec<String> = on
            .iter()
            .map(|m| m.mount_point.display().to_string())
            .collect();
        assert_eq!(
            points,
            [
                "/var/lib/docker/containers/abc/mounts/shm",
                "/run/containerd/io.containerd.runtime.v2.task/moby/abc/rootfs",
                "/var/lib/docker/overlay2/abc/merged",
                "/var/lib/containerd",
                "/var/lib/docker",
                "/run/spotinit/volume",
                "/mnt/elsewhere",
            ]
        );
    }

    #[test]
    fn lost_and_found_with_entries_is_not_empty() {
        let root = std::env::temp_dir().join(format!("spotinit-lf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("lost+found")).unwrap();
        assert!(is_empty_fs(&root));
        std::fs::write(root.join("lost+found/#12"), "x").unwrap();
        assert!(!is_empty_fs(&root));
        assert_eq!(lost_found_entries(&root), 1);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn record_parses_as_written_and_as_older_versions_wrote_it() {
        let r = Record {
            format: RECORD_FORMAT,
            volume_id: "vol-0123456789abcdef0".into(),
            boot_count: 7,
            clean_shutdown: true,
            mode: "docker".into(),
            ..Record::default()
        };
        assert_eq!(parse_record(&toml::to_string(&r).unwrap()), Ok(r));
        let old = parse_record("format = 1\nvolume_id = \"vol-1\"\n").unwrap();
        assert_eq!((old.volume_id.as_str(), old.mode.as_str()), ("vol-1", ""));
        assert!(parse_record("boot_count = -1\n").is_err());
        assert!(parse_record("format = [").is_err());
    }

    #[test]
    fn record_round_trips_durably() {
        let root = std::env::temp_dir().join(format!("spotinit-rec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let paths = Paths::under(&root);
        assert_eq!(read_record(&paths).unwrap(), None);
        let r = Record {
            format: RECORD_FORMAT,
            volume_id: "vol-1".into(),
            storage_driver: "overlay2".into(),
            boot_count: 3,
            ..Record::default()
        };
        write_record(&paths, &r).unwrap();
        assert_eq!(read_record(&paths).unwrap(), Some(r));
        std::fs::write(record_path(&paths), "format = [").unwrap();
        let e = read_record(&paths).unwrap_err();
        let toml = parse_record("format = [").unwrap_err();
        let toml_message = toml.message();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is damaged: {toml_message}",
                record_path(&paths).display()
            )
        );
        assert_eq!(e.source().unwrap().to_string(), toml.to_string());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_unreadable_record_keeps_the_io_error_down_to_the_volume_error() {
        let root = std::env::temp_dir().join(format!("spotinit-recdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let paths = Paths::under(&root);
        std::fs::create_dir_all(record_path(&paths)).unwrap();
        let e = crate::volume::VolumeError::Record {
            volume: "vol-1".into(),
            source: read_record(&paths).unwrap_err(),
        };
        let eisdir = std::io::Error::from_raw_os_error(libc::EISDIR);
        assert_eq!(
            e.to_string(),
            format!(
                "state volume vol-1: cannot read {}: {eisdir}",
                record_path(&paths).display()
            )
        );
        let io = std::iter::successors(Some(&e as &(dyn Error + 'static)), |err| (*err).source())
            .find_map(|err| err.downcast_ref::<std::io::Error>());
        assert_eq!(io.and_then(|e| e.raw_os_error()), Some(libc::EISDIR));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn record_errors_say_what_they_said_before() {
        let mode = RecordError::Mode {
            recorded: "persisted-root".into(),
            configured: "docker".into(),
        };
        assert_eq!(
            mode.to_string(),
            "it holds state of volume.mode = \"persisted-root\", but volume.mode is \"docker\": the state would not be where that mode looks. Set volume.mode = \"persisted-root\""
        );
        let dirs = RecordError::StateDirs(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(
            dirs.to_string(),
            format!(
                "cannot create the state directories: {}",
                std::io::Error::from_raw_os_error(libc::ENOSPC)
            )
        );
        let ro = ReadOnlyError::StillWritable {
            volume_mount: VOLUME_MOUNT.into(),
            target: "/".into(),
        };
        assert_eq!(
            ro.to_string(),
            "/run/spotinit/volume is still read-write after remounting / read-only"
        );
    }
}
