//! What the end-to-end scenarios (`e2e_*.rs`) share. Each scenario boots real VMs of the image
//! `image/build.sh` made (TCG: slow, and slower when two boot at once on a shared machine), so
//! every wait is on a console marker or an API condition with a generous deadline.
//!
//! Prerequisites (each missing one fails the test naming its fix): the built image in
//! `build/image/`, QEMU 10, busybox-static, moto (`pip install -r tests/requirements.txt`),
//! e2fsprogs (debugfs), and OVMF for the UEFI scenario. Work files stay in
//! `build/test-runs/<scenario>/` (console logs with timestamps, QMP logs, volume files).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spotworld::docker::{deploy_counter, Counter};
use spotworld::qemu::{ConsoleCursor, ConsoleLine};
use spotworld::world::{
    InstanceSpec, SimInstance, UserData, World, BOOT_FAILED_MARKER, READY_MARKER,
};

/// Scenarios in this binary run one after another: two at once would each boot VMs on the same
/// two cores and stretch every deadline. A tokio mutex, so a scenario that panics frees the turn.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for this scenario's turn; hold the guard for the whole scenario.
pub async fn one_scenario_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    TURN.lock().await
}

/// From QEMU's start to `spotinit: ready` (about 20 s alone; much more with two VMs booting).
pub const BOOT: Duration = Duration::from_secs(300);
/// Any one step after the boot: a drain, a detach, a container coming back.
pub const STEP: Duration = Duration::from_secs(180);

/// Waits for the next line containing `needle`, panicking with the console tail otherwise.
pub async fn expect(c: &mut ConsoleCursor, needle: &str, deadline: Duration) -> ConsoleLine {
    match c.wait_for(needle, deadline).await {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    }
}

/// Ready, or the boot failure, whichever comes first: for instances booting at once, some of
/// which must lose (a deadline of two boots, as they share the cores).
pub async fn ready_or_failed(i: &SimInstance) -> ConsoleLine {
    let outcome = i
        .console()
        .wait_until(
            "ready or BOOT FAILED",
            |t| t.contains(READY_MARKER) || t.contains(BOOT_FAILED_MARKER),
            BOOT + BOOT,
        )
        .await;
    match outcome {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    }
}

/// A loser that failed closed: after "Docker was not started" it says it powers off and does,
/// and neither containerd nor dockerd ever started.
pub async fn powered_off_without_docker(i: &SimInstance) {
    let mut c = i.console();
    expect(&mut c, "Docker was not started", STEP).await;
    expect(&mut c, "powering off", STEP).await;
    assert!(i.wait_poweroff(STEP).await.unwrap(), "{}", i.diagnostics());
    never(i, "phase containerd");
    never(i, "phase dockerd");
}

/// Panics if any console line so far contains `needle`.
pub fn never(i: &SimInstance, needle: &str) {
    let c = i.console();
    if c.contains(needle) {
        let line = c
            .lines()
            .into_iter()
            .find(|l| l.text.contains(needle))
            .unwrap();
        panic!(
            "instance {} printed {needle:?}, which it must not:\n  {line}\n{}",
            i.name,
            i.diagnostics()
        );
    }
}

/// A client incrementing the counter as fast as it answers, remembering the last value the
/// service acknowledged (each fsync'ed before its answer). Errors (a draining or vanished
/// instance) are counted, with a short pause.
pub struct Writer {
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u32>,
}

impl Writer {
    pub fn start(counter: Counter) -> Writer {
        let acked = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (acked, stop) = (acked.clone(), stop.clone());
            tokio::spawn(async move {
                let mut errors = 0;
                while !stop.load(Ordering::SeqCst) {
                    match counter.increment().await {
                        Ok(v) => {
                            let before = acked.swap(v, Ordering::SeqCst);
                            assert_eq!(v, before + 1, "increments are sequential");
                        }
                        Err(_) => {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                errors
            })
        };
        Writer { acked, stop, task }
    }

    /// The last value the service acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Stops writing; returns the number of requests that failed.
    pub async fn stop(self) -> u32 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// Prints a measured step (visible with `--nocapture`, and in the test output on failure).
pub fn report(what: &str, since: Instant) {
    println!("{what}: {:.1} s", since.elapsed().as_secs_f64());
}

/// A successor's boot on the volume its predecessor drained: found, the filesystem clean, the
/// record naming the predecessor's clean shutdown, ready, and nothing formatted.
pub async fn expect_clean_takeover(successor: &SimInstance, volume_id: &str, predecessor: &str) {
    let mut c = successor.console();
    expect(&mut c, &format!("volume: found {volume_id}"), BOOT).await;
    expect(&mut c, "volume: filesystem clean", STEP).await;
    let record = expect(&mut c, "volume: record: boot 2 of this state", STEP).await;
    assert!(
        record
            .text
            .contains(&format!("last on {predecessor} (clean shutdown)")),
        "{}",
        record.text
    );
    if let Err(e) = successor.wait_ready(BOOT).await {
        panic!("{e}");
    }
    never(successor, "creating ext4");
}

/// The usual first instance: launched in us-east-1a on the volume named `volume_name` (created
/// on this first boot), ready, running the counter service (at 0). Returns the instance, the
/// counter and the volume's id.
pub async fn first_instance_with_counter(
    world: &World,
    volume_name: &str,
) -> (SimInstance, Counter, String) {
    first_instance_with_counter_as(world, &UserData::new(volume_name)).await
}

/// [`first_instance_with_counter`] with user data of the caller's.
pub async fn first_instance_with_counter_as(
    world: &World,
    ud: &UserData,
) -> (SimInstance, Counter, String) {
    let a = world
        .launch(InstanceSpec::new("a", "us-east-1a").user_data(ud.to_toml()))
        .await
        .unwrap();
    a.wait_ready(BOOT).await.unwrap();
    let docker = a.docker().unwrap();
    docker.wait_ping(STEP).await.unwrap();
    deploy_counter(&docker).await.unwrap();
    let counter = Counter {
        port: a.service_port().unwrap(),
    };
    assert_eq!(counter.wait_value(STEP).await.unwrap(), 0);
    let volume_id = world.volumes().await.unwrap()[0].id.clone();
    (a, counter, volume_id)
}
