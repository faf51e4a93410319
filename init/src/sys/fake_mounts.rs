//! A kernel mount table for the recording fake: the mounts it is asked for, kept as the kernel
//! shows them in `<root>/proc/self/mountinfo`, with the kernel's answers that matter to
//! spotinit: a bind carries the device of the filesystem it comes from, a mount with another
//! mount below it cannot be unmounted (EBUSY), a read-only remount changes the whole filesystem.

use super::system::{MountSpec, MsFlags};
use nix::errno::Errno;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
struct Row {
    id: u32,
    device: String,
    root: String,
    point: PathBuf,
    fstype: String,
    source: String,
    read_only: bool,
}

#[derive(Debug)]
pub struct MountTable {
    file: PathBuf,
    rows: Vec<Row>,
    next_id: u32,
    next_device: u32,
}

impl MountTable {
    /// A table written to `<root>/proc/self/mountinfo`, starting with `/`.
    pub fn new(root: &Path) -> MountTable {
        let t = MountTable {
            file: root.join("proc/self/mountinfo"),
            rows: vec![Row {
                id: 1,
                device: "259:1".into(),
                root: "/".into(),
                point: root.to_path_buf(),
                fstype: "erofs".into(),
                source: "/dev/root".into(),
                read_only: true,
            }],
            next_id: 2,
            next_device: 2,
        };
        t.write();
        t
    }

    /// The mount at `point` that is on top (the last one mounted there).
    fn top(&self, point: &Path) -> Option<usize> {
        self.rows.iter().rposition(|r| r.point == point)
    }

    /// The mount a path lives on: the longest mount point above it.
    fn under(&self, path: &Path) -> Option<usize> {
        (0..self.rows.len())
            .rev()
            .filter(|i| path.starts_with(&self.rows[*i].point))
            .max_by_key(|i| self.rows[*i].point.components().count())
    }

    pub fn mount(&mut self, m: &MountSpec) -> Result<(), Errno> {
        let source = Path::new(&m.source);
        if m.flags.contains(MsFlags::MS_MOVE) {
            let from = self.top(source).ok_or(Errno::EINVAL)?;
            let old = self.rows[from].point.clone();
            for r in self.rows.iter_mut().filter(|r| r.point.starts_with(&old)) {
                let rest = r
                    .point
                    .strip_prefix(&old)
                    .unwrap_or(Path::new(""))
                    .to_path_buf();
                r.point = m.target.join(rest);
            }
        } else if m.flags.contains(MsFlags::MS_BIND) {
            let from = self.under(source).ok_or(Errno::ENOENT)?;
            let base = &self.rows[from];
            let rest = source.strip_prefix(&base.point).unwrap_or(Path::new(""));
            let root = Path::new(&base.root).join(rest).display().to_string();
            let row = Row {
                id: self.next_id,
                root,
                point: m.target.clone(),
                ..base.clone()
            };
            self.next_id += 1;
            self.rows.push(row);
        } else {
            // The same block device mounted again is the same filesystem.
            let device = match self
                .rows
                .iter()
                .find(|r| r.source == m.source && m.source.starts_with('/'))
            {
                Some(r) => r.device.clone(),
                None => {
                    self.next_device += 1;
                    format!("259:{}", self.next_device)
                }
            };
            self.rows.push(Row {
                id: self.next_id,
                device,
                root: "/".into(),
                point: m.target.clone(),
                fstype: m.fstype.clone().unwrap_or_default(),
                source: m.source.clone(),
                read_only: m.flags.contains(MsFlags::MS_RDONLY),
            });
            self.next_id += 1;
        }
        self.write();
        Ok(())
    }

    /// A mount with another below it is busy, as the kernel says for a plain umount2.
    pub fn umount(&mut self, target: &Path, detach: bool) -> Result<(), Errno> {
        let i = self.top(target).ok_or(Errno::EINVAL)?;
        if detach {
            self.rows.retain(|r| !r.point.starts_with(target));
        } else {
            if self
                .rows
                .iter()
                .any(|r| r.point != target && r.point.starts_with(target))
            {
                return Err(Errno::EBUSY);
            }
            self.rows.remove(i);
        }
        self.write();
        Ok(())
    }

    /// MS_REMOUNT|MS_RDONLY makes the filesystem under `target` read-only for all its mounts.
    pub fn remount(&mut self, target: &Path, flags: MsFlags) -> Result<(), Errno> {
        if flags.contains(MsFlags::MS_REMOUNT) {
            let i = self.top(target).ok_or(Errno::EINVAL)?;
            let device = self.rows[i].device.clone();
            let ro = flags.contains(MsFlags::MS_RDONLY);
            for r in self.rows.iter_mut().filter(|r| r.device == device) {
                r.read_only = ro;
            }
            self.write();
        }
        Ok(())
    }

    fn write(&self) {
        let mut text = String::new();
        for r in &self.rows {
            let rw = if r.read_only { "ro" } else { "rw" };
            text.push_str(&format!(
                "{} 1 {} {} {} {rw} - {} {} {rw}\n",
                r.id,
                r.device,
                r.root,
                r.point.display(),
                r.fstype,
                r.source
            ));
        }
        if let Some(dir) = self.file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(&self.file, text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::parse_mountinfo;

    #[test]
    fn binds_share_the_device_busy_mounts_refuse_and_read_only_is_per_filesystem() {
        let root = std::env::temp_dir().join(format!("spotinit-mt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut t = MountTable::new(&root);
        let vol = root.join("run/spotinit/volume");
        let docker = root.join("var/lib/docker");
        t.mount(&MountSpec::fs(
            "ext4",
            "/dev/nvme1n1",
            vol.clone(),
            MsFlags::empty(),
            "",
        ))
        .unwrap();
        t.mount(&MountSpec::bind(vol.join("docker"), docker.clone()))
            .unwrap();
        t.mount(&MountSpec::fs(
            "tmpfs",
            "tmpfs",
            docker.join("x"),
            MsFlags::empty(),
            "",
        ))
        .unwrap();
        let info =
            parse_mountinfo(&std::fs::read_to_string(root.join("proc/self/mountinfo")).unwrap());
        let v = info.iter().find(|m| m.mount_point == vol).unwrap();
        let d = info.iter().find(|m| m.mount_point == docker).unwrap();
        assert_eq!(
            (d.device.as_str(), d.root.as_str()),
            (v.device.as_str(), "/docker")
        );
        assert_eq!(t.umount(&docker, false), Err(Errno::EBUSY));
        t.umount(&docker.join("x"), false).unwrap();
        t.remount(&vol, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY)
            .unwrap();
        let info =
            parse_mountinfo(&std::fs::read_to_string(root.join("proc/self/mountinfo")).unwrap());
        assert!(info
            .iter()
            .filter(|m| m.device == v.device)
            .all(|m| m.fs_read_only()));
        t.umount(&docker, false).unwrap();
        t.umount(&vol, false).unwrap();
        assert_eq!(t.umount(&vol, false), Err(Errno::EINVAL));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
