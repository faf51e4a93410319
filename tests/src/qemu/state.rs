//! State shared by the VM handle, its background tasks and console cursors: the console so
//! far, QEMU's stderr and exit, and the diagnostics errors carry.

use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::ConsoleLine;

/// How many console lines an error message carries.
const CONSOLE_TAIL_LINES: usize = 40;

#[derive(Clone, Debug)]
pub(super) struct ExitRecord {
    pub(super) status: std::result::Result<ExitStatus, String>,
    pub(super) at: Duration,
}

#[derive(Default)]
pub(super) struct VmState {
    pub(super) lines: Vec<ConsoleLine>,
    /// The line being received (no newline yet, e.g. a prompt): shown with the complete ones.
    pub(super) partial: Option<ConsoleLine>,
    pub(super) console_closed: bool,
    pub(super) exit: Option<ExitRecord>,
    pub(super) stderr: String,
}

pub(super) struct Shared {
    pub(super) name: String,
    pub(super) started: Instant,
    pub(super) console_log: PathBuf,
    pub(super) state: Mutex<VmState>,
    /// Bumped on every change of `state`: console lines, console EOF, process exit.
    pub(super) changed: watch::Sender<u64>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, VmState> {
        // A panic while holding this lock cannot leave the state half-updated in a way that
        // matters for reading it, so a poisoned lock is still used.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut VmState)) {
        f(&mut self.lock());
        self.changed.send_modify(|v| *v += 1);
    }

    pub(super) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub(super) fn exited(&self) -> bool {
        self.lock().exit.is_some()
    }

    /// The last `n` console lines, one per line, with timestamps.
    fn console_tail(&self, n: usize) -> String {
        let st = self.lock();
        let mut all: Vec<&ConsoleLine> = st.lines.iter().collect();
        if let Some(p) = &st.partial {
            all.push(p);
        }
        let skip = all.len().saturating_sub(n);
        let mut out = String::new();
        for line in &all[skip..] {
            out.push_str(&format!("  {line}\n"));
        }
        if all.is_empty() {
            out.push_str("  (nothing on the console)\n");
        }
        out
    }

    /// A paragraph to append to errors: QEMU's state, stderr and the console tail.
    pub(super) fn diagnostics(&self) -> String {
        let (exit, stderr) = {
            let st = self.lock();
            (st.exit.clone(), st.stderr.clone())
        };
        let mut out = String::new();
        match exit {
            Some(e) => out.push_str(&format!(
                "QEMU exited at {:.3} s: {}\n",
                e.at.as_secs_f64(),
                describe_exit(&e.status)
            )),
            None => out.push_str(&format!(
                "QEMU still running, uptime {:.3} s\n",
                self.uptime().as_secs_f64()
            )),
        }
        let stderr = stderr.trim();
        if !stderr.is_empty() {
            out.push_str(&format!("QEMU stderr:\n{stderr}\n"));
        }
        out.push_str(&format!(
            "last {CONSOLE_TAIL_LINES} console lines (full log: {}):\n{}",
            self.console_log.display(),
            self.console_tail(CONSOLE_TAIL_LINES)
        ));
        out
    }
}

fn describe_exit(status: &std::result::Result<ExitStatus, String>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => format!("{s}"),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}
