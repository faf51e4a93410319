//! The volume phase against the EC2 world in a box: moto behind the fidelity layer (real
//! VolumeInUse, zone checks, latencies, delayed release, injected faults), reached by the real
//! aws-sdk-ec2 signing with instance-role credentials served by the IMDS mock.
//!
//! Each simulated instance has its own root directory. A volume is a backing file plus a
//! directory standing for its filesystem's content: when the fidelity layer attaches it, the
//! file appears in the instance's /dev and sysfs (with a uevent), `mkfs.ext4` runs for real on
//! it, and the faked mount shows the content directory at /run/spotinit/volume. So records,
//! signatures and moves carry over between instances exactly as on EBS, without root.

//!
//! The world itself (moto, the fidelity layer, the disks) is in `common`, shared with the
//! privileged tests that plug the same volumes in as loop devices.

mod common;

use common::{create_tagged, fast, tag, vcfg, write_at, InstanceParts, World};
use spotinit::cloud::ec2::Ec2Client;
use spotinit::config;
use spotinit::sys::fake::{FakeSystem, Op};
use spotinit::sys::Paths;
use spotinit::volume::ebs::EbsVolume;
use spotinit::volume::layout;
use spotinit::volume::{VolumeError, VolumePhase};
use spotworld::fidelity::{Fault, Settings};
use spotworld::imds::ImdsMock;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Instance {
    id: String,
    root: PathBuf,
    fake: FakeSystem,
    _imds: ImdsMock,
    volume: EbsVolume<Ec2Client, FakeSystem>,
}

impl World {
    async fn instance(&self, zone: &str, cfg: config::Volume, driver: &str) -> Instance {
        let InstanceParts {
            id,
            root,
            imds,
            ec2,
            me,
            devices,
        } = self.instance_parts(zone).await;
        let fake = FakeSystem::new(&root);
        // mkfs runs for real on the backing file, so signatures are real.
        fake.on_spawn("mkfs.ext4", |cmd| {
            let dev = cmd.args.last().unwrap();
            let label = &cmd.args[cmd.args.iter().position(|a| a == "-L").unwrap() + 1];
            let ok = std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", label, dev])
                .status()
                .unwrap()
                .success();
            assert!(ok, "mkfs.ext4 {dev}");
        });
        // The faked mount of the volume shows the volume's content directory.
        let (r, disks) = (root.clone(), self.disks.clone());
        fake.on_op(move |op| {
            let vol_mount = PathBuf::from(layout::VOLUME_MOUNT);
            match op {
                Op::Mount { source, target, .. } if *target == vol_mount => {
                    let img = std::fs::read_link(source).unwrap();
                    let id = img.file_stem().unwrap().to_string_lossy().to_string();
                    let at = r.join("run/spotinit/volume");
                    std::fs::remove_dir_all(&at).unwrap();
                    std::os::unix::fs::symlink(disks.content(&id), &at).unwrap();
                }
                Op::Umount { target, .. } if *target == vol_mount => {
                    let at = r.join("run/spotinit/volume");
                    std::fs::remove_file(&at).unwrap();
                    std::fs::create_dir_all(&at).unwrap();
                }
                _ => {}
            }
        });
        let volume = EbsVolume::new(
            Arc::new(ec2),
            Arc::new(fake.clone()),
            Paths::under(&root),
            cfg,
            driver.into(),
            me,
            devices,
        );
        Instance {
            id,
            root,
            fake,
            _imds: imds,
            volume,
        }
    }
}

impl Instance {
    fn spawned(&self, program: &str) -> Vec<Vec<String>> {
        self.fake
            .ops()
            .into_iter()
            .filter_map(|op| match op {
                Op::Spawn {
                    program: p, args, ..
                } if p == program => Some(args),
                _ => None,
            })
            .collect()
    }
    fn record(&self) -> layout::Record {
        layout::read_record(&Paths::under(&self.root))
            .unwrap()
            .unwrap()
    }
}

#[tokio::test]
async fn first_boot_creates_and_formats_then_a_successor_resumes_the_same_state() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let m = a.volume.acquire().await.unwrap();

    let vols = w.volumes().await;
    assert_eq!(vols.len(), 1);
    let v = &vols[0];
    assert_eq!(v.id, m.volume_id);
    assert_eq!(v.zone, "us-east-1a");
    assert_eq!(tag(v, "Name"), Some("spotinit-state"));
    assert_eq!(tag(v, "spotinit:created-by"), Some(a.id.as_str()));
    assert_eq!(v.attachments.len(), 1);
    assert_eq!(v.attachments[0].instance_id, a.id);
    assert_eq!(v.attachments[0].state, "attached");
    // Blank and just created: formatted once, mounted, bound into place.
    assert_eq!(a.spawned("mkfs.ext4").len(), 1);
    let b = a.fake.briefs();
    let mounts: Vec<&String> = b.iter().filter(|x| x.starts_with("mount")).collect();
    assert_eq!(
        mounts,
        vec![
            "mount ext4 /run/spotinit/volume",
            "mount bind /var/lib/docker",
            "mount bind /var/lib/containerd"
        ]
    );
    let r = a.record();
    assert_eq!(
        (r.boot_count, r.created_by.as_str(), r.clean_shutdown),
        (1, a.id.as_str(), false)
    );
    assert_eq!(r.storage_driver, "overlay2");
    // The NVMe I/O timeout EBS recommends was set on the disk.
    let nvme = m.device.file_name().unwrap().to_string_lossy().to_string();
    let t = std::fs::read_to_string(
        a.root
            .join("sys/block")
            .join(&nvme)
            .join("queue/io_timeout"),
    );
    assert_eq!(t.unwrap(), "4294967295");

    a.volume.release().await.unwrap();
    let b = a.fake.briefs();
    let umounts: Vec<&String> = b.iter().filter(|x| x.starts_with("umount")).collect();
    assert_eq!(
        umounts,
        vec![
            "umount /var/lib/containerd",
            "umount /var/lib/docker",
            "umount /run/spotinit/volume"
        ]
    );
    let v = w.moto.client().describe_volume(&m.volume_id).await.unwrap();
    assert_eq!(v.state, "available");
    let detaches: Vec<_> = w
        .fidelity
        .requests()
        .into_iter()
        .filter(|r| r.action == "DetachVolume")
        .collect();
    assert_eq!(detaches.len(), 1);
    assert_eq!(detaches[0].param("InstanceId"), Some(a.id.as_str()));

    // A new instance in the same zone finds it by its tag, checks it, never formats it.
    let mut b = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let m2 = b.volume.acquire().await.unwrap();
    assert_eq!(m2.volume_id, m.volume_id);
    assert!(b.spawned("mkfs.ext4").is_empty());
    let fsck = b.spawned("e2fsck");
    assert_eq!(fsck.len(), 1);
    assert!(!fsck[0].contains(&"-f".to_string()), "{fsck:?}");
    let r = b.record();
    assert_eq!(r.boot_count, 2);
    assert_eq!(r.created_by, a.id);
    assert_eq!(r.last_instance, b.id);
    assert_eq!(w.volumes().await.len(), 1);
}

#[tokio::test]
async fn a_volume_in_another_zone_follows_through_a_snapshot() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let old = a.volume.acquire().await.unwrap().volume_id;
    a.volume.release().await.unwrap();

    let mut b = w.instance("us-east-1b", vcfg(), "overlay2").await;
    let m = b.volume.acquire().await.unwrap();
    assert_ne!(m.volume_id, old);
    let vols = w.volumes().await;
    let new_v = vols.iter().find(|v| v.id == m.volume_id).unwrap();
    let old_v = vols.iter().find(|v| v.id == old).unwrap();
    assert_eq!(new_v.zone, "us-east-1b");
    assert_eq!(tag(new_v, "Name"), Some("spotinit-state"));
    assert_eq!(tag(new_v, "spotinit:moved-from"), Some(old.as_str()));
    assert_eq!(
        tag(old_v, "spotinit:superseded-by"),
        Some(m.volume_id.as_str())
    );
    assert_eq!(old_v.state, "available", "kept, not deleted, by default");
    assert!(new_v.snapshot_id.is_some());
    // The state came along: same record, one more boot, no mkfs.
    assert!(b.spawned("mkfs.ext4").is_empty());
    assert_eq!(b.record().boot_count, 2);
    assert_eq!(b.record().created_by, a.id);
    b.volume.release().await.unwrap();

    // The next instance in the new zone finds exactly the new volume.
    let mut c = w.instance("us-east-1b", vcfg(), "overlay2").await;
    assert_eq!(c.volume.acquire().await.unwrap().volume_id, m.volume_id);
}

#[tokio::test]
async fn an_interrupted_move_is_finished_not_duplicated() {
    let w = World::start(fast()).await;
    let api = w.fidelity.client();
    let old = create_tagged(&api, "us-east-1a", &[("Name", "spotinit-state")]).await;
    let new = create_tagged(
        &api,
        "us-east-1b",
        &[("Name", "spotinit-state"), ("spotinit:moved-from", &old)],
    )
    .await;
    let mut b = w.instance("us-east-1b", vcfg(), "overlay2").await;
    assert_eq!(b.volume.acquire().await.unwrap().volume_id, new);
    let o = w.moto.client().describe_volume(&old).await.unwrap();
    assert_eq!(tag(&o, "spotinit:superseded-by"), Some(new.as_str()));
}

#[tokio::test]
async fn several_matches_are_an_error_naming_them() {
    let w = World::start(fast()).await;
    let api = w.fidelity.client();
    let v1 = create_tagged(&api, "us-east-1a", &[("Name", "spotinit-state")]).await;
    let v2 = create_tagged(&api, "us-east-1a", &[("Name", "spotinit-state")]).await;
    let mut i = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let e = i.volume.acquire().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::Ambiguous { .. }), "{msg}");
    assert!(
        msg.contains(&v1) && msg.contains(&v2) && msg.contains("volume.id"),
        "{msg}"
    );
    assert!(!e.retryable());
}

#[tokio::test]
async fn no_volume_and_creation_off_fails_with_the_fix() {
    let w = World::start(fast()).await;
    let cfg = config::Volume {
        create: false,
        tags: BTreeMap::from([("Name".to_string(), "gitlab".to_string())]),
        ..vcfg()
    };
    let mut i = w.instance("us-east-1a", cfg, "overlay2").await;
    let e = i.volume.acquire().await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("Name=gitlab") && msg.contains("volume.create = true"),
        "{msg}"
    );
    assert!(w.volumes().await.is_empty(), "nothing created");
}

#[tokio::test]
async fn a_running_holder_keeps_the_volume() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    a.volume.acquire().await.unwrap();
    let mut b = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let e = b.volume.acquire().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::HeldByRunning { .. }), "{msg}");
    assert!(msg.contains(&a.id) && msg.contains("running"), "{msg}");
    assert!(e.retryable(), "the holder may be draining");
    assert!(b.fake.briefs().iter().all(|x| !x.starts_with("mount")));
    // B never asked EC2 to move the volume away from A.
    assert!(!w
        .fidelity
        .requests()
        .iter()
        .any(|r| r.action == "DetachVolume"));
    b.volume.release().await.unwrap();
    let v = w.volumes().await;
    assert_eq!(v[0].attachments[0].instance_id, a.id, "A still holds it");
}

/// A shutdown can interrupt the volume phase right after AttachVolume (a spot notice during the
/// boot). EC2 refuses to detach an attachment still `attaching` (IncorrectState); the release
/// waits for it to settle and detaches it, instead of leaving it attached behind the drain.
#[tokio::test]
async fn a_release_while_the_attachment_is_in_progress_still_detaches() {
    let w = World::start(Settings {
        attach_latency: Duration::from_secs(3),
        ..fast()
    })
    .await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let attach_sent = async {
        while !w
            .fidelity
            .requests()
            .iter()
            .any(|r| r.action == "AttachVolume" && r.status == 200)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        r = a.volume.acquire() => panic!("the attachment should still be in progress: {r:?}"),
        () = attach_sent => {}
    }
    let id = w.volumes().await[0].id.clone();
    let v = w.fidelity.client().describe_volume(&id).await.unwrap();
    assert_eq!(v.attachments[0].state, "attaching", "{v:?}");
    a.volume.release().await.unwrap();
    let v = w.fidelity.client().describe_volume(&id).await.unwrap();
    assert_eq!(v.state, "available", "{v:?}");
    assert!(v.attachments.is_empty(), "{v:?}");
    let detaches: Vec<_> = w
        .fidelity
        .requests()
        .into_iter()
        .filter(|r| r.action == "DetachVolume")
        .collect();
    // Refused once while attaching; then only looked at until it settled; detached once.
    assert_eq!(detaches.len(), 2, "{detaches:?}");
    assert_eq!(detaches[0].code.as_deref(), Some("IncorrectState"));
    assert_eq!(detaches[1].status, 200, "{detaches:?}");
    assert_eq!(detaches[1].param("InstanceId"), Some(a.id.as_str()));
}

#[tokio::test]
async fn a_terminated_holder_is_waited_out_then_its_volume_taken() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let id = a.volume.acquire().await.unwrap().volume_id;
    w.fidelity.terminate(&a.id).await.unwrap();
    let mut b = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let start = Instant::now();
    let m = b.volume.acquire().await.unwrap();
    assert_eq!(m.volume_id, id);
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let fsck = b.spawned("e2fsck");
    assert_eq!(fsck.len(), 1);
    assert!(
        !fsck[0].contains(&"-f".to_string()),
        "no force-detach, no forced check"
    );
    assert!(!w
        .fidelity
        .requests()
        .iter()
        .any(|r| r.action == "DetachVolume" && r.param("Force") == Some("true")));
}

#[tokio::test]
async fn after_the_release_wait_a_force_detach_brings_a_full_check() {
    let w = World::start(Settings {
        release_after_termination: Duration::from_secs(600),
        ..fast()
    })
    .await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    a.volume.acquire().await.unwrap();
    w.fidelity.terminate(&a.id).await.unwrap();
    let cfg = config::Volume {
        release_wait_secs: 2,
        force_detach: true,
        ..vcfg()
    };
    let mut b = w.instance("us-east-1a", cfg, "overlay2").await;
    b.volume.acquire().await.unwrap();
    let forced: Vec<_> = w
        .fidelity
        .requests()
        .into_iter()
        .filter(|r| r.action == "DetachVolume" && r.param("Force") == Some("true"))
        .collect();
    assert_eq!(forced.len(), 1);
    assert_eq!(forced[0].param("InstanceId"), Some(a.id.as_str()));
    let fsck = b.spawned("e2fsck");
    assert!(fsck[0].contains(&"-f".to_string()), "{fsck:?}");
}

#[tokio::test]
async fn a_dead_holder_past_the_wait_without_force_is_not_taken() {
    let w = World::start(Settings {
        release_after_termination: Duration::from_secs(600),
        ..fast()
    })
    .await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    a.volume.acquire().await.unwrap();
    w.fidelity.terminate(&a.id).await.unwrap();
    let cfg = config::Volume {
        release_wait_secs: 2,
        ..vcfg()
    };
    let mut b = w.instance("us-east-1a", cfg, "overlay2").await;
    let e = b.volume.acquire().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::NotReleased { .. }), "{msg}");
    assert!(msg.contains("volume.force_detach"), "{msg}");
    assert!(e.retryable());
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried() {
    let w = World::start(fast()).await;
    w.fidelity.inject("AttachVolume", Fault::Throttle, 2);
    w.fidelity.inject("DescribeVolumes", Fault::ServerError, 1);
    w.fidelity.inject("CreateVolume", Fault::Unavailable, 1);
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    a.volume.acquire().await.unwrap();
    let attaches: Vec<_> = w
        .fidelity
        .requests()
        .into_iter()
        .filter(|r| r.action == "AttachVolume")
        .map(|r| r.code)
        .collect();
    assert_eq!(
        attaches,
        vec![
            Some("RequestLimitExceeded".to_string()),
            Some("RequestLimitExceeded".to_string()),
            None
        ]
    );
    assert_eq!(
        w.volumes().await.len(),
        1,
        "one volume despite the retried CreateVolume"
    );
}

#[tokio::test]
async fn a_missing_permission_names_the_iam_action() {
    let w = World::start(fast()).await;
    w.fidelity.deny("CreateVolume");
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let e = a.volume.acquire().await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("UnauthorizedOperation") && msg.contains("ec2:CreateVolume"),
        "{msg}"
    );
    assert!(!e.retryable());
}

#[tokio::test]
async fn foreign_data_is_never_formatted() {
    let w = World::start(fast()).await;
    let id = create_tagged(
        &w.fidelity.client(),
        "us-east-1a",
        &[("Name", "spotinit-state")],
    )
    .await;
    // Someone's XFS filesystem.
    let img = w.disks.image(&id);
    let mut head = vec![0u8; 4096];
    head[..4].copy_from_slice(b"XFSB");
    write_at(&img, 0, &head);
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let e = a.volume.acquire().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::ForeignData { .. }), "{msg}");
    assert!(msg.contains("xfs") && msg.contains(&id), "{msg}");
    assert!(a.spawned("mkfs.ext4").is_empty());
    // It was attached; releasing gives it back untouched.
    a.volume.release().await.unwrap();
    assert_eq!(
        w.moto.client().describe_volume(&id).await.unwrap().state,
        "available"
    );
    assert_eq!(&std::fs::read(&img).unwrap()[..4], b"XFSB");
}

#[tokio::test]
async fn a_storage_driver_mismatch_refuses_and_says_how_to_fix_it() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    a.volume.acquire().await.unwrap();
    a.volume.release().await.unwrap();
    let mut b = w.instance("us-east-1a", vcfg(), "vfs").await;
    let e = b.volume.acquire().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::DriverMismatch { .. }), "{msg}");
    assert!(
        msg.contains("overlay2") && msg.contains("storage_driver"),
        "{msg}"
    );
    assert!(!b
        .fake
        .briefs()
        .iter()
        .any(|x| x == "mount bind /var/lib/docker"));
    // The record is untouched: still A's last boot, cleanly shut down.
    b.volume.release().await.unwrap();
    let mut c = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let m = c.volume.acquire().await.unwrap();
    assert_eq!(m.record.boot_count, 2);
}
