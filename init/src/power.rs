//! Everything that asks spotinit to stop: SIGTERM, SIGINT (ctrl-alt-del), SIGPWR, SIGUSR2
//! (busybox `poweroff`), and the ACPI power button, which EC2 presses on stop and terminate.
//! The button is read from its input event device: no acpid.

use crate::machine::{Request, Then};
use crate::sys::Paths;
use std::io::Read;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// Forwards signals as shutdown requests. `then` is what follows the drain (power off for
/// PID 1, exit for a service).
pub fn listen_signals(tx: mpsc::UnboundedSender<Request>, then: Then) {
    use tokio::signal::unix::{signal, SignalKind};
    let kinds = [
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::interrupt(), "SIGINT (ctrl-alt-del)"),
        (SignalKind::from_raw(libc::SIGPWR), "SIGPWR"),
        (SignalKind::user_defined2(), "SIGUSR2 (poweroff)"),
    ];
    for (kind, name) in kinds {
        match signal(kind) {
            Ok(mut s) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        let _ = tx.send(Request::new(format!("received {name}"), then));
                    }
                });
            }
            Err(e) => crate::log!("cannot listen for {name}: {e}"),
        }
    }
}

/// `event0=Power Button`-style names of every input event device, for messages.
pub fn input_devices(paths: &Paths) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(paths.p("/sys/class/input")) else {
        return vec!["none: /sys/class/input is missing".into()];
    };
    let mut v: Vec<String> = rd
        .flatten()
        .map(|e| {
            let name = std::fs::read_to_string(e.path().join("device/name"))
                .or_else(|_| std::fs::read_to_string(e.path().join("name")))
                .unwrap_or_default();
            format!("{}={}", e.file_name().to_string_lossy(), name.trim())
        })
        .collect();
    v.sort();
    v
}

/// Input event devices whose name is "Power Button".
pub fn power_buttons(paths: &Paths) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(paths.p("/sys/class/input")) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("device/name"))
                .map(|n| n.trim() == "Power Button")
                .unwrap_or(false)
        })
        .map(|e| paths.p("/dev/input").join(e.file_name()))
        .collect();
    v.sort();
    v
}

const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// struct input_event on 64-bit: struct timeval (16 bytes), type u16, code u16, value i32.
const EVENT_SIZE: usize = 24;

/// Is this input event a press of the power key?
pub fn is_power_press(ev: &[u8; EVENT_SIZE]) -> bool {
    let ty = u16::from_ne_bytes([ev[16], ev[17]]);
    let code = u16::from_ne_bytes([ev[18], ev[19]]);
    let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
    ty == EV_KEY && code == KEY_POWER && value == 1
}

/// Watches every power button (each on a small thread: the reads block) and sends a request
/// per press.
pub fn listen_power_button(paths: &Paths, tx: mpsc::UnboundedSender<Request>) -> usize {
    let buttons = power_buttons(paths);
    for dev in &buttons {
        let (dev, tx) = (dev.clone(), tx.clone());
        std::thread::spawn(move || read_button(&dev, tx));
    }
    buttons.len()
}

fn read_button(dev: &Path, tx: mpsc::UnboundedSender<Request>) {
    let Ok(mut f) = std::fs::File::open(dev) else {
        crate::log!("cannot open the power button {}", dev.display());
        return;
    };
    let mut ev = [0u8; EVENT_SIZE];
    while f.read_exact(&mut ev).is_ok() {
        if is_power_press(&ev) {
            let _ = tx.send(Request::new("ACPI power button pressed", Then::PowerOff));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: u16, code: u16, value: i32) -> [u8; EVENT_SIZE] {
        let mut e = [0u8; EVENT_SIZE];
        e[16..18].copy_from_slice(&ty.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_power_key_press_counts() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)));
        assert!(!is_power_press(&event(EV_KEY, 28, 1)));
        assert!(!is_power_press(&event(0, 0, 0)));
    }

    #[test]
    fn power_buttons_are_found_by_name() {
        let root = std::env::temp_dir().join(format!("spotinit-pwr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (ev, name) in [
            ("event0", "Power Button"),
            ("event1", "AT Translated Set 2 keyboard"),
        ] {
            let d = root.join("sys/class/input").join(ev).join("device");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
        }
        let b = power_buttons(&Paths::under(&root));
        assert_eq!(b, vec![root.join("dev/input/event0")]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
