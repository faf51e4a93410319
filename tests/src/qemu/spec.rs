//! What to start: a VM's description ([`VmSpec`]) and its builder methods.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use super::{DEFAULT_CPUS, DEFAULT_MEMORY_MIB, OVMF_CODE, OVMF_VARS_TEMPLATE, QEMU_BINARY};

/// Everything that defines one VM. Build it with [`VmSpec::direct_kernel`] or [`VmSpec::uefi`] and
/// the `with_*` methods, or set the fields directly.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Shown in errors and logs; also QEMU's `-name`.
    pub name: String,
    /// Console log, QMP socket and log, UEFI variables: created if missing.
    pub work_dir: PathBuf,
    pub firmware: Firmware,
    /// `-kernel/-initrd/-append`: works with both firmwares (OVMF loads it through fw_cfg).
    pub kernel: Option<DirectKernel>,
    /// Attached read-only as NVMe with serial [`ROOT_DISK_SERIAL`](super::ROOT_DISK_SERIAL): never modified, so every VM
    /// boots a pristine copy.
    pub root_disk: Option<PathBuf>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub network: UserNet,
    /// `-rtc base=…` (`utc`, `localtime` or a date like `2006-06-17T16:01:21`): a wrong guest clock.
    pub rtc_base: Option<String>,
    /// Appended to the command line as they are.
    pub extra_args: Vec<String>,
    pub qemu_binary: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// QEMU's default (SeaBIOS); with a direct kernel it boots fastest.
    Bios,
    /// OVMF in pflash: read-only code, and a fresh writable copy of the variables template in the
    /// work dir at every start (a new instance has a new NVRAM).
    Uefi {
        code: PathBuf,
        vars_template: PathBuf,
    },
}

impl Firmware {
    /// Debian's OVMF (package `ovmf`), 4 MiB flavour, without secure boot.
    pub fn ovmf() -> Self {
        Firmware::Uefi {
            code: OVMF_CODE.into(),
            vars_template: OVMF_VARS_TEMPLATE.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectKernel {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Kernel command line; include `console=ttyS0` to see anything on the console.
    pub append: String,
}

/// QEMU user-mode networking (slirp): one virtio-net NIC, no privileges needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserNet {
    /// The virtual network, e.g. `169.254.0.0/16` (default `10.0.2.0/24`). A guest forward's address
    /// must lie inside it: use `169.254.0.0/16` to serve IMDS at 169.254.169.254.
    pub subnet: Option<String>,
    pub host_forwards: Vec<HostForward>,
    pub guest_forwards: Vec<GuestForward>,
}

/// `127.0.0.1:host_port` on the host reaches `guest_port` in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostForward {
    /// 0: pick a free port at start; read it back with [`Vm::host_port`](super::Vm::host_port).
    pub host_port: u16,
    pub guest_port: u16,
}

/// A TCP connection from the guest to `guest` reaches `127.0.0.1:host_port` on the host. Each
/// connection runs `busybox nc` on the host (slirp's `guestfwd=…-cmd:`): a plain chardev target
/// would carry only one connection for the VM's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestForward {
    pub guest: SocketAddrV4,
    pub host_port: u16,
}

impl VmSpec {
    fn base(name: &str, work_dir: &Path, firmware: Firmware) -> Self {
        VmSpec {
            name: name.to_owned(),
            work_dir: work_dir.to_owned(),
            firmware,
            kernel: None,
            root_disk: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: DEFAULT_CPUS,
            network: UserNet::default(),
            rtc_base: None,
            extra_args: Vec::new(),
            qemu_binary: QEMU_BINARY.into(),
        }
    }

    /// Direct kernel boot under SeaBIOS: the fastest way to PID 1.
    pub fn direct_kernel(
        name: &str,
        work_dir: &Path,
        kernel: &Path,
        initrd: Option<&Path>,
        append: &str,
    ) -> Self {
        let mut spec = Self::base(name, work_dir, Firmware::Bios);
        spec.kernel = Some(DirectKernel {
            kernel: kernel.to_owned(),
            initrd: initrd.map(Path::to_owned),
            append: append.to_owned(),
        });
        spec
    }

    /// UEFI boot (OVMF) from the root disk's ESP.
    pub fn uefi(name: &str, work_dir: &Path, root_disk: &Path) -> Self {
        let mut spec = Self::base(name, work_dir, Firmware::ovmf());
        spec.root_disk = Some(root_disk.to_owned());
        spec
    }

    pub fn with_firmware(mut self, firmware: Firmware) -> Self {
        self.firmware = firmware;
        self
    }
    pub fn with_root_disk(mut self, path: &Path) -> Self {
        self.root_disk = Some(path.to_owned());
        self
    }
    pub fn with_memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }
    pub fn with_cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }
    pub fn with_subnet(mut self, subnet: &str) -> Self {
        self.network.subnet = Some(subnet.to_owned());
        self
    }
    /// Forward `127.0.0.1:host_port` (0 = pick one) to `guest_port`.
    pub fn with_host_forward(mut self, host_port: u16, guest_port: u16) -> Self {
        self.network.host_forwards.push(HostForward {
            host_port,
            guest_port,
        });
        self
    }
    /// Let the guest reach `127.0.0.1:host_port` as `guest_addr:guest_port`.
    pub fn with_guest_forward(
        mut self,
        guest_addr: Ipv4Addr,
        guest_port: u16,
        host_port: u16,
    ) -> Self {
        self.network.guest_forwards.push(GuestForward {
            guest: SocketAddrV4::new(guest_addr, guest_port),
            host_port,
        });
        self
    }
    pub fn with_rtc_base(mut self, base: &str) -> Self {
        self.rtc_base = Some(base.to_owned());
        self
    }
}
