//! The filesystem and mount steps with real system calls and real tools, as root: loop devices
//! (util-linux `losetup`), e2fsprogs, `mount(2)` through [`Linux`]. Each test re-executes
//! itself under `unshare --mount --propagation private`, so nothing it mounts is seen by the
//! host; the outer half releases any loop device the inner half left and fails if a mount
//! leaked. Without root or a needed tool each test prints `SKIPPED <test>: <why>` and passes.
//!
//! Paths are rooted in a sandbox ([`Paths::under`]) with `proc` linked to the real /proc, so
//! spotinit reads the real mountinfo of the namespace.

use crate::common::{
    create_tagged, fast, find_program, has_cap, mount_at, mounts_under, notice, privileged, sh,
    sparse_file, vcfg, write_at, InstanceParts, Loop, Ns, Plug, Spy, World,
};
use spotinit::cloud::ec2::Ec2Client;
use spotinit::config;
use spotinit::host;
use spotinit::machine::{BootState, Machine, Mode, Request, Then};
use spotinit::run::Aws;
use spotinit::shutdown::drain;
use spotinit::sys::{Linux, MountSpec, MsFlags, Paths, System};
use spotinit::volume::ebs::EbsVolume;
use spotinit::volume::fs::{self, Content, Fsck};
use spotinit::volume::layout::{self, Record, BINDS, RECORD_FORMAT, VOLUME_MOUNT};
use spotinit::volume::{verify_docker_state, Mounted, VolumeError, VolumePhase};
use spotworld::imds::ImdsMock;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// What every loop-device test needs: spotinit runs e2fsprogs by absolute path.
const LOOP_TOOLS: [&str; 5] = [
    "/dev/loop-control",
    "losetup",
    "/usr/sbin/mkfs.ext4",
    "/usr/sbin/e2fsck",
    "/usr/sbin/resize2fs",
];

fn needs(extra: &[&'static str]) -> Vec<&'static str> {
    LOOP_TOOLS.iter().chain(extra).copied().collect()
}

/// A sandbox root whose /proc is the real one (so mountinfo is the namespace's).
fn sandbox_root(dir: &Path) -> (PathBuf, Paths) {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::os::unix::fs::symlink("/proc", root.join("proc")).unwrap();
    (root.clone(), Paths::under(root))
}

/// Size of the mounted filesystem at `path`, from statvfs.
fn fs_bytes(path: &Path) -> u64 {
    let s = rustix::fs::statvfs(path).unwrap();
    s.f_blocks * s.f_frsize
}

/// "major:minor" of a block device node, as mountinfo shows it.
fn dev_numbers(dev: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(dev).unwrap().rdev();
    format!("{}:{}", libc::major(rdev), libc::minor(rdev))
}

/// Puts an XFS filesystem on `target` with mkfs.xfs if the host has it, else just the XFS
/// superblock magic (which is what the probe and blkid go by).
async fn make_xfs(target: &Path) {
    if find_program("mkfs.xfs") {
        sh(&format!("mkfs.xfs -q -f '{}'", target.display()))
            .await
            .unwrap();
    } else {
        eprintln!("mkfs.xfs is not installed: writing an XFS superblock magic instead");
        let mut sb = vec![0u8; 4096];
        sb[..4].copy_from_slice(b"XFSB");
        sb[4..8].copy_from_slice(&4096u32.to_be_bytes()); // block size
        write_at(target, 0, &sb);
    }
}

fn ext4_of(device: &Path) -> (u64, fs::Ext4Info) {
    match fs::probe(device).unwrap() {
        (size, Content::Ext4(info)) => (size, info),
        other => panic!("{} is not ext4: {other:?}", device.display()),
    }
}

#[test]
fn loop_device_probe_mkfs_fsck_and_foreign_signatures() {
    privileged(
        "loop_device_probe_mkfs_fsck_and_foreign_signatures",
        Ns::Mount,
        &needs(&["debugfs", "blkid"]),
        Duration::from_secs(120),
        |dir| async move {
            let img = dir.join("disk.img");
            sparse_file(&img, 64 * MIB);
            let disk = Loop::attach(&img).await;
            let dev = disk.dev.display().to_string();

            // A fresh loop device reads as zeros: blank, the only thing spotinit formats.
            assert_eq!(fs::probe(&disk.dev).unwrap(), (64 * MIB, Content::Blank));
            fs::mkfs(&Linux, &disk.dev, "spotinit-test").await.unwrap();
            let (size, info) = ext4_of(&disk.dev);
            assert_eq!(size, 64 * MIB);
            assert_eq!(info.label, "spotinit-test");
            assert_eq!(info.size_bytes(), 64 * MIB, "the filesystem fills the disk");
            assert!(!info.needs_recovery);
            // blkid, an independent reader, agrees.
            let blkid = sh(&format!("blkid -o export {dev}")).await.unwrap();
            assert!(
                blkid.contains("TYPE=ext4") && blkid.contains("LABEL=spotinit-test"),
                "{blkid}"
            );

            assert_eq!(
                fs::fsck(&Linux, &disk.dev, false).await.unwrap(),
                Fsck::Clean
            );
            assert_eq!(
                fs::fsck(&Linux, &disk.dev, true).await.unwrap(),
                Fsck::Clean
            );
            // Damage e2fsck -p repairs alone: a wrong link count. -p trusts a filesystem marked
            // clean; the full check (after a force-detach) finds it.
            let file = dir.join("file");
            std::fs::write(&file, "content").unwrap();
            sh(&format!(
                "debugfs -w -R 'write {} f' {dev} && debugfs -w -R 'sif /f links_count 5' {dev}",
                file.display()
            ))
            .await
            .unwrap();
            assert_eq!(
                fs::fsck(&Linux, &disk.dev, false).await.unwrap(),
                Fsck::Clean
            );
            assert_eq!(
                fs::fsck(&Linux, &disk.dev, true).await.unwrap(),
                Fsck::Repaired
            );
            assert_eq!(
                fs::fsck(&Linux, &disk.dev, true).await.unwrap(),
                Fsck::Clean
            );
            // Damage it must leave to a human: the root directory's inode cleared.
            sh(&format!("debugfs -w -R 'clri <2>' {dev}"))
                .await
                .unwrap();
            let e = fs::fsck(&Linux, &disk.dev, true)
                .await
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("cannot repair") && e.contains("exit status 4"),
                "{e}"
            );

            // Someone else's filesystems are named, never taken for blank.
            let xfs_img = dir.join("xfs.img");
            sparse_file(&xfs_img, 512 * MIB);
            let xfs = Loop::attach(&xfs_img).await;
            make_xfs(&xfs.dev).await;
            assert_eq!(fs::probe(&xfs.dev).unwrap().1, Content::Other("xfs"));

            let other_img = dir.join("other.img");
            sparse_file(&other_img, 64 * MIB);
            let other = Loop::attach(&other_img).await;
            write_at(&other.dev, 65536 + 64, b"_BHRfS_M");
            assert_eq!(fs::probe(&other.dev).unwrap().1, Content::Other("btrfs"));
            // Data without any signature, near the end of the disk: not blank either.
            write_at(&other.dev, 65536 + 64, &[0; 8]);
            write_at(&other.dev, 64 * MIB - 4096, b"some bytes");
            assert_eq!(fs::probe(&other.dev).unwrap().1, Content::Unknown);
        },
    );
}

#[test]
fn volume_mount_binds_and_the_docker_state_check() {
    privileged(
        "volume_mount_binds_and_the_docker_state_check",
        Ns::Mount,
        &needs(&[]),
        Duration::from_secs(120),
        |dir| async move {
            let (root, paths) = sandbox_root(&dir);
            let img = dir.join("vol.img");
            sparse_file(&img, 64 * MIB);
            let disk = Loop::attach(&img).await;
            fs::mkfs(&Linux, &disk.dev, "spotinit-state").await.unwrap();

            let vol = layout::mount_volume(&Linux, &paths, &disk.dev).unwrap();
            assert_eq!(vol, root.join("run/spotinit/volume"));
            let vm = mount_at(&vol).expect("the volume is mounted");
            assert_eq!(vm.fstype, "ext4");
            assert_eq!(vm.device, dev_numbers(&disk.dev));
            assert!(vm.options.contains("noatime"), "{}", vm.options);

            let record = Record {
                format: RECORD_FORMAT,
                volume_id: "vol-0123456789abcdef0".into(),
                storage_driver: "overlay2".into(),
                last_instance: "i-0123456789abcdef0".into(),
                boot_count: 1,
                ..Record::default()
            };
            // A new state: its directories first, then its record.
            layout::create_state_dirs(&paths, "docker").unwrap();
            layout::write_record(&paths, &record).unwrap();
            let targets = layout::bind_state_dirs(&Linux, &paths).unwrap();
            assert_eq!(
                targets,
                vec![root.join("var/lib/docker"), root.join("var/lib/containerd")]
            );
            for (d, target) in BINDS {
                let b = mount_at(&paths.p(target)).expect("bound");
                assert_eq!(
                    (b.device.as_str(), b.root.as_str()),
                    (vm.device.as_str(), &*format!("/{d}"))
                );
            }
            // What Docker writes lands on the volume.
            std::fs::write(root.join("var/lib/docker/image.db"), "layers").unwrap();
            std::fs::write(root.join("var/lib/containerd/meta.db"), "snapshots").unwrap();
            assert_eq!(
                std::fs::read_to_string(vol.join("docker/image.db")).unwrap(),
                "layers"
            );
            assert_eq!(
                std::fs::read_to_string(vol.join("containerd/meta.db")).unwrap(),
                "snapshots"
            );

            let mounted = Mounted {
                volume_id: record.volume_id.clone(),
                device: disk.dev.clone(),
                record: record.clone(),
                slot: None,
            };
            verify_docker_state(&paths, &mounted, "overlay2").unwrap();
            let e = verify_docker_state(&paths, &mounted, "vfs")
                .unwrap_err()
                .to_string();
            assert!(e.contains("storage driver overlay2"), "{e}");
            let other_boot = Mounted {
                record: Record {
                    last_instance: "i-0ffffffffffffffff".into(),
                    ..record.clone()
                },
                ..mounted.clone()
            };
            let e = verify_docker_state(&paths, &other_boot, "overlay2")
                .unwrap_err()
                .to_string();
            assert!(e.contains("not the one this boot wrote"), "{e}");

            let docker = paths.p("/var/lib/docker");
            let containerd = paths.p("/var/lib/containerd");
            // A tmpfs mounted over /var/lib/docker hides the volume: refused ...
            Linux
                .mount(&MountSpec::fs(
                    "tmpfs",
                    "tmpfs",
                    docker.clone(),
                    MsFlags::empty(),
                    "",
                ))
                .unwrap();
            let e = verify_docker_state(&paths, &mounted, "overlay2")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("/var/lib/docker is tmpfs")
                    && e.contains("not docker/ of the state volume"),
                "{e}"
            );
            // ... and fine again once the bind is back on top.
            Linux.umount(&docker, false).unwrap();
            verify_docker_state(&paths, &mounted, "overlay2").unwrap();
            // The volume's docker/ bound over /var/lib/containerd: the right disk, the wrong place.
            Linux
                .mount(&MountSpec::bind(vol.join("docker"), containerd.clone()))
                .unwrap();
            let e = verify_docker_state(&paths, &mounted, "overlay2")
                .unwrap_err()
                .to_string();
            assert!(e.contains("not containerd/ of the state volume"), "{e}");
            Linux.umount(&containerd, false).unwrap();
            // A directory of the root disk bound there instead.
            let elsewhere = dir.join("elsewhere");
            std::fs::create_dir_all(&elsewhere).unwrap();
            Linux
                .mount(&MountSpec::bind(elsewhere, containerd.clone()))
                .unwrap();
            let e = verify_docker_state(&paths, &mounted, "overlay2")
                .unwrap_err()
                .to_string();
            assert!(e.contains("not containerd/ of the state volume"), "{e}");
            Linux.umount(&containerd, false).unwrap();
            verify_docker_state(&paths, &mounted, "overlay2").unwrap();

            // The bind missing: refused, and what was written went to the volume, not the root.
            Linux.umount(&containerd, false).unwrap();
            let e = verify_docker_state(&paths, &mounted, "overlay2")
                .unwrap_err()
                .to_string();
            assert!(e.contains("/var/lib/containerd is not mounted"), "{e}");
            assert!(!containerd.join("meta.db").exists());
            Linux.umount(&docker, false).unwrap();
            Linux.umount(&vol, false).unwrap();
            let e = verify_docker_state(&paths, &mounted, "overlay2")
                .unwrap_err()
                .to_string();
            assert!(e.contains("/run/spotinit/volume is not mounted"), "{e}");
            assert!(mounts_under(&root).is_empty());

            // It all persists on the disk: mounted again, the record and the files are there.
            layout::mount_volume(&Linux, &paths, &disk.dev).unwrap();
            assert_eq!(layout::read_record(&paths).unwrap(), Some(record));
            assert_eq!(
                std::fs::read_to_string(vol.join("docker/image.db")).unwrap(),
                "layers"
            );
            Linux.umount(&vol, false).unwrap();
            assert_eq!(
                fs::fsck(&Linux, &disk.dev, true).await.unwrap(),
                Fsck::Clean
            );
        },
    );
}

#[test]
fn online_grow_after_the_disk_grew() {
    privileged(
        "online_grow_after_the_disk_grew",
        Ns::Mount,
        // The online resize ioctl (EXT4_IOC_RESIZE_FS) wants CAP_SYS_RESOURCE.
        &needs(&["CAP_SYS_RESOURCE"]),
        Duration::from_secs(120),
        |dir| async move {
            let (_root, paths) = sandbox_root(&dir);
            let img = dir.join("vol.img");
            sparse_file(&img, 64 * MIB);
            let disk = Loop::attach(&img).await;
            fs::mkfs(&Linux, &disk.dev, "spotinit-state").await.unwrap();
            let vol = layout::mount_volume(&Linux, &paths, &disk.dev).unwrap();
            std::fs::write(vol.join("data"), "kept").unwrap();
            let before = fs_bytes(&vol);

            // The volume was enlarged (ModifyVolume): the disk grows, the filesystem not yet.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&img)
                .unwrap()
                .set_len(128 * MIB)
                .unwrap();
            disk.refresh().await;
            let (size, info) = ext4_of(&disk.dev);
            assert_eq!(size, 128 * MIB);
            assert_eq!(info.size_bytes(), 64 * MIB);

            fs::grow(&Linux, &disk.dev).await.unwrap();
            let (_, info) = ext4_of(&disk.dev);
            assert_eq!(
                info.size_bytes(),
                128 * MIB,
                "the filesystem fills the disk"
            );
            let after = fs_bytes(&vol);
            assert!(
                after >= before + 60 * MIB,
                "mounted filesystem grew from {before} to {after} bytes"
            );
            assert_eq!(std::fs::read_to_string(vol.join("data")).unwrap(), "kept");
            Linux.umount(&vol, false).unwrap();
            assert_eq!(
                fs::fsck(&Linux, &disk.dev, true).await.unwrap(),
                Fsck::Clean
            );
        },
    );
}

/// A simulated instance whose volume phase makes real system calls.
struct RealInstance {
    id: String,
    root: PathBuf,
    paths: Paths,
    spy: Arc<Spy<Linux>>,
    _imds: ImdsMock,
    volume: EbsVolume<Ec2Client, Spy<Linux>>,
}

impl World {
    async fn real_instance(&self, zone: &str, cfg: config::Volume, driver: &str) -> RealInstance {
        let InstanceParts {
            id,
            root,
            imds,
            ec2,
            me,
            devices,
        } = self.instance_parts(zone).await;
        std::os::unix::fs::symlink("/proc", root.join("proc")).unwrap();
        let spy = Arc::new(Spy::new(Linux, &root));
        let paths = Paths::under(&root);
        let volume = EbsVolume::new(
            Arc::new(ec2),
            spy.clone(),
            paths.clone(),
            cfg,
            driver.into(),
            me,
            devices,
        );
        RealInstance {
            id,
            root,
            paths,
            spy,
            _imds: imds,
            volume,
        }
    }
}

#[test]
fn ebs_volume_phase_with_real_filesystems_and_mounts() {
    privileged(
        "ebs_volume_phase_with_real_filesystems_and_mounts",
        Ns::Mount,
        &needs(&["moto_server"]),
        Duration::from_secs(300),
        |dir| async move {
            let w = World::start_in(dir.join("world"), fast(), Plug::Loop).await;

            // First boot: the volume is created, formatted, mounted and bound for real.
            let mut a = w.real_instance("us-east-1a", vcfg(), "overlay2").await;
            let m = a.volume.acquire().await.unwrap();
            let loop_a = w
                .disks
                .loop_device(&m.volume_id)
                .expect("plugged as a loop device");
            assert_eq!(a.spy.matching("spawn mkfs.ext4").len(), 1);
            assert_eq!(ext4_of(&m.device).1.label, "spotinit-state");
            let vm = mount_at(&a.paths.p(VOLUME_MOUNT)).expect("volume mounted");
            assert_eq!(
                (vm.fstype.as_str(), vm.device.clone()),
                ("ext4", dev_numbers(&loop_a))
            );
            for (d, target) in BINDS {
                let b = mount_at(&a.paths.p(target)).expect("bound");
                assert_eq!(
                    (b.device.clone(), b.root.clone()),
                    (vm.device.clone(), format!("/{d}"))
                );
            }
            verify_docker_state(&a.paths, &m, "overlay2").unwrap();
            std::fs::write(a.root.join("var/lib/docker/owner"), &a.id).unwrap();
            std::fs::write(a.root.join("var/lib/containerd/owner"), &a.id).unwrap();
            a.volume.release().await.unwrap();
            assert!(
                mounts_under(&a.root).is_empty(),
                "{:?}",
                mounts_under(&a.root)
            );
            assert_eq!(
                a.spy.matching("umount"),
                vec![
                    "umount /var/lib/containerd",
                    "umount /var/lib/docker",
                    "umount /run/spotinit/volume"
                ]
            );
            assert_eq!(w.disks.loop_device(&m.volume_id), None, "detached");

            // While detached, the volume was enlarged from 1 to 1.5 GiB (when this root may
            // resize a mounted filesystem: EXT4_IOC_RESIZE_FS wants CAP_SYS_RESOURCE).
            let grow = has_cap("CAP_SYS_RESOURCE");
            if grow {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(w.disks.image(&m.volume_id))
                    .unwrap()
                    .set_len(1536 * MIB)
                    .unwrap();
            } else {
                notice("no CAP_SYS_RESOURCE here: the volume is not enlarged, so the online grow is not exercised");
            }

            // The next instance checks the filesystem, never formats it, finds the first one's
            // files under /var/lib/docker, and grows the filesystem online.
            let mut b = w.real_instance("us-east-1a", vcfg(), "overlay2").await;
            let m2 = b.volume.acquire().await.unwrap();
            assert_eq!(m2.volume_id, m.volume_id);
            assert!(b.spy.matching("spawn mkfs").is_empty(), "{:?}", b.spy.ops());
            let fsck = b.spy.matching("spawn e2fsck");
            assert_eq!(fsck.len(), 1);
            assert!(!fsck[0].contains(" -f "), "{fsck:?}");
            for d in ["docker", "containerd"] {
                let owner = b.root.join("var/lib").join(d).join("owner");
                assert_eq!(std::fs::read_to_string(owner).unwrap(), a.id);
            }
            assert_eq!(m2.record.boot_count, 2);
            assert_eq!(m2.record.created_by, a.id);
            assert_eq!(m2.record.last_instance, b.id);
            assert_eq!(
                layout::read_record(&b.paths).unwrap().as_ref(),
                Some(&m2.record)
            );
            let (size, info) = ext4_of(&m2.device);
            if grow {
                assert_eq!(b.spy.matching("spawn resize2fs").len(), 1);
                assert_eq!((size, info.size_bytes()), (1536 * MIB, 1536 * MIB));
                assert!(fs_bytes(&b.paths.p(VOLUME_MOUNT)) > 1400 * MIB);
            } else {
                assert!(b.spy.matching("spawn resize2fs").is_empty());
                assert_eq!((size, info.size_bytes()), (1024 * MIB, 1024 * MIB));
            }
            verify_docker_state(&b.paths, &m2, "overlay2").unwrap();
            b.volume.release().await.unwrap();
            assert!(mounts_under(&b.root).is_empty());

            // Another storage driver configured: refused after reading the record, before any
            // bind, and the volume is given back.
            let mut c = w.real_instance("us-east-1a", vcfg(), "vfs").await;
            let e = c.volume.acquire().await.unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, VolumeError::DriverMismatch { .. }), "{msg}");
            assert!(
                msg.contains("overlay2") && msg.contains("storage_driver"),
                "{msg}"
            );
            assert!(c.spy.matching("mount bind").is_empty(), "{:?}", c.spy.ops());
            for (_, target) in BINDS {
                assert!(mount_at(&c.paths.p(target)).is_none());
            }
            c.volume.release().await.unwrap();
            assert!(mounts_under(&c.root).is_empty());

            // Someone else's XFS volume: refused by name, never formatted, left as it was.
            let api = w.fidelity.client();
            let foreign = create_tagged(&api, "us-east-1a", &[("Name", "someone-elses")]).await;
            let fimg = w.disks.image(&foreign);
            make_xfs(&fimg).await;
            let cfg = config::Volume {
                create: false,
                tags: BTreeMap::from([("Name".to_string(), "someone-elses".to_string())]),
                ..vcfg()
            };
            let mut d = w.real_instance("us-east-1a", cfg, "overlay2").await;
            let e = d.volume.acquire().await.unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, VolumeError::ForeignData { .. }), "{msg}");
            assert!(msg.contains("xfs") && msg.contains(&foreign), "{msg}");
            assert!(d.spy.matching("spawn mkfs").is_empty(), "{:?}", d.spy.ops());
            assert!(d.spy.matching("mount").is_empty(), "{:?}", d.spy.ops());
            d.volume.release().await.unwrap();
            assert_eq!(&std::fs::read(&fimg).unwrap()[..4], b"XFSB");
            assert_eq!(
                w.moto
                    .client()
                    .describe_volume(&foreign)
                    .await
                    .unwrap()
                    .state,
                "available"
            );
        },
    );
}

/// The cgroup2 hierarchy's superblock options as the host has them mounted (they are global:
/// any cgroup2 mount sets them, e.g. `nsdelegate`).
fn host_cgroup2_options(sandbox: &Path) -> Option<String> {
    crate::common::mountinfo()
        .into_iter()
        .find(|m| m.fstype == "cgroup2" && !m.mount_point.starts_with(sandbox))
        .map(|m| m.super_options)
}

/// Mounts cgroup2 once with `options` (and unmounts it) to put the global flags back.
fn restore_cgroup2_options(at: &Path, options: &str) {
    let data: Vec<&str> = options
        .split(',')
        .filter(|o| *o != "rw" && *o != "ro")
        .collect();
    std::fs::create_dir_all(at).unwrap();
    Linux
        .mount(&MountSpec::fs(
            "cgroup2",
            "cgroup2",
            at.to_path_buf(),
            MsFlags::empty(),
            &data.join(","),
        ))
        .unwrap();
    Linux.umount(at, false).unwrap();
}

/// In a PID namespace too: the drain sends kill(-1) when processes are left, which must only
/// ever reach this namespace.
#[test]
fn early_mounts_then_the_drain_unmounts_them_in_reverse() {
    privileged(
        "early_mounts_then_the_drain_unmounts_them_in_reverse",
        Ns::Pid,
        &[],
        Duration::from_secs(60),
        |dir| async move {
            let root = dir.join("root");
            std::fs::create_dir_all(&root).unwrap();
            let paths = Paths::under(&root);
            let cgroup2_before = host_cgroup2_options(&root);
            let spy = Arc::new(Spy::new(Linux, &root));

            let made = host::early_mounts(&*spy, &paths).unwrap();
            let table = host::early_mount_table();
            let targets: Vec<PathBuf> = table.iter().map(|t| paths.p(t.2)).collect();
            assert_eq!(made, targets);
            for (fstype, _, target, flags, _) in &table {
                let m =
                    mount_at(&paths.p(target)).unwrap_or_else(|| panic!("{target} not mounted"));
                assert_eq!(m.fstype, *fstype, "{target}");
                let opts: Vec<&str> = m.options.split(',').collect();
                for (flag, name) in [
                    (MsFlags::MS_NOSUID, "nosuid"),
                    (MsFlags::MS_NODEV, "nodev"),
                    (MsFlags::MS_NOEXEC, "noexec"),
                ] {
                    assert_eq!(
                        opts.contains(&name),
                        flags.contains(flag),
                        "{target}: {}",
                        m.options
                    );
                }
            }
            // The proc under the root is this namespace's, where we are PID 1; devtmpfs has
            // the devices; the writable places and links exist.
            assert_eq!(
                std::fs::read_link(root.join("proc/self")).unwrap(),
                Path::new("1")
            );
            use std::os::unix::fs::FileTypeExt;
            assert!(std::fs::metadata(root.join("dev/null"))
                .unwrap()
                .file_type()
                .is_char_device());
            assert!(root.join("sys/fs/cgroup/cgroup.controllers").exists());
            assert!(
                root.join("var/lib/docker").is_dir() && root.join("run/spotinit/home").is_dir()
            );
            assert_eq!(
                std::fs::read_link(root.join("var/run")).unwrap(),
                Path::new("../run")
            );

            // A second call (an initrd left them, a retried boot) mounts nothing again.
            let mounts_before = spy.matching("mount").len();
            assert_eq!(
                host::early_mounts(&*spy, &paths).unwrap(),
                Vec::<PathBuf>::new()
            );
            assert_eq!(spy.matching("mount").len(), mounts_before);

            // The drain undoes them, innermost first, without falling back to lazy unmounts.
            let (m, _requests) = Machine::new(spy.clone(), paths.clone(), Mode::Pid1);
            m.early_mounts.lock().unwrap().extend(made);
            let mut st = BootState::<Aws<Spy<Linux>>>::default();
            drain(
                &m,
                &mut st,
                &Request::new("test: undo the early mounts", Then::Exit),
            )
            .await;
            let expected: Vec<String> = table
                .iter()
                .rev()
                .map(|t| format!("umount {}", t.2))
                .collect();
            assert_eq!(spy.matching("umount"), expected);
            assert!(mounts_under(&root).is_empty(), "{:?}", mounts_under(&root));
            assert_eq!(spy.ops().last().map(String::as_str), Some("sync"));
            assert!(
                spy.matching("kill").is_empty(),
                "nothing to kill: {:?}",
                spy.ops()
            );

            // Mounting cgroup2 set the hierarchy's global flags (nsdelegate); put the host's back.
            match cgroup2_before {
                Some(before) => {
                    if host_cgroup2_options(&root).as_ref() != Some(&before) {
                        restore_cgroup2_options(&dir.join("cgroup2"), &before);
                    }
                    assert_eq!(host_cgroup2_options(&root), Some(before));
                }
                None => eprintln!("the host has no cgroup2 mount: its flags are now spotinit's"),
            }
        },
    );
}

/// Persisted-root mode with real mounts: the image's root is seeded onto the volume, then a
/// child process (in a mount namespace of its own, so the test process keeps its root)
/// pivots into it and checks what it sees: the seeded files, "/" being rootfs/ of the volume,
/// the image's root gone from its mount table, the golden-rule check passing, and the root
/// going read-only as the drain leaves it.
#[test]
fn persisted_root_seeds_then_pivots_into_the_volume() {
    privileged(
        "persisted_root_seeds_then_pivots_into_the_volume",
        Ns::Mount,
        &needs(&["cp"]),
        Duration::from_secs(120),
        |dir| async move {
            use spotinit::volume::pivot;
            let root = dir.join("root");
            for d in [
                "etc", "usr", "dev", "proc", "sys", "run", "tmp", "var", "mnt",
            ] {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            std::fs::write(root.join("usr/marker"), "from the image").unwrap();
            let paths = Paths::under(&root);
            let mount = |fstype: &str, src: &str, target: &str, flags: MsFlags| {
                Linux
                    .mount(&MountSpec {
                        source: src.into(),
                        target: paths.p(target),
                        fstype: (!fstype.is_empty()).then(|| fstype.to_string()),
                        flags,
                        data: None,
                    })
                    .unwrap()
            };
            mount("tmpfs", "tmpfs", "/run", MsFlags::empty());
            mount("proc", "proc", "/proc", MsFlags::empty());
            mount("sysfs", "sysfs", "/sys", MsFlags::empty());
            mount("", "/dev", "/dev", MsFlags::MS_BIND | MsFlags::MS_REC);

            let img = dir.join("vol.img");
            sparse_file(&img, 64 * MIB);
            let disk = Loop::attach(&img).await;
            fs::mkfs(&Linux, &disk.dev, "spotinit-state").await.unwrap();
            let vol = layout::mount_volume(&Linux, &paths, &disk.dev).unwrap();
            let record = Record {
                format: RECORD_FORMAT,
                volume_id: "vol-0123456789abcdef0".into(),
                storage_driver: "overlay2".into(),
                last_instance: "i-0123456789abcdef0".into(),
                boot_count: 1,
                ..Record::default()
            };
            layout::write_record(&paths, &record).unwrap();

            assert!(pivot::seed(&Linux, &paths, &vol).await.unwrap(), "seeded");
            assert_eq!(
                std::fs::read_to_string(vol.join("rootfs/usr/marker")).unwrap(),
                "from the image"
            );
            assert!(vol.join("rootfs/var/lib/docker").is_dir());
            assert!(!vol.join("rootfs.partial").exists());
            assert!(
                !pivot::seed(&Linux, &paths, &vol).await.unwrap(),
                "seeded only once"
            );

            let mounted = Mounted {
                volume_id: record.volume_id.clone(),
                device: disk.dev.clone(),
                record: record.clone(),
                slot: None,
            };
            let volume_dev = dev_numbers(&disk.dev);
            // SAFETY: the child only makes synchronous system calls and exits with _exit; the
            // parent blocks in waitpid right away (so the runtime's reaper cannot take the
            // child's status first).
            match unsafe { nix::unistd::fork() }.unwrap() {
                nix::unistd::ForkResult::Child => {
                    let ok = std::panic::catch_unwind(|| {
                        pivot_child(&paths, &vol, &mounted, &volume_dev)
                    })
                    .is_ok();
                    // SAFETY: ends the forked child without running the parent's destructors.
                    unsafe { libc::_exit(if ok { 0 } else { 1 }) }
                }
                nix::unistd::ForkResult::Parent { child } => {
                    let status = nix::sys::wait::waitpid(child, None).unwrap();
                    assert_eq!(
                        status,
                        nix::sys::wait::WaitStatus::Exited(child, 0),
                        "the pivot child failed (its messages are above)"
                    );
                }
            }
            // The parent's namespace never moved.
            assert_eq!(
                std::fs::read_to_string(root.join("usr/marker")).unwrap(),
                "from the image"
            );
            for t in ["/run/spotinit/volume", "/dev", "/sys", "/proc", "/run"] {
                let _ = Linux.umount(&paths.p(t), true);
            }
            drop(disk);
        },
    );
}

/// In the forked child: pivot and look around. Panics (caught by the caller) on any mismatch.
fn pivot_child(paths: &Paths, vol: &Path, mounted: &Mounted, volume_dev: &str) {
    use spotinit::volume::pivot;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("own mount namespace");
    pivot::into(&Linux, paths, vol).unwrap_or_else(|e| panic!("pivot: {e}"));
    assert_eq!(
        std::fs::read_to_string("/usr/marker").unwrap(),
        "from the image",
        "the seeded root is /"
    );
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounts = spotinit::sys::parse_mountinfo(&info);
    let slash = mounts
        .iter()
        .rev()
        .find(|m| m.mount_point == Path::new("/"))
        .expect("a root mount");
    assert_eq!(
        (slash.device.as_str(), slash.root.as_str()),
        (volume_dev, "/rootfs"),
        "{info}"
    );
    assert!(
        !mounts
            .iter()
            .any(|m| m.mount_point.starts_with(pivot::OLD_ROOT)),
        "the image's root is detached: {info}"
    );
    assert!(Path::new("/run/spotinit/volume/.spotinit/record.toml").exists());
    spotinit::volume::verify_persisted_root(&Paths::real(), mounted, "overlay2")
        .unwrap_or_else(|e| panic!("golden rule: {e}"));
    // What the drain does with a root it cannot unmount.
    Linux
        .remount(
            Path::new(layout::VOLUME_MOUNT),
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        )
        .unwrap();
    let e = std::fs::write("/written-after-the-drain", "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    eprintln!("pivot child: / is rootfs/ of {volume_dev}, read-only after the drain");
}

/// The harness itself: where the run is meant to be privileged, a test that cannot run fails.
#[test]
fn a_run_meant_to_be_privileged_fails_a_test_that_cannot_run() {
    let why = "needs root (the harness's own check)";
    let failed = std::panic::catch_unwind(|| {
        crate::common::skip_or_fail("some_test", why, true, &mut Vec::new())
    });
    let message = failed.expect_err("a failure, not a skip");
    let text = message.downcast_ref::<String>().unwrap();
    assert!(
        text.contains("some_test") && text.contains(crate::common::REQUIRED_ENV),
        "{text}"
    );
    // Elsewhere it is a skip, said on its own line.
    let mut said = Vec::new();
    crate::common::skip_or_fail("some_test", why, false, &mut said);
    assert_eq!(
        String::from_utf8(said).unwrap(),
        format!("\nSKIPPED some_test: {why}\n")
    );
}
