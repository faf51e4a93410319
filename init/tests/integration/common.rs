//! Helpers shared by the integration tests.
//!
//! - The EC2 world in a box ([`World`], [`Disks`]): moto behind the fidelity layer, volumes as
//!   backing files that "attach" into a simulated instance's root, either as the file itself
//!   ([`Plug::File`], no root needed) or as a loop device of it ([`Plug::Loop`], root).
//! - The privileged-test harness ([`privileged`]): a test that needs root re-executes its own
//!   test binary under `unshare` (a private mount namespace, optionally a new PID namespace in
//!   which it is PID 1), runs there, and the outer test cleans up loop devices and checks that
//!   no mount leaked onto the host. Without root or a needed tool it says SKIPPED and why.
//! - [`Spy`]: a [`System`] that records every call and passes it to the real one, except the
//!   calls that would reach the whole machine (power, hostname, ctrl-alt-del, interfaces).

use spotinit::cloud::ec2::Ec2Client;
use spotinit::cloud::imds::Imds;
use spotinit::cloud::Identity;
use spotinit::config;
use spotinit::sys::{
    Child, CommandSpec, Linux, MountSpec, MsFlags, Output, Pid, PowerAction, Signal, SysResult,
    System,
};
use spotinit::volume::device::{DeviceWatcher, Uevent};
use spotworld::fidelity::{Fidelity, Settings};
use spotworld::imds::ImdsMock;
use spotworld::moto::{unique_temp_dir, MotoServer};
use spotworld::{BoxFuture, EbsHooks};
use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------------
// The EC2 world
// ---------------------------------------------------------------------------------------------

/// How an attached volume shows up in the instance's /dev.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plug {
    /// `/dev/nvmeXn1` is a symlink to the backing file (no root needed; mounts are faked).
    File,
    /// `/dev/nvmeXn1` is a symlink to a loop device of the backing file, made at attach and
    /// released at detach (root; real mkfs, fsck and mounts).
    Loop,
}

/// volume -> (instance, disk name, loop device)
type Plugged = (String, String, Option<PathBuf>);

/// Volumes as files, attached into instance roots.
pub struct Disks {
    pub dir: PathBuf,
    pub plug: Plug,
    pub instances: Mutex<HashMap<String, (PathBuf, mpsc::UnboundedSender<Uevent>)>>,
    plugged: Mutex<HashMap<String, Plugged>>,
    next: AtomicUsize,
}

impl Disks {
    pub fn image(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.img"))
    }
    /// The directory that stands for the volume's filesystem when mounts are faked.
    pub fn content(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.d"))
    }
    /// The loop device a volume is plugged in as, if any.
    pub fn loop_device(&self, vol: &str) -> Option<PathBuf> {
        self.plugged.lock().unwrap().get(vol)?.2.clone()
    }
    fn copy(&self, from: &str, to: &str) -> Result<(), String> {
        std::fs::copy(self.image(from), self.image(to)).map_err(|e| e.to_string())?;
        if self.plug == Plug::Loop {
            return Ok(()); // The filesystem is in the image itself.
        }
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
    fn volume_resized<'a>(
        &'a self,
        vol: &'a str,
        size_gib: u64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(self.image(vol))
                .map_err(|e| e.to_string())?;
            f.set_len(size_gib << 30).map_err(|e| e.to_string())
        })
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
            let (node, loop_dev) = match self.plug {
                Plug::File => (self.image(vol), None),
                Plug::Loop => {
                    let l = loop_attach(&self.image(vol)).await?;
                    (l.clone(), Some(l))
                }
            };
            let dev = root.join("sys/block").join(&name).join("device");
            std::fs::create_dir_all(&dev).map_err(|e| e.to_string())?;
            std::fs::write(dev.join("serial"), vol.replace('-', "")).map_err(|e| e.to_string())?;
            std::fs::write(dev.join("model"), "Amazon Elastic Block Store")
                .map_err(|e| e.to_string())?;
            std::fs::create_dir_all(root.join("sys/block").join(&name).join("queue")).unwrap();
            // As the kernel has it for a blk-mq NVMe namespace (EC2 Nitro).
            std::fs::write(
                root.join("sys/block").join(&name).join("queue/io_timeout"),
                "30000\n",
            )
            .unwrap();
            std::fs::create_dir_all(root.join("dev")).unwrap();
            std::os::unix::fs::symlink(node, root.join("dev").join(&name))
                .map_err(|e| e.to_string())?;
            self.plugged
                .lock()
                .unwrap()
                .insert(vol.into(), (instance.into(), name.clone(), loop_dev));
            self.event(instance, "add", &name);
            Ok(())
        })
    }
    fn detach<'a>(&'a self, instance: &'a str, vol: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let Some((inst, name, loop_dev)) = self.plugged.lock().unwrap().remove(vol) else {
                return Ok(());
            };
            if let Some((root, _)) = self.instances.lock().unwrap().get(&inst) {
                let _ = std::fs::remove_dir_all(root.join("sys/block").join(&name));
                let _ = std::fs::remove_file(root.join("dev").join(&name));
            }
            if let Some(l) = loop_dev {
                loop_release(&l);
            }
            self.event(instance, "remove", &name);
            Ok(())
        })
    }
    fn instance_gone<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.instances.lock().unwrap().remove(instance);
            self.plugged.lock().unwrap().retain(|_, (i, _, l)| {
                if i == instance {
                    if let Some(l) = l {
                        loop_release(l);
                    }
                }
                i != instance
            });
        })
    }
}

pub struct World {
    pub fidelity: Fidelity,
    pub moto: MotoServer,
    pub disks: Arc<Disks>,
    pub dir: PathBuf,
}

/// What every simulated instance has, whatever its [`System`].
pub struct InstanceParts {
    pub id: String,
    pub root: PathBuf,
    pub imds: ImdsMock,
    pub ec2: Ec2Client,
    pub me: Identity,
    pub devices: DeviceWatcher,
}

pub fn fast() -> Settings {
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
pub fn vcfg() -> config::Volume {
    config::Volume {
        size_gib: 1,
        attach_timeout_secs: 30,
        device_timeout_secs: 10,
        release_wait_secs: 60,
        // Fail at once on a live holder, as the tests of that expect; the handover test sets it.
        live_holder_wait_secs: 0,
        snapshot_timeout_secs: 60,
        ..config::Volume::default()
    }
}

impl World {
    /// A world of file-backed volumes in a temporary directory of its own.
    pub async fn start(settings: Settings) -> World {
        let dir = unique_temp_dir("spotinit-volume-test").unwrap();
        World::start_in(dir, settings, Plug::File).await
    }

    /// A world in `dir` (created), its volumes plugged as `plug` says.
    pub async fn start_in(dir: PathBuf, settings: Settings, plug: Plug) -> World {
        std::fs::create_dir_all(&dir).unwrap();
        let moto = MotoServer::start().await.expect("moto server");
        let disks = Arc::new(Disks {
            dir: dir.join("ebs"),
            plug,
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

    /// A new instance in `zone`: its id in moto, its IMDS, its root directory (with an empty
    /// sysfs the disks appear in), an EC2 client with its role's credentials, and a device
    /// watcher fed by the attach hook's uevents.
    pub async fn instance_parts(&self, zone: &str) -> InstanceParts {
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
        InstanceParts {
            id,
            root,
            imds,
            ec2,
            me,
            devices,
        }
    }

    /// How many `action` requests reached the fidelity layer so far (answered or refused).
    pub fn calls(&self, action: &str) -> usize {
        self.fidelity
            .requests()
            .iter()
            .filter(|r| r.action == action)
            .count()
    }

    /// From the end of `old`'s attachment to the start of `new`'s, as EC2 saw them: how late a
    /// waiting instance noticed a release.
    pub fn handover_gap(&self, old: &str, new: &str) -> Duration {
        let history = self.fidelity.attachment_history();
        let released = history
            .iter()
            .find(|x| x.instance == old)
            .and_then(|x| x.until)
            .expect("the old instance's attachment ended");
        let taken = history
            .iter()
            .find(|x| x.instance == new)
            .expect("the new instance attached")
            .from;
        taken.saturating_duration_since(released)
    }

    /// The volumes that are not instance root volumes (moto gives every instance one).
    pub async fn volumes(&self) -> Vec<spotworld::moto::Volume> {
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

pub fn tag<'a>(v: &'a spotworld::moto::Volume, k: &str) -> Option<&'a str> {
    v.tags.get(k).map(String::as_str)
}

/// Creates a tagged volume through the fidelity layer and waits until it is `available`.
pub async fn create_tagged(
    api: &spotworld::moto::Ec2Client,
    zone: &str,
    tags: &[(&str, &str)],
) -> String {
    let mut params =
        spotworld::query::Params::from_pairs([("AvailabilityZone", zone), ("Size", "1")]);
    params.push_tag_specification("volume", tags);
    let xml = api.call_with("CreateVolume", params).await.unwrap();
    let id = spotworld::moto::root_text(&xml, "volumeId").unwrap();
    // Wait out `creating`.
    let until = Instant::now() + Duration::from_secs(10);
    while api.describe_volume(&id).await.unwrap().state != "available" {
        assert!(Instant::now() < until, "volume {id} stays creating");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    id
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Running programs and loop devices from inside a privileged test
// ---------------------------------------------------------------------------------------------

/// Runs a shell script through [`Linux`] and returns its output (stdout and stderr).
///
/// Inside a test that uses `Linux`, spotinit's reaper collects every child with waitpid(-1),
/// so `std::process::Command::output()` would race it for the exit status. This goes through
/// the reaper instead; the output goes to a file the script redirects into.
pub async fn sh(script: &str) -> Result<String, String> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let out = std::env::temp_dir().join(format!(
        "spotinit-sh-{}-{}.out",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let cmd = CommandSpec::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec >'{}' 2>&1\n{script}", out.display()))
        .output(Output::Null);
    let code = spotinit::sys::run_code(&Linux, &cmd).await;
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    match code {
        Ok(0) => Ok(text),
        Ok(c) => Err(format!("`{script}` exited with {c}: {}", text.trim())),
        Err(e) => Err(format!("`{script}`: {e}")),
    }
}

/// `losetup --find --show FILE`: a new loop device backed by `file`.
pub async fn loop_attach(file: &Path) -> Result<PathBuf, String> {
    let out = sh(&format!("losetup --find --show '{}'", file.display())).await?;
    Ok(PathBuf::from(out.trim()))
}

/// Lets go of a loop device (LOOP_CLR_FD). On a device still in use (mounted) the kernel
/// instead marks it to be freed when its last user goes, so this is also the cleanup after a
/// failed test. A plain ioctl, so it can run in `Drop`.
pub fn loop_release(dev: &Path) {
    use std::os::fd::AsRawFd;
    const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
    if let Ok(f) = std::fs::File::open(dev) {
        // SAFETY: ioctl on an open loop device fd; LOOP_CLR_FD takes no argument.
        unsafe {
            libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD as _, 0);
        }
    }
}

/// A loop device that is released when dropped, also when the test panics.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    pub async fn attach(file: &Path) -> Loop {
        Loop {
            dev: loop_attach(file).await.expect("losetup"),
        }
    }
    /// `losetup -c`: the backing file changed size.
    pub async fn refresh(&self) {
        sh(&format!("losetup -c '{}'", self.dev.display()))
            .await
            .expect("losetup -c");
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        loop_release(&self.dev);
    }
}

/// Creates a sparse file of `bytes`.
pub fn sparse_file(path: &Path, bytes: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes).unwrap();
}

// ---------------------------------------------------------------------------------------------
// mountinfo
// ---------------------------------------------------------------------------------------------

/// One line of /proc/self/mountinfo, with the fields the tests look at.
#[derive(Clone, Debug)]
pub struct Mnt {
    pub mount_point: PathBuf,
    pub root: String,
    pub device: String,
    pub fstype: String,
    /// Per-mount options (`rw,nosuid,nodev`).
    pub options: String,
    /// Propagation tags (`shared:12`, `master:3`), empty when private.
    pub propagation: String,
    /// Superblock options.
    pub super_options: String,
}

pub fn mountinfo() -> Vec<Mnt> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let unescape = |s: &str| s.replace("\\040", " ").replace("\\011", "\t");
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(Mnt {
                device: f.get(2)?.to_string(),
                root: unescape(f.get(3)?),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                options: f.get(5)?.to_string(),
                propagation: f[6..].join(" "),
                fstype: r.first()?.to_string(),
                super_options: r.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// Mounts at or below `dir`, innermost last.
pub fn mounts_under(dir: &Path) -> Vec<Mnt> {
    mountinfo()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .collect()
}

/// The topmost mount at exactly `path`.
pub fn mount_at(path: &Path) -> Option<Mnt> {
    mountinfo()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

// ---------------------------------------------------------------------------------------------
// A recording System
// ---------------------------------------------------------------------------------------------

/// Records every call (as `mount ext4 /run/spotinit/volume`, `umount /var`, `umount -l /dev`,
/// `spawn e2fsck -p -f /dev/..`, `kill 12 SIGTERM`, `kill-all SIGKILL`, `sync`), paths shown
/// relative to `root`, and passes mounts, unmounts, spawns, kills and sync to `inner`. Power,
/// hostname, ctrl-alt-del and interfaces are recorded only: they would act on the whole host;
/// so is exec, which would replace the test process.
pub struct Spy<S: System> {
    inner: S,
    root: PathBuf,
    ops: Mutex<Vec<String>>,
}

impl<S: System> Spy<S> {
    pub fn new(inner: S, root: impl Into<PathBuf>) -> Self {
        Spy {
            inner,
            root: root.into(),
            ops: Mutex::new(Vec::new()),
        }
    }
    pub fn ops(&self) -> Vec<String> {
        self.ops.lock().unwrap().clone()
    }
    /// The recorded calls that start with `prefix`.
    pub fn matching(&self, prefix: &str) -> Vec<String> {
        self.ops()
            .into_iter()
            .filter(|o| o.starts_with(prefix))
            .collect()
    }
    fn note(&self, op: String) {
        self.ops.lock().unwrap().push(op);
    }
    fn rel(&self, p: &Path) -> String {
        match p.strip_prefix(&self.root) {
            Ok(r) => Path::new("/").join(r).display().to_string(),
            Err(_) => p.display().to_string(),
        }
    }
}

impl<S: System> System for Spy<S> {
    fn mount(&self, m: &MountSpec) -> SysResult<()> {
        self.note(format!(
            "mount {} {}",
            m.fstype.as_deref().unwrap_or("bind"),
            self.rel(&m.target)
        ));
        self.inner.mount(m)
    }
    fn umount(&self, target: &Path, detach: bool) -> SysResult<()> {
        let flag = if detach { "-l " } else { "" };
        self.note(format!("umount {flag}{}", self.rel(target)));
        self.inner.umount(target, detach)
    }
    fn remount(&self, target: &Path, flags: MsFlags) -> SysResult<()> {
        self.note(format!("remount {}", self.rel(target)));
        self.inner.remount(target, flags)
    }
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> SysResult<()> {
        self.note(format!("pivot_root {}", self.rel(new_root)));
        self.inner.pivot_root(new_root, put_old)
    }
    fn set_hostname(&self, name: &str) -> SysResult<()> {
        self.note(format!("hostname {name}"));
        Ok(())
    }
    fn interface_up(&self, name: &str) -> SysResult<()> {
        self.note(format!("up {name}"));
        Ok(())
    }
    fn spawn(&self, cmd: &CommandSpec) -> SysResult<Child> {
        let mut op = format!("spawn {}", cmd.name());
        for a in &cmd.args {
            op.push(' ');
            op.push_str(a);
        }
        self.note(op);
        self.inner.spawn(cmd)
    }
    fn kill(&self, pid: Pid, sig: Signal) -> SysResult<()> {
        self.note(format!("kill {pid} {}", sig.as_str()));
        self.inner.kill(pid, sig)
    }
    fn kill_all(&self, sig: Signal) -> SysResult<()> {
        // kill(-1) from anywhere but PID 1 of a PID namespace of its own would reach the host.
        assert_eq!(
            std::process::id(),
            1,
            "kill(-1) outside a PID namespace of our own: refused"
        );
        self.note(format!("kill-all {}", sig.as_str()));
        self.inner.kill_all(sig)
    }
    fn sync(&self) {
        self.note("sync".into());
        self.inner.sync()
    }
    fn exec(&self, program: &Path, args: &[String]) -> SysResult<()> {
        // It would replace the test process.
        self.note(format!("exec {} {}", program.display(), args.join(" ")));
        Ok(())
    }
    fn ctrl_alt_del_to_signal(&self) -> SysResult<()> {
        self.note("ctrl-alt-del".into());
        Ok(())
    }
    fn power(&self, action: PowerAction) -> SysResult<()> {
        self.note(format!("power {action:?}"));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The privileged-test harness
// ---------------------------------------------------------------------------------------------

/// Set in the re-executed test binary: the name of the test to run for real.
const INNER_ENV: &str = "SPOTINIT_PRIVILEGED_TEST";
/// The sandbox directory the outer test made (and removes).
const DIR_ENV: &str = "SPOTINIT_PRIVILEGED_DIR";
/// The outer test's mount namespace, which the inner one must not be in.
const HOST_NS_ENV: &str = "SPOTINIT_HOST_MNT_NS";
/// Written by the inner test when its body finished, so a filter that matched nothing (and
/// "passed") is not taken for a pass.
const PASSED: &str = ".inner-test-passed";
/// Lines for [`notice`].
const NOTICES: &str = ".inner-test-notices";
/// Set to 1 by a run that is meant to be privileged (`tests/all.sh`, as root): a privileged test
/// that cannot run there fails instead of skipping.
pub const REQUIRED_ENV: &str = "SPOTINIT_PRIVILEGED";
/// Capabilities such a run may lack, comma-separated: `tests/all.sh` names the ones its root's
/// bounding set does not have (some sandboxes), and says so before the tests. Only a test that
/// cannot run for want of one of these is skipped; anything else still fails.
pub const EXCUSED_ENV: &str = "SPOTINIT_PRIVILEGED_WITHOUT";

/// The namespaces a privileged test runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ns {
    /// A private mount namespace (`unshare --mount --propagation private`).
    Mount,
    /// Also a new PID namespace in which the test is PID 1, with its own /proc mounted
    /// (`unshare --pid --fork --kill-child --mount-proc`).
    Pid,
}

/// Runs `body` as root in a private mount namespace (and, for [`Ns::Pid`], as PID 1 of a new
/// PID namespace), in a tokio current-thread runtime, with a sandbox directory. `name` must be
/// the name of the calling `#[test]` function: the test binary is re-executed to run just it.
///
/// Without root, or without one of `needs` (programs looked up on PATH and in the sbin
/// directories; absolute paths checked as they are), the test prints `SKIPPED <name>: <why>`
/// straight to stderr (not captured by the test harness, so it always shows) and passes, unless
/// `SPOTINIT_PRIVILEGED=1` says the run is meant to be privileged: then it fails.
pub fn privileged<F, Fut>(name: &str, ns: Ns, needs: &[&str], timeout: Duration, body: F)
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: Future<Output = ()>,
{
    // The harness names the test's thread by its full path (`module::function`): the name to
    // re-execute it by.
    let full = std::thread::current()
        .name()
        .filter(|t| t.ends_with(name))
        .unwrap_or(name)
        .to_owned();
    let name = full.as_str();
    if std::env::var(INNER_ENV).as_deref() == Ok(name) {
        inner(ns, body);
        return;
    }
    if let Some(why) = cannot_run(ns, needs) {
        let required = std::env::var(REQUIRED_ENV).as_deref() == Ok("1") && !excused(needs);
        skip_or_fail(name, &why, required, &mut std::io::stderr());
        return;
    }
    outer(name, ns, timeout);
}

/// Root, and the only thing missing is a capability the run named in [`EXCUSED_ENV`].
fn excused(needs: &[&str]) -> bool {
    let named = std::env::var(EXCUSED_ENV).unwrap_or_default();
    let lacking: Vec<&&str> = needs
        .iter()
        .filter(|n| n.starts_with("CAP_") && !has_cap(n))
        .collect();
    nix::unistd::geteuid().is_root()
        && !lacking.is_empty()
        && lacking
            .iter()
            .all(|cap| named.split(',').any(|n| n == **cap))
}

/// A privileged test that cannot run here: skipped with a line of its own (even amid the
/// harness's `test ... ok` output), or, in a run meant to be privileged, failed.
pub fn skip_or_fail(name: &str, why: &str, required: bool, out: &mut dyn Write) {
    if required {
        panic!("{name} cannot run: {why}. {REQUIRED_ENV}=1 says this run is privileged, so that is a failure, not a skip");
    }
    let _ = writeln!(out, "\nSKIPPED {name}: {why}");
}

/// Is `p` an existing path, or a program on PATH or in the sbin directories?
pub fn find_program(p: &str) -> bool {
    if p.starts_with('/') {
        return Path::new(p).exists();
    }
    let in_dir = |d: &str| !d.is_empty() && Path::new(d).join(p).is_file();
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':').any(in_dir)
        || ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| in_dir(d))
}

/// Why this test cannot run here, if it cannot.
fn cannot_run(ns: Ns, needs: &[&str]) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        let mut what = Vec::new();
        if needs.contains(&"/dev/loop-control") {
            what.push("loop devices");
        }
        what.push("mounts in a private mount namespace");
        if ns == Ns::Pid {
            what.push("a PID namespace to be PID 1 in");
        }
        return Some(format!(
            "needs root for {}; run the tests as root, as CI does",
            what.join(", ")
        ));
    }
    let mut missing: Vec<&str> = needs
        .iter()
        .copied()
        .filter(|n| !n.starts_with("CAP_") && !find_program(n))
        .collect();
    if !find_program("unshare") {
        missing.push("unshare (util-linux)");
    }
    if !missing.is_empty() {
        return Some(format!("needs {} on this host", missing.join(", ")));
    }
    for cap in needs.iter().filter(|n| n.starts_with("CAP_")) {
        if !has_cap(cap) {
            return Some(format!(
                "needs {cap}, which this root does not have (its capability bounding set lacks it, as in some sandboxes)"
            ));
        }
    }
    // Root in a container without CAP_SYS_ADMIN cannot make namespaces: say so.
    let mut probe = std::process::Command::new("unshare");
    probe.args(["--mount", "--propagation", "private"]);
    if ns == Ns::Pid {
        probe.args(["--pid", "--fork", "--mount-proc"]);
    }
    match probe.arg("true").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "cannot create {} namespaces here: {}",
            if ns == Ns::Pid {
                "mount and PID"
            } else {
                "mount"
            },
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run unshare: {e}")),
    }
}

/// Is `cap` (e.g. `CAP_SYS_RESOURCE`) in this process's effective set?
pub fn has_cap(cap: &str) -> bool {
    cap.parse::<caps::Capability>()
        .ok()
        .and_then(|c| caps::has_cap(None, caps::CapSet::Effective, c).ok())
        .unwrap_or(false)
}

/// From inside a privileged test: a line the outer test prints straight to stderr (so it shows
/// even when the test passes), for a part of the test that could not run here.
pub fn notice(message: &str) {
    let dir = PathBuf::from(std::env::var(DIR_ENV).expect("inside a privileged test"));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(NOTICES))
        .unwrap();
    writeln!(f, "{message}").unwrap();
    eprintln!("NOTE: {message}");
}

fn mnt_ns() -> String {
    std::fs::read_link("/proc/self/ns/mnt")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn outer(name: &str, ns: Ns, timeout: Duration) {
    let dir = unique_temp_dir(&format!("spotinit-{name}"))
        .and_then(|d| d.canonicalize())
        .unwrap();
    let log_path = dir.with_extension("log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private"]);
    if ns == Ns::Pid {
        // --kill-child: if unshare dies (a timeout below), the namespace's PID 1 dies with it,
        // and with it everything in the namespace.
        cmd.args(["--pid", "--fork", "--kill-child", "--mount-proc"]);
    }
    cmd.arg("--")
        .arg(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(INNER_ENV, name)
        .env(DIR_ENV, &dir)
        .env(HOST_NS_ENV, mnt_ns())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let start = Instant::now();
    let mut child = cmd.spawn().expect("unshare");
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = start.elapsed();
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    let passed = dir.join(PASSED).exists();
    for line in std::fs::read_to_string(dir.join(NOTICES))
        .unwrap_or_default()
        .lines()
    {
        let _ = writeln!(std::io::stderr(), "NOTE {name}: {line}");
    }
    // Loop devices the inner test left behind (it failed, or was killed).
    let stray_loops = release_loops_under(&dir);
    // The mounts were made in a private namespace: none may be visible here.
    let leaked: Vec<String> = mounts_under(&dir)
        .iter()
        .map(|m| format!("{} ({})", m.mount_point.display(), m.fstype))
        .collect();
    if leaked.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    eprintln!("----- {name} in its namespace -----\n{output}----- {name}: {took:.2?} -----");
    assert!(!timed_out, "{name} did not finish within {timeout:?}");
    assert!(
        leaked.is_empty(),
        "mounts leaked onto the host (left in place): {leaked:?}"
    );
    assert!(
        status.success(),
        "{name} failed in its namespace ({status})"
    );
    assert!(
        passed,
        "{name} did not run in its namespace (is the name that of its #[test] function?)"
    );
    assert!(
        stray_loops.is_empty(),
        "loop devices were left attached (now released): {stray_loops:?}"
    );
}

/// `losetup -d` for every loop device whose backing file is below `dir`.
fn release_loops_under(dir: &Path) -> Vec<String> {
    let out = std::process::Command::new("losetup")
        .args([
            "--list",
            "--noheadings",
            "--raw",
            "--output",
            "NAME,BACK-FILE",
        ])
        .output();
    let Ok(out) = out else { return Vec::new() };
    let mut released = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((name, file)) = line.split_once(' ') else {
            continue;
        };
        if Path::new(file.trim()).starts_with(dir) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", name])
                .status();
            released.push(format!("{name} ({file})"));
        }
    }
    released
}

fn inner<F, Fut>(ns: Ns, body: F)
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: Future<Output = ()>,
{
    // Refuse to touch the host: the namespaces must be the ones unshare made.
    let host_ns = std::env::var(HOST_NS_ENV).unwrap();
    assert_ne!(
        mnt_ns(),
        host_ns,
        "not in a mount namespace of our own: refusing to mount anything"
    );
    let shared: Vec<String> = mountinfo()
        .into_iter()
        .filter(|m| m.propagation.contains("shared:"))
        .map(|m| m.mount_point.display().to_string())
        .collect();
    assert!(
        shared.is_empty(),
        "mounts that propagate to the host: {shared:?}"
    );
    if ns == Ns::Pid {
        assert_eq!(
            std::process::id(),
            1,
            "not PID 1 of a PID namespace of our own: refusing (kill -1 would reach the host)"
        );
    }
    let dir = PathBuf::from(std::env::var(DIR_ENV).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(body(dir.clone()));
    drop(rt);
    std::fs::write(dir.join(PASSED), "ok").unwrap();
}

/// Polls `check` every 20 ms (letting the runtime run) until it holds or `within` passes.
pub async fn wait_until(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
