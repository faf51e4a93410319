//! The boundary's types: the [`System`] trait, what it is asked to do (mounts, commands, power),
//! where files live ([`Paths`]) and what /proc/self/mountinfo says.

use super::errors::{CommandError, SysResult};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use tokio::sync::oneshot;

pub use nix::mount::MsFlags;
pub use nix::sys::signal::Signal;

pub type Pid = i32;

/// Where things live. Production uses `/`; tests use a temporary directory, so the same code
/// writes daemon.json, reads /proc/cmdline or walks /sys in a sandbox.
#[derive(Clone, Debug)]
pub struct Paths {
    pub root: PathBuf,
}

impl Paths {
    pub fn real() -> Self {
        Paths {
            root: PathBuf::from("/"),
        }
    }
    pub fn under(root: impl Into<PathBuf>) -> Self {
        Paths { root: root.into() }
    }
    /// An absolute path of the running system, inside `root`.
    pub fn p(&self, abs: impl AsRef<Path>) -> PathBuf {
        let abs = abs.as_ref();
        self.root.join(abs.strip_prefix("/").unwrap_or(abs))
    }
}

/// One mount(2) call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub source: String,
    pub target: PathBuf,
    pub fstype: Option<String>,
    pub flags: MsFlags,
    pub data: Option<String>,
}

impl MountSpec {
    pub fn fs(fstype: &str, source: &str, target: PathBuf, flags: MsFlags, data: &str) -> Self {
        MountSpec {
            source: source.into(),
            target,
            fstype: Some(fstype.into()),
            flags,
            data: (!data.is_empty()).then(|| data.into()),
        }
    }
    pub fn bind(source: PathBuf, target: PathBuf) -> Self {
        MountSpec {
            source: source.to_string_lossy().into_owned(),
            target,
            fstype: None,
            flags: MsFlags::MS_BIND,
            data: None,
        }
    }
}

/// Where a spawned program's output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Straight to our stderr (the console for PID 1).
    Console,
    /// Into a log file that spotinit keeps below a size; lines that look like errors are also
    /// copied to the console with the program's name.
    Log {
        path: PathBuf,
        max_bytes: u64,
    },
    Null,
}

/// A program to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub output: Output,
    /// Linux capabilities the program keeps (everything else is dropped from its bounding set
    /// before exec, so neither it nor anything it runs can regain them). `None` keeps all.
    pub keep_caps: Option<Vec<caps::Capability>>,
}

impl CommandSpec {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        CommandSpec {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            output: Output::Console,
            keep_caps: None,
        }
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn output(mut self, o: Output) -> Self {
        self.output = o;
        self
    }
    pub fn keep_caps(mut self, c: Vec<caps::Capability>) -> Self {
        self.keep_caps = Some(c);
        self
    }
    /// `program arg1 arg2` for messages.
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
    pub fn name(&self) -> String {
        self.program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// A started process. Its exit status arrives on `exited` once the reaper collects it, so
/// nothing else may wait for it.
#[derive(Debug)]
pub struct Child {
    pub pid: Pid,
    pub exited: oneshot::Receiver<ExitStatus>,
}

impl Child {
    /// Waits for the exit; a dropped sender (the reaper is gone) reads as killed.
    pub async fn wait(self) -> ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        self.exited
            .await
            .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerAction {
    PowerOff,
    Reboot,
}

/// The privileged operations spotinit needs, and nothing else.
pub trait System: Send + Sync + 'static {
    fn mount(&self, m: &MountSpec) -> SysResult<()>;
    /// `detach` = MNT_DETACH (lazy), for the last resort at shutdown.
    fn umount(&self, target: &Path, detach: bool) -> SysResult<()>;
    /// Changes a mount's propagation or flags without a source (e.g. MS_PRIVATE|MS_REC).
    fn remount(&self, target: &Path, flags: MsFlags) -> SysResult<()>;
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> SysResult<()>;
    fn set_hostname(&self, name: &str) -> SysResult<()>;
    /// Sets IFF_UP on a network interface.
    fn interface_up(&self, name: &str) -> SysResult<()>;
    fn spawn(&self, cmd: &CommandSpec) -> SysResult<Child>;
    fn kill(&self, pid: Pid, sig: Signal) -> SysResult<()>;
    /// kill(-1, sig): every process but us (PID 1 at shutdown).
    fn kill_all(&self, sig: Signal) -> SysResult<()>;
    fn sync(&self);
    /// Replaces this process with `program` (persisted-root mode's own init). Returns only on
    /// failure; the fake records it and returns Ok.
    fn exec(&self, program: &Path, args: &[String]) -> SysResult<()>;
    /// Makes ctrl-alt-del send SIGINT to PID 1 instead of rebooting at once.
    fn ctrl_alt_del_to_signal(&self) -> SysResult<()>;
    /// Returns only if the call failed; in the fake it records the call and returns Ok.
    fn power(&self, action: PowerAction) -> SysResult<()>;
}

/// Runs a program to completion and turns a non-zero exit into an error naming the command.
pub async fn run<S: System + ?Sized>(sys: &S, cmd: &CommandSpec) -> Result<(), CommandError> {
    let child = sys.spawn(cmd).map_err(|source| CommandError::Start {
        command: cmd.display(),
        source,
    })?;
    let status = child.wait().await;
    if status.success() {
        Ok(())
    } else {
        Err(CommandError::Failed {
            command: cmd.display(),
            exit: describe_exit(status),
        })
    }
}

/// Runs a program and returns its exit code (or an error if it was killed by a signal).
pub async fn run_code<S: System + ?Sized>(sys: &S, cmd: &CommandSpec) -> Result<i32, CommandError> {
    let child = sys.spawn(cmd).map_err(|source| CommandError::Start {
        command: cmd.display(),
        source,
    })?;
    let status = child.wait().await;
    status.code().ok_or_else(|| CommandError::NoExitCode {
        command: cmd.display(),
        exit: describe_exit(status),
    })
}

/// "exit status 2" / "killed by SIGKILL".
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => match Signal::try_from(s) {
            Ok(sig) => format!("killed by {}", sig.as_str()),
            Err(_) => format!("killed by signal {s}"),
        },
        _ => "ended".into(),
    }
}

/// One line of /proc/self/mountinfo: what is mounted where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    /// major:minor of the mounted device.
    pub device: String,
    /// The path within the source filesystem that is mounted (not `/` for bind mounts).
    pub root: String,
    /// Per-mount options (`rw,nosuid,relatime`).
    pub options: String,
    /// The filesystem's own options (`rw,lowerdir=...,upperdir=...` for overlay; `ro` when the
    /// whole filesystem is read-only, whatever each mount says).
    pub super_options: String,
}

impl MountInfo {
    /// The filesystem itself is read-only (for every mount of it).
    pub fn fs_read_only(&self) -> bool {
        self.super_options.split(',').any(|o| o == "ro")
    }

    /// The directories an overlay is made of (lowerdir, upperdir, workdir), if it is one.
    pub fn overlay_dirs(&self) -> Vec<PathBuf> {
        if self.fstype != "overlay" {
            return Vec::new();
        }
        self.super_options
            .split(',')
            .filter_map(|o| o.split_once('='))
            .filter(|(k, _)| matches!(*k, "lowerdir" | "upperdir" | "workdir"))
            .flat_map(|(_, v)| v.split(':').map(PathBuf::from).collect::<Vec<_>>())
            .collect()
    }
}

/// Parses /proc/self/mountinfo text (octal escapes in paths decoded).
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    fn unescape(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\' {
                // `get`: the three bytes after a backslash may end inside a character.
                if let Some(v) = s
                    .get(i + 1..i + 4)
                    .and_then(|o| u8::from_str_radix(o, 8).ok())
                {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountInfo {
                device: f.get(2)?.to_string(),
                root: unescape(f.get(3)?),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                options: f.get(5).unwrap_or(&"").to_string(),
                fstype: r.first()?.to_string(),
                source: unescape(r.get(1).unwrap_or(&"")),
                super_options: unescape(r.get(2).unwrap_or(&"")),
            })
        })
        .collect()
}

/// What is mounted right now (from `root`/proc/self/mountinfo). Read lossily: a path that is
/// not UTF-8 (the kernel passes such bytes through) must not make every mount disappear.
pub fn mounts(paths: &Paths) -> Vec<MountInfo> {
    std::fs::read(paths.p("/proc/self/mountinfo"))
        .map(|b| parse_mountinfo(&String::from_utf8_lossy(&b)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parses_and_unescapes() {
        let text = "22 1 259:2 / / ro,relatime shared:1 - erofs /dev/nvme0n1p2 ro\n\
                    40 22 259:5 /docker /var/lib/docker rw shared:9 - ext4 /dev/nvme1n1 rw\n\
                    41 22 0:40 / /mnt/with\\040space rw - tmpfs tmpfs rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].fstype, "erofs");
        assert_eq!(m[1].mount_point, PathBuf::from("/var/lib/docker"));
        assert_eq!(m[1].root, "/docker");
        assert_eq!(m[1].device, "259:5");
        assert_eq!(m[1].source, "/dev/nvme1n1");
        assert_eq!(m[2].mount_point, PathBuf::from("/mnt/with space"));
        assert!(m[0].fs_read_only() && !m[1].fs_read_only());
        assert_eq!(m[1].options, "rw");
    }

    #[test]
    fn a_backslash_before_a_multibyte_character_is_kept_as_it_is() {
        // Found by fuzzing (fuzz/, target mountinfo): the three bytes after a backslash ended
        // inside the `é`, and slicing the text there panicked.
        let m = parse_mountinfo("41 22 0:40 / /mnt/x\\04é rw - tmpfs tmp\\12é rw\n");
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/x\\04é"));
        assert_eq!(m[0].source, "tmp\\12é");
    }

    #[test]
    fn a_mount_point_that_is_not_utf8_hides_no_other_mount() {
        let root = std::env::temp_dir().join(format!("spotinit-mi-{}", std::process::id()));
        std::fs::create_dir_all(root.join("proc/self")).unwrap();
        std::fs::write(
            root.join("proc/self/mountinfo"),
            b"40 28 259:5 / /run/spotinit/volume rw - ext4 /dev/nvme1n1 rw\n\
              41 40 0:60 / /run/spotinit/volume/caf\xe9 rw - tmpfs tmpfs rw\n",
        )
        .unwrap();
        let m = mounts(&Paths::under(&root));
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/run/spotinit/volume"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn overlay_dirs_are_read_from_the_super_options() {
        let text = concat!(
            "90 40 0:55 / /var/lib/docker/overlay2/abc/merged rw,relatime - overlay overlay ",
            "rw,lowerdir=/var/lib/docker/overlay2/l/X:/var/lib/docker/overlay2/l/Y,",
            "upperdir=/var/lib/docker/overlay2/abc/diff,workdir=/var/lib/docker/overlay2/abc/work\n"
        );
        let m = &parse_mountinfo(text)[0];
        assert_eq!(
            m.overlay_dirs(),
            [
                "/var/lib/docker/overlay2/l/X",
                "/var/lib/docker/overlay2/l/Y",
                "/var/lib/docker/overlay2/abc/diff",
                "/var/lib/docker/overlay2/abc/work"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn paths_join_under_root() {
        let p = Paths::under("/tmp/x");
        assert_eq!(p.p("/run/spotinit"), PathBuf::from("/tmp/x/run/spotinit"));
        assert_eq!(Paths::real().p("/run"), PathBuf::from("/run"));
    }

    #[test]
    fn exit_descriptions() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe_exit(ExitStatus::from_raw(2 << 8)), "exit status 2");
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "killed by SIGKILL");
    }
}
