//! QMP: a client on the VM's socket (commands matched to replies, logged to `qmp.log`) and
//! subscriptions to its events.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};

use super::state::Shared;
use super::{Error, Result};

/// QEMU creates its QMP socket before it runs the guest; this only guards against a wedged start.
const QMP_CONNECT_DEADLINE: Duration = Duration::from_secs(60);
/// QMP commands return at once (device_del returns before the guest acts); generous for a loaded host.
const QMP_REPLY_DEADLINE: Duration = Duration::from_secs(120);
/// Interval between attempts to connect to a QMP socket that is not there yet.
const QMP_CONNECT_RETRY: Duration = Duration::from_millis(20);

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
    pub(super) async fn connect(path: &Path, shared: Arc<Shared>, log_path: &Path) -> Result<Qmp> {
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
