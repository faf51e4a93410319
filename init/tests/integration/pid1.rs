//! PID 1 duties with real processes: the test re-executes itself as PID 1 of a new PID
//! namespace (`unshare --pid --fork --mount-proc`, in a private mount namespace), runs a
//! [`Machine`] in `Mode::Pid1` on the real [`Linux`] system in a tokio current-thread runtime,
//! and checks, from /proc and from what the processes themselves log:
//!
//! - an orphan re-parented to us is reaped when it dies (no zombie left);
//! - a crashed service is restarted, after 1 s and then 2 s, not at once;
//! - the drain stops dockerd, then (only once dockerd has exited) containerd, then the other
//!   services, then ends every remaining process with kill(-1) (TERM, then KILL for one that
//!   ignores TERM), syncs, and leaves no process in the namespace but PID 1.
//!
//! Without root it prints `SKIPPED <test>: <why>` and passes.

use crate::common::{privileged, wait_until, Ns, Spy};
use spotinit::machine::{BootState, Machine, Mode, Request, Then};
use spotinit::run::Aws;
use spotinit::services::ServiceSpec;
use spotinit::shutdown::drain;
use spotinit::sys::{describe_exit, CommandSpec, Linux, Paths, Pid, System};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A daemon stand-in. It logs `start NAME NANOS PID` when it starts; on SIGTERM it logs
/// `term NAME NANOS`, takes @DELAY@ seconds to shut down, logs `stop NAME NANOS` and exits.
const DAEMON: &str = r#"#!/bin/sh
log='@LOG@'
name='@NAME@'
now() { date +%s%N; }
trap 'echo "term $name $(now)" >> "$log"; sleep @DELAY@; echo "stop $name $(now)" >> "$log"; kill $child 2>/dev/null; exit 0' TERM
echo "start $name $(now) $$" >> "$log"
sleep 100000 &
child=$!
wait $child
"#;

/// One line of the daemons' log.
#[derive(Debug)]
struct Event {
    kind: String,
    name: String,
    nanos: u128,
    /// For `start`: the daemon's pid.
    pid: Option<Pid>,
}

fn events(log: &Path) -> Vec<Event> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some(Event {
                kind: f.first()?.to_string(),
                name: f.get(1)?.to_string(),
                nanos: f.get(2)?.parse().ok()?,
                pid: f.get(3).and_then(|p| p.parse().ok()),
            })
        })
        .collect()
}

fn count(log: &Path, kind: &str, name: &str) -> usize {
    events(log)
        .iter()
        .filter(|e| e.kind == kind && e.name == name)
        .count()
}

/// When `name` logged `kind` (the first time).
fn at(ev: &[Event], kind: &str, name: &str) -> u128 {
    ev.iter()
        .find(|e| e.kind == kind && e.name == name)
        .unwrap_or_else(|| panic!("{name} never logged `{kind}`: {ev:?}"))
        .nanos
}

fn pids() -> Vec<Pid> {
    let mut v: Vec<Pid> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort();
    v
}

fn cmdline(pid: Pid) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The state letter in /proc/PID/stat (`S`, `R`, `Z` for a zombie), None when gone.
fn state(pid: Pid) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

fn ppid(pid: Pid) -> Option<Pid> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

/// Every process but us, described.
fn others() -> Vec<String> {
    pids()
        .into_iter()
        .filter(|p| *p != 1)
        .map(|p| format!("{p} {:?} {:?}", state(p), cmdline(p)))
        .collect()
}

fn sigkill(pid: Pid) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

async fn service_pid(m: &Machine<Spy<Linux>>, name: &str) -> Option<Pid> {
    m.supervisor
        .running()
        .await
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p)
}

/// Kills the service with SIGKILL and returns how long it took to be running again, and as
/// which pid. Also checks it is not restarted at once.
async fn crash_and_time_restart(
    m: &Machine<Spy<Linux>>,
    log: &Path,
    name: &str,
) -> (Duration, Pid) {
    let before = service_pid(m, name).await.expect("running");
    // Crash it once it is up (its script has logged its start), not while it is still exec'ing.
    let up = wait_until(Duration::from_secs(5), || {
        events(log)
            .iter()
            .any(|e| e.kind == "start" && e.name == name && e.pid == Some(before))
    })
    .await;
    assert!(up, "{name} ({before}) never logged its start");
    let t = Instant::now();
    sigkill(before);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        service_pid(m, name).await,
        None,
        "{name} should be waiting out its restart delay 500 ms after the crash (was the exit seen?)"
    );
    while t.elapsed() < Duration::from_secs(6) {
        if let Some(after) = service_pid(m, name).await {
            let took = t.elapsed();
            assert_ne!(after, before);
            return (took, after);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} was not restarted within 6 s");
}

#[test]
fn pid1_reaps_orphans_restarts_crashes_and_drains_in_order() {
    privileged(
        "pid1_reaps_orphans_restarts_crashes_and_drains_in_order",
        Ns::Pid,
        &["sh", "date", "sleep"],
        Duration::from_secs(120),
        |dir| async move {
            let root = dir.join("root");
            let bin = root.join("usr/bin");
            std::fs::create_dir_all(&bin).unwrap();
            // The namespace's own /proc (unshare --mount-proc), for the drain's process scan.
            std::os::unix::fs::symlink("/proc", root.join("proc")).unwrap();
            let log = dir.join("events.log");
            // dockerd takes longest to stop, containerd less, the rest no time: if the drain
            // stopped them together, the log would show it.
            for (name, delay) in [
                ("dockerd", "0.6"),
                ("containerd", "0.3"),
                ("worker", "0"),
                ("helper", "0"),
                ("stray", "0"),
            ] {
                let script = DAEMON
                    .replace("@LOG@", &log.display().to_string())
                    .replace("@NAME@", name)
                    .replace("@DELAY@", delay);
                let path = bin.join(name);
                std::fs::write(&path, script).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            let program = |name: &str| -> PathBuf { bin.join(name) };

            let spy = Arc::new(Spy::new(Linux, &root));
            let (m, _requests) = Machine::new(spy.clone(), Paths::under(&root), Mode::Pid1);
            for name in ["containerd", "dockerd", "worker", "helper"] {
                let spec = ServiceSpec::new(name, CommandSpec::new(program(name)))
                    .stop_timeout(Duration::from_secs(5));
                m.supervisor.launch(spec).await.unwrap();
            }
            let all_started = wait_until(Duration::from_secs(5), || {
                ["containerd", "dockerd", "worker", "helper"]
                    .iter()
                    .all(|n| count(&log, "start", n) == 1)
            })
            .await;
            assert!(all_started, "{:?}", events(&log));

            // An orphan: the subshell starts `sleep 1000` and exits, so its parent is gone and
            // the kernel re-parents it to PID 1, us. Killed, it must be reaped, not left a zombie.
            let parent = m
                .sys
                .spawn(&CommandSpec::new("/bin/sh").args(["-c", "(sleep 1000 &); exec sleep 2000"]))
                .unwrap();
            let mut orphan = None;
            let found = wait_until(Duration::from_secs(5), || {
                orphan = pids()
                    .into_iter()
                    .find(|p| cmdline(*p) == ["sleep", "1000"]);
                orphan.is_some()
            })
            .await;
            assert!(found, "the orphan never appeared: {:?}", others());
            let orphan = orphan.unwrap();
            assert_eq!(ppid(orphan), Some(1), "re-parented to PID 1");
            sigkill(orphan);
            let reaped = wait_until(Duration::from_secs(3), || state(orphan).is_none()).await;
            assert!(
                reaped,
                "orphan {orphan} was not reaped: state {:?}",
                state(orphan)
            );
            // Its exit went nowhere else: the shell's `sleep 2000` is ours and still running.
            assert_eq!(cmdline(parent.pid), ["sleep", "2000"]);
            assert!(matches!(state(parent.pid), Some(s) if s != 'Z'));

            // A crashed service comes back after its backoff: 1 s, then 2 s.
            let (first, _) = crash_and_time_restart(&m, &log, "worker").await;
            assert!(
                first >= Duration::from_millis(990) && first < Duration::from_millis(2500),
                "first restart after {first:?}"
            );
            let (second, _) = crash_and_time_restart(&m, &log, "worker").await;
            assert!(
                second >= Duration::from_millis(1990) && second < Duration::from_millis(4000),
                "second restart after {second:?}"
            );
            let third = wait_until(Duration::from_secs(5), || {
                count(&log, "start", "worker") == 3
            });
            assert!(third.await, "{:?}", events(&log));

            // Processes nobody supervises, for the drain's kill(-1): one that logs its SIGTERM,
            // one that ignores SIGTERM (sleep inherits the ignored signal).
            let stray = m.sys.spawn(&CommandSpec::new(program("stray"))).unwrap();
            let stubborn = m
                .sys
                .spawn(&CommandSpec::new("/bin/sh").args(["-c", "trap '' TERM; exec sleep 3000"]))
                .unwrap();
            assert!(
                wait_until(Duration::from_secs(5), || count(&log, "start", "stray")
                    == 1)
                .await
            );
            let names: HashMap<Pid, String> = m
                .supervisor
                .running()
                .await
                .into_iter()
                .map(|(n, p)| (p, n))
                .collect();
            let pid_of = |name: &str| *names.iter().find(|(_, n)| *n == name).unwrap().0;

            let t = Instant::now();
            let mut st = BootState::<Aws<Spy<Linux>>> {
                docker_started: true,
                ..BootState::default()
            };
            drain(
                &m,
                &mut st,
                &Request::new("test: drain as PID 1", Then::Exit),
            )
            .await;
            eprintln!("drain took {:?}", t.elapsed());

            // Nothing is left in the namespace but us: no process, no zombie.
            let empty = wait_until(Duration::from_secs(3), || pids() == [1]).await;
            assert!(empty, "left in the namespace: {:?}", others());
            let status = |c: spotinit::sys::Child| async move { describe_exit(c.wait().await) };
            assert_eq!(status(stubborn).await, "killed by SIGKILL");
            assert_eq!(status(parent).await, "killed by SIGTERM");
            assert_eq!(status(stray).await, "exit status 0");

            // The order, as the daemons lived it.
            let ev = events(&log);
            assert!(
                at(&ev, "stop", "dockerd") <= at(&ev, "term", "containerd"),
                "containerd was told to stop before dockerd had stopped: {ev:?}"
            );
            for other in ["worker", "helper"] {
                assert!(
                    at(&ev, "stop", "containerd") <= at(&ev, "term", other),
                    "{other} was told to stop before containerd had stopped: {ev:?}"
                );
            }
            for svc in ["dockerd", "containerd", "worker", "helper"] {
                assert!(
                    at(&ev, "stop", svc) <= at(&ev, "term", "stray"),
                    "kill(-1) came before {svc} had stopped: {ev:?}"
                );
            }

            // The order, as the system calls went.
            let ops = spy.ops();
            let pos = |op: &str| {
                ops.iter()
                    .position(|o| o == op)
                    .unwrap_or_else(|| panic!("no `{op}` in {ops:?}"))
            };
            let dockerd = pos(&format!("kill {} SIGTERM", pid_of("dockerd")));
            let containerd = pos(&format!("kill {} SIGTERM", pid_of("containerd")));
            let worker = pos(&format!("kill {} SIGTERM", pid_of("worker")));
            let helper = pos(&format!("kill {} SIGTERM", pid_of("helper")));
            let term_all = pos("kill-all SIGTERM");
            let kill_all = pos("kill-all SIGKILL");
            let sync = pos("sync");
            assert!(
                dockerd < containerd
                    && containerd < worker.min(helper)
                    && worker.max(helper) < term_all
                    && term_all < kill_all
                    && kill_all < sync,
                "{ops:?}"
            );
            assert_eq!(spy.matching("power"), Vec::<String>::new());
        },
    );
}
