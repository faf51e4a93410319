//! Where the image under test is: the files `image/build.sh` leaves, checked to be there and
//! newer than the spotinit binary.

use std::path::{Path, PathBuf};

use super::workspace_root;
use crate::qemu::{Error, Result};

/// The built image: what `image/build.sh` leaves in `build/image/`.
#[derive(Clone, Debug)]
pub struct Image {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The production kernel command line (`build/image/cmdline`).
    pub cmdline: String,
}

impl Image {
    /// `$SPOTINIT_IMAGE_DIR` or `build/image/`. Fails naming the fix if a file is missing.
    pub fn locate() -> Result<Image> {
        let dir = std::env::var_os("SPOTINIT_IMAGE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("build/image"));
        let fix = "build it: `nice cargo build --release -p spotinit && image/build.sh` (as root)";
        let file = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::new(format!(
                    "the spotinit image is not built: {} is missing; {fix}",
                    p.display()
                )))
            }
        };
        let image = Image {
            disk: file("spotinit.raw")?,
            kernel: file("vmlinuz")?,
            initrd: file("initrd.img")?,
            cmdline: std::fs::read_to_string(file("cmdline")?)
                .map_err(|e| Error::new(format!("read {}/cmdline: {e}", dir.display())))?
                .trim()
                .to_owned(),
            dir,
        };
        image.warn_if_stale();
        Ok(image)
    }

    /// A spotinit binary newer than the image means the image does not run the code under test.
    fn warn_if_stale(&self) {
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let bin = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("release/spotinit");
        if let (Some(b), Some(i)) = (modified(&bin), modified(&self.disk)) {
            if b > i {
                eprintln!(
                    "spotworld: WARNING: {} is newer than {}: the instances run an older spotinit; \
                     run image/build.sh to test the current one",
                    bin.display(),
                    self.disk.display()
                );
            }
        }
    }

    /// One line saying which build this is (`build/image/version`).
    pub fn version_line(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("version")).unwrap_or_default();
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or("?")
                .to_owned()
        };
        format!(
            "spotinit {} (git {}), image {}",
            get("spotinit_version"),
            get("git_commit"),
            get("image_id")
        )
    }
}
