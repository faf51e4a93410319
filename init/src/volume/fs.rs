//! What is on the volume, and making it usable: the signature probe, mkfs only on a volume that
//! is provably empty, fsck, and growing the filesystem when the volume was enlarged.
//!
//! The probe reads the first and last MiB. Zeros there are not proof of an empty volume (an ext4
//! whose head was overwritten, a filesystem at an offset): [`decide`] formats without more only a
//! volume this boot created from nothing, or one whose only writer ever was an unfinished first
//! `mkfs` of spotinit's (the volume's `spotinit:format` tag says so). Any other volume is
//! formatted only when [`sample`] — every place an ext4 keeps a backup superblock, and many
//! regions spread over the whole device — reads zeros too. Anything else is refused by name:
//! spotinit never formats a volume that holds anything.

use crate::sys::{run_code, CommandSpec, System};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const PROBE_BYTES: u64 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// All zeros where any filesystem, partition table or volume manager keeps its header.
    Blank,
    Ext4(Ext4Info),
    /// A known signature of something we do not use.
    Other(&'static str),
    /// Non-zero data without a signature we know.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ext4Info {
    pub label: String,
    pub block_size: u64,
    pub blocks: u64,
    /// The journal has transactions to replay (the last unmount was not clean).
    pub needs_recovery: bool,
}

impl Ext4Info {
    pub fn size_bytes(&self) -> u64 {
        self.block_size * self.blocks
    }
}

/// The device's size and what is on it.
pub fn probe(device: &Path) -> std::io::Result<(u64, Content)> {
    let mut f = std::fs::File::open(device)?;
    let size = f.seek(SeekFrom::End(0))?;
    let head_len = PROBE_BYTES.min(size);
    let mut head = vec![0u8; head_len as usize];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut head)?;
    let tail_start = size.saturating_sub(PROBE_BYTES).max(head_len);
    let mut tail = vec![0u8; (size - tail_start) as usize];
    f.seek(SeekFrom::Start(tail_start))?;
    f.read_exact(&mut tail)?;
    Ok((size, classify(&head, &tail)))
}

fn at(buf: &[u8], off: usize, magic: &[u8]) -> bool {
    buf.get(off..off + magic.len()) == Some(magic)
}

/// Classifies the first (`head`) and last (`tail`) bytes of a device.
pub fn classify(head: &[u8], tail: &[u8]) -> Content {
    if let Some(info) = ext4(head) {
        return Content::Ext4(info);
    }
    let signatures: &[(&'static str, usize, &[u8])] = &[
        ("xfs", 0, b"XFSB"),
        ("LUKS encryption", 0, b"LUKS\xba\xbe"),
        ("squashfs", 0, b"hsqs"),
        ("ntfs", 3, b"NTFS    "),
        ("GPT partition table", 512, b"EFI PART"),
        ("LVM physical volume", 512 + 24, b"LVM2 001"),
        ("LVM physical volume", 512, b"LABELONE"),
        ("erofs", 1024, &[0xe2, 0xe1, 0xf5, 0xe0]),
        ("linux swap", 4086, b"SWAPSPACE2"),
        ("linux raid (md 1.2)", 4096, &[0xfc, 0x4e, 0x2b, 0xa9]),
        ("bcache", 4096 + 24, &[0xc6, 0x85, 0x73, 0xf6]),
        ("iso9660", 32769, b"CD001"),
        ("btrfs", 65536 + 64, b"_BHRfS_M"),
        ("zfs", 128 * 1024, &[0x0c, 0xb1, 0xba, 0x00]),
        ("vfat", 82, b"FAT32"),
        ("vfat", 54, b"FAT1"),
    ];
    for (name, off, magic) in signatures {
        if at(head, *off, magic) {
            return Content::Other(name);
        }
    }
    if at(head, 510, &[0x55, 0xaa]) {
        return Content::Other("MBR partition table");
    }
    if head.iter().chain(tail).all(|b| *b == 0) {
        Content::Blank
    } else {
        Content::Unknown
    }
}

/// The ext2/3/4 superblock at byte 1024.
fn ext4(head: &[u8]) -> Option<Ext4Info> {
    let sb = head.get(1024..1024 + 1024)?;
    if sb[56..58] != [0x53, 0xef] {
        return None;
    }
    let le32 = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]) as u64;
    let log_block = le32(24);
    let incompat = le32(96);
    const INCOMPAT_64BIT: u64 = 0x80;
    const INCOMPAT_RECOVER: u64 = 0x4;
    let mut blocks = le32(4);
    if incompat & INCOMPAT_64BIT != 0 {
        blocks |= le32(0x150) << 32;
    }
    let label_raw = &sb[120..136];
    let end = label_raw.iter().position(|b| *b == 0).unwrap_or(16);
    Some(Ext4Info {
        label: String::from_utf8_lossy(&label_raw[..end]).into_owned(),
        block_size: 1024u64 << log_block.min(6),
        blocks,
        needs_recovery: incompat & INCOMPAT_RECOVER != 0,
    })
}

/// What a wider look at a device found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sample {
    /// Every sampled region reads zeros.
    Zeros { regions: usize, bytes: u64 },
    /// An ext2/3/4 backup superblock: the filesystem is there, its primary superblock is gone.
    BackupSuperblock { block: u64, block_size: u64 },
    /// Non-zero data at this byte offset.
    Data { offset: u64 },
}

/// Regions spread evenly over the device, besides the superblock locations.
const SPREAD_REGIONS: u64 = 1024;
const REGION_BYTES: usize = 4096;

/// Byte offsets where an ext2/3/4 filesystem keeps backup superblocks, for every block size
/// mke2fs uses: the start of groups 1 and the powers of 3, 5 and 7 (sparse_super), and the
/// second and last group (sparse_super2). A group holds 8 × block_size blocks.
pub fn backup_superblock_offsets(size: u64) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for block_size in [1024u64, 2048, 4096, 65536] {
        let group_bytes = 8 * block_size * block_size;
        let groups = size / group_bytes;
        let mut g = std::collections::BTreeSet::from([1u64, groups.saturating_sub(1)]);
        for base in [3u64, 5, 7] {
            let mut p = base;
            while p < groups {
                g.insert(p);
                p = p.saturating_mul(base);
            }
        }
        for group in g.into_iter().filter(|g| *g >= 1 && *g < groups) {
            // With 1 KiB blocks the first group starts at block 1 (block 0 is the boot block).
            let first_block = group * 8 * block_size + u64::from(block_size == 1024);
            out.push((first_block * block_size, first_block, block_size));
        }
    }
    out
}

/// Reads every ext4 backup-superblock location and [`SPREAD_REGIONS`] regions spread over the
/// device (a few MiB in all): the proof an unknown volume needs before it may be formatted.
pub fn sample(device: &Path) -> std::io::Result<Sample> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(device)?;
    // A block device's metadata says 0 bytes: its size is where its end is.
    let size = (&f).seek(SeekFrom::End(0))?;
    let mut buf = vec![0u8; REGION_BYTES];
    let mut regions = 0;
    let read = |offset: u64, buf: &mut [u8]| -> std::io::Result<usize> {
        let n = (size.saturating_sub(offset)).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], offset)?;
        Ok(n)
    };
    for (offset, block, block_size) in backup_superblock_offsets(size) {
        let n = read(offset, &mut buf)?;
        regions += 1;
        if n >= 1024 && buf[56..58] == [0x53, 0xef] {
            return Ok(Sample::BackupSuperblock { block, block_size });
        }
        if let Some(i) = buf[..n].iter().position(|b| *b != 0) {
            return Ok(Sample::Data {
                offset: offset + i as u64,
            });
        }
    }
    let step = (size / SPREAD_REGIONS).max(REGION_BYTES as u64);
    let mut offset = 0;
    while offset < size {
        let n = read(offset, &mut buf)?;
        regions += 1;
        if let Some(i) = buf[..n].iter().position(|b| *b != 0) {
            return Ok(Sample::Data {
                offset: offset + i as u64,
            });
        }
        offset += step;
    }
    Ok(Sample::Zeros {
        regions,
        bytes: regions as u64 * REGION_BYTES as u64,
    })
}

/// Where a volume came from, as far as formatting it is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// This boot created it from nothing (no snapshot): it was zeros when it arrived.
    pub created_by_this_boot: bool,
    /// spotinit created it from nothing and began its first mkfs, which never finished: nothing
    /// but that mkfs ever wrote to it (the `spotinit:format` tag).
    pub unfinished_first_format: bool,
}

/// What to do with the volume's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Make a new filesystem; the reason, for the console.
    Format(String),
    /// Check the ext4 that is there.
    Check(Ext4Info),
    /// Leave it alone: what was found, for the error.
    Refuse(String),
}

/// Formats only what is provably empty (module docs). `sample` runs only when it is needed.
pub fn decide(
    content: &Content,
    origin: Origin,
    sample: impl FnOnce() -> std::io::Result<Sample>,
) -> std::io::Result<Decision> {
    Ok(match content {
        Content::Ext4(info) => Decision::Check(info.clone()),
        Content::Blank if origin.created_by_this_boot => Decision::Format(
            "first and last MiB all zeros, created by this boot".into(),
        ),
        Content::Blank | Content::Unknown if origin.unfinished_first_format => Decision::Format(
            "its first format by spotinit never finished (spotinit:format tag); nothing else ever wrote to it".into(),
        ),
        Content::Blank => match sample()? {
            Sample::Zeros { regions, bytes } => Decision::Format(format!(
                "all zeros in the first and last MiB, at every ext4 backup-superblock location and in {regions} regions spread over it ({} KiB read)",
                bytes / 1024
            )),
            Sample::BackupSuperblock { block, block_size } => Decision::Refuse(format!(
                "an ext4 filesystem whose primary superblock is gone (a backup superblock is at block {block}, block size {block_size}; e2fsck -b {block} -B {block_size} may recover it)"
            )),
            Sample::Data { offset } => Decision::Refuse(format!(
                "data at byte {offset}, although its first and last MiB are zeros (a filesystem at an offset, or one whose start was overwritten)"
            )),
        },
        Content::Other(what) => Decision::Refuse(format!("a {what} signature")),
        Content::Unknown => {
            Decision::Refuse("data without any signature spotinit knows".into())
        }
    })
}

/// mkfs.ext4 with a label. Lazy inode-table and journal init keep it fast on large volumes;
/// `nodiscard` because a new EBS volume reads as zeros already, and a discard is the one thing
/// that would make a mistake unrecoverable.
pub async fn mkfs<S: System + ?Sized>(sys: &S, device: &Path, label: &str) -> Result<(), FsError> {
    let cmd = CommandSpec::new("/usr/sbin/mkfs.ext4").args([
        "-q",
        "-L",
        label,
        "-E",
        "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
        &device.to_string_lossy(),
    ]);
    Ok(crate::sys::run(sys, &cmd).await?)
}

/// Why mkfs, e2fsck or resize2fs did not do their work.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Command(#[from] crate::sys::CommandError),
    #[error("e2fsck -p found errors it cannot repair on its own (exit status {code})")]
    Unrepairable { code: i32 },
}

/// e2fsck's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsck {
    Clean,
    Repaired,
}

/// `e2fsck -p` (journal replay and the repairs that need no human), `-f` for a full check.
/// Exit 0 clean, 1 and 2 repaired; 4 and above mean errors it would not fix alone.
pub async fn fsck<S: System + ?Sized>(sys: &S, device: &Path, full: bool) -> Result<Fsck, FsError> {
    let mut cmd = CommandSpec::new("/usr/sbin/e2fsck").arg("-p");
    if full {
        cmd = cmd.arg("-f");
    }
    let cmd = cmd.arg(device.to_string_lossy());
    match run_code(sys, &cmd).await? {
        0 => Ok(Fsck::Clean),
        1 | 2 => Ok(Fsck::Repaired),
        code => Err(FsError::Unrepairable { code }),
    }
}

/// Grows a mounted ext4 to fill its device (online resize).
pub async fn grow<S: System + ?Sized>(sys: &S, device: &Path) -> Result<(), FsError> {
    let cmd = CommandSpec::new("/usr/sbin/resize2fs").arg(device.to_string_lossy());
    Ok(crate::sys::run(sys, &cmd).await?)
}

#[cfg(test)]
#[path = "fs_tests.rs"]
mod tests;
