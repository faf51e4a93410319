//! Unit tests of finding a volume's block device: uevents, serials, the sysfs scan, and waiting for a disk to appear.

use super::*;

fn fake_disk(sys_block: &Path, name: &str, serial: &str) {
    let dev = sys_block.join(name).join("device");
    std::fs::create_dir_all(&dev).unwrap();
    std::fs::write(dev.join("serial"), format!("{serial}      \n")).unwrap();
    std::fs::write(dev.join("model"), "QEMU NVMe Ctrl\n").unwrap();
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("spotinit-dev-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn io_timeout_is_the_disks_own_or_its_multipath_paths() {
    let d = tmp("iotimeout");
    let attr = |name: &str| {
        let q = d.join(name).join("queue");
        std::fs::create_dir_all(&q).unwrap();
        std::fs::write(q.join("io_timeout"), "30000\n").unwrap();
    };
    // A plain namespace (EC2 Nitro): its own attribute.
    attr("nvme2n1");
    assert_eq!(
        io_timeout_files(&d, "nvme2n1"),
        vec![d.join("nvme2n1/queue/io_timeout")]
    );
    // A multipath head (QEMU): none of its own, its paths' instead; other namespaces' not.
    std::fs::create_dir_all(d.join("nvme1n1/queue")).unwrap();
    attr("nvme1c1n1");
    attr("nvme1c3n1");
    attr("nvme1c1n2");
    attr("nvme11c1n1");
    assert_eq!(
        io_timeout_files(&d, "nvme1n1"),
        vec![
            d.join("nvme1c1n1/queue/io_timeout"),
            d.join("nvme1c3n1/queue/io_timeout")
        ]
    );
    // Xen names have no paths.
    assert!(io_timeout_files(&d, "xvdf").is_empty());
    std::fs::remove_dir_all(&d).unwrap();
}

fn add(name: &str) -> Uevent {
    Uevent {
        action: "add".into(),
        subsystem: "block".into(),
        devname: name.into(),
        devtype: "disk".into(),
    }
}

#[test]
fn uevent_parses() {
    let msg = b"add@/devices/pci0000:00/0000:00:04.0/nvme/nvme1/nvme1n1\0ACTION=add\0DEVPATH=/devices/x\0SUBSYSTEM=block\0MAJOR=259\0MINOR=2\0DEVNAME=nvme1n1\0DEVTYPE=disk\0SEQNUM=1234\0";
    let ev = parse_uevent(msg).unwrap();
    assert_eq!(ev, add("nvme1n1"));
}

#[test]
fn names_and_serials_match() {
    let m = VolumeMatch::new("vol-0123456789abcdef0", "/dev/sdf");
    assert_eq!(m.nvme_serial, "vol0123456789abcdef0");
    assert_eq!(m.xen_name, "xvdf");
    let nvme = |serial: &str| Disk {
        name: "nvme1n1".into(),
        serial: Some(serial.into()),
        model: None,
    };
    assert!(m.matches(&nvme("vol0123456789abcdef0")));
    assert!(!m.matches(&nvme("vol0123456789abcdef1")));
    assert!(m.matches(&Disk {
        name: "xvdf".into(),
        serial: None,
        model: None
    }));
    assert!(is_hidden_nvme_path("nvme0c0n1"));
    assert!(!is_hidden_nvme_path("nvme0n1"));
    assert!(!is_hidden_nvme_path("nvme10n1"));
}

#[test]
fn scan_skips_hidden_paths_and_reads_serials() {
    let root = tmp("scan");
    fake_disk(&root, "nvme0n1", "spotinit-root");
    fake_disk(&root, "nvme0c0n1", "spotinit-root");
    fake_disk(&root, "nvme1n1", "vol0abc");
    let names: Vec<_> = scan(&root).into_iter().map(|d| d.name).collect();
    assert_eq!(names, vec!["nvme0n1", "nvme1n1"]);
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn a_disk_present_before_the_wait_is_found() {
    let root = tmp("before");
    let (tx, rx) = mpsc::unbounded_channel();
    let w = DeviceWatcher::start(root.clone(), rx);
    // The hot-plug lands (and its event is handled) before anyone waits.
    fake_disk(&root, "nvme1n1", "vol0abc123");
    tx.send(add("nvme1n1")).unwrap();
    tokio::task::yield_now().await;
    let m = VolumeMatch::new("vol-0abc123", "/dev/sdf");
    let d = w.wait_for(&m, Duration::from_secs(1)).await.unwrap();
    assert_eq!(d.name, "nvme1n1");
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn a_disk_arriving_during_the_wait_wakes_it() {
    let root = tmp("during");
    let (tx, rx) = mpsc::unbounded_channel();
    let w = DeviceWatcher::start(root.clone(), rx);
    fake_disk(&root, "nvme0n1", "spotinit-root");
    let m = VolumeMatch::new("vol-0def456", "/dev/sdf");
    let waiter = tokio::spawn({
        let w = w.clone();
        async move { w.wait_for(&m, Duration::from_secs(10)).await }
    });
    tokio::task::yield_now().await;
    fake_disk(&root, "nvme2n1", "vol0def456");
    tx.send(add("nvme0n1")).unwrap();
    tx.send(add("nvme2n1")).unwrap();
    let d = waiter.await.unwrap().unwrap();
    assert_eq!(d.name, "nvme2n1");
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test(start_paused = true)]
async fn timeout_lists_present_disks() {
    let root = tmp("timeout");
    fake_disk(&root, "nvme0n1", "spotinit-root");
    let (_tx, rx) = mpsc::unbounded_channel();
    let w = DeviceWatcher::start(root.clone(), rx);
    let m = VolumeMatch::new("vol-0aaa", "/dev/sdf");
    let e = w.wait_for(&m, Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "no disk with NVMe serial vol0aaa or name xvdf appeared within 5.00 s; disks present: nvme0n1 (serial spotinit-root)"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
