//! A daemon's output, kept in a size-bounded log file on tmpfs (the file rolls over to `.1`),
//! with error lines also shown on the console under the daemon's name. The console under
//! emulation is slow and EC2 keeps only its tail, so it gets only what a person must see.

use std::io::Write;
use std::path::PathBuf;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// Does this daemon line deserve the console? (logrus `level=error`, Go panics, fatal errors.)
pub fn is_error_line(line: &str) -> bool {
    line.contains("level=error")
        || line.contains("level=fatal")
        || line.contains("level=panic")
        || line.starts_with("panic:")
        || line.starts_with("fatal error:")
}

pub(crate) fn pump(reader: std::io::PipeReader, name: String, path: PathBuf, max_bytes: u64) {
    let fd = std::os::fd::OwnedFd::from(reader);
    let rx = match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(rx) => rx,
        Err(e) => {
            crate::log!("{name}: cannot read its output ({e}); it is lost");
            return;
        }
    };
    tokio::spawn(copy_lines(rx, name, RollingFile::new(path, max_bytes)));
}

/// The longest line kept whole; a longer one is cut there (a runaway daemon must not make
/// PID 1 buffer without bound).
pub const MAX_LINE: usize = 16 << 10;

/// Copies a daemon's output line by line into `file`, error lines to the console too. Bytes
/// that are not UTF-8 are shown as U+FFFD: a daemon's odd line never ends its log.
pub(crate) async fn copy_lines<R: tokio::io::AsyncRead + Unpin>(
    reader: R,
    name: String,
    mut file: RollingFile,
) {
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let line = String::from_utf8_lossy(&buf[..n]);
        let line = line.trim_end_matches(['\n', '\r']);
        if is_error_line(line) {
            crate::log!("{name}: {line}");
        }
        file.write_line(line);
    }
}

/// Appends lines to a file and rolls it over to `<file>.1` past `max_bytes`.
pub struct RollingFile {
    path: PathBuf,
    max_bytes: u64,
    file: Option<std::fs::File>,
    written: u64,
}

impl RollingFile {
    pub fn new(path: PathBuf, max_bytes: u64) -> Self {
        RollingFile {
            path,
            max_bytes,
            file: None,
            written: 0,
        }
    }

    pub fn write_line(&mut self, line: &str) {
        if self.file.is_none() || self.written + line.len() as u64 + 1 > self.max_bytes {
            if self.file.take().is_some() {
                let mut old = self.path.clone().into_os_string();
                old.push(".1");
                let _ = std::fs::rename(&self.path, old);
            }
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
            self.written = self
                .file
                .as_ref()
                .and_then(|f| f.metadata().ok())
                .map(|m| m.len())
                .unwrap_or(0);
        }
        if let Some(f) = self.file.as_mut() {
            if writeln!(f, "{line}").is_ok() {
                self.written += line.len() as u64 + 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_are_recognised() {
        assert!(is_error_line(
            "time=\"...\" level=error msg=\"failed to start daemon\""
        ));
        assert!(is_error_line("panic: runtime error"));
        assert!(!is_error_line(
            "time=\"...\" level=info msg=\"API listen on /run/docker.sock\""
        ));
    }

    #[tokio::test]
    async fn odd_bytes_and_endless_lines_never_end_the_log() {
        let dir = std::env::temp_dir().join(format!("spotinit-log8-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("d.log");
        let mut input = b"first\n\xff\xfe not utf-8 \xc3\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend(b"\nlast\n");
        copy_lines(
            &input[..],
            "d".into(),
            RollingFile::new(path.clone(), 1 << 20),
        )
        .await;
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "first");
        assert_eq!(lines[1], "\u{fffd}\u{fffd} not utf-8 \u{fffd}");
        assert_eq!(lines[2].len(), MAX_LINE);
        assert_eq!(*lines.last().unwrap(), "last");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_rolls_over_and_stays_bounded() {
        let dir = std::env::temp_dir().join(format!("spotinit-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("d.log");
        let mut f = RollingFile::new(path.clone(), 100);
        for i in 0..30 {
            f.write_line(&format!("line {i:02} xxxxxxxx"));
        }
        let cur = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.join("d.log.1")).unwrap();
        assert!(cur.len() <= 100 && old.len() <= 100);
        assert!(cur.ends_with("line 29 xxxxxxxx\n"));
        assert!(old.contains("line 2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
