//! A simulated instance of the volume tests: its own root, a faked system whose mkfs runs for
//! real on the volume's backing file and whose mount of the volume shows the volume's content
//! directory, and the real volume phase ([`EbsVolume`]) against the world.

use crate::common::{InstanceParts, World};
use spotinit::cloud::ec2::Ec2Client;
use spotinit::config;
use spotinit::sys::fake::{FakeSystem, Op};
use spotinit::sys::Paths;
use spotinit::volume::ebs::EbsVolume;
use spotinit::volume::layout;
use spotworld::imds::ImdsMock;
use std::path::PathBuf;
use std::sync::Arc;

pub struct Instance {
    pub id: String,
    pub root: PathBuf,
    pub fake: FakeSystem,
    _imds: ImdsMock,
    pub volume: EbsVolume<Ec2Client, FakeSystem>,
}

impl World {
    pub async fn instance(&self, zone: &str, cfg: config::Volume, driver: &str) -> Instance {
        let InstanceParts {
            id,
            root,
            imds,
            ec2,
            me,
            devices,
        } = self.instance_parts(zone).await;
        let fake = FakeSystem::new(&root).with_mount_table();
        // mkfs runs for real on the backing file, so signatures are real.
        fake.on_spawn("mkfs.ext4", |cmd| {
            let dev = cmd.args.last().unwrap();
            let label = &cmd.args[cmd.args.iter().position(|a| a == "-L").unwrap() + 1];
            let ok = std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", label, dev])
                .status()
                .unwrap()
                .success();
            assert!(ok, "mkfs.ext4 {dev}");
        });
        // The faked mount of the volume shows the volume's content directory.
        let (r, disks) = (root.clone(), self.disks.clone());
        fake.on_op(move |op| {
            let vol_mount = PathBuf::from(layout::VOLUME_MOUNT);
            match op {
                Op::Mount { source, target, .. } if *target == vol_mount => {
                    let img = std::fs::read_link(source).unwrap();
                    let id = img.file_stem().unwrap().to_string_lossy().to_string();
                    let at = r.join("run/spotinit/volume");
                    std::fs::remove_dir_all(&at).unwrap();
                    std::os::unix::fs::symlink(disks.content(&id), &at).unwrap();
                }
                Op::Umount { target, .. } if *target == vol_mount => {
                    let at = r.join("run/spotinit/volume");
                    std::fs::remove_file(&at).unwrap();
                    std::fs::create_dir_all(&at).unwrap();
                }
                _ => {}
            }
        });
        let volume = EbsVolume::new(
            Arc::new(ec2),
            Arc::new(fake.clone()),
            Paths::under(&root),
            cfg,
            driver.into(),
            me,
            devices,
        );
        Instance {
            id,
            root,
            fake,
            _imds: imds,
            volume,
        }
    }
}

impl Instance {
    pub fn spawned(&self, program: &str) -> Vec<Vec<String>> {
        self.fake
            .ops()
            .into_iter()
            .filter_map(|op| match op {
                Op::Spawn {
                    program: p, args, ..
                } if p == program => Some(args),
                _ => None,
            })
            .collect()
    }
    pub fn record(&self) -> layout::Record {
        layout::read_record(&Paths::under(&self.root))
            .unwrap()
            .unwrap()
    }
}
