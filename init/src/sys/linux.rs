//! The real system calls. Each one names what it did in its error.

use super::errors::{SysError, SysResult};
use super::system::{
    Child, CommandSpec, MountSpec, MsFlags, Output, Pid, PowerAction, Signal, System,
};
use nix::errno::Errno;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// The running Linux kernel.
#[derive(Default)]
pub struct Linux;

const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl System for Linux {
    fn mount(&self, m: &MountSpec) -> SysResult<()> {
        nix::mount::mount(
            Some(m.source.as_str()),
            &m.target,
            m.fstype.as_deref(),
            m.flags,
            m.data.as_deref(),
        )
        .map_err(|e| {
            SysError::new(
                "mount",
                format!(
                    "{} on {} ({})",
                    m.source,
                    m.target.display(),
                    m.fstype.as_deref().unwrap_or("bind")
                ),
                e,
            )
        })
    }

    fn umount(&self, target: &Path, detach: bool) -> SysResult<()> {
        let flags = if detach {
            nix::mount::MntFlags::MNT_DETACH
        } else {
            nix::mount::MntFlags::empty()
        };
        nix::mount::umount2(target, flags)
            .map_err(|e| SysError::new("umount", target.display().to_string(), e))
    }

    fn remount(&self, target: &Path, flags: MsFlags) -> SysResult<()> {
        nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
            .map_err(|e| SysError::new("remount", target.display().to_string(), e))
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> SysResult<()> {
        let err = |e| {
            SysError::new(
                "pivot_root",
                format!("{} (old root to {})", new_root.display(), put_old.display()),
                e,
            )
        };
        nix::unistd::chdir(new_root).map_err(err)?;
        nix::unistd::pivot_root(new_root, put_old).map_err(err)?;
        nix::unistd::chdir("/").map_err(err)?;
        Ok(())
    }

    fn set_hostname(&self, name: &str) -> SysResult<()> {
        nix::unistd::sethostname(name).map_err(|e| SysError::new("sethostname", name, e))
    }

    fn interface_up(&self, name: &str) -> SysResult<()> {
        interface_up(name).map_err(|e| SysError::new("set link up", name, e))
    }

    fn spawn(&self, cmd: &CommandSpec) -> SysResult<Child> {
        let mut c = Command::new(&cmd.program);
        c.args(&cmd.args)
            .env_clear()
            .env("PATH", SAFE_PATH)
            // The root is read-only; programs that want a home get a writable one.
            .env("HOME", "/run/spotinit/home")
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        let mut log_reader = None;
        match &cmd.output {
            Output::Console => {}
            Output::Null => {
                c.stdout(Stdio::null()).stderr(Stdio::null());
            }
            Output::Log { .. } => {
                let (reader, writer) =
                    std::io::pipe().map_err(|e| SysError::io("pipe", cmd.name(), &e))?;
                let writer2 = writer
                    .try_clone()
                    .map_err(|e| SysError::io("pipe", cmd.name(), &e))?;
                c.stdout(writer).stderr(writer2);
                log_reader = Some(reader);
            }
        }
        let drop_caps: Option<Vec<caps::Capability>> = cmd.keep_caps.as_ref().map(|keep| {
            caps::all()
                .into_iter()
                .filter(|cap| !keep.contains(cap))
                .collect()
        });
        // SAFETY: the closure runs in the forked child before exec and only makes async-signal-
        // safe system calls (setsid, sigprocmask, prctl through the caps crate, which builds no
        // shared state); glibc's fork also leaves malloc usable in the child.
        unsafe {
            c.pre_exec(move || {
                // Own session: a signal for our process group never reaches the daemons.
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                // Start with nothing blocked, whatever this process had blocked.
                nix::sys::signal::sigprocmask(
                    nix::sys::signal::SigmaskHow::SIG_SETMASK,
                    Some(&nix::sys::signal::SigSet::empty()),
                    None,
                )
                .map_err(std::io::Error::from)?;
                if let Some(drop) = &drop_caps {
                    // Root gets exactly its bounding set at exec, so shrinking the bounding set
                    // is what limits a helper that runs as uid 0.
                    for cap in drop {
                        caps::drop(None, caps::CapSet::Bounding, *cap)
                            .map_err(|e| std::io::Error::other(e.to_string()))?;
                    }
                    nix::sys::prctl::set_no_new_privs().map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        let reaper = super::reaper::Reaper::get();
        let (pid, exited) = reaper
            .spawn_with(|| c.spawn().map(|child| child.id() as Pid))
            .map_err(|e| SysError::io("exec", cmd.display(), &e))?;
        // Drop our copies of the pipe's write end (they live in `c`), so EOF arrives.
        drop(c);
        if let (Some(reader), Output::Log { path, max_bytes }) = (log_reader, &cmd.output) {
            super::logfile::pump(reader, cmd.name(), path.clone(), *max_bytes);
        }
        Ok(Child { pid, exited })
    }

    fn kill(&self, pid: Pid, sig: Signal) -> SysResult<()> {
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(SysError::new(
                "kill",
                format!("{} to {pid}", sig.as_str()),
                e,
            )),
        }
    }

    fn kill_all(&self, sig: Signal) -> SysResult<()> {
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), sig) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(SysError::new(
                "kill",
                format!("{} to every process", sig.as_str()),
                e,
            )),
        }
    }

    fn sync(&self) {
        nix::unistd::sync();
    }

    fn exec(&self, program: &Path, args: &[String]) -> SysResult<()> {
        use std::ffi::CString;
        let c = |s: &str| CString::new(s).map_err(|_| SysError::new("exec", s, Errno::EINVAL));
        let prog = c(&program.to_string_lossy())?;
        let mut argv = vec![prog.clone()];
        for a in args {
            argv.push(c(a)?);
        }
        match nix::unistd::execv(&prog, &argv) {
            Ok(never) => match never {},
            Err(e) => Err(SysError::new("exec", program.display().to_string(), e)),
        }
    }

    fn ctrl_alt_del_to_signal(&self) -> SysResult<()> {
        nix::sys::reboot::set_cad_enabled(false)
            .map_err(|e| SysError::new("reboot", "disable ctrl-alt-del", e))
    }

    fn power(&self, action: PowerAction) -> SysResult<()> {
        use nix::sys::reboot::{reboot, RebootMode};
        let mode = match action {
            PowerAction::PowerOff => RebootMode::RB_POWER_OFF,
            PowerAction::Reboot => RebootMode::RB_AUTOBOOT,
        };
        nix::unistd::sync();
        match reboot(mode) {
            Ok(never) => match never {},
            Err(e) => Err(SysError::new("reboot", format!("{action:?}"), e)),
        }
    }
}

/// SIOCGIFFLAGS + SIOCSIFFLAGS with IFF_UP on a throwaway datagram socket.
fn interface_up(name: &str) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(Errno::ENAMETOOLONG);
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: valid socket fd and a properly initialised ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(Errno::last());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}
