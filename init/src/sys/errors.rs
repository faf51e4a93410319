//! The errors of the privilege boundary: a failed system call, a failed command, a failed file
//! operation. Each keeps the underlying error as its source.

use std::path::PathBuf;

/// A failed system call, with what it was doing.
#[derive(Debug, thiserror::Error)]
#[error("{op} {what}: {}", errno.desc())]
pub struct SysError {
    pub op: &'static str,
    pub what: String,
    #[source]
    pub errno: nix::errno::Errno,
}

impl SysError {
    pub fn new(op: &'static str, what: impl Into<String>, errno: nix::errno::Errno) -> Self {
        SysError {
            op,
            what: what.into(),
            errno,
        }
    }
    pub fn io(op: &'static str, what: impl Into<String>, e: &std::io::Error) -> Self {
        let errno = nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        SysError::new(op, what, errno)
    }
}

pub type SysResult<T> = Result<T, SysError>;

/// A program run to completion that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot start {command}: {source}")]
    Start { command: String, source: SysError },
    /// A non-zero exit, or a signal, where success was wanted.
    #[error("{command} failed: {exit}")]
    Failed { command: String, exit: String },
    /// Killed by a signal where an exit code was wanted.
    #[error("{command} was {exit}")]
    NoExitCode { command: String, exit: String },
}

/// A file operation that failed: `{op} {path}: {source}` ("mkdir /run/x: ...").
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct FileError {
    pub op: &'static str,
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl FileError {
    /// For `map_err`: `.map_err(FileError::at("mkdir", &dir))`.
    pub fn at(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| FileError { op, path, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn messages_and_sources() {
        let sys = SysError::new("mount", "/mnt", nix::errno::Errno::ENOENT);
        assert_eq!(sys.to_string(), "mount /mnt: No such file or directory");
        assert_eq!(
            sys.source().unwrap().to_string(),
            nix::errno::Errno::ENOENT.to_string()
        );
        let cmd = CommandError::Start {
            command: "mkfs.ext4 -q".into(),
            source: sys,
        };
        assert_eq!(
            cmd.to_string(),
            "cannot start mkfs.ext4 -q: mount /mnt: No such file or directory"
        );
        assert!(cmd.source().unwrap().is::<SysError>());
        let io = std::io::Error::from_raw_os_error(libc::EACCES);
        let file = FileError::at("mkdir", "/run/x")(io);
        assert_eq!(
            file.to_string(),
            format!(
                "mkdir /run/x: {}",
                std::io::Error::from_raw_os_error(libc::EACCES)
            )
        );
        assert!(file.source().unwrap().is::<std::io::Error>());
    }
}
