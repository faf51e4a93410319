//! A look inside a detached volume's ext4 from the host, through `debugfs`.

use std::path::Path;

use crate::qemu::{Error, Result};

/// Runs `debugfs -R REQUEST FILE` (read-only) on a volume's backing file and returns its output:
/// a look inside the ext4 from outside the guest, no mount (and no root) needed. Only while the
/// volume is detached.
pub fn debugfs(file: &Path, request: &str) -> Result<String> {
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(file)
        .output()
        .map_err(|e| {
            Error::new(format!(
                "run debugfs (apt-get install e2fsprogs) on {}: {e}",
                file.display()
            ))
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // debugfs exits 0 even when the request failed; anything on stderr but its banner is an error.
    let complaints = stderr
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .count();
    if !out.status.success() || complaints > 0 {
        return Err(Error::new(format!(
            "debugfs -R {request:?} {}: {}{}",
            file.display(),
            stderr.trim(),
            stdout.trim()
        )));
    }
    Ok(stdout)
}
