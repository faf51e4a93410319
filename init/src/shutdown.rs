//! The one drain. Signals, the power button, a spot interruption notice and a failed boot all
//! end here: stop Docker (containers get their stop timeouts), stop containerd, stop every other
//! process, sync, give the volume back (unmount, detach), undo the early mounts. Each step is
//! logged with its duration and, against a deadline, the time left.

use crate::console::human;
use crate::machine::{BootState, Machine, Mode, Platform, Request, RESERVE};
use crate::services::docker;
use crate::sys::{Signal, System};
use crate::volume::VolumePhase;
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

/// Stops every running container of the Engine API at `socket` with a timeout that fits before
/// the deadline (less [`RESERVE`]) and within `stop_timeout`, all at once. Returns how many were
/// running.
pub async fn stop_containers_before(
    socket: &Path,
    stop_timeout: Duration,
    deadline: Instant,
) -> usize {
    let socket = socket.to_path_buf();
    let left = deadline.saturating_duration_since(Instant::now());
    let budget = left
        .saturating_sub(RESERVE)
        .min(stop_timeout)
        .max(Duration::from_secs(1));
    let ids = match docker::running_containers(&socket).await {
        Ok(ids) => ids,
        Err(e) => {
            crate::log!("shutdown: cannot list containers: {e}");
            return 0;
        }
    };
    crate::log!(
        "shutdown: stopping {} with a {} stop timeout ({} left)",
        crate::console::count(ids.len(), "container"),
        human(budget),
        human(left)
    );
    let handles: Vec<_> = ids
        .iter()
        .map(|id| {
            let (socket, id) = (socket.clone(), id.clone());
            tokio::spawn(async move {
                let path = format!("/containers/{id}/stop?t={}", budget.as_secs());
                docker::request(&socket, "POST", &path, budget + Duration::from_secs(10)).await
            })
        })
        .collect();
    for (h, id) in handles.into_iter().zip(&ids) {
        match h.await {
            Ok(Ok((code, _))) if code < 300 || code == 304 => {}
            Ok(Ok((code, body))) => {
                crate::log!(
                    "shutdown: stopping container {id}: HTTP {code} {}",
                    body.trim()
                )
            }
            Ok(Err(e)) => crate::log!("shutdown: stopping container {id}: {e}"),
            Err(_) => {}
        }
    }
    ids.len()
}

/// How long the drain waits for its notifications at the end, at most.
const NOTIFY_FLUSH: Duration = Duration::from_secs(5);

/// Logs a finished step with its duration and the time left before the deadline.
fn step_done(name: &str, since: Instant, deadline: Option<Instant>) {
    match deadline {
        Some(d) => crate::log!(
            "shutdown: {name} in {} ({} left)",
            human(since.elapsed()),
            human(d.saturating_duration_since(Instant::now()))
        ),
        None => crate::log!("shutdown: {name} in {}", human(since.elapsed())),
    }
}

/// Processes other than us and kernel threads (which have an empty command line).
pub fn user_processes(paths: &crate::sys::Paths) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir(paths.p("/proc")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let dir = paths.p("/proc").join(pid.to_string());
            let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
            if cmdline.is_empty() {
                return None;
            }
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            Some((pid, comm.trim().to_string()))
        })
        .collect()
}

/// How long a step may take before the deadline, keeping [`RESERVE`] back
/// for sync, unmount and detach (at least a second; no limit without a deadline).
fn step_limit(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| {
        d.saturating_duration_since(Instant::now())
            .saturating_sub(RESERVE)
            .max(Duration::from_secs(1))
    })
}

pub async fn drain<S: System, P: Platform>(m: &Machine<S>, st: &mut BootState<P>, req: &Request) {
    let start = Instant::now();
    let deadline = req.deadline;
    match deadline {
        Some(d) => crate::log!(
            "shutting down: {} ({} until EC2 takes the instance)",
            req.reason,
            human(d.saturating_duration_since(Instant::now()))
        ),
        None => crate::log!("shutting down: {}", req.reason),
    }

    // Before Docker stops: a pull finishing now would create or start a container into the
    // drain, or fail it noisily once dockerd is gone.
    if let Some(task) = st.declared_containers.take() {
        if !task.is_finished() {
            task.abort();
            crate::log!("shutdown: declared containers: no longer made to match (shutting down)");
        }
    }
    if st.docker_started {
        if let (Some(d), Some(cfg)) = (deadline, &st.config) {
            let t = Instant::now();
            let socket = m.paths.p(docker::DOCKER_SOCKET);
            let stop_timeout = Duration::from_secs(cfg.docker.stop_timeout_secs);
            let n = stop_containers_before(&socket, stop_timeout, d).await;
            step_done(
                &format!("{} stopped", crate::console::count(n, "container")),
                t,
                deadline,
            );
        }
        for name in ["dockerd", "containerd"] {
            let t = Instant::now();
            let s = m.supervisor.stop_within(name, step_limit(deadline)).await;
            if s.was_running {
                step_done(
                    &format!(
                        "{name} {}",
                        match (s.killed, s.lingering) {
                            (_, true) => "killed, but not gone",
                            (true, false) => "stopped (killed)",
                            (false, false) => "stopped",
                        }
                    ),
                    t,
                    deadline,
                );
            }
        }
    }

    let t = Instant::now();
    let others = m.supervisor.running().await;
    // Stop them all at once: each only waits for its own process.
    let limit = step_limit(deadline);
    let handles: Vec<_> = others
        .into_iter()
        .map(|(name, _)| {
            let sup = m.supervisor.clone();
            tokio::spawn(async move { sup.stop_within(&name, limit).await })
        })
        .collect();
    let mut stopped = Vec::new();
    for h in handles {
        if let Ok(s) = h.await {
            stopped.push(s);
        }
    }
    if !stopped.is_empty() {
        step_done(
            &format!(
                "{} stopped",
                stopped
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            t,
            deadline,
        );
    }
    // A first mkfs or an fsck the boot began: let it finish (before the deadline's reserve),
    // or the volume would keep a half-made filesystem.
    if let Some(vol) = st.volume.as_ref() {
        let t = Instant::now();
        let until = deadline.map(|d| d.checked_sub(RESERVE).unwrap_or(d));
        let f = vol.finish_critical(until).await;
        if !f.finished.is_empty() {
            step_done(&format!("{} finished", f.finished.join(", ")), t, deadline);
        }
        for what in &f.cut_off {
            crate::log!("shutdown: {what} is still running at the deadline; it is stopped with the rest (the next boot redoes it)");
        }
    }

    if m.mode == Mode::Pid1 {
        // Container shims, containers, anything started by hand: TERM, a moment, KILL.
        let t = Instant::now();
        let left = user_processes(&m.paths).len();
        if left > 0 {
            let _ = m.sys.kill_all(Signal::SIGTERM);
            let grace = step_limit(deadline)
                .map_or(Duration::from_secs(5), |l| l.min(Duration::from_secs(5)));
            let until = Instant::now() + grace;
            while !user_processes(&m.paths).is_empty() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let stubborn = user_processes(&m.paths);
            if !stubborn.is_empty() {
                crate::log!(
                    "shutdown: killing {}",
                    stubborn
                        .iter()
                        .map(|(p, c)| format!("{c}[{p}]"))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                let _ = m.sys.kill_all(Signal::SIGKILL);
            }
            step_done(&format!("{left} other processes ended"), t, deadline);
        }
    }

    let t = Instant::now();
    m.sys.sync();
    step_done("filesystems synced", t, deadline);

    if let Some(vol) = st.volume.as_mut() {
        let t = Instant::now();
        match vol.release().await {
            Ok(()) => step_done("state volume released", t, deadline),
            Err(e) => crate::log!("shutdown: could not release the state volume: {e}"),
        }
    }

    if m.mode == Mode::Pid1 {
        let t = Instant::now();
        let mounts: Vec<_> = m
            .early_mounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .rev()
            .collect();
        for target in mounts {
            if m.sys.umount(&target, false).is_err() {
                // Busy (our own console, a straggler): detach it lazily; tmpfs loses nothing.
                let _ = m.sys.umount(&target, true);
            }
        }
        m.sys.sync();
        step_done("unmounted", t, deadline);
    }
    crate::log!("shutdown: done in {}", human(start.elapsed()));
    crate::notify::event(
        "drain-done",
        format!(
            "drained in {} ({}); the state volume is free for the next instance",
            human(start.elapsed()),
            req.reason
        ),
    );
    // Its last event may take what time the deadline leaves, up to a few seconds: the power
    // goes next.
    let spare = deadline.map_or(NOTIFY_FLUSH, |d| {
        d.saturating_duration_since(Instant::now())
            .min(NOTIFY_FLUSH)
    });
    crate::notify::flush(spare).await;
}
