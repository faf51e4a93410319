//! Unit tests of the filesystem probe and preparation: blank detection, the ext4 superblock, foreign signatures, and the sampled probe.

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

fn file_with(name: &str, size: u64, writes: &[(u64, &[u8])]) -> std::path::PathBuf {
    use std::io::Write;
    let p = std::env::temp_dir().join(format!("spotinit-{name}-{}", std::process::id()));
    let mut f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    for (off, data) in writes {
        f.seek(SeekFrom::Start(*off)).unwrap();
        f.write_all(data).unwrap();
    }
    p
}

const NEW: Origin = Origin {
    created_by_this_boot: true,
    unfinished_first_format: false,
};
const FOUND: Origin = Origin {
    created_by_this_boot: false,
    unfinished_first_format: false,
};
const UNFINISHED: Origin = Origin {
    created_by_this_boot: false,
    unfinished_first_format: true,
};

#[test]
fn backup_superblocks_are_where_mke2fs_puts_them() {
    let offs = backup_superblock_offsets(1 << 30);
    // 4 KiB blocks: group 1 at block 32768, group 3 at 98304, group 5, 7 (1 GiB = 8 groups).
    for block in [32768u64, 98304, 163840, 229376] {
        assert!(offs.contains(&(block * 4096, block, 4096)), "{block}");
    }
    // 1 KiB blocks: group 1 starts at block 8193.
    assert!(offs.contains(&(8193 * 1024, 8193, 1024)));
    assert!(offs.iter().all(|(o, _, _)| *o < 1 << 30));
}

#[test]
fn only_a_volume_created_blank_or_an_unfinished_first_format_skips_the_sample() {
    let never = || -> std::io::Result<Sample> { panic!("no sample needed") };
    let z = vec![0u8; 1 << 20];
    let blank = classify(&z, &z);
    assert!(matches!(
        decide(&blank, NEW, never).unwrap(),
        Decision::Format(_)
    ));
    assert!(matches!(
        decide(&Content::Unknown, UNFINISHED, never).unwrap(),
        Decision::Format(_)
    ));
    assert!(matches!(
        decide(&Content::Other("xfs"), UNFINISHED, never).unwrap(),
        Decision::Refuse(_)
    ));
    assert!(matches!(
        decide(&Content::Unknown, NEW, never).unwrap(),
        Decision::Refuse(_)
    ));
    // A found volume that is blank where the probe looks is sampled, and refused on data.
    let d = decide(&blank, FOUND, || Ok(Sample::Data { offset: 77 << 20 })).unwrap();
    assert!(
        matches!(&d, Decision::Refuse(r) if r.contains("data at byte 80740352")),
        "{d:?}"
    );
    let d = decide(&blank, FOUND, || {
        Ok(Sample::BackupSuperblock {
            block: 32768,
            block_size: 4096,
        })
    })
    .unwrap();
    assert!(
        matches!(&d, Decision::Refuse(r) if r.contains("primary superblock is gone")),
        "{d:?}"
    );
    let d = decide(&blank, FOUND, || {
        Ok(Sample::Zeros {
            regions: 9,
            bytes: 36864,
        })
    })
    .unwrap();
    assert!(matches!(d, Decision::Format(_)));
}

#[test]
fn the_sample_finds_an_ext4_whose_head_was_zeroed_and_data_at_an_offset() {
    let size = 1u64 << 30;
    // The magic of a backup superblock at group 1 (4 KiB blocks), as mke2fs leaves it.
    let p = file_with("bsb", size, &[(32768 * 4096 + 56, &[0x53, 0xef])]);
    assert_eq!(
        sample(&p).unwrap(),
        Sample::BackupSuperblock {
            block: 32768,
            block_size: 4096
        }
    );
    std::fs::remove_file(&p).unwrap();
    // A byte in the middle of the device, where no superblock lives.
    let off = 300 * (1u64 << 20) + 12345;
    let step = size / SPREAD_REGIONS;
    let region_start = off / step * step;
    let p = file_with("mid", size, &[(region_start + 100, b"x")]);
    assert_eq!(
        sample(&p).unwrap(),
        Sample::Data {
            offset: region_start + 100
        }
    );
    std::fs::remove_file(&p).unwrap();
    let p = file_with("zeros", size, &[]);
    assert!(matches!(sample(&p).unwrap(), Sample::Zeros { regions, .. } if regions > 1000));
    std::fs::remove_file(&p).unwrap();
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

#[test]
fn fs_errors_name_the_command_and_keep_its_cause() {
    use std::error::Error;
    let e = FsError::Unrepairable { code: 4 };
    assert_eq!(
        e.to_string(),
        "e2fsck -p found errors it cannot repair on its own (exit status 4)"
    );
    let e = FsError::from(crate::sys::CommandError::Start {
        command: "/usr/sbin/resize2fs /dev/nvme1n1".into(),
        source: crate::sys::SysError::new("exec", "/usr/sbin/resize2fs", nix::errno::Errno::ENOENT),
    });
    assert_eq!(
        e.to_string(),
        "cannot start /usr/sbin/resize2fs /dev/nvme1n1: exec /usr/sbin/resize2fs: No such file or directory"
    );
    assert!(e.source().unwrap().is::<crate::sys::SysError>());
}
