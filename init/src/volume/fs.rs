//! What is on the volume, and making it usable: the signature probe, mkfs only on a blank
//! volume, fsck, and growing the filesystem when the volume was enlarged.
//!
//! The probe reads the first and last MiB. A volume is *blank* only when both are all zeros (a
//! fresh EBS volume reads as zeros). Anything else that is not ext2/3/4 is refused by name, or
//! as unknown data: spotinit never formats a volume that holds anything.

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

/// mkfs.ext4 with a label. Lazy inode-table and journal init keep it fast on large volumes.
pub async fn mkfs<S: System + ?Sized>(sys: &S, device: &Path, label: &str) -> Result<(), String> {
    let cmd = CommandSpec::new("/usr/sbin/mkfs.ext4").args([
        "-q",
        "-L",
        label,
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1",
        &device.to_string_lossy(),
    ]);
    crate::sys::run(sys, &cmd).await
}

/// e2fsck's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsck {
    Clean,
    Repaired,
}

/// `e2fsck -p` (journal replay and the repairs that need no human), `-f` for a full check.
/// Exit 0 clean, 1 and 2 repaired; 4 and above mean errors it would not fix alone.
pub async fn fsck<S: System + ?Sized>(sys: &S, device: &Path, full: bool) -> Result<Fsck, String> {
    let mut cmd = CommandSpec::new("/usr/sbin/e2fsck").arg("-p");
    if full {
        cmd = cmd.arg("-f");
    }
    let cmd = cmd.arg(device.to_string_lossy());
    match run_code(sys, &cmd).await? {
        0 => Ok(Fsck::Clean),
        1 | 2 => Ok(Fsck::Repaired),
        code => Err(format!(
            "e2fsck -p found errors it cannot repair on its own (exit status {code})"
        )),
    }
}

/// Grows a mounted ext4 to fill its device (online resize).
pub async fn grow<S: System + ?Sized>(sys: &S, device: &Path) -> Result<(), String> {
    let cmd = CommandSpec::new("/usr/sbin/resize2fs").arg(device.to_string_lossy());
    crate::sys::run(sys, &cmd).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext4_head(label: &str, blocks: u32, recover: bool) -> Vec<u8> {
        let mut h = vec![0u8; 1 << 20];
        let sb = 1024;
        h[sb + 4..sb + 8].copy_from_slice(&blocks.to_le_bytes());
        h[sb + 24..sb + 28].copy_from_slice(&2u32.to_le_bytes()); // 4096-byte blocks
        h[sb + 56] = 0x53;
        h[sb + 57] = 0xef;
        let incompat: u32 = 0x2 | if recover { 0x4 } else { 0 };
        h[sb + 96..sb + 100].copy_from_slice(&incompat.to_le_bytes());
        h[sb + 120..sb + 120 + label.len()].copy_from_slice(label.as_bytes());
        h
    }

    #[test]
    fn zeros_are_blank() {
        let z = vec![0u8; 1 << 20];
        assert_eq!(classify(&z, &z), Content::Blank);
    }

    #[test]
    fn data_anywhere_probed_is_not_blank() {
        let z = vec![0u8; 1 << 20];
        let mut t = z.clone();
        t[777] = 1;
        assert_eq!(classify(&z, &t), Content::Unknown);
        assert_eq!(classify(&t, &z), Content::Unknown);
    }

    #[test]
    fn ext4_superblock_is_read() {
        let h = ext4_head("spotinit-state", 262144, true);
        match classify(&h, &[]) {
            Content::Ext4(i) => {
                assert_eq!(i.label, "spotinit-state");
                assert_eq!(i.size_bytes(), 1 << 30);
                assert!(i.needs_recovery);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn foreign_signatures_are_named() {
        let mut h = vec![0u8; 1 << 20];
        h[0..4].copy_from_slice(b"XFSB");
        assert_eq!(classify(&h, &[]), Content::Other("xfs"));
        let mut h = vec![0u8; 1 << 20];
        h[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(classify(&h, &[]), Content::Other("GPT partition table"));
        let mut h = vec![0u8; 1 << 20];
        h[65536 + 64..65536 + 72].copy_from_slice(b"_BHRfS_M");
        assert_eq!(classify(&h, &[]), Content::Other("btrfs"));
        let mut h = vec![0u8; 1 << 20];
        h[0..6].copy_from_slice(b"LUKS\xba\xbe");
        assert_eq!(classify(&h, &[]), Content::Other("LUKS encryption"));
    }

    #[test]
    fn probe_reads_a_file_device() {
        let p = std::env::temp_dir().join(format!("spotinit-probe-{}", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        drop(f);
        assert_eq!(probe(&p).unwrap(), (8 << 20, Content::Blank));
        // A byte in the last MiB makes it unknown data.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.seek(SeekFrom::Start((8 << 20) - 10)).unwrap();
        f.write_all(b"x").unwrap();
        assert_eq!(probe(&p).unwrap().1, Content::Unknown);
        std::fs::remove_file(&p).unwrap();
    }
}
