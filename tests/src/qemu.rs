//! A QEMU instance (q35, TCG) with its serial console and its QMP socket.
//!
//! One [`Vm`] is one simulated EC2 instance: a `qemu-system-x86_64` process booted from a root disk
//! attached read-only (every VM boots a pristine copy of the image), with
//! - the serial console captured line by line, timestamped, written to `<work_dir>/console.log` and
//!   kept in memory so a test can wait for markers in order ([`ConsoleCursor`]);
//! - a QMP client on `<work_dir>/qmp.sock` for commands and events ([`Qmp`], [`QmpEvents`]), logged
//!   to `<work_dir>/qmp.log`;
//! - eight PCIe root ports to hot-plug NVMe volumes into ([`Vm::hotplug_nvme`], [`Vm::unplug`]);
//! - user-mode networking with host→guest port forwards and guest→host forwards (IMDS at
//!   169.254.169.254 inside the guest, served by a process on the host's loopback).
//!
//! There is no KVM here (`/dev/kvm` exists but cannot run a guest), so everything is TCG and slow:
//! every wait is on a condition with a deadline, never a fixed sleep.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader,
};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::process::{ChildStdin, Command};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Hot-plug slots (`pcie-root-port`s) every VM gets: one volume each.
pub const HOTPLUG_PORTS: usize = 8;
pub const DEFAULT_MEMORY_MIB: u32 = 2048;
pub const DEFAULT_CPUS: u32 = 2;
/// NVMe serial of the root disk, so the guest can tell it from EBS volumes (`vol…`).
pub const ROOT_DISK_SERIAL: &str = "spotinit-root";
/// NVMe serials are 20 bytes (NVMe base spec, Identify Controller SN); QEMU truncates silently.
pub const NVME_SERIAL_MAX: usize = 20;
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS_TEMPLATE: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// How many console lines an error message carries.
const CONSOLE_TAIL_LINES: usize = 40;
/// QEMU creates its QMP socket before it runs the guest; this only guards against a wedged start.
const QMP_CONNECT_DEADLINE: Duration = Duration::from_secs(60);
/// QMP commands return at once (device_del returns before the guest acts); generous for a loaded host.
const QMP_REPLY_DEADLINE: Duration = Duration::from_secs(120);
/// Interval between attempts to connect to a QMP socket that is not there yet.
const QMP_CONNECT_RETRY: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// Errors

/// An error with its context spelled out; `Debug` prints the message verbatim so a failed
/// `unwrap()` in a test shows the console tail as lines, not as one escaped string.
#[derive(Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    pub fn new(message: impl Into<String>) -> Self {
        Error(message.into())
    }
    /// Prefix the message with what was being done.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error(format!("{what}: {}", self.0))
    }
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<Error> for String {
    fn from(e: Error) -> String {
        e.0
    }
}

pub type Result<T> = std::result::Result<T, Error>;

// ---------------------------------------------------------------------------------------------
// What to start

/// Everything that defines one VM. Build it with [`VmSpec::direct_kernel`] or [`VmSpec::uefi`] and
/// the `with_*` methods, or set the fields directly.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Shown in errors and logs; also QEMU's `-name`.
    pub name: String,
    /// Console log, QMP socket and log, UEFI variables: created if missing.
    pub work_dir: PathBuf,
    pub firmware: Firmware,
    /// `-kernel/-initrd/-append`: works with both firmwares (OVMF loads it through fw_cfg).
    pub kernel: Option<DirectKernel>,
    /// Attached read-only as NVMe with serial [`ROOT_DISK_SERIAL`]: never modified, so every VM
    /// boots a pristine copy.
    pub root_disk: Option<PathBuf>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub network: UserNet,
    /// `-rtc base=…` (`utc`, `localtime` or a date like `2006-06-17T16:01:21`): a wrong guest clock.
    pub rtc_base: Option<String>,
    /// Appended to the command line as they are.
    pub extra_args: Vec<String>,
    pub qemu_binary: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// QEMU's default (SeaBIOS); with a direct kernel it boots fastest.
    Bios,
    /// OVMF in pflash: read-only code, and a fresh writable copy of the variables template in the
    /// work dir at every start (a new instance has a new NVRAM).
    Uefi {
        code: PathBuf,
        vars_template: PathBuf,
    },
}

impl Firmware {
    /// Debian's OVMF (package `ovmf`), 4 MiB flavour, without secure boot.
    pub fn ovmf() -> Self {
        Firmware::Uefi {
            code: OVMF_CODE.into(),
            vars_template: OVMF_VARS_TEMPLATE.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectKernel {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line; include `console=ttyS0` to see anything on the console.
    pub append: String,
}

/// QEMU user-mode networking (slirp): one virtio-net NIC, no privileges needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserNet {
    /// The virtual network, e.g. `169.254.0.0/16` (default `10.0.2.0/24`). A guest forward's address
    /// must lie inside it: use `169.254.0.0/16` to serve IMDS at 169.254.169.254.
    pub subnet: Option<String>,
    pub host_forwards: Vec<HostForward>,
    pub guest_forwards: Vec<GuestForward>,
}

/// `127.0.0.1:host_port` on the host reaches `guest_port` in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostForward {
    /// 0: pick a free port at start; read it back with [`Vm::host_port`].
    pub host_port: u16,
    pub guest_port: u16,
}

/// A TCP connection from the guest to `guest` reaches `127.0.0.1:host_port` on the host. Each
/// connection runs `busybox nc` on the host (slirp's `guestfwd=…-cmd:`): a plain chardev target
/// would carry only one connection for the VM's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestForward {
    pub guest: SocketAddrV4,
    pub host_port: u16,
}

impl VmSpec {
    fn base(name: &str, work_dir: &Path, firmware: Firmware) -> Self {
        VmSpec {
            name: name.to_owned(),
            work_dir: work_dir.to_owned(),
            firmware,
            kernel: None,
            root_disk: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: DEFAULT_CPUS,
            network: UserNet::default(),
            rtc_base: None,
            extra_args: Vec::new(),
            qemu_binary: QEMU_BINARY.into(),
        }
    }

    /// Direct kernel boot under SeaBIOS: the fastest way to PID 1.
    pub fn direct_kernel(
        name: &str,
        work_dir: &Path,
        kernel: &Path,
        initrd: Option<&Path>,
        append: &str,
    ) -> Self {
        let mut spec = Self::base(name, work_dir, Firmware::Bios);
        spec.kernel = Some(DirectKernel {
            kernel: kernel.to_owned(),
            initrd: initrd.map(Path::to_owned),
            append: append.to_owned(),
        });
        spec
    }

    /// UEFI boot (OVMF) from the root disk's ESP.
    pub fn uefi(name: &str, work_dir: &Path, root_disk: &Path) -> Self {
        let mut spec = Self::base(name, work_dir, Firmware::ovmf());
        spec.root_disk = Some(root_disk.to_owned());
        spec
    }

    pub fn with_firmware(mut self, firmware: Firmware) -> Self {
        self.firmware = firmware;
        self
    }
    pub fn with_root_disk(mut self, path: &Path) -> Self {
        self.root_disk = Some(path.to_owned());
        self
    }
    pub fn with_memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }
    pub fn with_cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }
    pub fn with_subnet(mut self, subnet: &str) -> Self {
        self.network.subnet = Some(subnet.to_owned());
        self
    }
    /// Forward `127.0.0.1:host_port` (0 = pick one) to `guest_port`.
    pub fn with_host_forward(mut self, host_port: u16, guest_port: u16) -> Self {
        self.network.host_forwards.push(HostForward {
            host_port,
            guest_port,
        });
        self
    }
    /// Let the guest reach `127.0.0.1:host_port` as `guest_addr:guest_port`.
    pub fn with_guest_forward(
        mut self,
        guest_addr: Ipv4Addr,
        guest_port: u16,
        host_port: u16,
    ) -> Self {
        self.network.guest_forwards.push(GuestForward {
            guest: SocketAddrV4::new(guest_addr, guest_port),
            host_port,
        });
        self
    }
    pub fn with_rtc_base(mut self, base: &str) -> Self {
        self.rtc_base = Some(base.to_owned());
        self
    }
}

// ---------------------------------------------------------------------------------------------
// State shared by the VM handle, its background tasks and console cursors

/// One console line; `at` is when its first byte reached the host, counted from QEMU's start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleLine {
    pub at: Duration,
    pub text: String,
}

impl fmt::Display for ConsoleLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:>9.3}] {}", self.at.as_secs_f64(), self.text)
    }
}

#[derive(Clone, Debug)]
struct ExitRecord {
    status: std::result::Result<ExitStatus, String>,
    at: Duration,
}

#[derive(Default)]
struct VmState {
    lines: Vec<ConsoleLine>,
    /// The line being received (no newline yet, e.g. a prompt): shown with the complete ones.
    partial: Option<ConsoleLine>,
    console_closed: bool,
    exit: Option<ExitRecord>,
    stderr: String,
}

struct Shared {
    name: String,
    started: Instant,
    console_log: PathBuf,
    state: Mutex<VmState>,
    /// Bumped on every change of `state`: console lines, console EOF, process exit.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, VmState> {
        // A panic while holding this lock cannot leave the state half-updated in a way that
        // matters for reading it, so a poisoned lock is still used.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut VmState)) {
        f(&mut self.lock());
        self.changed.send_modify(|v| *v += 1);
    }

    fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn exited(&self) -> bool {
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
    fn diagnostics(&self) -> String {
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

// ---------------------------------------------------------------------------------------------
// Console

/// A reading position in a VM's console: successive waits find markers in order. Cheap to create;
/// each test step can have its own.
pub struct ConsoleCursor {
    shared: Arc<Shared>,
    /// Index of the next complete line to look at.
    next: usize,
}

impl ConsoleCursor {
    /// Wait for the next complete line (at or after the cursor) containing `needle`; the cursor
    /// moves past it.
    pub async fn wait_for(&mut self, needle: &str, deadline: Duration) -> Result<ConsoleLine> {
        let what = format!("a line containing {needle:?}");
        self.wait(&what, |t| t.contains(needle), deadline).await
    }

    /// Wait for the next complete line for which `matches` holds; `what` describes it in errors.
    /// Fails at once if QEMU exits (after every line it printed was looked at), and after
    /// `deadline` with the console tail.
    pub async fn wait_until(
        &mut self,
        what: &str,
        matches: impl FnMut(&str) -> bool,
        deadline: Duration,
    ) -> Result<ConsoleLine> {
        self.wait(what, matches, deadline).await
    }

    async fn wait(
        &mut self,
        what: &str,
        mut matches: impl FnMut(&str) -> bool,
        deadline: Duration,
    ) -> Result<ConsoleLine> {
        let until = tokio::time::Instant::now() + deadline;
        let mut changed = self.shared.changed.subscribe();
        loop {
            changed.borrow_and_update();
            {
                let st = self.shared.lock();
                if let Some(offset) = st
                    .lines
                    .iter()
                    .skip(self.next)
                    .position(|l| matches(&l.text))
                {
                    let index = self.next + offset;
                    self.next = index + 1;
                    return Ok(st.lines[index].clone());
                }
                // Each complete line is looked at once.
                self.next = self.next.max(st.lines.len());
                if st.console_closed && st.exit.is_some() {
                    drop(st);
                    return Err(Error::new(format!(
                        "VM {}: QEMU exited while waiting for {what}\n{}",
                        self.shared.name,
                        self.shared.diagnostics()
                    )));
                }
            }
            match tokio::time::timeout_at(until, changed.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `Shared`, which this cursor holds: it cannot be dropped.
                Ok(Err(_)) => unreachable!("console notifier dropped while a cursor holds it"),
                Err(_) => {
                    return Err(Error::new(format!(
                        "VM {}: timed out after {:.1} s waiting for {what}\n{}",
                        self.shared.name,
                        deadline.as_secs_f64(),
                        self.shared.diagnostics()
                    )))
                }
            }
        }
    }

    /// Every line so far (the partial last line included), whatever the cursor position.
    pub fn lines(&self) -> Vec<ConsoleLine> {
        let st = self.shared.lock();
        let mut all = st.lines.clone();
        all.extend(st.partial.clone());
        all
    }

    /// Whether any line so far contains `needle`, whatever the cursor position.
    pub fn contains(&self, needle: &str) -> bool {
        let st = self.shared.lock();
        st.lines
            .iter()
            .chain(st.partial.iter())
            .any(|l| l.text.contains(needle))
    }

    /// Skip everything received so far.
    pub fn skip_to_end(&mut self) {
        let st = self.shared.lock();
        self.next = st.lines.len();
    }
}

/// Turns console bytes into lines: splits on `\n`, drops `\r` and terminal escape sequences
/// (firmware clears the screen and moves the cursor), and stamps each line with the arrival of its
/// first byte.
#[derive(Default)]
struct LineSplitter {
    pending: Vec<u8>,
    pending_at: Option<Duration>,
    escape: Escape,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Escape {
    #[default]
    None,
    /// After ESC.
    Started,
    /// In a CSI sequence (`ESC [` parameters, then a final byte 0x40..=0x7E).
    Csi,
}

impl LineSplitter {
    /// Feed bytes received at `now`; returns the lines they completed.
    fn feed(&mut self, bytes: &[u8], now: Duration) -> Vec<ConsoleLine> {
        let mut complete = Vec::new();
        for &b in bytes {
            match (self.escape, b) {
                (Escape::Started, b'[') => self.escape = Escape::Csi,
                // Two-byte sequences (ESC c, ESC 7, …): drop the second byte too.
                (Escape::Started, _) => self.escape = Escape::None,
                (Escape::Csi, 0x40..=0x7e) => self.escape = Escape::None,
                (Escape::Csi, _) => {}
                (Escape::None, 0x1b) => self.escape = Escape::Started,
                (Escape::None, b'\n') => {
                    let at = self.pending_at.take().unwrap_or(now);
                    complete.push(ConsoleLine {
                        at,
                        text: String::from_utf8_lossy(&self.pending).into_owned(),
                    });
                    self.pending.clear();
                }
                (Escape::None, b'\r') => {}
                (Escape::None, _) => {
                    self.pending_at.get_or_insert(now);
                    self.pending.push(b);
                }
            }
        }
        complete
    }

    /// The line received so far without its newline.
    fn partial(&self) -> Option<ConsoleLine> {
        self.pending_at.map(|at| ConsoleLine {
            at,
            text: String::from_utf8_lossy(&self.pending).into_owned(),
        })
    }
}

/// Reads the serial console (QEMU's stdout) until EOF, logging and publishing each line.
async fn read_console(
    mut stdout: impl AsyncRead + Unpin,
    shared: Arc<Shared>,
    mut log: std::fs::File,
) {
    let mut buf = vec![0u8; 8192];
    let mut splitter = LineSplitter::default();
    loop {
        let n = match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let complete = splitter.feed(&buf[..n], shared.uptime());
        for line in &complete {
            // The log is for humans tailing it; a failed write must not stop the capture.
            let _ = writeln!(log, "{line}");
        }
        let partial = splitter.partial();
        shared.update(|st| {
            st.lines.extend(complete);
            st.partial = partial;
        });
    }
    let last = splitter.partial();
    if let Some(line) = &last {
        let _ = writeln!(log, "{line}");
    }
    shared.update(|st| {
        st.partial = None;
        st.lines.extend(last);
        st.console_closed = true;
    });
}

/// Keeps QEMU's stderr (warnings, the reason it refused to start) for error messages and a log.
async fn read_stderr(stderr: impl AsyncRead + Unpin, shared: Arc<Shared>, mut log: std::fs::File) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = writeln!(log, "{line}");
        shared.update(|st| {
            st.stderr.push_str(&line);
            st.stderr.push('\n');
        });
    }
}

// ---------------------------------------------------------------------------------------------
// QMP

/// An asynchronous QMP event (`DEVICE_DELETED`, `SHUTDOWN`, `POWERDOWN`, …).
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
    /// When the host read it, counted from QEMU's start (same clock as console lines).
    pub at: Duration,
}

type Pending = HashMap<u64, oneshot::Sender<Value>>;

struct QmpInner {
    /// `None` once the connection is closed: later commands fail at once.
    pending: Option<Pending>,
}

/// A QMP connection: commands matched to replies by `id`, events fanned out to subscribers.
pub struct Qmp {
    vm: Arc<Shared>,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    inner: Arc<Mutex<QmpInner>>,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    log: Arc<Mutex<std::fs::File>>,
}

fn log_qmp(log: &Mutex<std::fs::File>, shared: &Shared, direction: &str, text: &str) {
    let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
    let _ = writeln!(
        f,
        "[{:>9.3}] {direction} {text}",
        shared.uptime().as_secs_f64()
    );
}

impl Qmp {
    async fn connect(path: &Path, shared: Arc<Shared>, log_path: &Path) -> Result<Qmp> {
        let stream = connect_when_ready(path, &shared).await?;
        let log = std::fs::File::create(log_path)
            .map_err(|e| Error::new(format!("create QMP log {}: {e}", log_path.display())))?;
        let log = Arc::new(Mutex::new(log));
        let (read_half, write_half) = stream.into_split();
        let mut lines = BufReader::new(read_half).lines();
        let greeting = tokio::time::timeout(QMP_REPLY_DEADLINE, lines.next_line())
            .await
            .map_err(|_| {
                Error::new(format!(
                    "VM {}: no QMP greeting on {}",
                    shared.name,
                    path.display()
                ))
            })?
            .map_err(|e| Error::new(format!("VM {}: read QMP greeting: {e}", shared.name)))?
            .ok_or_else(|| {
                Error::new(format!(
                    "VM {}: QMP socket closed before the greeting\n{}",
                    shared.name,
                    shared.diagnostics()
                ))
            })?;
        log_qmp(&log, &shared, "<-", &greeting);
        let greeting: Value = serde_json::from_str(&greeting).map_err(|e| {
            Error::new(format!(
                "VM {}: bad QMP greeting {greeting:?}: {e}",
                shared.name
            ))
        })?;
        if greeting.get("QMP").is_none() {
            return Err(Error::new(format!(
                "VM {}: not a QMP greeting: {greeting}",
                shared.name
            )));
        }

        let inner = Arc::new(Mutex::new(QmpInner {
            pending: Some(HashMap::new()),
        }));
        let (events, _) = broadcast::channel(1024);
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(read_qmp(
            lines,
            inner.clone(),
            events.clone(),
            closed_tx,
            shared.clone(),
            log.clone(),
        ));
        let qmp = Qmp {
            vm: shared,
            writer: tokio::sync::Mutex::new(write_half),
            inner,
            next_id: AtomicU64::new(1),
            events,
            closed,
            log,
        };
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Run a QMP command; `arguments` is an object (or `null`/`{}` for none). Returns `return`.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({ "execute": command, "id": id });
        let has_arguments = match &arguments {
            Value::Null => false,
            Value::Object(m) => !m.is_empty(),
            _ => true,
        };
        if has_arguments {
            message["arguments"] = arguments;
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            match inner.pending.as_mut() {
                Some(pending) => {
                    pending.insert(id, tx);
                }
                None => {
                    return Err(Error::new(format!(
                        "VM {}: QMP {command}: connection closed (QEMU gone?)",
                        self.vm.name
                    )))
                }
            }
        }
        let text = message.to_string();
        log_qmp(&self.log, &self.vm, "->", &text);
        {
            let mut w = self.writer.lock().await;
            let written = async {
                w.write_all(text.as_bytes()).await?;
                w.write_all(b"\n").await?;
                w.flush().await
            }
            .await;
            if let Err(e) = written {
                self.forget(id);
                return Err(Error::new(format!(
                    "VM {}: QMP {command}: write: {e}",
                    self.vm.name
                )));
            }
        }
        let reply = match tokio::time::timeout(QMP_REPLY_DEADLINE, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => {
                return Err(Error::new(format!(
                    "VM {}: QMP {command}: connection closed before the reply\n{}",
                    self.vm.name,
                    self.vm.diagnostics()
                )))
            }
            Err(_) => {
                self.forget(id);
                return Err(Error::new(format!(
                    "VM {}: QMP {command}: no reply within {} s\n{}",
                    self.vm.name,
                    QMP_REPLY_DEADLINE.as_secs(),
                    self.vm.diagnostics()
                )));
            }
        };
        if let Some(err) = reply.get("error") {
            let class = err.get("class").and_then(Value::as_str).unwrap_or("?");
            let desc = err.get("desc").and_then(Value::as_str).unwrap_or("?");
            return Err(Error::new(format!(
                "VM {}: QMP {command} failed: {class}: {desc}",
                self.vm.name
            )));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    fn forget(&self, id: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = inner.pending.as_mut() {
            p.remove(&id);
        }
    }

    /// Events from now on. Subscribe before the command that causes the event you wait for.
    pub fn subscribe(&self) -> QmpEvents {
        QmpEvents {
            vm: self.vm.clone(),
            rx: self.events.subscribe(),
            closed: self.closed.clone(),
        }
    }
}

async fn connect_when_ready(path: &Path, shared: &Shared) -> Result<UnixStream> {
    let until = tokio::time::Instant::now() + QMP_CONNECT_DEADLINE;
    let mut changed = shared.changed.subscribe();
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => {
                return Err(Error::new(format!(
                    "VM {}: connect to QMP socket {}: {e}",
                    shared.name,
                    path.display()
                )))
            }
        }
        if shared.exited() {
            return Err(Error::new(format!(
                "VM {}: QEMU exited before its QMP socket {} was up\n{}",
                shared.name,
                path.display(),
                shared.diagnostics()
            )));
        }
        if tokio::time::Instant::now() >= until {
            return Err(Error::new(format!(
                "VM {}: QMP socket {} not up within {} s\n{}",
                shared.name,
                path.display(),
                QMP_CONNECT_DEADLINE.as_secs(),
                shared.diagnostics()
            )));
        }
        // The socket appears milliseconds after QEMU starts: poll for it, waking early on exit.
        tokio::select! {
            _ = tokio::time::sleep(QMP_CONNECT_RETRY) => {}
            _ = changed.changed() => {}
        }
    }
}

async fn read_qmp(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    inner: Arc<Mutex<QmpInner>>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
    shared: Arc<Shared>,
    log: Arc<Mutex<std::fs::File>>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        log_qmp(&log, &shared, "<-", &line);
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(name) = message.get("event").and_then(Value::as_str) {
            // No subscriber is fine: nobody is waiting for this event.
            let _ = events.send(QmpEvent {
                event: name.to_owned(),
                data: message.get("data").cloned().unwrap_or(Value::Null),
                at: shared.uptime(),
            });
        } else if let Some(id) = message.get("id").and_then(Value::as_u64) {
            let waiter = {
                let mut inner = inner.lock().unwrap_or_else(|p| p.into_inner());
                inner.pending.as_mut().and_then(|p| p.remove(&id))
            };
            if let Some(waiter) = waiter {
                let _ = waiter.send(message);
            }
        }
    }
    // Dropping the waiters fails their commands at once.
    inner.lock().unwrap_or_else(|p| p.into_inner()).pending = None;
    let _ = closed.send(true);
}

/// A subscription to a VM's QMP events.
pub struct QmpEvents {
    vm: Arc<Shared>,
    rx: broadcast::Receiver<QmpEvent>,
    closed: watch::Receiver<bool>,
}

impl QmpEvents {
    /// Wait for the next event for which `matches` holds (`what` names it in errors). Fails early
    /// once the QMP connection is closed and every event it delivered was looked at.
    pub async fn wait_for(
        &mut self,
        what: &str,
        mut matches: impl FnMut(&QmpEvent) -> bool,
        deadline: Duration,
    ) -> Result<QmpEvent> {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let closed = async {
                // Err: the reader is gone, which also means closed.
                let _ = self.closed.wait_for(|c| *c).await;
            };
            tokio::select! {
                biased;
                received = self.rx.recv() => match received {
                    Ok(event) if matches(&event) => return Ok(event),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(self.gone(what)),
                },
                _ = closed => {
                    // The reader sent every event before it closed: drain them first.
                    loop {
                        match self.rx.try_recv() {
                            Ok(event) if matches(&event) => return Ok(event),
                            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                            Err(_) => return Err(self.gone(what)),
                        }
                    }
                }
                _ = tokio::time::sleep_until(until) => {
                    return Err(Error::new(format!(
                        "VM {}: timed out after {:.1} s waiting for QMP event {what}\n{}",
                        self.vm.name,
                        deadline.as_secs_f64(),
                        self.vm.diagnostics()
                    )));
                }
            }
        }
    }

    /// Wait for the event named `name` (`SHUTDOWN`, `POWERDOWN`, …).
    pub async fn wait_named(&mut self, name: &str, deadline: Duration) -> Result<QmpEvent> {
        self.wait_for(name, |e| e.event == name, deadline).await
    }

    /// Wait for `DEVICE_DELETED` of the device with this id (not the path-only events QEMU also
    /// emits, e.g. twice for virtio-blk).
    pub async fn wait_device_deleted(
        &mut self,
        device_id: &str,
        deadline: Duration,
    ) -> Result<QmpEvent> {
        self.wait_for(
            &format!("DEVICE_DELETED of {device_id:?}"),
            |e| {
                e.event == "DEVICE_DELETED"
                    && e.data.get("device").and_then(Value::as_str) == Some(device_id)
            },
            deadline,
        )
        .await
    }

    fn gone(&self, what: &str) -> Error {
        Error::new(format!(
            "VM {}: QMP connection closed while waiting for event {what}\n{}",
            self.vm.name,
            self.vm.diagnostics()
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The VM

/// A volume plugged into a VM: what [`Vm::unplug`] needs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PlugId {
    port: usize,
    device: String,
    node: String,
    serial: String,
    file: PathBuf,
}

impl PlugId {
    /// QEMU device id (`device_del`, `DEVICE_DELETED`).
    pub fn device_id(&self) -> &str {
        &self.device
    }
    /// The `pcie-root-port` id it sits on, e.g. `rp3`.
    pub fn root_port(&self) -> String {
        root_port_id(self.port)
    }
}

fn root_port_id(index: usize) -> String {
    format!("rp{}", index + 1)
}

/// A running (or exited) QEMU instance. Dropping it kills QEMU.
pub struct Vm {
    shared: Arc<Shared>,
    work_dir: PathBuf,
    pid: Option<u32>,
    qmp: Qmp,
    kill: mpsc::UnboundedSender<()>,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    host_forwards: Vec<HostForward>,
    /// Which root port holds which plug; `Some` is also set while a plug is being added.
    ports: Mutex<[Option<String>; HOTPLUG_PORTS]>,
    plug_seq: AtomicU64,
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

    /// Hot-plug `volume_file` as an NVMe controller with this serial on a free root port. Returns
    /// once QEMU added the device; the guest notices it a moment later (PCIe/ACPI hot-plug), as a
    /// real instance notices an EBS attachment after the API said `attached`.
    pub async fn hotplug_nvme(&self, volume_file: &Path, serial: &str) -> Result<PlugId> {
        let what = format!(
            "VM {}: hot-plug {} as NVMe serial {serial:?}",
            self.name(),
            volume_file.display()
        );
        validate_serial(serial).map_err(|e| e.context(&what))?;
        let file =
            std::path::absolute(volume_file).map_err(|e| Error::new(format!("{what}: {e}")))?;
        if !file.is_file() {
            return Err(Error::new(format!("{what}: no such file")));
        }
        let seq = self.plug_seq.fetch_add(1, Ordering::Relaxed);
        let device = format!("nvme{seq}-{serial}");
        let node = format!("blk{seq}-{serial}");
        let port = {
            let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
            let free = ports.iter().position(Option::is_none).ok_or_else(|| {
                Error::new(format!(
                    "{what}: all {HOTPLUG_PORTS} hot-plug root ports are taken"
                ))
            })?;
            ports[free] = Some(device.clone());
            free
        };
        let plug = PlugId {
            port,
            device,
            node,
            serial: serial.to_owned(),
            file,
        };
        if let Err(e) = self
            .qmp
            .execute(
                "blockdev-add",
                json!({
                    "driver": "raw",
                    "node-name": plug.node,
                    // The guest's TRIM punches holes: volume files stay sparse.
                    "discard": "unmap",
                    "file": { "driver": "file", "filename": plug.file },
                }),
            )
            .await
        {
            self.free_port(&plug);
            return Err(e.context(&what));
        }
        if let Err(e) = self
            .qmp
            .execute(
                "device_add",
                json!({
                    "driver": "nvme",
                    "id": plug.device,
                    "drive": plug.node,
                    "serial": plug.serial,
                    "bus": plug.root_port(),
                }),
            )
            .await
        {
            let rollback = self
                .qmp
                .execute("blockdev-del", json!({ "node-name": plug.node }))
                .await
                .err()
                .map(|r| format!(" (and rolling back blockdev-add failed: {r})"))
                .unwrap_or_default();
            self.free_port(&plug);
            return Err(Error::new(format!("{what}: {e}{rollback}")));
        }
        Ok(plug)
    }

    /// Hot-unplug: `device_del`, wait for the guest to release the device (`DEVICE_DELETED`: this
    /// needs the guest's cooperation through ACPI), then `blockdev-del` so QEMU closes the file.
    pub async fn unplug(&self, plug: &PlugId, deadline: Duration) -> Result<()> {
        let what = format!(
            "VM {}: unplug device {} ({} as serial {:?})",
            self.name(),
            plug.device,
            plug.file.display(),
            plug.serial
        );
        let mut events = self.qmp.subscribe();
        if let Err(e) = self
            .qmp
            .execute("device_del", json!({ "id": plug.device }))
            .await
        {
            // A second attempt after a timed-out one finds the unplug already under way: wait on.
            if !e.message().contains("in the process of unplug") {
                return Err(e.context(&what));
            }
        }
        events
            .wait_device_deleted(&plug.device, deadline)
            .await
            .map_err(|e| {
                e.context(format!(
                "{what}: the guest did not release the device (hot-unplug needs its cooperation: \
                 is it booted, does it handle ACPI/PCIe hot-plug?)"
            ))
            })?;
        self.qmp
            .execute("blockdev-del", json!({ "node-name": plug.node }))
            .await
            .map_err(|e| e.context(&what))?;
        self.free_port(plug);
        Ok(())
    }

    /// What is plugged now (device ids by root port), for diagnostics.
    pub fn plugged_devices(&self) -> Vec<String> {
        let ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        ports.iter().flatten().cloned().collect()
    }

    fn free_port(&self, plug: &PlugId) {
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        if ports[plug.port].as_deref() == Some(plug.device.as_str()) {
            ports[plug.port] = None;
        }
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

/// NVMe serials: at most 20 printable ASCII bytes (QEMU would truncate a longer one silently).
pub fn validate_serial(serial: &str) -> Result<()> {
    if serial.is_empty() || serial.len() > NVME_SERIAL_MAX {
        return Err(Error::new(format!(
            "NVMe serial {serial:?} is {} bytes; it must be 1 to {NVME_SERIAL_MAX}",
            serial.len()
        )));
    }
    if !serial.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::new(format!(
            "NVMe serial {serial:?} must be printable ASCII without spaces"
        )));
    }
    Ok(())
}

fn resolve_host_forwards(requested: &[HostForward]) -> Result<Vec<HostForward>> {
    // Every listener stays open until all ports are picked: released one by one, the kernel
    // could hand the same port out twice (seen: QEMU refusing a spec with a port in it twice).
    let mut held = Vec::new();
    let resolved = requested
        .iter()
        .map(|f| {
            if f.host_port != 0 {
                return Ok(*f);
            }
            // Ask the kernel for a free port; QEMU binds it a moment later (a small race that
            // shows as QEMU refusing to start, with its reason in the error).
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .map_err(|e| Error::new(format!("pick a free host port: {e}")))?;
            let port = listener
                .local_addr()
                .map_err(|e| Error::new(format!("pick a free host port: {e}")))?
                .port();
            held.push(listener);
            Ok(HostForward {
                host_port: port,
                guest_port: f.guest_port,
            })
        })
        .collect();
    drop(held);
    resolved
}

fn build_args(
    spec: &VmSpec,
    work_dir: &Path,
    qmp_socket: &Path,
    host_forwards: &[HostForward],
) -> Result<Vec<String>> {
    let must_exist = |what: &str, path: &Path| -> Result<String> {
        if !path.exists() {
            return Err(Error::new(format!("{what} {} not found", path.display())));
        }
        Ok(path.display().to_string())
    };
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &spec.name]);
    push(&["-machine", "q35,accel=tcg", "-cpu", "max"]);
    push(&[
        "-m",
        &spec.memory_mib.to_string(),
        "-smp",
        &spec.cpus.to_string(),
    ]);
    push(&["-display", "none", "-no-reboot", "-nodefaults"]);
    // The console is QEMU's stdout; the monitor is QMP only.
    push(&[
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
    ]);

    if let Firmware::Uefi {
        code,
        vars_template,
    } = &spec.firmware
    {
        let code = must_exist("OVMF code (package ovmf)", code)?;
        let template = must_exist("OVMF variables template (package ovmf)", vars_template)?;
        let vars = work_dir.join("OVMF_VARS.fd");
        std::fs::copy(&template, &vars)
            .map_err(|e| Error::new(format!("copy {template} to {}: {e}", vars.display())))?;
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"),
        ]);
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
        ]);
    }
    if let Some(k) = &spec.kernel {
        push(&["-kernel", &must_exist("kernel", &k.kernel)?]);
        if let Some(initrd) = &k.initrd {
            push(&["-initrd", &must_exist("initrd", initrd)?]);
        }
        push(&["-append", &k.append]);
    }
    if let Some(root) = &spec.root_disk {
        let root = must_exist("root disk", root)?;
        check_drive_path(&root)?;
        push(&[
            "-drive",
            &format!("file={root},if=none,id=root,format=raw,readonly=on"),
        ]);
        push(&[
            "-device",
            &format!("nvme,drive=root,serial={ROOT_DISK_SERIAL},bus=pcie.0"),
        ]);
    }
    for i in 0..HOTPLUG_PORTS {
        let n = i + 1;
        push(&[
            "-device",
            &format!(
                "pcie-root-port,id={},bus=pcie.0,chassis={n},slot={n}",
                root_port_id(i)
            ),
        ]);
    }

    let mut netdev = String::from("user,id=n0");
    if let Some(subnet) = &spec.network.subnet {
        netdev.push_str(&format!(",net={subnet}"));
    }
    for f in host_forwards {
        netdev.push_str(&format!(
            ",hostfwd=tcp:127.0.0.1:{}-:{}",
            f.host_port, f.guest_port
        ));
    }
    for f in &spec.network.guest_forwards {
        netdev.push_str(&format!(
            ",guestfwd=tcp:{}:{}-cmd:busybox nc 127.0.0.1 {}",
            f.guest.ip(),
            f.guest.port(),
            f.host_port
        ));
    }
    push(&["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"]);

    if let Some(base) = &spec.rtc_base {
        push(&["-rtc", &format!("base={base}")]);
    }
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp_socket.display()),
    ]);
    args.extend(spec.extra_args.iter().cloned());
    Ok(args)
}

/// QEMU's `-drive` option syntax treats commas specially; refuse instead of escaping.
fn check_drive_path(path: &str) -> Result<()> {
    if path.contains(',') {
        return Err(Error::new(format!(
            "disk path {path:?} contains a comma, which -drive cannot take"
        )));
    }
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=,.:/@+".contains(&b))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_forwards_of_one_vm_never_share_a_port() {
        let requested: Vec<HostForward> = (0..64)
            .map(|g| HostForward {
                host_port: 0,
                guest_port: 8000 + g,
            })
            .collect();
        let resolved = resolve_host_forwards(&requested).unwrap();
        let mut ports: Vec<u16> = resolved.iter().map(|f| f.host_port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 64, "a port was handed out twice");
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn splitter_joins_chunks_strips_cr_and_escapes_and_stamps_first_bytes() {
        let mut splitter = LineSplitter::default();
        assert!(splitter.feed(b"", secs(1)).is_empty());
        let first = splitter.feed(b"ab\r\nc", secs(1));
        assert_eq!(
            first,
            vec![ConsoleLine {
                at: secs(1),
                text: "ab".into()
            }]
        );
        assert_eq!(splitter.partial().unwrap().text, "c");
        let second = splitter.feed(b"d\x1b[2J\x1b[01;01H\x1b[=3he\x1bcf\n\n", secs(2));
        assert_eq!(
            second,
            vec![
                ConsoleLine {
                    at: secs(1),
                    text: "cdef".into()
                },
                ConsoleLine {
                    at: secs(2),
                    text: "".into()
                },
            ]
        );
        assert!(splitter.partial().is_none());
        // An escape sequence split across reads.
        assert!(splitter.feed(b"x\x1b[0", secs(3)).is_empty());
        let third = splitter.feed(b"1;02Hy\n", secs(4));
        assert_eq!(
            third,
            vec![ConsoleLine {
                at: secs(3),
                text: "xy".into()
            }]
        );
    }

    #[test]
    fn serials_longer_than_twenty_bytes_or_with_spaces_are_refused() {
        assert!(validate_serial("vol0123456789abcdef0").is_ok());
        assert!(validate_serial("vol0123456789abcdef01").is_err());
        assert!(validate_serial("").is_err());
        assert!(validate_serial("vol 1").is_err());
    }

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("-m"), "-m");
        assert_eq!(shell_quote("console=ttyS0 quiet"), "'console=ttyS0 quiet'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
