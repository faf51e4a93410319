//! Test support shared by the unit tests and the benchmarks: a fake cloud (identity, user
//! data, a scripted volume phase) and a sandbox root in which the recording fake system's
//! "daemons" open the sockets the boot waits for. Nothing here runs in production.

use crate::cloud::{CloudError, Identity, Metadata, SpotAction};
use crate::config::Config;
use crate::machine::{Platform, Request};
use crate::sys::fake::{Behavior, FakeSystem};
use crate::sys::Paths;
use crate::volume::layout::{self, Record};
use crate::volume::{Mounted, VolumeError, VolumePhase};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

#[derive(Clone)]
pub struct FakeMeta {
    pub user_data: Option<String>,
}

impl Metadata for FakeMeta {
    async fn identity(&self) -> Result<Identity, CloudError> {
        Ok(Identity {
            instance_id: "i-0123456789abcdef0".into(),
            region: "us-east-1".into(),
            zone: "us-east-1a".into(),
            account_id: "123456789012".into(),
            instance_type: "t3.small".into(),
            image_id: "ami-03cf127a".into(),
        })
    }
    async fn local_hostname(&self) -> Result<Option<String>, CloudError> {
        Ok(Some("ip-10-0-2-15.ec2.internal".into()))
    }
    async fn user_data(&self) -> Result<Option<String>, CloudError> {
        Ok(self.user_data.clone())
    }
    async fn spot_action(&self) -> Result<Option<SpotAction>, CloudError> {
        Ok(None)
    }
    async fn rebalance(&self) -> Result<Option<String>, CloudError> {
        Ok(None)
    }
    async fn scheduled_events(&self) -> Result<Vec<crate::cloud::ScheduledEvent>, CloudError> {
        Ok(Vec::new())
    }
    async fn key_pair(&self) -> Result<Option<String>, CloudError> {
        Ok(None)
    }
}

/// What the fake volume does on acquire.
#[derive(Clone, Copy)]
pub enum Script {
    Mount,
    /// Fail this many times with a retryable error, then mount.
    FlakyThenMount(usize),
    FailForeign,
    /// Never finish (so a shutdown request interrupts the boot).
    Hang,
    /// Claim success without binding /var/lib/docker (a broken volume phase).
    MountWithoutBinds,
    /// Mount as persisted-root mode would: the mountinfo shows "/" as rootfs/ of the volume.
    PersistedRoot,
    /// A first mkfs that takes this long (critical work: a shutdown lets it finish), then mount.
    SlowFormat(std::time::Duration),
    /// Mount a volume of pool `runners`, slot 2.
    PoolSlot,
}

pub struct FakeVolume {
    pub critical: crate::critical::Critical,
    pub fake: FakeSystem,
    pub root: PathBuf,
    pub script: Script,
    pub tries: Arc<AtomicUsize>,
    /// (op index when it happened, what)
    pub log: Arc<Mutex<Vec<(usize, &'static str)>>>,
}

impl FakeVolume {
    fn note(&self, what: &'static str) {
        self.log.lock().unwrap().push((self.fake.ops().len(), what));
    }

    /// Writes the record and the mountinfo lines the golden-rule check reads.
    fn mount(&self, binds: bool) -> Mounted {
        let paths = Paths::under(&self.root);
        let record = Record {
            format: 1,
            volume_id: "vol-0aaaaaaaaaaaaaaaa".into(),
            storage_driver: "overlay2".into(),
            last_instance: "i-0123456789abcdef0".into(),
            boot_count: 1,
            ..Record::default()
        };
        layout::write_record(&paths, &record).unwrap();
        let vm = self.root.join("run/spotinit/volume");
        let mut info = format!("40 1 259:5 / {} rw - ext4 /dev/nvme1n1 rw\n", vm.display());
        if binds {
            for (dir, target) in layout::BINDS {
                info.push_str(&format!(
                    "41 1 259:5 /{dir} {} rw - ext4 /dev/nvme1n1 rw\n",
                    paths.p(target).display()
                ));
            }
        }
        std::fs::create_dir_all(self.root.join("proc/self")).unwrap();
        std::fs::write(self.root.join("proc/self/mountinfo"), info).unwrap();
        Mounted {
            volume_id: record.volume_id.clone(),
            device: PathBuf::from("/dev/nvme1n1"),
            record,
            slot: None,
        }
    }
}

impl VolumePhase for FakeVolume {
    async fn acquire(&mut self) -> Result<Mounted, VolumeError> {
        self.note("volume acquire");
        let n = self.tries.fetch_add(1, Ordering::SeqCst);
        match self.script {
            Script::Mount => Ok(self.mount(true)),
            Script::PoolSlot => Ok(Mounted {
                slot: Some(crate::volume::Slot {
                    pool: "runners".into(),
                    number: 2,
                }),
                ..self.mount(true)
            }),
            Script::MountWithoutBinds => Ok(self.mount(false)),
            Script::PersistedRoot => {
                let m = self.mount(false);
                let info = self.root.join("proc/self/mountinfo");
                let mut text = std::fs::read_to_string(&info).unwrap();
                text.push_str(&format!(
                    "42 1 259:5 /rootfs {} rw - ext4 /dev/nvme1n1 rw\n",
                    self.root.display()
                ));
                std::fs::write(&info, text).unwrap();
                Ok(m)
            }
            Script::FlakyThenMount(k) if n < k => Err(VolumeError::HeldByRunning {
                volume: "vol-0aaaaaaaaaaaaaaaa".into(),
                holder: "i-0other".into(),
                state: "running".into(),
            }),
            Script::FlakyThenMount(_) => Ok(self.mount(true)),
            Script::FailForeign => Err(VolumeError::ForeignData {
                volume: "vol-0aaaaaaaaaaaaaaaa".into(),
                device: "/dev/nvme1n1".into(),
                found: "a xfs signature".into(),
            }),
            Script::Hang => std::future::pending().await,
            Script::SlowFormat(took) => {
                let (fake, log) = (self.fake.clone(), self.log.clone());
                self.critical
                    .run("mkfs.ext4 of vol-0aaaaaaaaaaaaaaaa", async move {
                        tokio::time::sleep(took).await;
                        log.lock()
                            .unwrap()
                            .push((fake.ops().len(), "mkfs finished"));
                    })
                    .await;
                Ok(self.mount(true))
            }
        }
    }
    async fn release(&mut self) -> Result<(), VolumeError> {
        self.note("volume release");
        Ok(())
    }
    async fn finish_critical(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> crate::critical::Finished {
        self.critical.finish(deadline).await
    }
}

pub struct FakeCloud {
    pub fake: FakeSystem,
    pub root: PathBuf,
    pub user_data: Option<String>,
    pub script: Script,
    pub tries: Arc<AtomicUsize>,
    pub log: Arc<Mutex<Vec<(usize, &'static str)>>>,
}

impl Platform for FakeCloud {
    type Meta = FakeMeta;
    type Volume = FakeVolume;
    fn metadata(&self, _: Option<&str>) -> Result<FakeMeta, CloudError> {
        Ok(FakeMeta {
            user_data: self.user_data.clone(),
        })
    }
    fn volume(&self, _: &Config, _: &Identity, _: &FakeMeta) -> Result<FakeVolume, VolumeError> {
        Ok(FakeVolume {
            critical: crate::critical::Critical::default(),
            fake: self.fake.clone(),
            root: self.root.clone(),
            script: self.script,
            tries: self.tries.clone(),
            log: self.log.clone(),
        })
    }
    type Events = ();
    fn watch(&self, _: &Config, _: &FakeMeta, _: mpsc::UnboundedSender<Request>) {}
    fn start_volume_upkeep(&self, _: &Config, _: &Identity, _: &FakeMeta, _: &Mounted, _: ()) {
        self.log
            .lock()
            .unwrap()
            .push((self.fake.ops().len(), "volume upkeep"));
    }
}

/// A temp root with what the boot reads, and fake daemons that open their sockets when
/// "spawned".
pub fn world(
    name: &str,
    user_data: Option<&str>,
    script: Script,
) -> (FakeSystem, FakeCloud, PathBuf) {
    let root = std::env::temp_dir().join(format!("sb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("proc")).unwrap();
    std::fs::write(root.join("proc/cmdline"), "console=ttyS0 quiet\n").unwrap();
    std::fs::create_dir_all(root.join("sys/class/net/eth0/device")).unwrap();
    std::fs::create_dir_all(root.join("sys/class/net/lo")).unwrap();
    let fake = FakeSystem::new(&root);
    for daemon in ["containerd", "dockerd", "busybox"] {
        fake.behave(daemon, Behavior::Run);
    }
    let lease = root.join("run/spotinit/dhcp-eth0.env");
    fake.on_spawn("busybox", move |_| {
        std::fs::create_dir_all(lease.parent().unwrap()).unwrap();
        std::fs::write(&lease, "ip=10.0.2.15\nprefix=24\nrouter=10.0.2.2\n").unwrap();
    });
    let csock = root.join("run/containerd/containerd.sock");
    fake.on_spawn("containerd", move |_| serve_socket(&csock, false));
    let dsock = root.join("run/docker.sock");
    fake.on_spawn("dockerd", move |_| serve_socket(&dsock, true));
    let cloud = FakeCloud {
        fake: fake.clone(),
        root: root.clone(),
        user_data: user_data.map(str::to_string),
        script,
        tries: Arc::new(AtomicUsize::new(0)),
        log: Arc::new(Mutex::new(Vec::new())),
    };
    (fake, cloud, root)
}

/// A fake daemon: listens on `path` (as dockerd when `engine_api`, answering every request).
pub fn serve_socket(path: &Path, engine_api: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            if engine_api {
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let body = if req.starts_with("GET /containers/json") {
                    "[]"
                } else {
                    "OK"
                };
                let _ = s
                    .write_all(format!("HTTP/1.0 200 OK\r\n\r\n{body}").as_bytes())
                    .await;
            }
        }
    });
}
