//! The boot and the drain, end to end against the recording fake system and a fake cloud: the
//! order of the phases, the golden rule, interruption, and the shutdown order.

use super::*;
use crate::machine::{BootState, Machine, Mode, Request, Then};
use crate::run::serve;
use crate::shutdown::drain;
use crate::testkit::{world, Script};
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn index_of(briefs: &[String], what: &str) -> usize {
    briefs
        .iter()
        .position(|b| b == what)
        .unwrap_or_else(|| panic!("{what} not in {briefs:#?}"))
}

#[tokio::test]
async fn boot_runs_the_phases_in_order_and_docker_starts_last() {
    let (fake, cloud, root) = world("order", Some("[volume]\nsize_gib = 30\n"), Script::Mount);
    let (m, _rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    boot(&m, &cloud, &mut st).await.unwrap();
    assert!(st.ready && st.docker_started);
    assert_eq!(st.config.as_ref().unwrap().volume.size_gib, 30);

    let b = fake.briefs();
    assert_eq!(
        &b[..11],
        &[
            "mount proc /proc",
            "mount sysfs /sys",
            "mount devtmpfs /dev",
            "mount devpts /dev/pts",
            "mount tmpfs /dev/shm",
            "mount tmpfs /run",
            "mount tmpfs /tmp",
            "mount tmpfs /var",
            "mount tmpfs /etc/docker",
            "mount tmpfs /root",
            "mount cgroup2 /sys/fs/cgroup",
        ]
    );
    let order = [
        "hostname spotinit",
        "up lo",
        "spawn modprobe",
        "up eth0",
        "spawn busybox",
        "hostname ip-10-0-2-15",
        // The IMDS rules go in beside the volume phase, before any daemon starts a container.
        "spawn iptables",
        "spawn containerd",
        "spawn dockerd",
    ];
    let idx: Vec<usize> = order.iter().map(|w| index_of(&b, w)).collect();
    assert!(idx.windows(2).all(|w| w[0] < w[1]), "{b:#?}");
    let acquire_at = cloud.log.lock().unwrap()[0].0;
    assert!(acquire_at > index_of(&b, "hostname ip-10-0-2-15"));
    assert!(acquire_at <= index_of(&b, "spawn containerd"));
    // daemon.json went where dockerd reads it, with the configured driver.
    let dj: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("run/spotinit/daemon.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dj["storage-driver"], "overlay2");
    std::fs::remove_dir_all(&root).unwrap();
}

/// dockerd dials containerd's socket itself, so the boot starts both before waiting: here
/// containerd's socket appears only once dockerd has been spawned, and the boot still gets to
/// ready (one after the other, it would wait for containerd until its timeout).
#[tokio::test]
async fn containerd_and_dockerd_start_together() {
    let (fake, cloud, root) = world(
        "together",
        Some("[docker]\nstart_timeout_secs = 5\n"),
        Script::Mount,
    );
    let csock = root.join("run/containerd/containerd.sock");
    let dsock = root.join("run/docker.sock");
    fake.on_spawn("containerd", |_| {});
    fake.on_spawn("dockerd", move |_| {
        crate::testkit::serve_socket(&csock, false);
        crate::testkit::serve_socket(&dsock, true);
    });
    let (m, _rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    boot(&m, &cloud, &mut st).await.unwrap();
    assert!(st.ready);
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn a_containerd_that_never_answers_fails_the_boot_by_name() {
    let (fake, cloud, root) = world(
        "nocontainerd",
        Some("[docker]\nstart_timeout_secs = 5\n"),
        Script::Mount,
    );
    fake.on_spawn("containerd", |_| {});
    let (m, _rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    let e = boot(&m, &cloud, &mut st).await.unwrap_err().to_string();
    assert!(
        e.contains("containerd:") && e.contains("containerd.sock did not accept connections"),
        "{e}"
    );
    assert!(!st.ready);
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn a_volume_failure_never_starts_docker() {
    let (fake, cloud, root) = world("foreign", None, Script::FailForeign);
    let (m, _rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    let e = boot(&m, &cloud, &mut st).await.unwrap_err();
    assert!(e.to_string().contains("never formats"), "{e}");
    let b = fake.briefs();
    assert!(
        !b.iter()
            .any(|x| x == "spawn containerd" || x == "spawn dockerd"),
        "{b:#?}"
    );
    assert!(!st.docker_started);
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn docker_does_not_start_when_the_binds_are_missing() {
    let (fake, cloud, root) = world("nobinds", None, Script::MountWithoutBinds);
    let (m, _rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    let e = boot(&m, &cloud, &mut st).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("docker state check") && msg.contains("/var/lib/docker is not mounted"),
        "{msg}"
    );
    assert!(!fake.briefs().iter().any(|x| x == "spawn containerd"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn invalid_user_data_names_the_key_and_never_starts_docker() {
    let (fake, cloud, root) = world("baduser", Some("[volume]\nsise_gib = 3\n"), Script::Mount);
    let (m, _rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    let e = boot(&m, &cloud, &mut st).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("user data, line 2") && msg.contains("sise_gib"),
        "{msg}"
    );
    assert!(
        cloud.log.lock().unwrap().is_empty(),
        "the volume phase must not run"
    );
    assert!(!fake.briefs().iter().any(|x| x == "spawn containerd"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_volume_held_elsewhere_is_retried_per_the_failure_policy() {
    let ud = "[failure]\nretry_interval_secs = 5\nretry_for_secs = 60\n";
    let (fake, cloud, root) = world("retry", Some(ud), Script::FlakyThenMount(2));
    let (m, _rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    boot(&m, &cloud, &mut st).await.unwrap();
    assert_eq!(cloud.tries.load(Ordering::SeqCst), 3);
    assert!(fake.briefs().iter().any(|x| x == "spawn dockerd"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_volume_held_too_long_gives_up_without_docker() {
    let ud = "[failure]\nretry_interval_secs = 5\nretry_for_secs = 12\n";
    let (fake, cloud, root) = world("giveup", Some(ud), Script::FlakyThenMount(100));
    let (m, _rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    let e = boot(&m, &cloud, &mut st).await.unwrap_err();
    assert!(e.to_string().contains("i-0other"), "{e}");
    assert_eq!(cloud.tries.load(Ordering::SeqCst), 3);
    assert!(!fake.briefs().iter().any(|x| x == "spawn containerd"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn the_drain_stops_docker_then_containerd_then_the_rest_then_releases_and_unmounts() {
    let (fake, cloud, root) = world("drain", None, Script::Mount);
    let (m, mut rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    boot(&m, &cloud, &mut st).await.unwrap();
    m.requests
        .send(Request::new("test", Then::PowerOff))
        .unwrap();
    let req = rx.recv().await.unwrap();
    let before = fake.ops().len();
    drain(&m, &mut st, &req).await;
    let b: Vec<String> = fake.briefs()[before..].to_vec();
    let want = [
        "kill dockerd SIGTERM",
        "kill containerd SIGTERM",
        "kill busybox SIGTERM",
        "sync",
    ];
    let idx: Vec<usize> = want.iter().map(|w| index_of(&b, w)).collect();
    assert!(idx.windows(2).all(|w| w[0] < w[1]), "{b:#?}");
    let released_at = cloud.log.lock().unwrap().last().unwrap().0 - before;
    assert!(released_at > idx[3], "volume released after sync");
    let umounts: Vec<&String> = b.iter().filter(|x| x.starts_with("umount")).collect();
    assert_eq!(
        umounts.first().map(|s| s.as_str()),
        Some("umount /sys/fs/cgroup")
    );
    assert_eq!(umounts.last().map(|s| s.as_str()), Some("umount /proc"));
    assert!(index_of(&b, "umount /proc") > released_at);
    assert!(fake.running().is_empty(), "{:?}", fake.running());
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn a_request_during_the_volume_phase_interrupts_the_boot_and_releases_the_volume() {
    let (fake, cloud, root) = world("interrupt", None, Script::Hang);
    let (m, mut rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let tx = m.requests.clone();
    let log = cloud.log.clone();
    tokio::spawn(async move {
        // Post the "spot notice" once the volume phase is under way.
        while log.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = tx.send(Request::new("spot interruption notice", Then::Wait));
    });
    let then = serve(&m, &cloud, &mut rx).await;
    assert_eq!(then, Then::Wait);
    let notes: Vec<&str> = cloud.log.lock().unwrap().iter().map(|(_, w)| *w).collect();
    assert_eq!(notes, vec!["volume acquire", "volume release"]);
    let b = fake.briefs();
    assert!(!b.iter().any(|x| x == "spawn containerd"), "{b:#?}");
    assert!(b.iter().any(|x| x == "kill busybox SIGTERM"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_notice_during_the_first_mkfs_lets_it_finish_before_processes_are_stopped() {
    let (fake, cloud, root) = world(
        "mkfs-notice",
        None,
        Script::SlowFormat(Duration::from_secs(20)),
    );
    // A process of the instance's own, so the drain has something to stop.
    std::fs::create_dir_all(root.join("proc/4242")).unwrap();
    std::fs::write(root.join("proc/4242/cmdline"), "sleep\0").unwrap();
    std::fs::write(root.join("proc/4242/comm"), "sleep\n").unwrap();
    let (m, mut rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let tx = m.requests.clone();
    let log = cloud.log.clone();
    tokio::spawn(async move {
        while log.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let notice = Request::new("spot interruption notice", Then::Wait)
            .with_deadline(Instant::now() + Duration::from_secs(120));
        let _ = tx.send(notice);
    });
    assert_eq!(serve(&m, &cloud, &mut rx).await, Then::Wait);
    let notes = cloud.log.lock().unwrap().clone();
    let at = |what: &str| notes.iter().find(|(_, w)| *w == what).map(|(i, _)| *i);
    let finished = at("mkfs finished").expect("the mkfs ran to its end");
    let b = fake.briefs();
    let kill_all = index_of(&b, "kill-all SIGTERM");
    assert!(
        finished <= kill_all,
        "mkfs ended at op {finished}, kill-all at {kill_all}: {b:#?}"
    );
    assert!(at("volume release").unwrap() > finished);
    assert!(!b.iter().any(|x| x == "spawn containerd"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_first_mkfs_that_would_outlast_the_deadline_is_not_waited_for() {
    let (fake, cloud, root) = world(
        "mkfs-late",
        None,
        Script::SlowFormat(Duration::from_secs(600)),
    );
    let (m, mut rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let tx = m.requests.clone();
    let log = cloud.log.clone();
    tokio::spawn(async move {
        while log.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let notice = Request::new("spot interruption notice", Then::Wait)
            .with_deadline(Instant::now() + Duration::from_secs(60));
        let _ = tx.send(notice);
    });
    let start = Instant::now();
    serve(&m, &cloud, &mut rx).await;
    // The drain kept the reserve for unmount and detach.
    assert!(
        start.elapsed() <= Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    let notes = cloud.log.lock().unwrap().clone();
    assert!(!notes.iter().any(|(_, w)| *w == "mkfs finished"));
    assert!(notes.iter().any(|(_, w)| *w == "volume release"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn service_mode_makes_no_mounts_and_never_powers_off() {
    let (fake, cloud, root) = world("service", None, Script::Mount);
    let (m, mut rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Service);
    let mut st = BootState::default();
    boot(&m, &cloud, &mut st).await.unwrap();
    m.requests
        .send(Request::new("SIGTERM", Then::Exit))
        .unwrap();
    let req = rx.recv().await.unwrap();
    drain(&m, &mut st, &req).await;
    let b = fake.briefs();
    assert!(
        !b.iter().any(|x| x.starts_with("mount ")
            || x.starts_with("hostname")
            || x.starts_with("kill-all")),
        "{b:#?}"
    );
    assert!(!b.iter().any(|x| x.starts_with("power")));
    assert!(b.iter().any(|x| x == "spawn dockerd"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn persisted_root_pivots_before_docker_and_docker_runs_from_it() {
    let ud = "[volume]\nmode = \"persisted-root\"\n";
    let (fake, cloud, root) = world("persisted", Some(ud), Script::PersistedRoot);
    let (m, _rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    boot(&m, &cloud, &mut st).await.unwrap();
    let b = fake.briefs();
    let order = [
        "mount bind /mnt",
        "mount bind /mnt/run",
        "pivot_root /mnt",
        "umount /run/spotinit/image-root",
        "spawn containerd",
    ];
    let idx: Vec<usize> = order.iter().map(|w| index_of(&b, w)).collect();
    assert!(idx.windows(2).all(|w| w[0] < w[1]), "{b:#?}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn persisted_root_with_its_own_init_hands_pid_1_over() {
    let ud = "[volume]\nmode = \"persisted-root\"\nroot_init = \"/sbin/init\"\n";
    let (fake, cloud, root) = world("handover", Some(ud), Script::PersistedRoot);
    let (m, _rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    // The fake's exec returns, so the boot carries on here; a real exec never returns. What
    // matters is that the handover comes right after the pivot.
    let _ = boot(&m, &cloud, &mut st).await;
    let b = fake.briefs();
    assert!(
        index_of(&b, "pivot_root /mnt") < index_of(&b, "exec /sbin/init"),
        "{b:#?}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn a_persisted_root_that_is_not_on_the_volume_never_starts_docker() {
    let ud = "[volume]\nmode = \"persisted-root\"\n";
    // The volume phase "mounted" with binds but "/" is not rootfs/ of the volume.
    let (fake, cloud, root) = world("notpivoted", Some(ud), Script::Mount);
    let (m, _rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    let e = boot(&m, &cloud, &mut st).await.unwrap_err();
    assert!(
        e.to_string().contains("no root in mountinfo") || e.to_string().contains("not rootfs/"),
        "{e}"
    );
    assert!(!fake.briefs().iter().any(|x| x == "spawn containerd"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn declared_containers_are_reconciled_in_a_task_that_the_drain_stops_first() {
    let declared = "[[containers]]\nname = \"web\"\nimage = \"busybox:1\"\n";
    let (fake, cloud, root) = world("declared", Some(declared), Script::Mount);
    let (m, mut rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    boot(&m, &cloud, &mut st).await.unwrap();
    assert!(st.declared_containers.is_some(), "the boot keeps the task");
    // A reconciliation still under way (a pull retried, say) when the drain starts: it holds
    // `_alive` until it is stopped.
    let (alive, gone) = tokio::sync::oneshot::channel::<()>();
    st.declared_containers = Some(tokio::spawn(async move {
        let _alive = alive;
        std::future::pending::<()>().await;
    }));
    m.requests
        .send(Request::new("test", Then::PowerOff))
        .unwrap();
    let req = rx.recv().await.unwrap();
    drain(&m, &mut st, &req).await;
    assert!(st.declared_containers.is_none());
    tokio::time::timeout(Duration::from_secs(5), gone)
        .await
        .expect("the drain stopped the reconciliation")
        .expect_err("it was aborted, not finished");
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn a_pool_volume_names_the_host_by_its_slot_before_docker_starts() {
    let (fake, cloud, root) = world("slot", None, Script::PoolSlot);
    let (m, _rx) = Machine::new(Arc::new(fake.clone()), Paths::under(&root), Mode::Pid1);
    let mut st = BootState::default();
    boot(&m, &cloud, &mut st).await.unwrap();
    let b = fake.briefs();
    let acquire_at = cloud.log.lock().unwrap()[0].0;
    let named_at = index_of(&b, "hostname runners-2");
    assert!(named_at >= acquire_at, "{b:#?}");
    assert!(named_at < index_of(&b, "spawn containerd"), "{b:#?}");
    assert_eq!(
        std::fs::read_to_string(root.join("run/spotinit/slot")).unwrap(),
        "2\n"
    );
    let env = std::fs::read_to_string(root.join("run/spotinit/pool.env")).unwrap();
    assert!(env.contains("SPOTINIT_SLOT=2\n"), "{env}");
}
