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

use crate::common::{create_tagged, fast, tag, vcfg, write_at, World};
use spotinit::config;
use spotinit::sys::fake::Op;
use spotinit::sys::{MountSpec, MsFlags, System};
use spotinit::volume::layout;
use spotinit::volume::{VolumeError, VolumePhase};
use spotworld::fidelity::{Fault, Settings};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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
    // The mover (an instance that no longer exists) claimed the old volume, made the copy,
    // and was gone before it marked the old one superseded.
    let claim = "i-0dead0000000000000 us-east-1b 2026-11-29T10:00:00Z";
    let old = create_tagged(
        &api,
        "us-east-1a",
        &[("Name", "spotinit-state"), ("spotinit:moving", claim)],
    )
    .await;
    let new = create_tagged(
        &api,
        "us-east-1b",
        &[
            ("Name", "spotinit-state"),
            ("spotinit:moved-from", &old),
            ("spotinit:move-claim", claim),
        ],
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
    // B's configuration asks for a larger volume: it must not change A's.
    let bigger = config::Volume {
        size_gib: 2,
        ..vcfg()
    };
    let mut b = w.instance("us-east-1a", bigger, "overlay2").await;
    let e = b.volume.acquire().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::HeldByRunning { .. }), "{msg}");
    assert!(
        !w.fidelity
            .requests()
            .iter()
            .any(|r| r.action == "ModifyVolume"),
        "B modified the volume A owns"
    );
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

/// Capacity rebalancing: the replacement boots while the old instance still holds the volume.
/// With `live_holder_wait_secs` it waits instead of failing, and attaches within about a second
/// of the release (the old way, failing and retrying per `[failure]`, took up to 30 s more).
#[tokio::test]
async fn a_live_holder_is_waited_for_and_its_release_taken_over_at_once() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    a.volume.acquire().await.unwrap();
    let b = w
        .instance(
            "us-east-1a",
            config::Volume {
                live_holder_wait_secs: 60,
                ..vcfg()
            },
            "overlay2",
        )
        .await;
    let b_id = b.id.clone();
    let mut b_volume = b.volume;
    let waiting = tokio::spawn(async move { b_volume.acquire().await.map(|_| b_volume) });
    // B polls the volume while A holds it; A then drains (the old instance's termination).
    let before = w.calls("DescribeVolumes");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while w.calls("DescribeVolumes") < before + 3 {
        assert!(std::time::Instant::now() < deadline, "B does not poll");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!waiting.is_finished(), "B waits while A lives");
    a.volume.release().await.unwrap();
    let mut b_volume = waiting.await.unwrap().expect("B takes the volume");
    let gap = w.handover_gap(&a.id, &b_id);
    println!("B's AttachVolume reached EC2 {gap:?} after A's detach completed");
    assert!(
        gap < Duration::from_secs(5),
        "B noticed the release {gap:?} late"
    );
    b_volume.release().await.unwrap();
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

// ---------------------------------------------------------------------------------------------
// State never forks, goes stale or gets formatted
// ---------------------------------------------------------------------------------------------

fn pinned(id: &str) -> config::Volume {
    config::Volume {
        id: Some(id.to_string()),
        ..vcfg()
    }
}

/// A first instance in us-east-1a makes the state (one boot), and a second in us-east-1b moves
/// it there (boot two). Returns (old, new).
async fn state_moved_to_b(w: &World) -> (String, String) {
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let old = a.volume.acquire().await.unwrap().volume_id;
    a.volume.release().await.unwrap();
    let mut b = w.instance("us-east-1b", vcfg(), "overlay2").await;
    let new = b.volume.acquire().await.unwrap().volume_id;
    assert_ne!(new, old);
    b.volume.release().await.unwrap();
    (old, new)
}

#[tokio::test]
async fn a_pinned_volume_id_follows_the_move_to_the_live_volume() {
    let w = World::start(fast()).await;
    let (old, new) = state_moved_to_b(&w).await;
    // In the old volume's own zone, pinned to the old id: the old volume is stale.
    let mut c = w.instance("us-east-1b", pinned(&old), "overlay2").await;
    let m = c.volume.acquire().await.unwrap();
    assert_eq!(m.volume_id, new, "never the superseded volume");
    assert_eq!(
        c.record().boot_count,
        3,
        "the state that continued on the new volume"
    );
    assert!(c.spawned("mkfs.ext4").is_empty());
    c.volume.release().await.unwrap();
    // Pinned in the old zone: it follows the state out of it and back, through a new move —
    // never mounting the stale old volume that sits right there.
    let mut d = w.instance("us-east-1a", pinned(&old), "overlay2").await;
    let m = d.volume.acquire().await.unwrap();
    assert!(m.volume_id != old && m.volume_id != new, "{}", m.volume_id);
    assert_eq!(d.record().boot_count, 4);
    let v = w.moto.client().describe_volume(&new).await.unwrap();
    assert_eq!(
        tag(&v, "spotinit:superseded-by"),
        Some(m.volume_id.as_str())
    );
}

#[tokio::test]
async fn a_superseded_chain_that_loops_or_breaks_is_refused() {
    let w = World::start(fast()).await;
    let api = w.fidelity.client();
    let a = create_tagged(&api, "us-east-1a", &[("Name", "loop")]).await;
    let b = create_tagged(
        &api,
        "us-east-1a",
        &[("Name", "loop"), ("spotinit:superseded-by", &a)],
    )
    .await;
    api.call(
        "CreateTags",
        &[
            ("ResourceId.1", a.as_str()),
            ("Tag.1.Key", "spotinit:superseded-by"),
            ("Tag.1.Value", b.as_str()),
        ],
    )
    .await
    .unwrap();
    let before = w.fidelity.requests().len();
    let mut i = w.instance("us-east-1a", pinned(&a), "overlay2").await;
    let e = i.volume.acquire().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::Lineage { .. }), "{msg}");
    assert!(
        msg.contains("loop") && msg.contains(&format!("{a} -> {b} -> {a}")),
        "{msg}"
    );
    assert!(!e.retryable());
    assert!(!w.fidelity.requests()[before..]
        .iter()
        .any(|r| r.action == "AttachVolume"));

    let c = create_tagged(
        &api,
        "us-east-1a",
        &[("spotinit:superseded-by", "vol-0123456789abcdef0")],
    )
    .await;
    let before_c = w.fidelity.requests().len();
    let mut j = w.instance("us-east-1a", pinned(&c), "overlay2").await;
    let e = j.volume.acquire().await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("vol-0123456789abcdef0 does not exist") && msg.contains("set volume.id"),
        "{msg}"
    );
    // Nothing was attached, nothing created.
    let acted = |from: usize| {
        w.fidelity.requests()[from..]
            .iter()
            .any(|r| r.action == "AttachVolume" || r.action == "CreateVolume")
    };
    assert!(!acted(before_c));
}

#[tokio::test]
async fn only_superseded_volumes_left_is_refused_rather_than_creating_an_empty_one() {
    let w = World::start(fast()).await;
    let api = w.fidelity.client();
    let _old = create_tagged(
        &api,
        "us-east-1a",
        &[
            ("Name", "spotinit-state"),
            ("spotinit:superseded-by", "vol-0123456789abcdef0"),
        ],
    )
    .await;
    let before = w.fidelity.requests().len();
    let mut i = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let e = i.volume.acquire().await.unwrap_err();
    assert!(matches!(e, VolumeError::Lineage { .. }), "{e}");
    assert!(
        e.to_string().contains("will not create an empty one"),
        "{e}"
    );
    assert!(!w.fidelity.requests()[before..]
        .iter()
        .any(|r| r.action == "CreateVolume"));
}

#[tokio::test]
async fn two_instances_moving_one_volume_at_once_leave_exactly_one_copy() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let old = a.volume.acquire().await.unwrap().volume_id;
    a.volume.release().await.unwrap();
    let mut b = w.instance("us-east-1b", vcfg(), "overlay2").await;
    let mut c = w.instance("us-east-1c", vcfg(), "overlay2").await;
    let (rb, rc) = tokio::join!(b.volume.acquire(), c.volume.acquire());
    let (winner, loser, e) = match (rb, rc) {
        (Ok(m), Err(e)) => (m, &mut c, e),
        (Err(e), Ok(m)) => (m, &mut b, e),
        (rb, rc) => panic!("exactly one must get the state: {rb:?} / {rc:?}"),
    };
    assert!(e.retryable(), "{e}");
    assert!(
        matches!(
            e,
            VolumeError::BeingMoved { .. } | VolumeError::MoveLost { .. }
        ),
        "{e}"
    );
    let live = |vols: &[spotworld::moto::Volume]| -> Vec<String> {
        vols.iter()
            .filter(|v| tag(v, "spotinit:superseded-by").is_none() && v.state != "deleted")
            .map(|v| v.id.clone())
            .collect()
    };
    let vols = w.volumes().await;
    assert_eq!(live(&vols), vec![winner.volume_id.clone()], "{vols:#?}");
    let o = w.moto.client().describe_volume(&old).await.unwrap();
    assert_eq!(
        tag(&o, "spotinit:superseded-by"),
        Some(winner.volume_id.as_str())
    );
    // The loser, trying again, finds the state in use by the winner and keeps off it.
    let e = loser.volume.acquire().await.unwrap_err();
    assert!(matches!(e, VolumeError::HeldByRunning { .. }), "{e}");
    assert_eq!(live(&w.volumes().await), vec![winner.volume_id.clone()]);
    assert!(loser.spawned("mkfs.ext4").is_empty());
}

#[tokio::test]
async fn a_move_claimed_by_a_live_instance_is_waited_for() {
    let w = World::start(fast()).await;
    let api = w.fidelity.client();
    let mover = w.moto.client().run_instance("us-east-1b").await.unwrap();
    let claim = format!("{mover} us-east-1b 2026-11-29T10:00:00Z");
    let v = create_tagged(
        &api,
        "us-east-1a",
        &[("Name", "spotinit-state"), ("spotinit:moving", &claim)],
    )
    .await;
    let mut i = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let e = i.volume.acquire().await.unwrap_err();
    assert!(matches!(e, VolumeError::BeingMoved { .. }), "{e}");
    assert!(e.retryable() && e.to_string().contains(&mover), "{e}");
    // The mover is gone: its claim is cleared, the volume used, its would-be copies ignored.
    w.fidelity.terminate(&mover).await.unwrap();
    let m = i.volume.acquire().await.unwrap();
    assert_eq!(m.volume_id, v);
    let now = w.moto.client().describe_volume(&v).await.unwrap();
    assert_eq!(tag(&now, "spotinit:moving"), Some(""));
}

#[tokio::test]
async fn a_move_does_not_copy_tags_reserved_for_aws() {
    let w = World::start(fast()).await;
    let old = create_tagged(
        &w.fidelity.client(),
        "us-east-1a",
        &[("Name", "spotinit-state")],
    )
    .await;
    // As CloudFormation leaves it: tagged straight in moto, where AWS's own services write.
    w.moto
        .client()
        .call(
            "CreateTags",
            &[
                ("ResourceId.1", old.as_str()),
                ("Tag.1.Key", "aws:cloudformation:stack-name"),
                ("Tag.1.Value", "gitlab"),
            ],
        )
        .await
        .unwrap();
    let mut a = w.instance("us-east-1b", vcfg(), "overlay2").await;
    let m = a.volume.acquire().await.unwrap();
    let n = w.moto.client().describe_volume(&m.volume_id).await.unwrap();
    assert_eq!(tag(&n, "Name"), Some("spotinit-state"));
    assert_eq!(tag(&n, "spotinit:moved-from"), Some(old.as_str()));
    assert!(
        !n.tags.keys().any(|k| k.starts_with("aws:")),
        "{:?}",
        n.tags
    );
}

#[tokio::test]
async fn wildcards_in_a_tag_value_match_only_that_value() {
    let w = World::start(fast()).await;
    let api = w.fidelity.client();
    let star = create_tagged(&api, "us-east-1a", &[("Name", "git*")]).await;
    let _other = create_tagged(&api, "us-east-1a", &[("Name", "gitlab")]).await;
    let _q = create_tagged(&api, "us-east-1a", &[("Name", "gitX")]).await;
    let cfg = config::Volume {
        tags: BTreeMap::from([("Name".to_string(), "git*".to_string())]),
        ..vcfg()
    };
    let mut i = w.instance("us-east-1a", cfg, "overlay2").await;
    assert_eq!(i.volume.acquire().await.unwrap().volume_id, star);
}

#[tokio::test]
async fn a_used_volume_whose_head_and_tail_were_zeroed_is_refused_not_formatted() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let id = a.volume.acquire().await.unwrap().volume_id;
    a.volume.release().await.unwrap();
    let img = w.disks.image(&id);
    let size = std::fs::metadata(&img).unwrap().len();
    write_at(&img, 0, &vec![0u8; 1 << 20]);
    write_at(&img, size - (1 << 20), &vec![0u8; 1 << 20]);
    let before = std::fs::read(&img).unwrap();
    let mut b = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let e = b.volume.acquire().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::ForeignData { .. }), "{msg}");
    assert!(
        msg.contains("primary superblock is gone") && msg.contains("e2fsck -b"),
        "{msg}"
    );
    assert!(b.spawned("mkfs.ext4").is_empty());
    b.volume.release().await.unwrap();
    assert!(std::fs::read(&img).unwrap() == before, "not a byte changed");
}

#[tokio::test]
async fn a_found_volume_is_formatted_only_when_the_wide_sample_reads_zeros() {
    let w = World::start(fast()).await;
    let api = w.fidelity.client();
    let id = create_tagged(&api, "us-east-1a", &[("Name", "spotinit-state")]).await;
    // A filesystem at an offset: zeros where the probe looks, data in the middle.
    write_at(&w.disks.image(&id), 300 << 20, b"some data of someone's");
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let e = a.volume.acquire().await.unwrap_err();
    assert!(e.to_string().contains("data at byte"), "{e}");
    assert!(a.spawned("mkfs.ext4").is_empty());
    a.volume.release().await.unwrap();
    // Truly blank (made by someone else, tagged to be adopted): formatted, without a discard.
    write_at(&w.disks.image(&id), 300 << 20, &[0u8; 64]);
    let mut b = w.instance("us-east-1a", vcfg(), "overlay2").await;
    b.volume.acquire().await.unwrap();
    let mkfs = b.spawned("mkfs.ext4");
    assert_eq!(mkfs.len(), 1);
    assert!(mkfs[0].iter().any(|a| a.contains("nodiscard")), "{mkfs:?}");
    let v = w.moto.client().describe_volume(&id).await.unwrap();
    assert_eq!(tag(&v, "spotinit:format"), Some("done"));
}

#[tokio::test]
async fn an_unfinished_first_format_is_done_again_and_only_then() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    // The first mkfs dies half-way: some of its structures written, no superblock.
    a.fake.on_spawn("mkfs.ext4", |cmd| {
        let dev = cmd.args.last().unwrap().clone();
        write_at(std::path::Path::new(&dev), 5 << 20, &[0xab; 4096]);
    });
    a.fake.exit_codes("mkfs.ext4", &[137]);
    let e = a.volume.acquire().await.unwrap_err();
    assert!(e.to_string().contains("mkfs.ext4"), "{e}");
    a.volume.release().await.unwrap();
    let id = w.volumes().await[0].id.clone();
    let v = w.moto.client().describe_volume(&id).await.unwrap();
    assert!(
        tag(&v, "spotinit:format").is_some_and(|t| t.starts_with(&format!("started by {}", a.id))),
        "{:?}",
        v.tags
    );
    // The next instance: not created by it, not blank — but nothing else ever wrote to it.
    let mut b = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let m = b.volume.acquire().await.unwrap();
    assert_eq!(m.volume_id, id);
    assert_eq!(b.spawned("mkfs.ext4").len(), 1);
    let v = w.moto.client().describe_volume(&id).await.unwrap();
    assert_eq!(tag(&v, "spotinit:format"), Some("done"));
    b.volume.release().await.unwrap();
    // Once done, the same damage is refused like anyone's data.
    write_at(&w.disks.image(&id), 0, &vec![0u8; 1 << 20]);
    let mut c = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let e = c.volume.acquire().await.unwrap_err();
    assert!(matches!(e, VolumeError::ForeignData { .. }), "{e}");
    assert!(c.spawned("mkfs.ext4").is_empty());
}

#[tokio::test]
async fn a_used_volume_whose_docker_state_is_gone_is_refused() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let id = a.volume.acquire().await.unwrap().volume_id;
    a.volume.release().await.unwrap();
    // An fsck put docker/ into lost+found.
    let content = w.disks.content(&id);
    std::fs::create_dir_all(content.join("lost+found")).unwrap();
    std::fs::rename(content.join("docker"), content.join("lost+found/#131073")).unwrap();
    let mut b = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let e = b.volume.acquire().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::StateMissing { .. }), "{msg}");
    assert!(
        msg.contains("docker/ is missing") && msg.contains("lost+found/ holds 1 entries"),
        "{msg}"
    );
    assert!(!e.retryable());
    assert!(!b
        .fake
        .briefs()
        .iter()
        .any(|x| x == "mount bind /var/lib/docker"));
    assert!(!content.join("docker").exists(), "not recreated empty");
    assert_eq!(b.record().boot_count, 1, "the record is untouched");
}

#[tokio::test]
async fn a_volume_without_a_record_whose_lost_and_found_holds_files_is_not_empty() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let id = a.volume.acquire().await.unwrap().volume_id;
    a.volume.release().await.unwrap();
    let content = w.disks.content(&id);
    std::fs::remove_dir_all(content.join(".spotinit")).unwrap();
    std::fs::remove_dir_all(content.join("docker")).unwrap();
    std::fs::remove_dir_all(content.join("containerd")).unwrap();
    std::fs::create_dir_all(content.join("lost+found")).unwrap();
    std::fs::write(content.join("lost+found/#12"), "someone's file").unwrap();
    let mut b = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let e = b.volume.acquire().await.unwrap_err();
    assert!(matches!(e, VolumeError::NoRecord { .. }), "{e}");
}

#[tokio::test]
async fn the_release_unmounts_what_was_left_on_the_volume_deepest_first_then_detaches() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let id = a.volume.acquire().await.unwrap().volume_id;
    // What a container left: a tmpfs below /var/lib/docker, an overlay on top of that.
    let docker = a.root.join("var/lib/docker");
    let tmp = docker.join("volumes/x/_data");
    a.fake
        .mount(&MountSpec::fs(
            "tmpfs",
            "tmpfs",
            tmp.clone(),
            MsFlags::empty(),
            "",
        ))
        .unwrap();
    a.fake
        .mount(&MountSpec::fs(
            "tmpfs",
            "shm",
            tmp.join("shm"),
            MsFlags::empty(),
            "",
        ))
        .unwrap();
    a.volume.release().await.unwrap();
    let umounts: Vec<String> = a
        .fake
        .briefs()
        .into_iter()
        .filter(|x| x.starts_with("umount"))
        .collect();
    assert_eq!(
        umounts,
        [
            "umount /var/lib/docker/volumes/x/_data/shm",
            "umount /var/lib/docker/volumes/x/_data",
            "umount /var/lib/containerd",
            "umount /var/lib/docker",
            "umount /run/spotinit/volume"
        ]
    );
    // The record lives on the volume: read it through its content directory.
    let text = std::fs::read_to_string(w.disks.content(&id).join(layout::RECORD)).unwrap();
    assert!(text.contains("clean_shutdown = true"), "{text}");
    assert_eq!(
        w.moto.client().describe_volume(&id).await.unwrap().state,
        "available"
    );
}

#[tokio::test]
async fn a_mount_that_will_not_go_is_made_read_only_and_if_that_fails_nothing_is_detached() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let id = a.volume.acquire().await.unwrap().volume_id;
    let stuck = a.root.join("var/lib/docker/overlay2/abc/merged");
    a.fake
        .mount(&MountSpec::fs(
            "overlay",
            "overlay",
            stuck.clone(),
            MsFlags::empty(),
            "",
        ))
        .unwrap();
    a.fake.fail_when(
        move |op| matches!(op, Op::Umount { target, .. } if target.ends_with("abc/merged")),
        nix::errno::Errno::EBUSY,
    );
    a.fake.fail_when(
        |op| matches!(op, Op::Remount { .. }),
        nix::errno::Errno::EBUSY,
    );
    let e = a.volume.release().await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::StillMounted { .. }), "{msg}");
    assert!(
        msg.contains("overlay2/abc/merged") && msg.contains("not detached"),
        "{msg}"
    );
    assert!(!w
        .fidelity
        .requests()
        .iter()
        .any(|r| r.action == "DetachVolume"));
    let v = w.moto.client().describe_volume(&id).await.unwrap();
    assert_eq!(v.attachments.len(), 1, "still attached: {v:?}");
    let text = std::fs::read_to_string(w.disks.content(&id).join(layout::RECORD)).unwrap();
    assert!(text.contains("clean_shutdown = false"), "{text}");
}

#[tokio::test]
async fn a_stuck_mount_with_a_read_only_filesystem_is_detached_unclean() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let id = a.volume.acquire().await.unwrap().volume_id;
    let stuck = a.root.join("var/lib/docker/overlay2/abc/merged");
    a.fake
        .mount(&MountSpec::fs(
            "overlay",
            "overlay",
            stuck,
            MsFlags::empty(),
            "",
        ))
        .unwrap();
    a.fake.fail_when(
        |op| matches!(op, Op::Umount { target, .. } if target.ends_with("abc/merged")),
        nix::errno::Errno::EBUSY,
    );
    a.volume.release().await.unwrap();
    let b = a.fake.briefs();
    let ro = b
        .iter()
        .position(|x| x == "remount /run/spotinit/volume")
        .expect("remounted");
    assert!(!b[ro..]
        .iter()
        .any(|x| x.starts_with("umount /run/spotinit/volume")));
    assert_eq!(
        w.moto.client().describe_volume(&id).await.unwrap().state,
        "available"
    );
    let text = std::fs::read_to_string(w.disks.content(&id).join(layout::RECORD)).unwrap();
    assert!(
        text.contains("clean_shutdown = false"),
        "never marked clean: {text}"
    );
}

#[tokio::test]
async fn a_persisted_root_is_made_read_only_before_its_volume_is_detached() {
    let w = World::start(fast()).await;
    let cfg = config::Volume {
        mode: config::VolumeMode::PersistedRoot,
        ..vcfg()
    };
    let mut a = w.instance("us-east-1a", cfg.clone(), "overlay2").await;
    let id = a.volume.acquire().await.unwrap().volume_id;
    // The pivot made rootfs/ of the volume the root.
    let root = a.root.clone();
    a.fake
        .mount(&MountSpec::bind(
            root.join("run/spotinit/volume/rootfs"),
            root.clone(),
        ))
        .unwrap();
    a.volume.release().await.unwrap();
    let b = a.fake.briefs();
    assert!(b.iter().any(|x| x == "remount /"), "{b:#?}");
    assert!(!b.iter().any(|x| x == "umount /"), "{b:#?}");
    assert_eq!(
        w.moto.client().describe_volume(&id).await.unwrap().state,
        "available"
    );
    let text = std::fs::read_to_string(w.disks.content(&id).join(layout::RECORD)).unwrap();
    assert!(text.contains("clean_shutdown = true"), "{text}");

    // The same, but the root will not go read-only: the volume stays attached, not clean.
    let mut c = w.instance("us-east-1a", cfg, "overlay2").await;
    c.volume.acquire().await.unwrap();
    let root = c.root.clone();
    c.fake
        .mount(&MountSpec::bind(
            root.join("run/spotinit/volume/rootfs"),
            root.clone(),
        ))
        .unwrap();
    c.fake.fail_when(
        |op| matches!(op, Op::Remount { .. }),
        nix::errno::Errno::EBUSY,
    );
    let e = c.volume.release().await.unwrap_err();
    assert!(matches!(e, VolumeError::StillMounted { .. }), "{e}");
    let v = w.moto.client().describe_volume(&id).await.unwrap();
    assert_eq!(
        v.attachments.len(),
        1,
        "never detached under a read-write root: {v:?}"
    );
    let text = std::fs::read_to_string(w.disks.content(&id).join(layout::RECORD)).unwrap();
    assert!(text.contains("clean_shutdown = false"), "{text}");
}

#[tokio::test]
async fn a_detach_refused_while_attached_backs_off_instead_of_spinning() {
    let w = World::start(fast()).await;
    let mut a = w.instance("us-east-1a", vcfg(), "overlay2").await;
    let id = a.volume.acquire().await.unwrap().volume_id;
    w.fidelity.inject("DetachVolume", Fault::IncorrectState, 3);
    let start = Instant::now();
    a.volume.release().await.unwrap();
    let took = start.elapsed();
    let detaches: Vec<_> = w
        .fidelity
        .requests()
        .into_iter()
        .filter(|r| r.action == "DetachVolume")
        .collect();
    assert_eq!(detaches.len(), 4, "{detaches:?}");
    // 0.5 + 1 + 2 s of pauses between the refusals.
    assert!(took >= Duration::from_secs(3), "{took:?}");
    assert_eq!(
        w.moto.client().describe_volume(&id).await.unwrap().state,
        "available"
    );
}
