//! Unit tests of the golden rule's check: what it says, and the source it keeps.

use super::*;
use std::error::Error;

fn mountinfo(paths: &Paths, containerd: &str) {
    let p = |a: &str| paths.p(a).display().to_string();
    let text = format!(
        "40 30 259:5 / {} rw - ext4 /dev/nvme1n1 rw\n\
         41 22 259:5 /docker {} rw - ext4 /dev/nvme1n1 rw\n\
         42 22 {containerd} {} rw - tmpfs tmpfs rw\n",
        p(layout::VOLUME_MOUNT),
        p("/var/lib/docker"),
        p("/var/lib/containerd"),
    );
    let file = paths.p("/proc/self/mountinfo");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(file, text).unwrap();
}

#[test]
fn docker_state_elsewhere_or_an_unreadable_record_stops_docker_with_its_cause() {
    let root = std::env::temp_dir().join(format!("spotinit-verify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let paths = Paths::under(&root);
    let m = Mounted {
        volume_id: "vol-1".into(),
        device: "/dev/nvme1n1".into(),
        record: layout::Record::default(),
        slot: None,
    };
    mountinfo(&paths, "0:25 /");
    let e = verify_docker_state(&paths, &m, "overlay2").unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{} is tmpfs / from device 0:25, not containerd/ of the state volume (device 259:5)",
            paths.p("/var/lib/containerd").display()
        )
    );

    mountinfo(&paths, "259:5 /containerd");
    std::fs::create_dir_all(layout::record_path(&paths)).unwrap();
    let e = crate::boot::PhaseError::DockerState(
        verify_docker_state(&paths, &m, "overlay2").unwrap_err(),
    );
    let eisdir = std::io::Error::from_raw_os_error(libc::EISDIR);
    assert_eq!(
        e.to_string(),
        format!(
            "cannot read {}: {eisdir}; refusing to start Docker on anything but the state volume",
            layout::record_path(&paths).display()
        )
    );
    let io = std::iter::successors(Some(&e as &(dyn Error + 'static)), |err| (*err).source())
        .find_map(|err| err.downcast_ref::<std::io::Error>());
    assert_eq!(io.and_then(|e| e.raw_os_error()), Some(libc::EISDIR));
    std::fs::remove_dir_all(&root).unwrap();
}
