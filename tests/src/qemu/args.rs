//! The QEMU command line made from a [`VmSpec`]: host ports picked for the forwards, the
//! arguments, and their shell-quoted form written next to the logs.

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

use super::{Error, Firmware, HostForward, Result, VmSpec, HOTPLUG_PORTS, ROOT_DISK_SERIAL};

pub(super) fn resolve_host_forwards(requested: &[HostForward]) -> Result<Vec<HostForward>> {
    // Every listener stays open until all ports are picked: released one by one, the kernel
    // could hand the same port out twice (seen: QEMU refusing a spec with a port in it twice).
    let mut held = Vec::new();
    let resolved = requested
        .iter()
        .map(|f| {
            if f.host_port != 0 {
                return Ok(*f);
            }
            // Ask the kernel for a free port; QEMU binds it a moment later (a small race that
            // shows as QEMU refusing to start, with its reason in the error).
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .map_err(|e| Error::new(format!("pick a free host port: {e}")))?;
            let port = listener
                .local_addr()
                .map_err(|e| Error::new(format!("pick a free host port: {e}")))?
                .port();
            held.push(listener);
            Ok(HostForward {
                host_port: port,
                guest_port: f.guest_port,
            })
        })
        .collect();
    drop(held);
    resolved
}

pub(super) fn build_args(
    spec: &VmSpec,
    work_dir: &Path,
    qmp_socket: &Path,
    host_forwards: &[HostForward],
) -> Result<Vec<String>> {
    let must_exist = |what: &str, path: &Path| -> Result<String> {
        if !path.exists() {
            return Err(Error::new(format!("{what} {} not found", path.display())));
        }
        Ok(path.display().to_string())
    };
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &spec.name]);
    push(&["-machine", "q35,accel=tcg", "-cpu", "max"]);
    push(&[
        "-m",
        &spec.memory_mib.to_string(),
        "-smp",
        &spec.cpus.to_string(),
    ]);
    push(&["-display", "none", "-no-reboot", "-nodefaults"]);
    // The console is QEMU's stdout; the monitor is QMP only.
    push(&[
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
    ]);

    if let Firmware::Uefi {
        code,
        vars_template,
    } = &spec.firmware
    {
        let code = must_exist("OVMF code (package ovmf)", code)?;
        let template = must_exist("OVMF variables template (package ovmf)", vars_template)?;
        let vars = work_dir.join("OVMF_VARS.fd");
        std::fs::copy(&template, &vars)
            .map_err(|e| Error::new(format!("copy {template} to {}: {e}", vars.display())))?;
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"),
        ]);
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
        ]);
    }
    if let Some(k) = &spec.kernel {
        push(&["-kernel", &must_exist("kernel", &k.kernel)?]);
        if let Some(initrd) = &k.initrd {
            push(&["-initrd", &must_exist("initrd", initrd)?]);
        }
        push(&["-append", &k.append]);
    }
    if let Some(root) = &spec.root_disk {
        let root = must_exist("root disk", root)?;
        check_drive_path(&root)?;
        push(&[
            "-drive",
            &format!("file={root},if=none,id=root,format=raw,readonly=on"),
        ]);
        push(&[
            "-device",
            &format!("nvme,drive=root,serial={ROOT_DISK_SERIAL},bus=pcie.0"),
        ]);
    }
    for i in 0..HOTPLUG_PORTS {
        let n = i + 1;
        push(&[
            "-device",
            &format!(
                "pcie-root-port,id={},bus=pcie.0,chassis={n},slot={n}",
                root_port_id(i)
            ),
        ]);
    }

    let mut netdev = String::from("user,id=n0");
    if let Some(subnet) = &spec.network.subnet {
        netdev.push_str(&format!(",net={subnet}"));
    }
    for f in host_forwards {
        netdev.push_str(&format!(
            ",hostfwd=tcp:127.0.0.1:{}-:{}",
            f.host_port, f.guest_port
        ));
    }
    for f in &spec.network.guest_forwards {
        netdev.push_str(&format!(
            ",guestfwd=tcp:{}:{}-cmd:busybox nc 127.0.0.1 {}",
            f.guest.ip(),
            f.guest.port(),
            f.host_port
        ));
    }
    push(&["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"]);

    if let Some(base) = &spec.rtc_base {
        push(&["-rtc", &format!("base={base}")]);
    }
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp_socket.display()),
    ]);
    args.extend(spec.extra_args.iter().cloned());
    Ok(args)
}

/// QEMU's `-drive` option syntax treats commas specially; refuse instead of escaping.
fn check_drive_path(path: &str) -> Result<()> {
    if path.contains(',') {
        return Err(Error::new(format!(
            "disk path {path:?} contains a comma, which -drive cannot take"
        )));
    }
    Ok(())
}

pub(super) fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=,.:/@+".contains(&b))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The id of the `index`th `pcie-root-port` (from 0): `rp1`, `rp2`, …
pub(super) fn root_port_id(index: usize) -> String {
    format!("rp{}", index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_forwards_of_one_vm_never_share_a_port() {
        let requested: Vec<HostForward> = (0..64)
            .map(|g| HostForward {
                host_port: 0,
                guest_port: 8000 + g,
            })
            .collect();
        let resolved = resolve_host_forwards(&requested).unwrap();
        let mut ports: Vec<u16> = resolved.iter().map(|f| f.host_port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 64, "a port was handed out twice");
    }

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("-m"), "-m");
        assert_eq!(shell_quote("console=ttyS0 quiet"), "'console=ttyS0 quiet'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
