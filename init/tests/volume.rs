//! The volume phase against the EC2 world in a box: moto behind the fidelity layer (real
//! VolumeInUse, zone checks, latencies, delayed release, injected faults), reached by the real
//! aws-sdk-ec2 signing with instance-role credentials served by the IMDS mock.
//!
//! Each simulated instance has its own root directory. A volume is a backing file plus a
//! directory standing for its filesystem's content: when the fidelity layer attaches it, the
//! file appears in the instance's /dev and sysfs (with a uevent), `mkfs.ext4` runs for real on
//! it, and the faked mount shows the content directory at /run/spotinit/volume. So records,
//! signatures and moves carry over between instances exactly as on EBS, without root.

use spotinit::cloud::ec2::Ec2Client;
use spotinit::cloud::imds::Imds;
use spotinit::cloud::Identity;
use spotinit::config;
use spotinit::sys::fake::{FakeSystem, Op};
use spotinit::sys::Paths;
use spotinit::volume::device::{DeviceWatcher, Uevent};
use spotinit::volume::ebs::EbsVolume;
use spotinit::volume::layout;
use spotinit::volume::{VolumeError, VolumePhase};
use spotworld::fidelity::{Fault, Fidelity, Settings};
use spotworld::imds::ImdsMock;
use spotworld::moto::{unique_temp_dir, MotoServer};
use spotworld::{BoxFuture, EbsHooks};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Volumes as files, attached into instance roots.
struct Disks {
    dir: PathBuf,
    instances: Mutex<HashMap<String, (PathBuf, mpsc::UnboundedSender<Uevent>)>>,
    plugged: Mutex<HashMap<String, (String, String)>>, // volume -> (instance, disk name)
    next: AtomicUsize,
}

impl Disks {
    fn image(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.img"))
    }
    fn content(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.d"))
    }
    fn copy(&self, from: &str, to: &str) -> Result<(), String> {
        std::fs::copy(self.image(from), self.image(to)).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("cp")
            .arg("-a")
            .arg(self.content(from))
            .arg(self.content(to))
            .status()
            .map_err(|e| e.to_string())?;
        out.success().then_some(()).ok_or("cp -a failed".into())
    }
    fn event(&self, instance: &str, action: &str, name: &str) {
        if let Some((_, tx)) = self.instances.lock().unwrap().get(instance) {
            let _ = tx.send(Uevent {
                action: action.into(),
                subsystem: "block".into(),
                devname: name.into(),
                devtype: "disk".into(),
            });
        }
    }
}

impl EbsHooks for Disks {
    fn volume_created<'a>(
        &'a self,
        id: &'a str,
        size_gib: u64,
        snapshot: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            match snapshot {
                Some(s) => self.copy(s, id),
                None => {
                    let f = std::fs::File::create(self.image(id)).map_err(|e| e.to_string())?;
                    f.set_len(size_gib << 30).map_err(|e| e.to_string())?;
                    std::fs::create_dir_all(self.content(id)).map_err(|e| e.to_string())
                }
            }
        })
    }
    fn snapshot_created<'a>(
        &'a self,
        snap: &'a str,
        vol: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.copy(vol, snap) })
    }
    fn attach<'a>(&'a self, instance: &'a str, vol: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let root = self
                .instances
                .lock()
                .unwrap()
                .get(instance)
                .map(|(r, _)| r.clone())
                .ok_or(format!("no instance {instance}"))?;
            let name = format!("nvme{}n1", self.next.fetch_add(1, Ordering::SeqCst) + 1);
            let dev = root.join("sys/block").join(&name).join("device");
            std::fs::create_dir_all(&dev).map_err(|e| e.to_string())?;
            std::fs::write(dev.join("serial"), vol.replace('-', "")).map_err(|e| e.to_string())?;
            std::fs::write(dev.join("model"), "Amazon Elastic Block Store")
                .map_err(|e| e.to_string())?;
            std::fs::create_dir_all(root.join("sys/block").join(&name).join("queue")).unwrap();
            std::fs::create_dir_all(root.join("dev")).unwrap();
            std::os::unix::fs::symlink(self.image(vol), root.join("dev").join(&name))
                .map_err(|e| e.to_string())?;
            self.plugged
                .lock()
                .unwrap()
                .insert(vol.into(), (instance.into(), name.clone()));
            self.event(instance, "add", &name);
            Ok(())
        })
    }
    fn detach<'a>(&'a self, instance: &'a str, vol: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let Some((inst, name)) = self.plugged.lock().unwrap().remove(vol) else {
                return Ok(());
            };
            if let Some((root, _)) = self.instances.lock().unwrap().get(&inst) {
                let _ = std::fs::remove_dir_all(root.join("sys/block").join(&name));
                let _ = std::fs::remove_file(root.join("dev").join(&name));
            }
            self.event(instance, "remove", &name);
            Ok(())
        })
    }
    fn instance_gone<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.instances.lock().unwrap().remove(instance);
            self.plugged
                .lock()
                .unwrap()
                .retain(|_, (i, _)| i != instance);
        })
    }
}

struct World {
    fidelity: Fidelity,
    moto: MotoServer,
    disks: Arc<Disks>,
    dir: PathBuf,
}

struct Instance {
    id: String,
    root: PathBuf,
    fake: FakeSystem,
    _imds: ImdsMock,
    volume: EbsVolume<Ec2Client, FakeSystem>,
}

fn fast() -> Settings {
    Settings {
        attach_latency: Duration::from_millis(300),
        detach_latency: Duration::from_millis(200),
        volume_creation: Duration::from_millis(200),
        snapshot_duration: Duration::from_millis(800),
        shutting_down: Duration::from_millis(300),
        release_after_termination: Duration::from_secs(3),
        ..Settings::default()
    }
}

/// Default volume settings for tests: small, quick waits.
fn vcfg() -> config::Volume {
    config::Volume {
        size_gib: 1,
        attach_timeout_secs: 30,
        device_timeout_secs: 10,
        release_wait_secs: 60,
        snapshot_timeout_secs: 60,
        ..config::Volume::default()
    }
}

impl World {
    async fn start(settings: Settings) -> World {
        let dir = unique_temp_dir("spotinit-volume-test").unwrap();
        let moto = MotoServer::start().await.expect("moto server");
        let disks = Arc::new(Disks {
            dir: dir.join("ebs"),
            instances: Mutex::new(HashMap::new()),
            plugged: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
        });
        std::fs::create_dir_all(&disks.dir).unwrap();
        let fidelity = Fidelity::start(moto.endpoint(), disks.clone(), settings)
            .await
            .unwrap();
        World {
            fidelity,
            moto,
            disks,
            dir,
        }
    }

    async fn instance(&self, zone: &str, cfg: config::Volume, driver: &str) -> Instance {
        let id = self.moto.client().run_instance(zone).await.unwrap();
        let imds = ImdsMock::start(spotworld::imds::Identity::new(&id, zone), None)
            .await
            .unwrap();
        let root = self.dir.join(&id);
        std::fs::create_dir_all(root.join("sys/block")).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        self.disks
            .instances
            .lock()
            .unwrap()
            .insert(id.clone(), (root.clone(), tx));
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
        let meta = Imds::new(Some(&imds.endpoint())).unwrap();
        let ec2 =
            Ec2Client::with_instance_role("us-east-1", Some(&self.fidelity.endpoint()), &meta);
        let me = Identity {
            instance_id: id.clone(),
            region: "us-east-1".into(),
            zone: zone.into(),
            account_id: "123456789012".into(),
            instance_type: "t3.small".into(),
            image_id: "ami-03cf127a".into(),
        };
        let devices = DeviceWatcher::start(root.join("sys/block"), rx);
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

    /// The volumes that are not instance root volumes (moto gives every instance one).
    async fn volumes(&self) -> Vec<spotworld::moto::Volume> {
        let mut v = self.moto.client().describe_volumes_all().await.unwrap();
        v.retain(|v| !v.tags.is_empty());
        v
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
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

fn tag<'a>(v: &'a spotworld::moto::Volume, k: &str) -> Option<&'a str> {
    v.tags.get(k).map(String::as_str)
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

async fn create_tagged(
    api: &spotworld::moto::Ec2Client,
    zone: &str,
    tags: &[(&str, &str)],
) -> String {
    let mut p: Vec<(String, String)> = vec![
        ("AvailabilityZone".into(), zone.into()),
        ("Size".into(), "1".into()),
        ("TagSpecification.1.ResourceType".into(), "volume".into()),
    ];
    for (i, (k, v)) in tags.iter().enumerate() {
        p.push((
            format!("TagSpecification.1.Tag.{}.Key", i + 1),
            k.to_string(),
        ));
        p.push((
            format!("TagSpecification.1.Tag.{}.Value", i + 1),
            v.to_string(),
        ));
    }
    let params: Vec<(&str, &str)> = p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let xml = api.call("CreateVolume", &params).await.unwrap();
    let id = spotworld::moto::root_text(&xml, "volumeId").unwrap();
    // Wait out `creating`.
    let until = Instant::now() + Duration::from_secs(10);
    while api.describe_volume(&id).await.unwrap().state != "available" {
        assert!(Instant::now() < until, "volume {id} stays creating");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    id
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

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
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
