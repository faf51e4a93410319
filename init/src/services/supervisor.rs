//! The supervisor: starts long-running services, restarts the ones that die (with a growing
//! delay, and a console line each time, so a crash loop never spins), and stops them with a
//! deadline (the stop signal, then SIGKILL). It is an actor: one task owns the service table and
//! everything else talks to it through a [`Supervisor`] handle.

use crate::console::human;
use crate::sys::{describe_exit, CommandSpec, Pid, Signal, SysError, System};
use std::collections::HashMap;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub command: CommandSpec,
    /// Start it again when it exits on its own.
    pub restart: bool,
    pub stop_signal: Signal,
    /// How long the stop signal gets before SIGKILL.
    pub stop_timeout: Duration,
}

impl ServiceSpec {
    pub fn new(name: &str, command: CommandSpec) -> Self {
        ServiceSpec {
            name: name.into(),
            command,
            restart: true,
            stop_signal: Signal::SIGTERM,
            stop_timeout: Duration::from_secs(10),
        }
    }
    pub fn stop_timeout(mut self, d: Duration) -> Self {
        self.stop_timeout = d;
        self
    }
}

/// How a stop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stopped {
    pub name: String,
    pub took: Duration,
    /// It did not stop in time and got SIGKILL.
    pub killed: bool,
    /// It was not running (never started, or waiting to be restarted).
    pub was_running: bool,
    /// It had not exited [`KILL_GRACE`] after SIGKILL (stuck in the kernel): the stop gave up
    /// waiting for it.
    pub lingering: bool,
}

/// How long a process gets to disappear after SIGKILL before a stop stops waiting for it: one
/// stuck in uninterruptible I/O must not hold up the drain for ever.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Restart delays: 1 s doubling to 30 s; a service that ran a minute starts over at 1 s.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub stable_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_secs(1),
            max: Duration::from_secs(30),
            stable_after: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay before restart number `n` (1-based) of a service that ran for `ran`.
    fn delay(&self, n: u32) -> Duration {
        crate::retry::doubling(self.first, n, self.max)
    }
}

/// Why a service did not start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start {name}: the supervisor is gone")]
    SupervisorGone { name: String },
    #[error("{name} is already running")]
    AlreadyRunning { name: String },
    #[error("{name} is not a service")]
    NotAService { name: String },
    #[error("cannot start {name}: {source}")]
    Spawn { name: String, source: SysError },
}

enum Msg {
    Start(ServiceSpec, oneshot::Sender<Result<Pid, LaunchError>>),
    /// Stop it; SIGKILL after its stop timeout, or after the limit if that is shorter.
    Stop(String, Option<Duration>, oneshot::Sender<Stopped>),
    Running(oneshot::Sender<Vec<(String, Pid)>>),
    Exited {
        name: String,
        generation: u64,
        status: ExitStatus,
    },
    Restart {
        name: String,
        generation: u64,
    },
    StopDeadline {
        name: String,
        generation: u64,
    },
    KillDeadline {
        name: String,
        generation: u64,
    },
}

struct Service {
    spec: ServiceSpec,
    pid: Option<Pid>,
    /// Bumped at every start, so late events of an earlier run are ignored.
    generation: u64,
    started: Instant,
    restarts: u32,
    stopping: Option<(Instant, bool, Vec<oneshot::Sender<Stopped>>)>,
    /// The stop timeout in force for the stop under way.
    stop_timeout: Duration,
    /// Stopped for good: never restarted again.
    stopped: bool,
}

/// A handle to the supervisor task.
#[derive(Clone)]
pub struct Supervisor {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Supervisor {
    pub fn start<S: System>(sys: Arc<S>) -> Self {
        Self::with_backoff(sys, Backoff::default())
    }

    pub fn with_backoff<S: System>(sys: Arc<S>, backoff: Backoff) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let actor = Actor {
            sys,
            backoff,
            services: HashMap::new(),
            tx: tx.clone(),
        };
        tokio::spawn(actor.run(rx));
        Supervisor { tx }
    }

    /// Starts a service (replacing a stopped one of the same name).
    pub async fn launch(&self, spec: ServiceSpec) -> Result<Pid, LaunchError> {
        let (reply, rx) = oneshot::channel();
        let name = spec.name.clone();
        let gone = |name: &str| LaunchError::SupervisorGone { name: name.into() };
        self.tx
            .send(Msg::Start(spec, reply))
            .map_err(|_| gone(&name))?;
        rx.await.map_err(|_| gone(&name))?
    }

    /// Stops a service for good: stop signal, then SIGKILL after its stop timeout.
    pub async fn stop(&self, name: &str) -> Stopped {
        self.stop_within(name, None).await
    }

    /// As [`Supervisor::stop`], with SIGKILL after `limit` if that is shorter than the
    /// service's stop timeout (a drain against a spot notice's deadline).
    pub async fn stop_within(&self, name: &str, limit: Option<Duration>) -> Stopped {
        let (reply, rx) = oneshot::channel();
        let gone = not_running(name);
        if self.tx.send(Msg::Stop(name.into(), limit, reply)).is_err() {
            return gone;
        }
        rx.await.unwrap_or(gone)
    }

    /// Services currently running, with their pids.
    pub async fn running(&self) -> Vec<(String, Pid)> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Running(reply)).is_err() {
            return Vec::new();
        }
        let mut v = rx.await.unwrap_or_default();
        v.sort();
        v
    }
}

fn not_running(name: &str) -> Stopped {
    Stopped {
        name: name.into(),
        took: Duration::ZERO,
        killed: false,
        was_running: false,
        lingering: false,
    }
}

struct Actor<S: System> {
    sys: Arc<S>,
    backoff: Backoff,
    services: HashMap<String, Service>,
    tx: mpsc::UnboundedSender<Msg>,
}

impl<S: System> Actor<S> {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Start(spec, reply) => {
                    let _ = reply.send(self.launch(spec));
                }
                Msg::Stop(name, limit, reply) => self.stop(&name, limit, reply),
                Msg::Running(reply) => {
                    let _ = reply.send(
                        self.services
                            .values()
                            .filter_map(|s| s.pid.map(|p| (s.spec.name.clone(), p)))
                            .collect(),
                    );
                }
                Msg::Exited {
                    name,
                    generation,
                    status,
                } => self.exited(&name, generation, status),
                Msg::Restart { name, generation } => self.restart(&name, generation),
                Msg::StopDeadline { name, generation } => self.stop_deadline(&name, generation),
                Msg::KillDeadline { name, generation } => self.kill_deadline(&name, generation),
            }
        }
    }

    fn launch(&mut self, spec: ServiceSpec) -> Result<Pid, LaunchError> {
        let name = spec.name.clone();
        let (generation, restarts) = match self.services.get(&name) {
            Some(s) if s.pid.is_some() => return Err(LaunchError::AlreadyRunning { name }),
            Some(s) => (s.generation + 1, 0),
            None => (1, 0),
        };
        self.services.insert(
            name.clone(),
            Service {
                spec,
                pid: None,
                generation,
                started: Instant::now(),
                restarts,
                stopping: None,
                stop_timeout: Duration::ZERO,
                stopped: false,
            },
        );
        self.spawn(&name)
    }

    fn spawn(&mut self, name: &str) -> Result<Pid, LaunchError> {
        let sys = self.sys.clone();
        let tx = self.tx.clone();
        let Some(svc) = self.services.get_mut(name) else {
            return Err(LaunchError::NotAService { name: name.into() });
        };
        let child = sys
            .spawn(&svc.spec.command)
            .map_err(|source| LaunchError::Spawn {
                name: name.into(),
                source,
            })?;
        svc.pid = Some(child.pid);
        svc.started = Instant::now();
        let pid = child.pid;
        let generation = svc.generation;
        let name = name.to_string();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(Msg::Exited {
                name,
                generation,
                status,
            });
        });
        Ok(pid)
    }

    fn exited(&mut self, name: &str, generation: u64, status: ExitStatus) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        if svc.generation != generation {
            return;
        }
        svc.pid = None;
        let ran = svc.started.elapsed();
        if let Some((since, killed, waiters)) = svc.stopping.take() {
            for w in waiters {
                let _ = w.send(Stopped {
                    name: name.into(),
                    took: since.elapsed(),
                    killed,
                    was_running: true,
                    lingering: false,
                });
            }
            return;
        }
        if svc.stopped || !svc.spec.restart {
            crate::log!(
                "{name} exited ({}) after {}",
                describe_exit(status),
                human(ran)
            );
            return;
        }
        if ran >= self.backoff.stable_after {
            svc.restarts = 0;
        }
        svc.restarts += 1;
        let delay = self.backoff.delay(svc.restarts);
        crate::log!(
            "{name} exited ({}) after {}; restarting in {} (restart {})",
            describe_exit(status),
            human(ran),
            human(delay),
            svc.restarts
        );
        svc.generation += 1;
        let (tx, name, generation) = (self.tx.clone(), name.to_string(), svc.generation);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Msg::Restart { name, generation });
        });
    }

    fn restart(&mut self, name: &str, generation: u64) {
        match self.services.get(name) {
            Some(s) if s.generation == generation && !s.stopped && s.pid.is_none() => {}
            _ => return,
        }
        if let Err(e) = self.spawn(name) {
            crate::log!("{e}");
            // Treat a failed exec like a crash: the next try waits longer.
            if let Some(svc) = self.services.get_mut(name) {
                let status = std::os::unix::process::ExitStatusExt::from_raw(127 << 8);
                let generation = svc.generation;
                self.exited(name, generation, status);
            }
        }
    }

    fn stop(&mut self, name: &str, limit: Option<Duration>, reply: oneshot::Sender<Stopped>) {
        let Some(svc) = self.services.get_mut(name) else {
            let _ = reply.send(not_running(name));
            return;
        };
        svc.stopped = true;
        let Some(pid) = svc.pid else {
            // Waiting for a restart: cancel it.
            svc.generation += 1;
            let _ = reply.send(not_running(name));
            return;
        };
        if let Some((_, _, waiters)) = svc.stopping.as_mut() {
            waiters.push(reply);
            return;
        }
        if let Err(e) = self.sys.kill(pid, svc.spec.stop_signal) {
            crate::log!("stopping {name}: {e}");
        }
        svc.stopping = Some((Instant::now(), false, vec![reply]));
        let timeout = limit.map_or(svc.spec.stop_timeout, |l| l.min(svc.spec.stop_timeout));
        svc.stop_timeout = timeout;
        let (tx, name, generation) = (self.tx.clone(), name.to_string(), svc.generation);
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = tx.send(Msg::StopDeadline { name, generation });
        });
    }

    fn stop_deadline(&mut self, name: &str, generation: u64) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        if svc.generation != generation {
            return;
        }
        if let (Some(pid), Some((_, killed, _))) = (svc.pid, svc.stopping.as_mut()) {
            crate::log!(
                "{name} did not stop within {}: sending SIGKILL",
                human(svc.stop_timeout)
            );
            *killed = true;
            if let Err(e) = self.sys.kill(pid, Signal::SIGKILL) {
                crate::log!("killing {name}: {e}");
            }
            let (tx, name) = (self.tx.clone(), name.to_string());
            tokio::spawn(async move {
                tokio::time::sleep(KILL_GRACE).await;
                let _ = tx.send(Msg::KillDeadline { name, generation });
            });
        }
    }

    /// SIGKILL did not end it in [`KILL_GRACE`]: answer the stop anyway.
    fn kill_deadline(&mut self, name: &str, generation: u64) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        if svc.generation != generation {
            return;
        }
        if let Some((since, _, waiters)) = svc.stopping.take() {
            crate::log!(
                "{name} has not exited {} after SIGKILL (stuck in the kernel?); going on without it",
                human(KILL_GRACE)
            );
            for w in waiters {
                let _ = w.send(Stopped {
                    name: name.into(),
                    took: since.elapsed(),
                    killed: true,
                    was_running: true,
                    lingering: true,
                });
            }
        }
    }
}

#[cfg(test)]
#[path = "supervisor_tests.rs"]
mod tests;
