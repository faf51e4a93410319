//! A recording [`System`] for tests: every call is appended to a log of [`Op`]s in order, and
//! spawned programs behave as scripted (exit at once, run until signalled, ignore SIGTERM).

use super::errors::{SysError, SysResult};
use super::system::{Child, CommandSpec, MountSpec, MsFlags, Pid, PowerAction, Signal, System};
use nix::errno::Errno;
use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// One recorded call. Paths are shown relative to the fake's root (as the real system sees them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Mount {
        source: String,
        target: PathBuf,
        fstype: Option<String>,
        flags: MsFlags,
    },
    Umount {
        target: PathBuf,
        detach: bool,
    },
    Remount {
        target: PathBuf,
        flags: MsFlags,
    },
    PivotRoot {
        new_root: PathBuf,
        put_old: PathBuf,
    },
    SetHostname(String),
    Exec {
        program: String,
        args: Vec<String>,
    },
    InterfaceUp(String),
    Spawn {
        pid: Pid,
        program: String,
        args: Vec<String>,
    },
    Kill {
        pid: Pid,
        program: String,
        sig: Signal,
    },
    KillAll(Signal),
    Sync,
    Power(PowerAction),
}

impl Op {
    /// A short form for sequence assertions: `mount tmpfs /run`, `spawn containerd`,
    /// `kill dockerd SIGTERM`, `umount /var/lib/docker`, `sync`, `power PowerOff`.
    pub fn brief(&self) -> String {
        match self {
            Op::Mount { target, fstype, .. } => format!(
                "mount {} {}",
                fstype.as_deref().unwrap_or("bind"),
                target.display()
            ),
            Op::Umount { target, .. } => format!("umount {}", target.display()),
            Op::Remount { target, .. } => format!("remount {}", target.display()),
            Op::PivotRoot { new_root, .. } => format!("pivot_root {}", new_root.display()),
            Op::SetHostname(h) => format!("hostname {h}"),
            Op::Exec { program, .. } => format!("exec {program}"),
            Op::InterfaceUp(i) => format!("up {i}"),
            Op::Spawn { program, .. } => format!("spawn {program}"),
            Op::Kill { program, sig, .. } => format!("kill {program} {}", sig.as_str()),
            Op::KillAll(sig) => format!("kill-all {}", sig.as_str()),
            Op::Sync => "sync".into(),
            Op::Power(a) => format!("power {a:?}"),
        }
    }
}

/// How a spawned fake program behaves.
#[derive(Clone, Copy, Debug)]
pub enum Behavior {
    /// Exits at once with this code.
    Exit(i32),
    /// Runs until it gets SIGTERM, SIGINT or SIGKILL.
    Run,
    /// Runs until SIGKILL (a daemon stuck in shutdown).
    IgnoreTerm,
    /// Never exits, not even on SIGKILL (a process stuck in uninterruptible I/O).
    IgnoreAll,
}

type SpawnHook = Arc<dyn Fn(&CommandSpec) + Send + Sync>;
type OpHook = Arc<dyn Fn(&Op) + Send + Sync>;
type FailRule = Box<dyn Fn(&Op) -> bool + Send + Sync>;

struct Running {
    program: String,
    behavior: Behavior,
    tx: oneshot::Sender<ExitStatus>,
}

#[derive(Default)]
struct State {
    ops: Vec<Op>,
    next_pid: Pid,
    running: HashMap<Pid, Running>,
    behaviors: HashMap<String, Behavior>,
    exit_codes: HashMap<String, Vec<i32>>,
    hooks: HashMap<String, SpawnHook>,
    op_hooks: Vec<OpHook>,
    failures: Vec<(FailRule, Errno)>,
    /// Kept only when asked for ([`FakeSystem::with_mount_table`]).
    mounts: Option<super::fake_mounts::MountTable>,
}

/// The recording fake. Cheap to clone (shared state).
#[derive(Clone)]
pub struct FakeSystem {
    root: PathBuf,
    state: Arc<Mutex<State>>,
}

impl FakeSystem {
    /// `root` is the directory tests use as `/` (the same as their [`super::Paths`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FakeSystem {
            root: root.into(),
            state: Arc::new(Mutex::new(State {
                next_pid: 100,
                ..State::default()
            })),
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a kernel-like mount table in `<root>/proc/self/mountinfo` from the mounts made
    /// through this fake: binds share their filesystem's device, a mount with mounts below it
    /// is busy, a read-only remount covers the whole filesystem.
    pub fn with_mount_table(self) -> Self {
        self.st().mounts = Some(super::fake_mounts::MountTable::new(&self.root));
        self
    }

    /// What the mount table says to a call (nothing without a table), before it is recorded.
    fn table(
        &self,
        f: impl FnOnce(&mut super::fake_mounts::MountTable) -> Result<(), Errno>,
    ) -> Result<(), Errno> {
        match self.st().mounts.as_mut() {
            Some(t) => f(t),
            None => Ok(()),
        }
    }

    /// Programs (by file name) that do not exit by themselves default to [`Behavior::Exit(0)`];
    /// daemons are declared with this.
    pub fn behave(&self, program: &str, b: Behavior) -> &Self {
        self.st().behaviors.insert(program.into(), b);
        self
    }

    /// The next runs of `program` exit with these codes, in order (then its behaviour applies).
    pub fn exit_codes(&self, program: &str, codes: &[i32]) -> &Self {
        self.st().exit_codes.insert(program.into(), codes.to_vec());
        self
    }

    /// Runs `hook` when `program` is spawned (e.g. to open the socket a daemon would).
    pub fn on_spawn(&self, program: &str, hook: impl Fn(&CommandSpec) + Send + Sync + 'static) {
        self.st().hooks.insert(program.into(), Arc::new(hook));
    }

    /// Runs `hook` after every successful call (e.g. to make a fake mount show content).
    pub fn on_op(&self, hook: impl Fn(&Op) + Send + Sync + 'static) {
        self.st().op_hooks.push(Arc::new(hook));
    }

    /// Every call matching `rule` fails with `errno` (and is still recorded).
    pub fn fail_when(&self, rule: impl Fn(&Op) -> bool + Send + Sync + 'static, errno: Errno) {
        self.st().failures.push((Box::new(rule), errno));
    }

    pub fn ops(&self) -> Vec<Op> {
        self.st().ops.clone()
    }

    /// [`Op::brief`] of every recorded call.
    pub fn briefs(&self) -> Vec<String> {
        self.ops().iter().map(Op::brief).collect()
    }

    /// Programs currently "running".
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<_> = self
            .st()
            .running
            .values()
            .map(|r| r.program.clone())
            .collect();
        v.sort();
        v
    }

    /// Makes a running program exit as if it crashed.
    pub fn crash(&self, program: &str, code: i32) -> bool {
        let mut st = self.st();
        let pid = st
            .running
            .iter()
            .find(|(_, r)| r.program == program)
            .map(|(p, _)| *p);
        match pid.and_then(|p| st.running.remove(&p)) {
            Some(r) => {
                let _ = r.tx.send(ExitStatus::from_raw(code << 8));
                true
            }
            None => false,
        }
    }

    fn rel(&self, p: &Path) -> PathBuf {
        match p.strip_prefix(&self.root) {
            Ok(r) => Path::new("/").join(r),
            Err(_) => p.to_path_buf(),
        }
    }

    fn record(&self, op: Op, what: &str, name: &'static str) -> SysResult<()> {
        self.record_then(op, what, name, || Ok(()))
    }

    /// Records the call; a scripted failure, else what `kernel` answers (the mount table),
    /// decides the result; the op hooks run only after a success.
    fn record_then(
        &self,
        op: Op,
        what: &str,
        name: &'static str,
        kernel: impl FnOnce() -> Result<(), Errno>,
    ) -> SysResult<()> {
        let failed = {
            let mut st = self.st();
            let failed = st
                .failures
                .iter()
                .find(|(rule, _)| rule(&op))
                .map(|(_, e)| *e);
            st.ops.push(op.clone());
            failed
        };
        if let Some(errno) = failed.or_else(|| kernel().err()) {
            return Err(SysError::new(name, what, errno));
        }
        let hooks = self.st().op_hooks.clone();
        for h in hooks {
            h(&op);
        }
        Ok(())
    }

    fn signal(&self, pid: Pid, sig: Signal) {
        let mut st = self.st();
        let ends = match st.running.get(&pid) {
            Some(r) => match (r.behavior, sig) {
                (Behavior::IgnoreAll, _) => false,
                (_, Signal::SIGKILL) => true,
                (Behavior::IgnoreTerm, _) => false,
                (_, Signal::SIGTERM | Signal::SIGINT) => true,
                _ => false,
            },
            None => false,
        };
        if ends {
            if let Some(r) = st.running.remove(&pid) {
                let _ = r.tx.send(ExitStatus::from_raw(sig as i32));
            }
        }
    }
}

impl System for FakeSystem {
    fn mount(&self, m: &MountSpec) -> SysResult<()> {
        let op = Op::Mount {
            source: m.source.clone(),
            target: self.rel(&m.target),
            fstype: m.fstype.clone(),
            flags: m.flags,
        };
        let what = m.target.display().to_string();
        self.record_then(op, &what, "mount", || self.table(|t| t.mount(m)))
    }
    fn umount(&self, target: &Path, detach: bool) -> SysResult<()> {
        let op = Op::Umount {
            target: self.rel(target),
            detach,
        };
        let what = target.display().to_string();
        self.record_then(op, &what, "umount", || {
            self.table(|t| t.umount(target, detach))
        })
    }
    fn remount(&self, target: &Path, flags: MsFlags) -> SysResult<()> {
        let op = Op::Remount {
            target: self.rel(target),
            flags,
        };
        let what = target.display().to_string();
        self.record_then(op, &what, "remount", || {
            self.table(|t| t.remount(target, flags))
        })
    }
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> SysResult<()> {
        let op = Op::PivotRoot {
            new_root: self.rel(new_root),
            put_old: self.rel(put_old),
        };
        self.record(op, &new_root.display().to_string(), "pivot_root")
    }
    fn set_hostname(&self, name: &str) -> SysResult<()> {
        self.record(Op::SetHostname(name.into()), name, "sethostname")
    }
    fn interface_up(&self, name: &str) -> SysResult<()> {
        self.record(Op::InterfaceUp(name.into()), name, "set link up")
    }
    fn spawn(&self, cmd: &CommandSpec) -> SysResult<Child> {
        let program = cmd.name();
        let (pid, behavior, code, hook) = {
            let mut st = self.st();
            st.next_pid += 1;
            let pid = st.next_pid;
            let behavior = st
                .behaviors
                .get(&program)
                .copied()
                .unwrap_or(Behavior::Exit(0));
            let code = st.exit_codes.get_mut(&program).and_then(|c| {
                if c.is_empty() {
                    None
                } else {
                    Some(c.remove(0))
                }
            });
            (pid, behavior, code, st.hooks.get(&program).cloned())
        };
        self.record(
            Op::Spawn {
                pid,
                program: program.clone(),
                args: cmd.args.clone(),
            },
            &cmd.display(),
            "exec",
        )?;
        let (tx, rx) = oneshot::channel();
        match (code, behavior) {
            (Some(c), _) | (None, Behavior::Exit(c)) => {
                let _ = tx.send(ExitStatus::from_raw(c << 8));
            }
            (None, b) => {
                self.st().running.insert(
                    pid,
                    Running {
                        program,
                        behavior: b,
                        tx,
                    },
                );
            }
        }
        if let Some(h) = hook {
            h(cmd);
        }
        Ok(Child { pid, exited: rx })
    }
    fn kill(&self, pid: Pid, sig: Signal) -> SysResult<()> {
        let program = self
            .st()
            .running
            .get(&pid)
            .map(|r| r.program.clone())
            .unwrap_or_else(|| format!("pid{pid}"));
        self.record(Op::Kill { pid, program, sig }, &pid.to_string(), "kill")?;
        self.signal(pid, sig);
        Ok(())
    }
    fn kill_all(&self, sig: Signal) -> SysResult<()> {
        self.record(Op::KillAll(sig), "every process", "kill")?;
        let pids: Vec<Pid> = self.st().running.keys().copied().collect();
        for pid in pids {
            self.signal(pid, sig);
        }
        Ok(())
    }
    fn sync(&self) {
        let _ = self.record(Op::Sync, "", "sync");
    }
    fn exec(&self, program: &Path, args: &[String]) -> SysResult<()> {
        let op = Op::Exec {
            program: program.display().to_string(),
            args: args.to_vec(),
        };
        self.record(op, &program.display().to_string(), "exec")
    }
    fn ctrl_alt_del_to_signal(&self) -> SysResult<()> {
        Ok(())
    }
    fn power(&self, action: PowerAction) -> SysResult<()> {
        self.record(Op::Power(action), &format!("{action:?}"), "reboot")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn daemons_run_until_signalled_and_stubborn_ones_until_killed() {
        let fake = FakeSystem::new("/tmp/none");
        fake.behave("dockerd", Behavior::Run);
        fake.behave("stuck", Behavior::IgnoreTerm);
        let d = fake.spawn(&CommandSpec::new("/usr/bin/dockerd")).unwrap();
        let s = fake.spawn(&CommandSpec::new("/bin/stuck")).unwrap();
        let quick = fake.spawn(&CommandSpec::new("/sbin/modprobe")).unwrap();
        assert!(quick.wait().await.success());
        assert_eq!(fake.running(), vec!["dockerd", "stuck"]);
        fake.kill(d.pid, Signal::SIGTERM).unwrap();
        fake.kill(s.pid, Signal::SIGTERM).unwrap();
        assert_eq!(fake.running(), vec!["stuck"]);
        fake.kill_all(Signal::SIGKILL).unwrap();
        assert!(fake.running().is_empty());
        assert_eq!(
            fake.briefs(),
            vec![
                "spawn dockerd",
                "spawn stuck",
                "spawn modprobe",
                "kill dockerd SIGTERM",
                "kill stuck SIGTERM",
                "kill-all SIGKILL"
            ]
        );
    }

    #[test]
    fn scripted_failures_are_recorded_and_returned() {
        let fake = FakeSystem::new("/r");
        fake.fail_when(
            |op| matches!(op, Op::Mount { target, .. } if target == Path::new("/proc")),
            Errno::EBUSY,
        );
        let m = MountSpec::fs(
            "proc",
            "proc",
            PathBuf::from("/r/proc"),
            MsFlags::empty(),
            "",
        );
        let e = fake.mount(&m).unwrap_err();
        assert_eq!(e.errno, Errno::EBUSY);
        assert_eq!(fake.briefs(), vec!["mount proc /proc"]);
    }
}
