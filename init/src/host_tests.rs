//! Unit tests of the machine-local boot steps: module loading passes, the network interface, the DHCP client and its lease.

use super::*;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("spotinit-host-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn modaliases_are_collected_once() {
    let root = tmp("alias");
    for (bus, dev, alias) in [
        ("pci", "0000:00:02.0", "pci:v00001AF4d00001000sv*"),
        ("pci", "0000:00:03.0", "pci:v00001AF4d00001000sv*"),
        ("acpi", "LNXPWRBN:00", "acpi:LNXPWRBN:"),
    ] {
        let d = root.join("sys/devices").join(bus).join(dev);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("modalias"), format!("{alias}\n")).unwrap();
    }
    // sysfs is full of links back up the tree; the walk must not follow them.
    std::os::unix::fs::symlink("..", root.join("sys/devices/pci/0000:00:02.0/subsystem")).unwrap();
    let a = modaliases(&Paths::under(&root));
    assert_eq!(a, vec!["acpi:LNXPWRBN:", "pci:v00001AF4d00001000sv*"]);
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn module_passes_repeat_while_drivers_reveal_devices() {
    use crate::sys::fake::FakeSystem;
    let root = tmp("passes");
    let dev = |bus: &str, name: &str, alias: &str| {
        let d = root.join("sys/devices").join(bus).join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("modalias"), alias).unwrap();
    };
    dev("pci", "0000:00:02.0", "pci:v00001AF4d00001041");
    let fake = FakeSystem::new(&root);
    // Loading virtio_pci makes the virtio bus show the NIC; then nothing new appears.
    let r = root.clone();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    fake.on_spawn("modprobe", move |_| {
        if n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            let d = r.join("sys/devices/pci0000:00/0000:00:02.0/virtio0");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("modalias"), "virtio:d00000001v00001AF4").unwrap();
        }
    });
    let summary = load_device_drivers(&fake, &Paths::under(&root), Vec::new())
        .await
        .unwrap();
    assert_eq!(summary, "2 device aliases in 2 passes");
    let docker = DockerModules::start(&fake);
    let spawns: Vec<Vec<String>> = fake
        .ops()
        .into_iter()
        .filter_map(|op| match op {
            crate::sys::fake::Op::Spawn { args, .. } => Some(args),
            _ => None,
        })
        .collect();
    assert_eq!(spawns.len(), 3, "two coldplug passes and Docker's modules");
    assert_eq!(
        docker.wait().await,
        "loaded overlay br_netfilter veth nf_conntrack"
    );
    assert!(spawns[0].contains(&"pci:v00001AF4d00001041".to_string()));
    assert!(spawns[1].contains(&"virtio:d00000001v00001AF4".to_string()));
    assert!(!spawns[1].contains(&"pci:v00001AF4d00001041".to_string()));
    assert!(spawns[2].contains(&"overlay".to_string()));
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn the_network_drivers_load_first_and_the_rest_skips_them() {
    let root = tmp("nic-first");
    let dev = |path: &str, alias: &str| {
        let d = root.join("sys/devices").join(path);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("modalias"), alias).unwrap();
    };
    // virtio-net's PCI function (class 02), a watchdog, the ACPI power button.
    dev(
        "pci0000:00/0000:00:02.0",
        "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00",
    );
    dev(
        "pci0000:00/0000:00:1f.0",
        "pci:v00008086d00002918sv00001AF4sd00001100bc06sc01i00",
    );
    dev("LNXSYSTM:00/LNXPWRBN:00", "acpi:LNXPWRBN:");
    let fake = crate::sys::fake::FakeSystem::new(&root);
    // Loading virtio_pci shows the virtio NIC, which needs virtio_net in turn.
    let r = root.clone();
    fake.on_spawn("modprobe", move |cmd| {
        if cmd.args.iter().any(|a| a.contains("bc02")) {
            let d = r.join("sys/devices/pci0000:00/0000:00:02.0/virtio0");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("modalias"), "virtio:d00000001v00001AF4").unwrap();
        }
    });
    let paths = Paths::under(&root);
    let (line, tried) = load_network_drivers(&fake, &paths).await.unwrap();
    assert_eq!(line, "2 network device aliases");
    assert!(tried.iter().all(|a| is_network_alias(a)), "{tried:?}");
    let rest = load_device_drivers(&fake, &paths, tried).await.unwrap();
    assert_eq!(rest, "2 device aliases in 1 passes");
    let spawns: Vec<Vec<String>> = fake
        .ops()
        .into_iter()
        .filter_map(|op| match op {
            crate::sys::fake::Op::Spawn { args, .. } => Some(args),
            _ => None,
        })
        .collect();
    assert_eq!(spawns.len(), 3, "{spawns:?}");
    assert!(spawns[1].contains(&"virtio:d00000001v00001AF4".to_string()));
    assert!(!spawns[2].iter().any(|a| is_network_alias(a)), "{spawns:?}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn dockers_modules_load_in_the_background_until_waited_for() {
    let root = tmp("docker-modules");
    let fake = crate::sys::fake::FakeSystem::new(&root);
    // A modprobe that takes its time: starting it must not wait for it.
    fake.behave("modprobe", crate::sys::fake::Behavior::Run);
    let modules = DockerModules::start(&fake);
    let pid = match &modules.0 {
        Ok(child) => child.pid,
        Err(e) => panic!("{e}"),
    };
    let waiting = tokio::spawn(modules.wait());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "the wait ended before modprobe did");
    fake.kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let line = waiting.await.unwrap();
    assert!(
        line.starts_with("modprobe overlay br_netfilter veth nf_conntrack was killed"),
        "{line}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn interface_is_the_first_physical_one() {
    let root = tmp("net");
    for (n, phys) in [
        ("lo", false),
        ("docker0", false),
        ("eth1", true),
        ("eth0", true),
    ] {
        let d = root.join("sys/class/net").join(n);
        std::fs::create_dir_all(&d).unwrap();
        if phys {
            std::fs::create_dir_all(d.join("device")).unwrap();
        }
    }
    let p = Paths::under(&root);
    assert_eq!(pick_interface(&p, None).as_deref(), Some("eth0"));
    assert_eq!(pick_interface(&p, Some("eth1")).as_deref(), Some("eth1"));
    assert_eq!(pick_interface(&p, Some("ens5")), None);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn dhcp_client_keeps_only_network_capabilities() {
    let s = dhcp_client("eth0", &Paths::real());
    let caps = s.command.keep_caps.unwrap();
    assert_eq!(caps.len(), 3);
    assert!(caps.contains(&caps::Capability::CAP_NET_RAW));
    assert!(!caps.contains(&caps::Capability::CAP_SYS_ADMIN));
    assert!(s.command.args.contains(&DHCP_SCRIPT.to_string()));
}

#[test]
fn lease_text_parses_as_the_hook_script_writes_it() {
    let l = parse_lease("ip=172.31.5.20\nprefix=20\nrouter=\ndns=\"172.31.0.2\"\nnot a pair\n");
    assert_eq!(
        l,
        [
            ("ip".to_string(), "172.31.5.20".to_string()),
            ("prefix".into(), "20".into()),
            ("router".into(), "".into()),
            ("dns".into(), "172.31.0.2".into()),
        ]
    );
}

#[test]
fn lease_file_parses() {
    let root = tmp("lease");
    let f = root.join("dhcp-eth0.env");
    std::fs::write(
        &f,
        "ip=10.0.2.15\nprefix=24\nrouter=10.0.2.2\ndns=\"10.0.2.3\"\n",
    )
    .unwrap();
    let l = read_lease(&f).unwrap();
    assert!(l.contains(&("dns".into(), "10.0.2.3".into())));
    std::fs::remove_dir_all(&root).unwrap();
}
