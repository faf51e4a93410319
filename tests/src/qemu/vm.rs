//! The VM: QEMU started from a [`VmSpec`], with its console, QMP, power button and exit.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt as _;
use tokio::process::{ChildStdin, Command};
use tokio::sync::{mpsc, watch};

use super::args::{build_args, resolve_host_forwards, shell_quote};
use super::console::{read_console, read_stderr};
use super::state::{ExitRecord, Shared, VmState};
use super::{ConsoleCursor, Error, HostForward, Qmp, QmpEvents, Result, VmSpec, HOTPLUG_PORTS};

/// A running (or exited) QEMU instance. Dropping it kills QEMU.
pub struct Vm {
    shared: Arc<Shared>,
    work_dir: PathBuf,
    pid: Option<u32>,
    pub(super) qmp: Qmp,
    kill: mpsc::UnboundedSender<()>,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    host_forwards: Vec<HostForward>,
    /// Which root port holds which plug; `Some` is also set while a plug is being added.
    pub(super) ports: Mutex<[Option<String>; HOTPLUG_PORTS]>,
    pub(super) plug_seq: AtomicU64,
}

impl Vm {
    /// Start QEMU as `spec` says and connect to its QMP socket. Returns once QMP is ready; the guest
    /// is then booting: wait for its markers on [`Vm::console`].
    ///
    /// QEMU gets `PR_SET_PDEATHSIG`, tied to the thread that starts it: call this from a thread
    /// that outlives the VM (a runtime's worker or the `block_on` thread, not `spawn_blocking`).
    pub async fn start(spec: VmSpec) -> Result<Vm> {
        let what = format!("start VM {}", spec.name);
        std::fs::create_dir_all(&spec.work_dir).map_err(|e| {
            Error::new(format!(
                "{what}: create work dir {}: {e}",
                spec.work_dir.display()
            ))
        })?;
        let work_dir = std::path::absolute(&spec.work_dir)
            .map_err(|e| Error::new(format!("{what}: {}: {e}", spec.work_dir.display())))?;
        let qmp_socket = work_dir.join("qmp.sock");
        match std::fs::remove_file(&qmp_socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::new(format!(
                    "{what}: remove stale {}: {e}",
                    qmp_socket.display()
                )))
            }
        }
        let host_forwards =
            resolve_host_forwards(&spec.network.host_forwards).map_err(|e| e.context(&what))?;
        let args = build_args(&spec, &work_dir, &qmp_socket, &host_forwards)
            .map_err(|e| e.context(&what))?;
        if !spec.network.guest_forwards.is_empty() && which("busybox").is_none() {
            return Err(Error::new(format!(
                "{what}: guest forwards run `busybox nc` on the host; install busybox-static"
            )));
        }

        let console_log = work_dir.join("console.log");
        let open_log = |path: &Path| {
            std::fs::File::create(path)
                .map_err(|e| Error::new(format!("{what}: create {}: {e}", path.display())))
        };
        let console_file = open_log(&console_log)?;
        let stderr_file = open_log(&work_dir.join("qemu-stderr.log"))?;
        let command_line = std::iter::once(spec.qemu_binary.display().to_string())
            .chain(args.iter().map(|a| shell_quote(a)))
            .collect::<Vec<_>>()
            .join(" ");
        std::fs::write(
            work_dir.join("qemu-cmdline.sh"),
            format!("{command_line}\n"),
        )
        .map_err(|e| Error::new(format!("{what}: write qemu-cmdline.sh: {e}")))?;

        let mut command = Command::new(&spec.qemu_binary);
        command
            .args(&args)
            .current_dir(&work_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec; it only calls prctl and getppid, which
        // are async-signal-safe, and builds its error without allocating.
        unsafe {
            command.pre_exec(move || {
                // QEMU must not outlive the test process (a crashed test would leave a guest
                // spinning a core on a shared two-core machine).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }

        let (changed, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            name: spec.name.clone(),
            started: Instant::now(),
            console_log,
            state: Mutex::new(VmState::default()),
            changed,
        });
        let mut child = command.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(format!(
                    "{what}: {} not found: install QEMU 10 from bookworm-backports \
                     (apt-get install -t bookworm-backports qemu-system-x86 qemu-utils)",
                    spec.qemu_binary.display()
                ))
            } else {
                Error::new(format!("{what}: spawn {}: {e}", spec.qemu_binary.display()))
            }
        })?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let stdin = child.stdin.take();
        tokio::spawn(read_console(stdout, shared.clone(), console_file));
        tokio::spawn(read_stderr(stderr, shared.clone(), stderr_file));

        let (kill, mut kill_requested) = mpsc::unbounded_channel::<()>();
        let waiter_shared = shared.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                // A kill request, or the Vm was dropped (all senders gone): SIGKILL.
                _ = kill_requested.recv() => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let at = waiter_shared.uptime();
            waiter_shared.update(|st| {
                st.exit = Some(ExitRecord {
                    status: status.map_err(|e| e.to_string()),
                    at,
                })
            });
        });

        let qmp = match Qmp::connect(&qmp_socket, shared.clone(), &work_dir.join("qmp.log")).await {
            Ok(qmp) => qmp,
            Err(e) => {
                let _ = kill.send(());
                return Err(e.context(&what));
            }
        };
        Ok(Vm {
            shared,
            work_dir,
            pid,
            qmp,
            kill,
            stdin: tokio::sync::Mutex::new(stdin),
            host_forwards,
            ports: Mutex::new(Default::default()),
            plug_seq: AtomicU64::new(1),
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }
    pub fn console_log_path(&self) -> &Path {
        &self.shared.console_log
    }
    /// QEMU's process id (`None` if it had already exited when spawned).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }
    /// Time since QEMU was started: the clock of console lines and events.
    pub fn uptime(&self) -> Duration {
        self.shared.uptime()
    }

    /// A console cursor at the first line.
    pub fn console(&self) -> ConsoleCursor {
        ConsoleCursor {
            shared: self.shared.clone(),
            next: 0,
        }
    }

    /// A console cursor past every line received so far.
    pub fn console_from_now(&self) -> ConsoleCursor {
        let mut c = self.console();
        c.skip_to_end();
        c
    }

    /// Type on the serial console (the guest's `/dev/console` input).
    pub async fn write_console(&self, text: &str) -> Result<()> {
        let mut stdin = self.stdin.lock().await;
        let pipe = stdin
            .as_mut()
            .ok_or_else(|| Error::new(format!("VM {}: console input is closed", self.name())))?;
        let written = async {
            pipe.write_all(text.as_bytes()).await?;
            pipe.flush().await
        }
        .await;
        written.map_err(|e| Error::new(format!("VM {}: write to console: {e}", self.name())))
    }

    /// The host port forwarded to `guest_port`, if the spec asked for one.
    pub fn host_port(&self, guest_port: u16) -> Option<u16> {
        self.host_forwards
            .iter()
            .find(|f| f.guest_port == guest_port)
            .map(|f| f.host_port)
    }

    /// Shorthand for `self.qmp().execute(…)`.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value> {
        self.qmp.execute(command, arguments).await
    }

    /// QMP events from now on.
    pub fn subscribe_events(&self) -> QmpEvents {
        self.qmp.subscribe()
    }

    /// Press the ACPI power button (`system_powerdown`), as EC2 stop/terminate does. Returns once
    /// QEMU took the request; the guest decides what happens next (see [`Vm::wait_exit`]).
    pub async fn powerdown(&self) -> Result<()> {
        self.qmp
            .execute("system_powerdown", json!({}))
            .await
            .map(drop)
    }

    /// SIGKILL QEMU: a spot instance lost without warning. Returns at once; see [`Vm::wait_exit`].
    pub fn kill(&self) {
        // Err: the waiter task already finished, i.e. QEMU is gone.
        let _ = self.kill.send(());
    }

    /// Freeze the vCPUs, draining in-flight I/O to the backing files (QMP `stop`).
    pub async fn pause(&self) -> Result<()> {
        self.qmp.execute("stop", json!({})).await.map(drop)
    }

    /// Undo [`Vm::pause`] (QMP `cont`).
    pub async fn resume(&self) -> Result<()> {
        self.qmp.execute("cont", json!({})).await.map(drop)
    }

    pub fn has_exited(&self) -> bool {
        self.shared.exited()
    }

    /// Wait for QEMU to exit; returns its status (whatever it is: judge it yourself).
    pub async fn wait_exit(&self, deadline: Duration) -> Result<ExitStatus> {
        let mut changed = self.shared.changed.subscribe();
        let wait = changed.wait_for(|_| self.shared.exited());
        match tokio::time::timeout(deadline, wait).await {
            Ok(_) => {}
            Err(_) => {
                return Err(Error::new(format!(
                    "VM {}: QEMU still running {:.1} s after waiting began\n{}",
                    self.name(),
                    deadline.as_secs_f64(),
                    self.shared.diagnostics()
                )))
            }
        }
        let exit = self.shared.lock().exit.clone().expect("exited");
        exit.status
            .map_err(|e| Error::new(format!("VM {}: wait for QEMU: {e}", self.name())))
    }

    /// Console tail and QEMU state, to append to a test's own error messages.
    pub fn diagnostics(&self) -> String {
        self.shared.diagnostics()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Also implied by dropping the sender; explicit because it is the point.
        let _ = self.kill.send(());
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}
