//! The two ways spotinit runs — PID 1 of our image, or a service under another init — and the
//! production [`Platform`] (IMDS + EC2 + EBS). Both runners: boot (interruptible by any shutdown
//! request), then wait for a request, then the one drain, then what the request says.

use crate::boot::{boot, BootError};
#[cfg(feature = "aws")]
use crate::cloud::ec2::{endpoint, Ec2Client};
#[cfg(feature = "aws")]
use crate::cloud::imds::Imds;
#[cfg(feature = "aws")]
use crate::cloud::{CloudError, Identity};
use crate::config::{Config, FailureAction};
use crate::machine::{BootState, Machine, Mode, Platform, Request, Then};
use crate::shutdown::drain;
#[cfg(not(feature = "aws"))]
use crate::sys::System;
#[cfg(feature = "aws")]
use crate::sys::{Linux, Paths, PowerAction, System};
#[cfg(feature = "aws")]
use crate::volume::device::DeviceWatcher;
#[cfg(feature = "aws")]
use crate::volume::ebs::EbsVolume;
#[cfg(feature = "aws")]
use crate::volume::VolumeError;
#[cfg(feature = "aws")]
use std::sync::Arc;
use tokio::sync::mpsc;

/// IMDS, EC2 and EBS.
#[cfg(feature = "aws")]
pub struct Aws<S: System> {
    pub sys: Arc<S>,
    pub paths: Paths,
    /// One EC2 client for the volume phase and the lifecycle.
    ec2: std::sync::Mutex<Option<Arc<Ec2Client>>>,
}

#[cfg(feature = "aws")]
impl<S: System> Aws<S> {
    pub fn new(sys: Arc<S>, paths: Paths) -> Self {
        Aws {
            sys,
            paths,
            ec2: std::sync::Mutex::new(None),
        }
    }

    fn ec2(&self, cfg: &Config, me: &Identity, meta: &Imds) -> Arc<Ec2Client> {
        let mut slot = self.ec2.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert_with(|| {
            let region = cfg.aws.region.clone().unwrap_or_else(|| me.region.clone());
            let ep = endpoint(cfg.aws.ec2_endpoint.as_deref());
            if let Some(ep) = &ep {
                crate::log!("aws: EC2 endpoint {ep}");
            }
            Arc::new(Ec2Client::with_instance_role(&region, ep.as_deref(), meta))
        })
        .clone()
    }
}

#[cfg(feature = "aws")]
impl<S: System> Platform for Aws<S> {
    type Meta = Imds;
    type Volume = EbsVolume<Ec2Client, S>;

    fn metadata(&self, endpoint: Option<&str>) -> Result<Imds, CloudError> {
        Imds::new(endpoint)
    }

    fn volume(
        &self,
        cfg: &Config,
        me: &Identity,
        meta: &Imds,
    ) -> Result<Self::Volume, VolumeError> {
        let ec2 = self.ec2(cfg, me, meta);
        // Listen for disks before the first AttachVolume, so the hot-plug cannot be missed.
        let devices = DeviceWatcher::open(&self.paths).map_err(VolumeError::DeviceEvents)?;
        Ok(EbsVolume::new(
            ec2,
            self.sys.clone(),
            self.paths.clone(),
            cfg.volume.clone(),
            cfg.docker.storage_driver.clone(),
            me.clone(),
            devices,
        ))
    }

    type Events = mpsc::UnboundedReceiver<crate::lifecycle::Event>;

    fn watch(
        &self,
        cfg: &Config,
        meta: &Imds,
        requests: mpsc::UnboundedSender<Request>,
    ) -> Self::Events {
        let (tx, rx) = mpsc::unbounded_channel();
        crate::lifecycle::watch(meta.clone(), cfg, requests, tx);
        rx
    }

    fn start_volume_upkeep(
        &self,
        cfg: &Config,
        me: &Identity,
        meta: &Imds,
        mounted: &crate::volume::Mounted,
        events: Self::Events,
    ) {
        let ec2 = self.ec2(cfg, me, meta);
        if let Some(alloc) = cfg.address.elastic_ip_allocation_id.clone() {
            let (ec2, me) = (ec2.clone(), me.clone());
            tokio::spawn(async move {
                crate::lifecycle::associate_address(&*ec2, &alloc, &me).await;
            });
        }
        if let (true, Some(slot)) = (cfg.address.from_pool, mounted.slot.clone()) {
            let (ec2, me) = (ec2.clone(), me.clone());
            tokio::spawn(async move {
                crate::lifecycle::associate_slot_address(&*ec2, &slot, &me).await;
            });
        }
        let snapshots = crate::lifecycle::Snapshots {
            ec2,
            volume_id: mounted.volume_id.clone(),
            me: me.clone(),
            keep: cfg.snapshots.keep,
        };
        crate::lifecycle::maintain(snapshots, cfg, events);
    }
}

/// What a failed boot turns into, per `failure.action`.
fn failure_request(e: &BootError, cfg: Option<&Config>) -> Request {
    let action = cfg
        .map(|c| c.failure.action)
        .unwrap_or(FailureAction::Poweroff);
    let (then, what) = match action {
        FailureAction::Poweroff => (
            Then::PowerOff,
            "powering off so a replacement can be launched",
        ),
        FailureAction::Reboot => (Then::Reboot, "rebooting to try again"),
        FailureAction::Stay => (Then::Stay, "staying up without Docker for debugging"),
    };
    for line in e.to_string().lines() {
        crate::log!("BOOT FAILED: {line}");
    }
    crate::log!("Docker was not started. failure.action = {action:?}: {what}");
    crate::notify::event(
        "boot-failed",
        format!("boot failed, Docker was not started ({what}): {e}"),
    );
    Request::new(format!("boot failed ({what})"), then)
}

/// Boot, serve, drain. Returns what should follow the drain.
pub async fn serve<S: System, P: Platform>(
    m: &Machine<S>,
    platform: &P,
    requests: &mut mpsc::UnboundedReceiver<Request>,
) -> Then {
    enum Outcome {
        Booted,
        Failed(BootError),
        Interrupted(Request),
    }
    let mut st = BootState::<P>::default();
    // Any shutdown request (a spot notice during the volume phase, the power button) wins
    // over the boot; the boot state says what to undo.
    let outcome = tokio::select! {
        r = boot(m, platform, &mut st) => match r {
            Ok(()) => Outcome::Booted,
            Err(e) => Outcome::Failed(e),
        },
        Some(req) = requests.recv() => Outcome::Interrupted(req),
    };
    let fallback = || Request::new("request channel closed", Then::PowerOff);
    let req = match outcome {
        Outcome::Booted => {
            notify_ready();
            requests.recv().await.unwrap_or_else(fallback)
        }
        Outcome::Interrupted(req) => {
            crate::log!("boot interrupted: {}", req.reason);
            req
        }
        Outcome::Failed(e) => {
            let req = failure_request(&e, st.config.as_ref());
            if req.then == Then::Stay {
                // For debugging: SSH with a throwaway host key, if a key is configured.
                if let (Some(cfg), Some(meta)) = (&st.config, &st.metadata) {
                    if m.mode == Mode::Pid1 {
                        crate::boot::start_ssh(m, cfg, meta, false).await;
                    }
                }
                crate::log!("waiting for a shutdown request (power button, SIGTERM)");
                requests.recv().await.unwrap_or_else(fallback)
            } else {
                req
            }
        }
    };
    drain(m, &mut st, &req).await;
    req.then
}

/// Tells systemd we are ready, when it asked (`Type=notify` units set NOTIFY_SOCKET).
fn notify_ready() {
    if let Ok(path) = std::env::var("NOTIFY_SOCKET") {
        if let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() {
            let _ = sock.send_to(b"READY=1", path);
        }
    }
}

#[cfg(feature = "aws")]
/// One malloc arena for the whole process. The runtime is single-threaded, but tokio's blocking
/// pool (DNS, files) would get an arena per thread from glibc, each holding partly used pages;
/// PID 1 allocates little and never in a hurry, so one arena keeps its memory small and steady.
fn one_malloc_arena() {
    // SAFETY: mallopt only sets an allocator parameter; called first thing in main's thread,
    // before the runtime or any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// PID 1. Never returns: it ends in power-off, reboot, or waiting.
#[cfg(feature = "aws")]
pub fn pid1() -> ! {
    one_malloc_arena();
    install_panic_hook();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let then = match rt {
        Ok(rt) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async {
                let sys = Arc::new(Linux);
                let _ = sys.ctrl_alt_del_to_signal();
                let (m, mut requests) = Machine::new(sys.clone(), Paths::real(), Mode::Pid1);
                crate::power::listen_signals(m.requests.clone(), Then::PowerOff);
                let platform = Aws::new(sys.clone(), m.paths.clone());
                let then = serve(&m, &platform, &mut requests).await;
                if matches!(then, Then::Wait | Then::Stay) {
                    crate::log!("drained; waiting for EC2 to stop this instance");
                    // Keep the runtime (and the reaper) alive until the end.
                    std::future::pending::<()>().await;
                }
                then
            })
        }))
        .unwrap_or_else(|_| {
            crate::log!("PANIC in PID 1: emergency shutdown");
            emergency();
            Then::PowerOff
        }),
        Err(e) => {
            crate::log!("cannot start the runtime: {e}; emergency shutdown");
            emergency();
            Then::PowerOff
        }
    };
    let action = if then == Then::Reboot {
        PowerAction::Reboot
    } else {
        PowerAction::PowerOff
    };
    crate::log!(
        "{}",
        if action == PowerAction::Reboot {
            "rebooting"
        } else {
            "powering off"
        }
    );
    if let Err(e) = Linux.power(action) {
        crate::log!("{e}");
    }
    // Nothing left to do but keep PID 1 alive.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

#[cfg(feature = "aws")]
/// After a panic nothing async can be trusted: plain syscalls only. Stop everything, sync,
/// unmount the state volume if it is mounted (the volume stays attached; the next instance
/// waits for EC2 to release it, and the journal covers the rest).
fn emergency() {
    let sys = Linux;
    let _ = sys.kill_all(crate::sys::Signal::SIGTERM);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !crate::shutdown::user_processes(&Paths::real()).is_empty()
        && std::time::Instant::now() < until
    {
        std::thread::sleep(std::time::Duration::from_millis(200));
        // SAFETY: waitpid with a null status pointer and WNOHANG just collects zombies.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    }
    let _ = sys.kill_all(crate::sys::Signal::SIGKILL);
    sys.sync();
    for (_, target) in crate::volume::layout::BINDS.iter().rev() {
        let _ = sys.umount(std::path::Path::new(target), false);
    }
    let _ = sys.umount(
        std::path::Path::new(crate::volume::layout::VOLUME_MOUNT),
        false,
    );
    sys.sync();
}

#[cfg(feature = "aws")]
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        crate::log!("panic: {info}");
    }));
}

/// Under another init. Exits after the drain.
#[cfg(feature = "aws")]
pub fn service() -> i32 {
    one_malloc_arena();
    install_panic_hook();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("spotinit: cannot start the runtime: {e}");
            return 1;
        }
    };
    rt.block_on(async {
        let sys = Arc::new(Linux);
        let (m, mut requests) = Machine::new(sys.clone(), Paths::real(), Mode::Service);
        crate::power::listen_signals(m.requests.clone(), Then::Exit);
        let platform = Aws::new(sys, m.paths.clone());
        match serve(&m, &platform, &mut requests).await {
            Then::Exit => 0,
            _ => 1,
        }
    })
}

/// `spotinit config check FILE`: validates user data offline.
pub fn config_check(path: &str) -> i32 {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("spotinit: cannot read {path}: {e}");
            return 2;
        }
    };
    match Config::load("", Some(&text), None) {
        Ok(c) => {
            println!("{path}: ok: {}", c.summary());
            0
        }
        Err(errors) => {
            for e in errors {
                eprintln!("{path}: {e}");
            }
            1
        }
    }
}
