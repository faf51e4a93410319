//! Real VMs: a QEMU instance's console, QMP, power button, kill, NVMe hot-plug, networking, and
//! the EBS bridge on top of them.
//!
//! Needs `qemu-system-x86_64` (QEMU 10 from bookworm-backports), `busybox-static`, `ovmf`, and apt
//! access to Debian bookworm once: the guest is Debian's cloud kernel plus a busybox initramfs,
//! built on first use and cached under `build/test-guest/`. VM work dirs (console.log, qmp.log,
//! the QEMU command line) stay under `build/test-runs/qemu/<test>/` for inspection.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test qemu -- --nocapture` (prints the
//! measured latencies).

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;
use spotworld::ebs::{nvme_serial, EbsBridge};
use spotworld::qemu::{ConsoleCursor, ConsoleLine, Firmware, Vm, VmSpec};
use spotworld::EbsHooks;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// TCG on a shared two-core machine: generous, but a hung guest still fails in minutes.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const STEP_DEADLINE: Duration = Duration::from_secs(60);
const GIB: u64 = 1 << 30;

const READY_MARKER: &str = "guest: ready";

// ---------------------------------------------------------------------------------------------
// The test guest: Debian's cloud kernel and a busybox initramfs

/// Modules the guest loads, in dependency order: the ACPI power button (so `system_powerdown`
/// reaches it) and virtio-net. NVMe, PCIe and ACPI hot-plug are built into the cloud kernel.
const GUEST_MODULES: &[&str] = &[
    "drivers/acpi/button",
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
];

const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";

const GUEST_INIT: &str = r#"#!/bin/busybox sh
# spotworld test guest, PID 1: reports block devices appearing and disappearing, runs commands
# typed on the console ("<tag> <command>"), and powers off on the ACPI power button.
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin /tmp /run
/bin/busybox --install -s
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in $(cat /lib/modules/load-order); do
  insmod /lib/modules/$m.ko || echo "guest: insmod $m failed"
done
# Commands are announced below; the tty's own echo would only duplicate them.
stty -echo 2>/dev/null
echo "guest: cmdline $(cat /proc/cmdline)"
if [ -e /sys/class/net/eth0 ]; then
  ip link set lo up
  ip link set eth0 up
  udhcpc -q -n -t 10 -T 1 -i eth0 -s /bin/udhcpc-script >/dev/null 2>&1 || echo "guest: dhcp failed"
  echo "guest: eth0 $(ip -4 -o addr show eth0 | awk '{print $4}')"
fi
# Kernel messages about hot-plug are worth seeing; the boot chatter before this point is not.
echo 6 > /proc/sys/kernel/printk
read pwr0 rest < /sys/firmware/acpi/interrupts/ff_pwr_btn
# Commands are read by a blocking reader of their own: busybox's `read -t` checks its deadline
# before each byte and drops what it has read when the deadline passes mid-line.
# (A background job's stdin is /dev/null unless given, hence fd 3.)
exec 3<&0
while read -r tag cmd <&3; do
  echo "guest: run $tag: $cmd"
  eval "$cmd"
  echo "guest: done $tag rc=$?"
done &
echo "guest: ready uptime=$(cut -d' ' -f1 /proc/uptime) date=$(date -u +%Y-%m-%dT%H:%M:%S)"
known=""
while :; do
  now=""
  for d in /sys/block/*; do
    n=${d##*/}
    # Hidden NVMe multipath nodes (nvmeXcYnZ) and pseudo devices are not disks.
    case $n in nvme*c*|loop*|ram*|zram*|'*') continue;; esac
    now="$now $n"
    case " $known " in
      *" $n "*) ;;
      *) s=$(cat $d/device/serial 2>/dev/null || cat $d/serial 2>/dev/null)
         echo "guest: + $n serial=$(echo $s) sectors=$(cat $d/size) uptime=$(cut -d' ' -f1 /proc/uptime)";;
    esac
  done
  for n in $known; do
    case " $now " in *" $n "*) ;; *) echo "guest: - $n uptime=$(cut -d' ' -f1 /proc/uptime)";; esac
  done
  known=$now
  # The power button's ACPI fixed event is counted here once button.ko handles it.
  read pwr rest < /sys/firmware/acpi/interrupts/ff_pwr_btn
  if [ "$pwr" != "$pwr0" ]; then
    echo "guest: power button pressed, powering off"
    sync
    poweroff -f
  fi
  sleep 0.1
done
"#;

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
bound|renew)
  ip addr flush dev "$interface"
  ip addr add "$ip/$mask" dev "$interface"
  [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
  ;;
esac
exit 0
"#;

const KERNEL_APPEND: &str = "console=ttyS0 panic=-1 quiet";

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

/// The test guest, built once per test process (the kernel download once per machine).
fn guest() -> &'static Guest {
    static GUEST: OnceLock<Result<Guest, String>> = OnceLock::new();
    match GUEST.get_or_init(build_guest) {
        Ok(g) => g,
        Err(e) => panic!("cannot build the test guest: {e}"),
    }
}

fn build_guest() -> Result<Guest, String> {
    if which("qemu-system-x86_64").is_none() {
        return Err(
            "qemu-system-x86_64 not found: apt-get install -t bookworm-backports \
                    qemu-system-x86 qemu-utils (QEMU 10)"
                .into(),
        );
    }
    let dir = workspace_root().join("build/test-guest");
    let kernel_dir = dir.join("kernel");
    fetch_kernel(&dir, &kernel_dir)?;
    let initrd = dir.join("initrd.cpio");
    write_initramfs(&kernel_dir, &initrd)?;
    Ok(Guest {
        kernel: kernel_dir.join("vmlinuz"),
        initrd,
    })
}

/// Debian's cloud kernel and the modules the guest loads, from the package the meta-package
/// `linux-image-cloud-amd64` depends on.
fn fetch_kernel(dir: &Path, kernel_dir: &Path) -> Result<(), String> {
    let complete = kernel_dir.join("vmlinuz").is_file()
        && GUEST_MODULES
            .iter()
            .all(|m| kernel_dir.join(module_file(m)).is_file());
    if complete {
        return Ok(());
    }
    let how = format!(
        "fetching the guest kernel needs apt access to Debian bookworm ({KERNEL_PACKAGE}); \
         or put vmlinuz and {} under {}",
        GUEST_MODULES
            .iter()
            .map(|m| module_file(m))
            .collect::<Vec<_>>()
            .join(", "),
        kernel_dir.display()
    );
    let depends =
        run("apt-cache", &["depends", KERNEL_PACKAGE], None).map_err(|e| format!("{e}\n{how}"))?;
    let package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| format!("apt-cache depends {KERNEL_PACKAGE} names no linux-image package:\n{depends}\n{how}"))?
        .to_owned();
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)
        .map_err(|e| format!("create {}: {e}", download.display()))?;
    run("apt-get", &["download", &package], Some(&download)).map_err(|e| format!("{e}\n{how}"))?;
    let deb = std::fs::read_dir(&download)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                download.display()
            )
        })?;
    let tree = download.join("tree");
    run(
        "dpkg-deb",
        &[
            "-x",
            &deb.display().to_string(),
            &tree.display().to_string(),
        ],
        None,
    )?;
    let staging = dir.join("kernel.partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| e.to_string())?;
    let vmlinuz = std::fs::read_dir(tree.join("boot"))
        .map_err(|e| format!("{package} has no /boot: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| format!("{package} has no /boot/vmlinuz-*"))?;
    copy(&vmlinuz, &staging.join("vmlinuz"))?;
    let modules_root = std::fs::read_dir(tree.join("lib/modules"))
        .map_err(|e| format!("{package} has no /lib/modules: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .next()
        .ok_or_else(|| format!("{package}: /lib/modules is empty"))?
        .join("kernel");
    for m in GUEST_MODULES {
        copy(
            &modules_root.join(format!("{m}.ko")),
            &staging.join(module_file(m)),
        )?;
    }
    std::fs::write(staging.join("PACKAGE"), format!("{package}\n")).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(kernel_dir);
    std::fs::rename(&staging, kernel_dir)
        .map_err(|e| format!("rename {}: {e}", staging.display()))?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(())
}

fn module_file(module: &str) -> String {
    format!("{}.ko", module.rsplit('/').next().unwrap_or(module))
}

/// A newc cpio with busybox, the init script and the modules (the kernel takes it uncompressed).
fn write_initramfs(kernel_dir: &Path, target: &Path) -> Result<(), String> {
    let busybox = std::fs::read("/bin/busybox")
        .map_err(|e| format!("/bin/busybox: {e}: apt-get install busybox-static"))?;
    if !is_static_elf(&busybox) {
        return Err("/bin/busybox is dynamically linked: apt-get install busybox-static".into());
    }
    let mut cpio = Cpio::default();
    for d in [".", "bin", "dev", "lib", "lib/modules"] {
        cpio.entry(d, 0o040755, &[], (0, 0));
    }
    cpio.entry("dev/console", 0o020600, &[], (5, 1));
    cpio.entry("init", 0o100755, GUEST_INIT.as_bytes(), (0, 0));
    cpio.entry("bin/busybox", 0o100755, &busybox, (0, 0));
    cpio.entry(
        "bin/udhcpc-script",
        0o100755,
        UDHCPC_SCRIPT.as_bytes(),
        (0, 0),
    );
    let mut order = String::new();
    for m in GUEST_MODULES {
        let name = module_file(m);
        let data = std::fs::read(kernel_dir.join(&name)).map_err(|e| format!("{name}: {e}"))?;
        cpio.entry(&format!("lib/modules/{name}"), 0o100644, &data, (0, 0));
        order.push_str(name.trim_end_matches(".ko"));
        order.push('\n');
    }
    cpio.entry("lib/modules/load-order", 0o100644, order.as_bytes(), (0, 0));
    let bytes = cpio.finish();
    let partial = target.with_extension("partial");
    std::fs::write(&partial, bytes).map_err(|e| format!("write {}: {e}", partial.display()))?;
    std::fs::rename(&partial, target).map_err(|e| format!("rename to {}: {e}", target.display()))
}

/// The "new ASCII" cpio format the kernel unpacks (Documentation/driver-api/early-userspace).
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.inode += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len(),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() + 1,
            0, // check
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

/// A 64-bit ELF without a program interpreter (PT_INTERP) runs with no libraries in the guest.
fn is_static_elf(bytes: &[u8]) -> bool {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        bytes
            .get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) != 3)
    })
}

fn run(program: &str, args: &[&str], cwd: Option<&Path>) -> Result<String, String> {
    let mut command = std::process::Command::new(program);
    command.args(args);
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let output = command
        .output()
        .map_err(|e| format!("run {program}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{program} {}: {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A fresh work directory for one test, kept afterwards for inspection.
fn run_dir(test: &str) -> PathBuf {
    let dir = workspace_root().join("build/test-runs/qemu").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// The test guest is small: one vCPU and 512 MiB boot faster under TCG than the defaults.
fn guest_spec(name: &str, dir: &Path) -> VmSpec {
    let g = guest();
    VmSpec::direct_kernel(
        name,
        &dir.join(name),
        &g.kernel,
        Some(&g.initrd),
        &format!("{KERNEL_APPEND} spotworld.vm={name}"),
    )
    .with_memory_mib(512)
    .with_cpus(1)
}

async fn boot(spec: VmSpec) -> (Vm, ConsoleLine) {
    let vm = Vm::start(spec).await.unwrap();
    let ready = vm
        .console()
        .wait_for(READY_MARKER, BOOT_DEADLINE)
        .await
        .unwrap();
    (vm, ready)
}

/// Result of a command typed on the guest's console.
struct GuestRun {
    rc: i32,
    output: Vec<String>,
}

impl GuestRun {
    fn text(&self) -> String {
        self.output.join("\n")
    }
}

/// Run a shell command in the test guest through its console and collect its output.
async fn run_in_guest(vm: &Vm, command: &str) -> GuestRun {
    static TAGS: AtomicU64 = AtomicU64::new(1);
    let tag = format!("t{}", TAGS.fetch_add(1, Ordering::Relaxed));
    let mut console = vm.console_from_now();
    vm.write_console(&format!("{tag} {command}\n"))
        .await
        .unwrap();
    let started = console
        .wait_for(&format!("guest: run {tag}: "), STEP_DEADLINE)
        .await
        .unwrap();
    let done_prefix = format!("guest: done {tag} rc=");
    let done = console
        .wait_until(
            &format!("the end of command {tag} ({command})"),
            |t| t.starts_with(&done_prefix),
            STEP_DEADLINE,
        )
        .await
        .unwrap();
    let rc = done.text[done_prefix.len()..].trim().parse().unwrap();
    let lines = console.lines();
    let from = lines
        .iter()
        .position(|l| *l == started)
        .expect("start line")
        + 1;
    let to = lines.iter().position(|l| *l == done).expect("end line");
    GuestRun {
        rc,
        output: lines[from..to].iter().map(|l| l.text.clone()).collect(),
    }
}

/// A sparse file of `gib` GiB.
fn sparse_file(path: &Path, gib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(gib * GIB).unwrap();
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Whether QEMU (process `pid`) has `file` open.
fn process_has_open(pid: u32, file: &Path) -> bool {
    let file = std::fs::canonicalize(file).unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .any(|target| target == file)
        })
        .unwrap_or(false)
}

/// Wait for the guest to list a disk with this serial; returns its name (`nvme1n1`) and the line.
/// Names depend on probe order (no root disk: the first volume is `nvme0n1`): match on serials,
/// as spotinit does.
async fn wait_disk(console: &mut ConsoleCursor, serial: &str) -> (String, ConsoleLine) {
    let needle = format!(" serial={serial} ");
    let line = console
        .wait_until(
            &format!("a disk with serial {serial}"),
            |t| t.starts_with("guest: + ") && t.contains(&needle),
            STEP_DEADLINE,
        )
        .await
        .unwrap();
    let name = line
        .text
        .split_whitespace()
        .nth(2)
        .expect("disk name")
        .to_owned();
    (name, line)
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// VM tests

/// A VM boots to the marker; the root disk is attached as NVMe with its serial and really is
/// read-only; `-rtc base` sets the guest's clock.
#[tokio::test]
async fn vm_boots_to_marker_with_read_only_root_disk_and_given_clock() {
    let dir = run_dir("boot");
    let root = dir.join("root.img");
    std::fs::write(&root, vec![0xA5u8; 1 << 20]).unwrap();
    let spec = guest_spec("boot", &dir)
        .with_root_disk(&root)
        .with_rtc_base("2001-02-03T04:05:06");
    let (vm, ready) = boot(spec).await;
    let guest_uptime = ready
        .text
        .split("uptime=")
        .nth(1)
        .unwrap_or("?")
        .split(' ')
        .next()
        .unwrap_or("?");
    println!(
        "boot: console marker at {} after QEMU start (guest uptime {guest_uptime} s)",
        secs(ready.at)
    );
    assert!(
        ready.text.contains("date=2001-02-03T04:0"),
        "clock not from -rtc base: {}",
        ready.text
    );

    let mut console = vm.console();
    console
        .wait_for("guest: cmdline ", STEP_DEADLINE)
        .await
        .unwrap();
    let root_seen = console
        .wait_for(
            "guest: + nvme0n1 serial=spotinit-root sectors=2048",
            STEP_DEADLINE,
        )
        .await
        .unwrap();
    assert!(root_seen.at >= Duration::ZERO);

    let write = run_in_guest(
        &vm,
        "dd if=/dev/zero of=/dev/nvme0n1 bs=4096 count=1 conv=fsync",
    )
    .await;
    assert_ne!(
        write.rc,
        0,
        "writing the read-only root disk succeeded:\n{}",
        write.text()
    );
    assert_eq!(
        read_at(&root, 0, 4096),
        vec![0xA5u8; 4096],
        "root disk modified"
    );

    let log = std::fs::read_to_string(vm.console_log_path()).unwrap();
    let logged = log
        .lines()
        .find(|l| l.contains(READY_MARKER))
        .expect("marker in console.log");
    assert!(
        logged.starts_with('[') && logged.contains("] guest: ready"),
        "{logged}"
    );
    assert!(console.contains(READY_MARKER));
    assert!(!console.lines().is_empty());
}

/// A hot-plugged volume appears in the guest with its serial; after unplug it is gone from the
/// guest, QEMU has closed the file, the root port is free again; data the guest wrote is in it.
#[tokio::test]
async fn hotplugged_volume_appears_with_its_serial_and_unplug_removes_it() {
    let dir = run_dir("hotplug");
    let (vm, _) = boot(guest_spec("hotplug", &dir)).await;
    let mut console = vm.console();
    let volume = dir.join("vol-a.img");
    let other = dir.join("vol-b.img");
    sparse_file(&volume, 1);
    sparse_file(&other, 2);

    let plugged_at = vm.uptime();
    let plug = vm
        .hotplug_nvme(&volume, "vol0123456789abcdef0")
        .await
        .unwrap();
    let plug_returned = vm.uptime() - plugged_at;
    let (disk, seen) = wait_disk(&mut console, "vol0123456789abcdef0").await;
    assert!(seen.text.contains(" sectors=2097152 "), "{}", seen.text);
    println!(
        "attach: hotplug_nvme returned in {}, guest listed the disk {} after device_add",
        secs(plug_returned),
        secs(seen.at - plugged_at)
    );
    let pid = vm.pid().unwrap();
    assert!(process_has_open(pid, &volume));

    let plug_b = vm
        .hotplug_nvme(&other, "vol0fedcba9876543210")
        .await
        .unwrap();
    assert_ne!(plug.root_port(), plug_b.root_port());
    let (disk_b, seen_b) = wait_disk(&mut console, "vol0fedcba9876543210").await;
    assert!(seen_b.text.contains(" sectors=4194304 "), "{}", seen_b.text);
    assert_ne!(disk, disk_b);
    assert_eq!(vm.plugged_devices().len(), 2);

    let write = format!(
        "printf 'written-in-the-guest' | dd of=/dev/{disk} bs=512 seek=2048 conv=fsync 2>/dev/null"
    );
    let wrote = run_in_guest(&vm, &write).await;
    assert_eq!(wrote.rc, 0, "{}", wrote.text());

    let unplug_started = vm.uptime();
    vm.unplug(&plug, STEP_DEADLINE).await.unwrap();
    let unplug_returned = vm.uptime() - unplug_started;
    let gone = console
        .wait_for(&format!("guest: - {disk} "), STEP_DEADLINE)
        .await
        .unwrap();
    println!(
        "detach: unplug (device_del .. DEVICE_DELETED .. blockdev-del) took {}, guest saw the disk \
         gone {} after device_del",
        secs(unplug_returned),
        secs(gone.at.saturating_sub(unplug_started))
    );
    assert!(
        !process_has_open(pid, &volume),
        "QEMU still has {} open",
        volume.display()
    );
    assert!(process_has_open(pid, &other));
    assert_eq!(read_at(&volume, 2048 * 512, 20), b"written-in-the-guest");
    assert_eq!(vm.plugged_devices(), vec![plug_b.device_id().to_owned()]);

    // The port, the node name and the file can be used again.
    let again = vm
        .hotplug_nvme(&volume, "vol0123456789abcdef0")
        .await
        .unwrap();
    let (disk_again, _) = wait_disk(&mut console, "vol0123456789abcdef0").await;
    assert_ne!(disk_again, disk_b);
    let read =
        format!("dd if=/dev/{disk_again} bs=512 skip=2048 count=1 2>/dev/null | head -c 20; echo");
    let readback = run_in_guest(&vm, &read).await;
    assert!(
        readback.text().contains("written-in-the-guest"),
        "{}",
        readback.text()
    );
    vm.unplug(&again, STEP_DEADLINE).await.unwrap();
    vm.unplug(&plug_b, STEP_DEADLINE).await.unwrap();
    assert!(vm.plugged_devices().is_empty());
    assert!(!process_has_open(pid, &other));

    let bad = vm
        .hotplug_nvme(&volume, "vol0123456789abcdef01")
        .await
        .unwrap_err();
    assert!(bad.message().contains("21 bytes"), "{bad}");
    let missing = vm
        .hotplug_nvme(&dir.join("nope.img"), "vol1")
        .await
        .unwrap_err();
    assert!(missing.message().contains("nope.img"), "{missing}");
}

/// `system_powerdown` is the ACPI power button: the guest sees it and powers off; QEMU reports a
/// guest-initiated shutdown and exits with 0.
#[tokio::test]
async fn powerdown_reaches_the_guest_which_powers_off() {
    let dir = run_dir("powerdown");
    let (vm, _) = boot(guest_spec("powerdown", &dir)).await;
    let mut events = vm.subscribe_events();
    let mut console = vm.console_from_now();
    let pressed = vm.uptime();
    vm.powerdown().await.unwrap();
    events.wait_named("POWERDOWN", STEP_DEADLINE).await.unwrap();
    let seen = console
        .wait_for("guest: power button pressed", STEP_DEADLINE)
        .await
        .unwrap();
    let shutdown = events.wait_named("SHUTDOWN", STEP_DEADLINE).await.unwrap();
    assert_eq!(shutdown.data["guest"], json!(true), "{:?}", shutdown.data);
    assert_eq!(
        shutdown.data["reason"],
        json!("guest-shutdown"),
        "{:?}",
        shutdown.data
    );
    let status = vm.wait_exit(STEP_DEADLINE).await.unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
    println!(
        "powerdown: guest saw the button {} after system_powerdown, QEMU exited after {}",
        secs(seen.at - pressed),
        secs(vm.uptime() - pressed)
    );
}

/// `kill()` ends QEMU at once (SIGKILL); waits on the console and on QMP then fail at once, not at
/// their deadline.
#[tokio::test]
async fn kill_ends_qemu_at_once_and_waits_fail_early() {
    use std::os::unix::process::ExitStatusExt as _;
    let dir = run_dir("kill");
    let (vm, _) = boot(guest_spec("kill", &dir)).await;
    let killed = Instant::now();
    vm.kill();
    let status = vm.wait_exit(Duration::from_secs(10)).await.unwrap();
    let took = killed.elapsed();
    println!("kill: QEMU gone {} after kill()", secs(took));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    assert!(took < Duration::from_secs(5), "kill took {took:?}");
    assert!(vm.has_exited());

    let waited = Instant::now();
    let err = vm
        .console_from_now()
        .wait_for("never printed", Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(waited.elapsed() < Duration::from_secs(5));
    assert!(err.message().contains("QEMU exited"), "{err}");
    assert!(err.message().contains("killed by signal 9"), "{err}");
    let err = vm.execute("query-status", json!({})).await.unwrap_err();
    assert!(err.message().contains("closed"), "{err}");
    let err = vm
        .subscribe_events()
        .wait_named("SHUTDOWN", Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(err.message().contains("closed"), "{err}");
}

/// Two VMs at once: each has its own QMP socket, console and devices.
#[tokio::test]
async fn two_vms_run_at_once_with_their_own_qmp_and_console() {
    let dir = run_dir("two");
    let ((a, ready_a), (b, ready_b)) =
        tokio::join!(boot(guest_spec("a", &dir)), boot(guest_spec("b", &dir)));
    println!(
        "two VMs: markers at {} and {} after their starts",
        secs(ready_a.at),
        secs(ready_b.at)
    );
    assert_ne!(a.work_dir(), b.work_dir());
    assert_ne!(a.console_log_path(), b.console_log_path());
    assert_eq!(
        a.execute("query-name", json!({})).await.unwrap()["name"],
        json!("a")
    );
    assert_eq!(
        b.execute("query-name", json!({})).await.unwrap()["name"],
        json!("b")
    );
    assert!(a.console().contains("spotworld.vm=a") && !a.console().contains("spotworld.vm=b"));
    assert!(b.console().contains("spotworld.vm=b") && !b.console().contains("spotworld.vm=a"));

    let volume = dir.join("vol.img");
    sparse_file(&volume, 1);
    let mut console_a = a.console();
    let plug = a
        .hotplug_nvme(&volume, "vol0aaaaaaaaaaaaaaaa")
        .await
        .unwrap();
    let (disk, _) = wait_disk(&mut console_a, "vol0aaaaaaaaaaaaaaaa").await;
    let listed_b = run_in_guest(&b, "ls /sys/block").await;
    assert_eq!(listed_b.rc, 0);
    assert!(
        !listed_b.text().contains(&disk),
        "B sees A's volume: {}",
        listed_b.text()
    );
    assert!(!b.console().contains("vol0aaaaaaaaaaaaaaaa"));
    a.unplug(&plug, STEP_DEADLINE).await.unwrap();

    b.kill();
    b.wait_exit(STEP_DEADLINE).await.unwrap();
    assert!(!a.has_exited(), "killing B ended A");
    assert_eq!(run_in_guest(&a, "true").await.rc, 0);
}

/// A console wait that times out says what it waited for and carries the console tail and the
/// log path; so does a QMP event wait.
#[tokio::test]
async fn timeout_error_names_the_marker_and_carries_the_console_tail() {
    let dir = run_dir("timeout");
    let (vm, _) = boot(guest_spec("timeout", &dir)).await;
    let err = vm
        .console()
        .wait_for("no-such-marker", Duration::from_secs(2))
        .await
        .unwrap_err();
    let message = err.message();
    println!("timeout error as printed:\n{err}");
    assert!(message.contains("timed out after 2.0 s"), "{message}");
    assert!(message.contains("\"no-such-marker\""), "{message}");
    assert!(
        message.contains(&vm.console_log_path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("] guest: ready"), "{message}");
    let tail_lines = message.lines().filter(|l| l.starts_with("  [")).count();
    assert!((1..=40).contains(&tail_lines), "{tail_lines} tail lines");
    let err = vm
        .subscribe_events()
        .wait_named("NEVER_EMITTED", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.message().contains("NEVER_EMITTED"), "{err}");
    assert!(err.message().contains("] guest: ready"), "{err}");
}

/// User networking: the guest reaches a host service at 169.254.169.254:80 (where IMDS lives)
/// and the host reaches a guest service through a forwarded port.
#[tokio::test]
async fn network_forwards_reach_a_host_service_as_imds_and_a_guest_port() {
    let dir = run_dir("network");
    let imds = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let imds_port = imds.local_addr().unwrap().port();
    let requests = Arc::new(AtomicU64::new(0));
    let served = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = imds.accept().await {
            served.fetch_add(1, Ordering::Relaxed);
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let body = "i-0123456789abcdef0";
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        }
    });
    let spec = guest_spec("network", &dir)
        .with_subnet("169.254.0.0/16")
        .with_guest_forward(Ipv4Addr::new(169, 254, 169, 254), 80, imds_port)
        .with_host_forward(0, 8080);
    let (vm, _) = boot(spec).await;
    // slirp's DHCP hands out an address inside the subnet (169.254.2.15 today).
    let eth0 = vm
        .console()
        .wait_for("guest: eth0 ", STEP_DEADLINE)
        .await
        .unwrap();
    assert!(
        eth0.text.starts_with("guest: eth0 169.254.") && eth0.text.ends_with("/16"),
        "{}",
        eth0.text
    );

    let fetched = run_in_guest(
        &vm,
        "wget -q -O - http://169.254.169.254/latest/meta-data/instance-id; echo",
    )
    .await;
    assert_eq!(fetched.rc, 0, "{}", fetched.text());
    assert!(
        fetched.text().contains("i-0123456789abcdef0"),
        "{}",
        fetched.text()
    );
    assert_eq!(requests.load(Ordering::Relaxed), 1);

    let serving = run_in_guest(
        &vm,
        "mkdir -p /www && echo served-by-the-guest > /www/index.html && httpd -p 8080 -h /www",
    )
    .await;
    assert_eq!(serving.rc, 0, "{}", serving.text());
    let host_port = vm.host_port(8080).expect("forwarded port");
    let body = http_get_until_served(host_port, "/index.html", STEP_DEADLINE).await;
    assert!(body.contains("served-by-the-guest"), "{body}");
}

/// GET from a forwarded port, retrying while the guest side is not answering yet.
async fn http_get_until_served(port: u16, path: &str, deadline: Duration) -> String {
    let until = Instant::now() + deadline;
    loop {
        let attempt = async {
            let mut conn = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
            conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                .await?;
            let mut response = String::new();
            conn.read_to_string(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        match attempt.await {
            Ok(response) if response.starts_with("HTTP/") => return response,
            result if Instant::now() > until => panic!("GET 127.0.0.1:{port}{path}: {result:?}"),
            // slirp accepts on the host side before the guest answers and resets if it does not.
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// UEFI: OVMF in pflash with a writable copy of the variables boots the guest kernel.
#[tokio::test]
async fn uefi_firmware_boots_the_guest_kernel() {
    let dir = run_dir("uefi");
    for f in [
        spotworld::qemu::OVMF_CODE,
        spotworld::qemu::OVMF_VARS_TEMPLATE,
    ] {
        assert!(Path::new(f).is_file(), "{f} missing: apt-get install ovmf");
    }
    let spec = guest_spec("uefi", &dir).with_firmware(Firmware::ovmf());
    let (vm, ready) = boot(spec).await;
    println!(
        "uefi: console marker at {} after QEMU start",
        secs(ready.at)
    );
    assert!(vm.work_dir().join("OVMF_VARS.fd").is_file());
    let args = std::fs::read_to_string(vm.work_dir().join("qemu-cmdline.sh")).unwrap();
    assert!(
        args.contains(
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
        ),
        "{args}"
    );
    let efi = run_in_guest(&vm, "ls /sys/firmware/efi >/dev/null && echo efi-booted").await;
    assert!(efi.text().contains("efi-booted"), "{}", efi.text());
}

// ---------------------------------------------------------------------------------------------
// EBS bridge

/// Volumes are sparse files of their size; a snapshot freezes a volume's bytes at that moment; a
/// volume from a snapshot starts with exactly those bytes.
#[tokio::test]
async fn ebs_snapshot_freezes_bytes_and_volume_from_it_starts_with_them() {
    let dir = run_dir("ebs-files");
    let ebs = EbsBridge::new(dir.join("ebs")).unwrap();
    let (a, b, c, d) = (
        "vol-0aaaaaaaaaaaaaaa1",
        "vol-0bbbbbbbbbbbbbbb2",
        "vol-0ccccccccccccccc3",
        "vol-0ddddddddddddddd4",
    );
    let snap = "snap-0123456789abcdef0";
    ebs.volume_created(a, 1, None).await.unwrap();
    ebs.volume_created(b, 2, None).await.unwrap();
    assert_eq!(std::fs::metadata(ebs.volume_file(a)).unwrap().len(), GIB);
    assert_eq!(
        std::fs::metadata(ebs.volume_file(b)).unwrap().len(),
        2 * GIB
    );
    assert!(
        allocated_bytes(&ebs.volume_file(b)) < 1 << 20,
        "volume not sparse"
    );

    let far = 512 * (1 << 20) + 3;
    write_at(&ebs.volume_file(a), 0, b"before-snapshot@0");
    write_at(&ebs.volume_file(a), far, b"before-snapshot@far");
    ebs.snapshot_created(snap, a).await.unwrap();
    write_at(&ebs.volume_file(a), 0, b"after--snapshot@0");

    ebs.volume_created(c, 1, Some(snap)).await.unwrap();
    ebs.volume_created(d, 3, Some(snap)).await.unwrap();
    for v in [c, d] {
        let file = ebs.volume_file(v);
        assert_eq!(read_at(&file, 0, 17), b"before-snapshot@0", "{v}");
        assert_eq!(read_at(&file, far, 19), b"before-snapshot@far", "{v}");
        assert!(
            allocated_bytes(&file) < 1 << 20,
            "{v} not sparse: {}",
            allocated_bytes(&file)
        );
    }
    assert_eq!(
        std::fs::metadata(ebs.volume_file(d)).unwrap().len(),
        3 * GIB
    );
    assert_eq!(read_at(&ebs.volume_file(a), 0, 17), b"after--snapshot@0");
    assert_eq!(read_at(&ebs.volume_file(b), 0, 17), vec![0u8; 17]);
    assert_eq!(
        read_at(&ebs.snapshot_file(snap), far, 19),
        b"before-snapshot@far"
    );

    let e = ebs.attach("i-0123456789abcdef0", a).await.unwrap_err();
    assert!(
        e.contains("no VM is registered for instance i-0123456789abcdef0"),
        "{e}"
    );
    let e = ebs.volume_created(a, 1, None).await.unwrap_err();
    assert!(e.contains("already exists"), "{e}");
    let e = ebs
        .snapshot_created("snap-0000000000000000a", "vol-0000000000000000f")
        .await
        .unwrap_err();
    assert!(e.contains("vol-0000000000000000f"), "{e}");
    let e = ebs
        .volume_created("vol-0eeeeeeeeeeeeeee5", 1, Some("snap-missing"))
        .await
        .unwrap_err();
    assert!(e.contains("snap-missing"), "{e}");
    let e = ebs.volume_created("../escape", 1, None).await.unwrap_err();
    assert!(e.contains("not a plain EC2 id"), "{e}");
    assert_eq!(nvme_serial(a).unwrap(), "vol0aaaaaaaaaaaaaaa1");
}

/// Through the hooks, with a VM: attach plugs the volume in with its serial, a snapshot of the
/// attached volume is point-in-time while the guest keeps running, detach unplugs it with the
/// guest's writes in the file, and instance_gone kills the VM and forgets its plugs.
#[tokio::test]
async fn ebs_attach_snapshot_detach_follow_the_hooks_in_a_vm() {
    let dir = run_dir("ebs-vm");
    let ebs = EbsBridge::new(dir.join("ebs")).unwrap();
    let (vm, _) = boot(guest_spec("ebs", &dir)).await;
    let vm = Arc::new(vm);
    let instance = "i-0123456789abcdef0";
    let (volume, copy) = ("vol-0123456789abcdef0", "vol-0fedcba9876543210");
    let snap = "snap-0123456789abcdef0";
    ebs.register_instance(instance, vm.clone());
    ebs.volume_created(volume, 1, None).await.unwrap();

    let mut console = vm.console();
    let attach_started = vm.uptime();
    ebs.attach(instance, volume).await.unwrap();
    assert_eq!(ebs.attached_to(volume).as_deref(), Some(instance));
    let (disk, seen) = wait_disk(&mut console, "vol0123456789abcdef0").await;
    println!(
        "ebs attach: guest listed the volume {} after the hook began",
        secs(seen.at - attach_started)
    );
    let e = ebs.attach(instance, volume).await.unwrap_err();
    assert!(e.contains("still plugged into instance"), "{e}");

    let at_1mib = format!("dd of=/dev/{disk} bs=512 seek=2048 conv=fsync 2>/dev/null");
    assert_eq!(
        run_in_guest(&vm, &format!("printf before-snapshot | {at_1mib}"))
            .await
            .rc,
        0
    );
    ebs.snapshot_created(snap, volume).await.unwrap();
    assert_eq!(
        vm.execute("query-status", json!({})).await.unwrap()["status"],
        json!("running")
    );
    assert_eq!(
        run_in_guest(&vm, &format!("printf after--snapshot | {at_1mib}"))
            .await
            .rc,
        0
    );

    let detach_started = vm.uptime();
    ebs.detach(instance, volume).await.unwrap();
    let gone = console
        .wait_for(&format!("guest: - {disk} "), STEP_DEADLINE)
        .await
        .unwrap();
    println!(
        "ebs detach: hook returned after {}, guest saw the volume gone {} after it began",
        secs(vm.uptime() - detach_started),
        secs(gone.at.saturating_sub(detach_started))
    );
    assert_eq!(ebs.attached_to(volume), None);
    assert_eq!(
        read_at(&ebs.volume_file(volume), 1 << 20, 15),
        b"after--snapshot"
    );
    assert_eq!(
        read_at(&ebs.snapshot_file(snap), 1 << 20, 15),
        b"before-snapshot"
    );
    ebs.volume_created(copy, 1, Some(snap)).await.unwrap();
    assert_eq!(
        read_at(&ebs.volume_file(copy), 1 << 20, 15),
        b"before-snapshot"
    );

    // The copy goes in; then the instance is lost with it attached.
    ebs.attach(instance, copy).await.unwrap();
    wait_disk(&mut console, "vol0fedcba9876543210").await;
    ebs.instance_gone(instance).await;
    assert!(vm.has_exited(), "instance_gone left QEMU running");
    assert_eq!(ebs.attached_to(copy), None);
    let e = ebs.attach(instance, volume).await.unwrap_err();
    assert!(e.contains(instance), "{e}");
}
