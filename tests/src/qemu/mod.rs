//! A QEMU instance (q35, TCG) with its serial console and its QMP socket.
//!
//! One [`Vm`] is one simulated EC2 instance: a `qemu-system-x86_64` process booted from a root disk
//! attached read-only (every VM boots a pristine copy of the image), with
//! - the serial console captured line by line, timestamped, written to `<work_dir>/console.log` and
//!   kept in memory so a test can wait for markers in order ([`ConsoleCursor`]);
//! - a QMP client on `<work_dir>/qmp.sock` for commands and events ([`Qmp`], [`QmpEvents`]), logged
//!   to `<work_dir>/qmp.log`;
//! - eight PCIe root ports to hot-plug NVMe volumes into ([`Vm::hotplug_nvme`], [`Vm::unplug`]);
//! - user-mode networking with host→guest port forwards and guest→host forwards (IMDS at
//!   169.254.169.254 inside the guest, served by a process on the host's loopback).
//!
//! There is no KVM here (`/dev/kvm` exists but cannot run a guest), so everything is TCG and slow:
//! every wait is on a condition with a deadline, never a fixed sleep.
//!
//! One file per part: [`VmSpec`] and the command line made from it (`spec`, `args`), the state
//! the VM handle shares with its background tasks (`state`), the console (`console`), QMP
//! (`qmp`), the VM itself (`vm`) and NVMe hot-plug (`hotplug`).

mod args;
mod console;
mod error;
mod hotplug;
mod qmp;
mod spec;
mod state;
mod vm;

pub use console::{ConsoleCursor, ConsoleLine};
pub use error::{Error, Result};
pub use hotplug::{validate_serial, PlugId};
pub use qmp::{Qmp, QmpEvent, QmpEvents};
pub use spec::{DirectKernel, Firmware, GuestForward, HostForward, UserNet, VmSpec};
pub use vm::Vm;

/// Hot-plug slots (`pcie-root-port`s) every VM gets: one volume each.
pub const HOTPLUG_PORTS: usize = 8;
pub const DEFAULT_MEMORY_MIB: u32 = 2048;
pub const DEFAULT_CPUS: u32 = 2;
/// NVMe serial of the root disk, so the guest can tell it from EBS volumes (`vol…`).
pub const ROOT_DISK_SERIAL: &str = "spotinit-root";
/// NVMe serials are 20 bytes (NVMe base spec, Identify Controller SN); QEMU truncates silently.
pub const NVME_SERIAL_MAX: usize = 20;
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS_TEMPLATE: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
