//! Persisted-root mode: the state volume carries a whole root filesystem (`rootfs/` on it),
//! seeded from the image on first use; spotinit makes it the root (`pivot_root`, the image's
//! root detached) and continues the boot there, or execs that root's own init.
//!
//! Each step has its own error variant, so a failure says exactly which mount or call broke.

use crate::sys::{CommandSpec, MountSpec, MsFlags, Paths, SysError, System};
use std::path::{Path, PathBuf};

/// The root filesystem's directory on the state volume.
pub const ROOTFS: &str = "rootfs";
/// Where `rootfs/` is bound to become the new root. Not below /run, where the volume itself is
/// mounted: /run is moved into the new root, and a mount cannot move below itself.
pub const NEW_ROOT: &str = "/mnt";
/// Where the image's root goes during the pivot (on the moved /run tmpfs), before it is detached.
pub const OLD_ROOT: &str = "/run/spotinit/image-root";
/// Mounts carried into the new root. /var and /etc/docker are not: in this mode they are the
/// persisted root's own.
pub const CARRIED: [&str; 4] = ["/dev", "/proc", "/sys", "/run"];

#[derive(Debug, thiserror::Error)]
pub enum PivotError {
    /// Copying the image's root onto the volume failed.
    #[error("cannot seed the persisted root from the image: {0}")]
    Seed(#[source] crate::sys::CommandError),
    /// Making or renaming the copy's directory failed.
    #[error("cannot seed the persisted root from the image: {0}")]
    SeedDir(#[source] std::io::Error),
    /// Making `rootfs/` a mount point (pivot_root needs one).
    #[error("cannot make the persisted root a mount point: {0}")]
    BindNewRoot(#[source] SysError),
    /// Creating a directory the new root needs.
    #[error("cannot prepare {} in the persisted root: {error}", path.display())]
    Prepare {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    /// Moving one of the API filesystems into the new root.
    #[error("cannot move {what} into the persisted root: {error}")]
    MoveMount {
        what: &'static str,
        #[source]
        error: SysError,
    },
    #[error("cannot switch to the persisted root: {0}")]
    PivotRoot(#[source] SysError),
    /// Detaching the image's root after the pivot.
    #[error("cannot detach the image's root: {0}")]
    DetachOldRoot(#[source] SysError),
}

/// Directories every root needs for spotinit to continue the boot in it.
const SKELETON: [&str; 13] = [
    "dev",
    "proc",
    "sys",
    "run",
    "tmp",
    "etc/docker",
    "var/lib/docker",
    "var/lib/containerd",
    "var/log/spotinit",
    "var/tmp",
    "var/cache",
    "root",
    "mnt",
];

/// Seeds `rootfs/` on the mounted volume from the running image's root (one filesystem:
/// `cp -ax /`), unless it is there already. Returns whether it seeded.
pub async fn seed<S: System + ?Sized>(
    sys: &S,
    paths: &Paths,
    volume_mount: &Path,
) -> Result<bool, PivotError> {
    let rootfs = volume_mount.join(ROOTFS);
    if rootfs.join("usr").is_dir() {
        return Ok(false);
    }
    let partial = volume_mount.join(format!("{ROOTFS}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(PivotError::SeedDir)?;
    // -x: only the image's own filesystem, not /proc, /run, the volume itself...
    let cmd = CommandSpec::new("/bin/cp")
        .arg("-ax")
        .arg(format!("{}/.", paths.p("/").display()))
        .arg(partial.to_string_lossy());
    crate::sys::run(sys, &cmd).await.map_err(PivotError::Seed)?;
    for d in SKELETON {
        let p = partial.join(d);
        std::fs::create_dir_all(&p).map_err(|error| PivotError::Prepare { path: p, error })?;
    }
    // Renamed only once complete: an interrupted seed is redone, never used half-made.
    std::fs::rename(&partial, &rootfs).map_err(PivotError::SeedDir)?;
    Ok(true)
}

/// Makes `<volume>/rootfs` the root: bind it at /mnt, move the API filesystems into it,
/// pivot_root with the image's root put under /run, detach that. The process's root and working
/// directory follow (pivot_root moves them; the Linux implementation also chdirs to "/").
pub fn into<S: System + ?Sized>(
    sys: &S,
    paths: &Paths,
    volume_mount: &Path,
) -> Result<(), PivotError> {
    let new_root = paths.p(NEW_ROOT);
    sys.mount(&MountSpec {
        source: volume_mount.join(ROOTFS).to_string_lossy().into_owned(),
        target: new_root.clone(),
        fstype: None,
        flags: MsFlags::MS_BIND | MsFlags::MS_REC,
        data: None,
    })
    .map_err(PivotError::BindNewRoot)?;
    // Moving /run carries the volume's own mount (/run/spotinit/volume) along.
    for what in CARRIED {
        let target = new_root.join(what.trim_start_matches('/'));
        std::fs::create_dir_all(&target).map_err(|error| PivotError::Prepare {
            path: target.clone(),
            error,
        })?;
        sys.mount(&MountSpec {
            source: paths.p(what).to_string_lossy().into_owned(),
            target,
            fstype: None,
            flags: MsFlags::MS_MOVE,
            data: None,
        })
        .map_err(|error| PivotError::MoveMount { what, error })?;
    }
    let put_old = new_root.join(OLD_ROOT.trim_start_matches('/'));
    std::fs::create_dir_all(&put_old).map_err(|error| PivotError::Prepare {
        path: put_old.clone(),
        error,
    })?;
    sys.pivot_root(&new_root, &put_old)
        .map_err(PivotError::PivotRoot)?;
    // Now "/" is the persisted root and the image's root is at OLD_ROOT: an absolute path in
    // the new root, whatever `paths` was rooted at before.
    sys.umount(Path::new(OLD_ROOT), true)
        .map_err(PivotError::DetachOldRoot)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::FakeSystem;

    #[test]
    fn the_pivot_binds_moves_pivots_and_detaches_in_order() {
        let root = std::env::temp_dir().join(format!("spotinit-pivot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let fake = FakeSystem::new(&root);
        let paths = Paths::under(&root);
        let vol = paths.p("/run/spotinit/volume");
        into(&fake, &paths, &vol).unwrap();
        assert_eq!(
            fake.briefs(),
            vec![
                "mount bind /mnt",
                "mount bind /mnt/dev",
                "mount bind /mnt/proc",
                "mount bind /mnt/sys",
                "mount bind /mnt/run",
                "pivot_root /mnt",
                "umount /run/spotinit/image-root",
            ]
        );
        match &fake.ops()[4] {
            crate::sys::fake::Op::Mount { flags, source, .. } => {
                assert_eq!(*flags, MsFlags::MS_MOVE);
                assert!(source.ends_with("/run"));
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_failed_move_names_the_mount() {
        let root = std::env::temp_dir().join(format!("spotinit-pivot2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let fake = FakeSystem::new(&root);
        fake.fail_when(
            |op| matches!(op, crate::sys::fake::Op::Mount { target, .. } if target.ends_with("proc")),
            nix::errno::Errno::EINVAL,
        );
        let paths = Paths::under(&root);
        let e = into(&fake, &paths, &paths.p("/run/spotinit/volume")).unwrap_err();
        assert!(
            matches!(e, PivotError::MoveMount { what: "/proc", .. }),
            "{e}"
        );
        assert!(!fake.briefs().iter().any(|b| b.starts_with("pivot_root")));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
