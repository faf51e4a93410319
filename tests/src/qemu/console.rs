//! The serial console: lines as they arrive (timestamped, logged), cursors that wait for markers
//! in order, and the readers of QEMU's stdout and stderr.

use std::fmt;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, BufReader};

use super::state::Shared;
use super::{Error, Result};

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

/// A reading position in a VM's console: successive waits find markers in order. Cheap to create;
/// each test step can have its own.
pub struct ConsoleCursor {
    pub(super) shared: Arc<Shared>,
    /// Index of the next complete line to look at.
    pub(super) next: usize,
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
pub(super) async fn read_console(
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
pub(super) async fn read_stderr(
    stderr: impl AsyncRead + Unpin,
    shared: Arc<Shared>,
    mut log: std::fs::File,
) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = writeln!(log, "{line}");
        shared.update(|st| {
            st.stderr.push_str(&line);
            st.stderr.push('\n');
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
