//! The process table. As PID 1 we collect every exit, including orphans re-parented to us; a
//! child's status is routed to whoever started it. The waiter is registered under the same lock
//! that the collector holds while it calls waitpid, so a child that exits before `spawn` returns
//! is never missed (the kata-containers agent pattern).

use super::system::Pid;
use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Mutex, OnceLock};
use tokio::sync::oneshot;

pub(crate) struct Reaper {
    waiters: Mutex<HashMap<Pid, oneshot::Sender<ExitStatus>>>,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

impl Reaper {
    /// The one process table, with its SIGCHLD listener started on first use. Must be called
    /// inside the tokio runtime.
    pub(crate) fn get() -> &'static Reaper {
        let mut first = false;
        let r = REAPER.get_or_init(|| {
            first = true;
            Reaper {
                waiters: Mutex::new(HashMap::new()),
            }
        });
        if first {
            r.listen();
        }
        r
    }

    /// Starts a child with `start` while holding the table lock, and registers its waiter.
    pub(crate) fn spawn_with<E>(
        &self,
        start: impl FnOnce() -> Result<Pid, E>,
    ) -> Result<(Pid, oneshot::Receiver<ExitStatus>), E> {
        let mut table = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let pid = start()?;
        let (tx, rx) = oneshot::channel();
        table.insert(pid, tx);
        Ok((pid, rx))
    }

    /// Collects every child that has exited.
    pub(crate) fn reap(&self) {
        loop {
            let mut table = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            let mut raw: libc::c_int = 0;
            // SAFETY: waitpid with a valid out-pointer to a local int; WNOHANG never blocks.
            let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
            if pid <= 0 {
                return; // 0: children remain but none exited; -1/ECHILD: no children at all.
            }
            let status = ExitStatus::from_raw(raw);
            match table.remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(status);
                }
                None => {
                    drop(table);
                    crate::log!(
                        "reaped orphan process {pid} ({})",
                        super::system::describe_exit(status)
                    );
                }
            }
        }
    }

    fn listen(&'static self) {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::child()) {
            Ok(mut sigchld) => {
                tokio::spawn(async move {
                    // A child may have exited before the handler existed.
                    self.reap();
                    while sigchld.recv().await.is_some() {
                        self.reap();
                    }
                });
            }
            Err(e) => crate::log!("cannot listen for SIGCHLD ({e}): children will not be reaped"),
        }
    }
}
