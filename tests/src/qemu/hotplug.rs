//! NVMe hot-plug: volumes plugged into a VM's free PCIe root ports over QMP, and unplugged with
//! the guest's cooperation.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use super::args::root_port_id;
use super::{Error, Result, Vm, HOTPLUG_PORTS, NVME_SERIAL_MAX};

/// A volume plugged into a VM: what [`Vm::unplug`] needs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PlugId {
    port: usize,
    device: String,
    node: String,
    serial: String,
    file: PathBuf,
}

impl PlugId {
    /// QEMU device id (`device_del`, `DEVICE_DELETED`).
    pub fn device_id(&self) -> &str {
        &self.device
    }
    /// The `pcie-root-port` id it sits on, e.g. `rp3`.
    pub fn root_port(&self) -> String {
        root_port_id(self.port)
    }
}

impl Vm {
    /// Hot-plug `volume_file` as an NVMe controller with this serial on a free root port. Returns
    /// once QEMU added the device; the guest notices it a moment later (PCIe/ACPI hot-plug), as a
    /// real instance notices an EBS attachment after the API said `attached`.
    pub async fn hotplug_nvme(&self, volume_file: &Path, serial: &str) -> Result<PlugId> {
        let what = format!(
            "VM {}: hot-plug {} as NVMe serial {serial:?}",
            self.name(),
            volume_file.display()
        );
        validate_serial(serial).map_err(|e| e.context(&what))?;
        let file =
            std::path::absolute(volume_file).map_err(|e| Error::new(format!("{what}: {e}")))?;
        if !file.is_file() {
            return Err(Error::new(format!("{what}: no such file")));
        }
        let seq = self.plug_seq.fetch_add(1, Ordering::Relaxed);
        let device = format!("nvme{seq}-{serial}");
        let node = format!("blk{seq}-{serial}");
        let port = {
            let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
            let free = ports.iter().position(Option::is_none).ok_or_else(|| {
                Error::new(format!(
                    "{what}: all {HOTPLUG_PORTS} hot-plug root ports are taken"
                ))
            })?;
            ports[free] = Some(device.clone());
            free
        };
        let plug = PlugId {
            port,
            device,
            node,
            serial: serial.to_owned(),
            file,
        };
        if let Err(e) = self
            .qmp
            .execute(
                "blockdev-add",
                json!({
                    "driver": "raw",
                    "node-name": plug.node,
                    // The guest's TRIM punches holes: volume files stay sparse.
                    "discard": "unmap",
                    "file": { "driver": "file", "filename": plug.file },
                }),
            )
            .await
        {
            self.free_port(&plug);
            return Err(e.context(&what));
        }
        if let Err(e) = self
            .qmp
            .execute(
                "device_add",
                json!({
                    "driver": "nvme",
                    "id": plug.device,
                    "drive": plug.node,
                    "serial": plug.serial,
                    "bus": plug.root_port(),
                }),
            )
            .await
        {
            let rollback = self
                .qmp
                .execute("blockdev-del", json!({ "node-name": plug.node }))
                .await
                .err()
                .map(|r| format!(" (and rolling back blockdev-add failed: {r})"))
                .unwrap_or_default();
            self.free_port(&plug);
            return Err(Error::new(format!("{what}: {e}{rollback}")));
        }
        Ok(plug)
    }

    /// Hot-unplug: `device_del`, wait for the guest to release the device (`DEVICE_DELETED`: this
    /// needs the guest's cooperation through ACPI), then `blockdev-del` so QEMU closes the file.
    pub async fn unplug(&self, plug: &PlugId, deadline: Duration) -> Result<()> {
        let what = format!(
            "VM {}: unplug device {} ({} as serial {:?})",
            self.name(),
            plug.device,
            plug.file.display(),
            plug.serial
        );
        let mut events = self.qmp.subscribe();
        if let Err(e) = self
            .qmp
            .execute("device_del", json!({ "id": plug.device }))
            .await
        {
            // A second attempt after a timed-out one finds the unplug already under way: wait on.
            if !e.message().contains("in the process of unplug") {
                return Err(e.context(&what));
            }
        }
        events
            .wait_device_deleted(&plug.device, deadline)
            .await
            .map_err(|e| {
                e.context(format!(
                "{what}: the guest did not release the device (hot-unplug needs its cooperation: \
                 is it booted, does it handle ACPI/PCIe hot-plug?)"
            ))
            })?;
        self.qmp
            .execute("blockdev-del", json!({ "node-name": plug.node }))
            .await
            .map_err(|e| e.context(&what))?;
        self.free_port(plug);
        Ok(())
    }

    /// What is plugged now (device ids by root port), for diagnostics.
    pub fn plugged_devices(&self) -> Vec<String> {
        let ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        ports.iter().flatten().cloned().collect()
    }

    fn free_port(&self, plug: &PlugId) {
        let mut ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        if ports[plug.port].as_deref() == Some(plug.device.as_str()) {
            ports[plug.port] = None;
        }
    }
}

/// NVMe serials: at most 20 printable ASCII bytes (QEMU would truncate a longer one silently).
pub fn validate_serial(serial: &str) -> Result<()> {
    if serial.is_empty() || serial.len() > NVME_SERIAL_MAX {
        return Err(Error::new(format!(
            "NVMe serial {serial:?} is {} bytes; it must be 1 to {NVME_SERIAL_MAX}",
            serial.len()
        )));
    }
    if !serial.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::new(format!(
            "NVMe serial {serial:?} must be printable ASCII without spaces"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_longer_than_twenty_bytes_or_with_spaces_are_refused() {
        assert!(validate_serial("vol0123456789abcdef0").is_ok());
        assert!(validate_serial("vol0123456789abcdef01").is_err());
        assert!(validate_serial("").is_err());
        assert!(validate_serial("vol 1").is_err());
    }
}
