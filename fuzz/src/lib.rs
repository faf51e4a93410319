//! Fuzz targets for what spotinit, PID 1, parses from outside: EC2 user data and the kernel
//! command line, IMDS documents, kernel tables (/proc/self/mountinfo, uevents), and the files
//! on the state volume and in /run that other programs write. Each target is a function of
//! `&[u8]` that must never panic nor hang, whatever the bytes: PID 1 catches a panic but then
//! falls to a safe state, not a running Docker host, and a hang stops the boot or the drain.
//!
//! One binary per target (`src/bin/<target>.rs`, a line each), not one binary that takes the
//! target's name: AFL++ keeps one coverage map per binary, so each map holds only the edges
//! its target can reach (denser, faster to compare after every execution), and the paths,
//! stability and crashes AFL++ reports are that target's alone. The targets themselves live
//! here, so the same code runs under AFL++ and in plain builds.
//!
//! Built by `cargo afl build` (with `--cfg fuzzing`), a binary is a persistent-mode AFL++
//! target; run by hand, it reads one input from standard input, which reproduces a crash with
//! the panic's message: `build/fuzz-target/release/config < crash-file`. Built by plain cargo,
//! it runs over the files named on its command line, with an ordinary panic and backtrace (a
//! debug build: overflow checks and debug assertions on, as cargo-afl turns them on):
//! `CARGO_TARGET_DIR=build/fuzz-replay cargo run --manifest-path fuzz/Cargo.toml --bin config
//! -- crash-file` (a target directory of its own: cargo-afl's flags differ, and each build
//! would throw away the other's). `tests/fuzz.sh` builds and runs them all;
//! `cargo test --manifest-path fuzz/Cargo.toml` runs every target over its seeds
//! (`seeds/<target>/`).

use spotinit::config::Config;
use spotinit::sys::Paths;

/// A fuzz target: any bytes, and it must neither panic nor hang.
pub type Target = fn(&[u8]);

/// Every target, by the name of its binary and of its seed directory.
pub const TARGETS: [(&str, Target); 10] = [
    ("config", config),
    ("cmdline", cmdline),
    ("mountinfo", mountinfo),
    ("uevent", uevent),
    ("record", record),
    ("lease", lease),
    ("imds_identity", imds_identity),
    ("spot_action", spot_action),
    ("daemon_json", daemon_json),
    ("ntp", ntp),
];

/// Takes a result out of the optimiser's sight: one nobody reads could let it skip the parse.
fn keep<T>(result: T) {
    drop(std::hint::black_box(result));
}

/// Text as spotinit gets it: every source it reads as text is read lossily or refused, so any
/// bytes become some `str`.
fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// The kernel command line before the first 0xff byte (a byte UTF-8 never has, so AFL++ keeps
/// the two parts apart), user data after it.
pub fn config(data: &[u8]) {
    let (cmdline, user_data) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let (cmdline, user_data) = (text(cmdline), text(user_data));
    // What PID 1 prints of either outcome is part of reading it.
    match Config::load(&cmdline, Some(&user_data), None) {
        Ok(c) => keep(c.summary()),
        Err(errors) => errors.iter().for_each(|e| keep(e.to_string())),
    }
}

/// The kernel command line alone: its words, and its `spotinit.` keys as a table.
pub fn cmdline(data: &[u8]) {
    let cmdline = text(data);
    keep(spotinit::config::cmdline_words(&cmdline));
    keep(spotinit::config::cmdline_table(&cmdline));
}

/// /proc/self/mountinfo, then what of it is on a volume: the device of its first entry,
/// as the shutdown asks with the state volume's.
pub fn mountinfo(data: &[u8]) {
    let all = spotinit::sys::parse_mountinfo(&text(data));
    if let Some(first) = all.first() {
        let on = spotinit::volume::layout::mounts_on_volume(&all, &Paths::real(), &first.device);
        on.iter().for_each(|m| keep(m.fs_read_only()));
    }
}

/// One kernel uevent message, as read from the netlink socket.
pub fn uevent(data: &[u8]) {
    keep(spotinit::volume::device::parse_uevent(data));
}

/// The state volume's `.spotinit/record.toml`.
pub fn record(data: &[u8]) {
    keep(spotinit::volume::layout::parse_record(&text(data)));
}

/// The DHCP lease file the hook script writes to /run/spotinit.
pub fn lease(data: &[u8]) {
    keep(spotinit::host::parse_lease(&text(data)));
}

/// IMDS's instance identity document.
pub fn imds_identity(data: &[u8]) {
    keep(spotinit::cloud::documents::parse_identity(&text(data)));
}

/// IMDS's spot instance-action document, then its time as the watcher reads it; and the same
/// text as the rebalance recommendation.
pub fn spot_action(data: &[u8]) {
    use spotinit::cloud::documents::{parse_rebalance, parse_spot_action};
    let doc = text(data);
    if let Ok(action) = parse_spot_action(&doc) {
        keep(spotinit::lifecycle::deadline_of(&action.time));
    }
    keep(parse_rebalance(&doc));
}

/// User data, then the daemon.json its `[docker]` table makes, as written to disk.
pub fn daemon_json(data: &[u8]) {
    let Ok(config) = Config::load("", Some(&text(data)), None) else {
        return;
    };
    let json = spotinit::services::docker::daemon_json(&config.docker, None);
    keep(serde_json::to_string(&json).expect("a JSON value always serialises"));
}

/// An SNTP reply: 8 bytes of our transmit timestamp, 8 of when we sent (t1) and 8 of when the
/// reply came (t4), both as f64 bits (any of them, NaN included), then the reply itself.
pub fn ntp(data: &[u8]) {
    use spotinit::services::clock::reply_offset;
    let Some((head, reply)) = data.split_first_chunk::<24>() else {
        return;
    };
    let sent: [u8; 8] = head[..8].try_into().unwrap();
    let t1 = f64::from_be_bytes(head[8..16].try_into().unwrap());
    let t4 = f64::from_be_bytes(head[16..24].try_into().unwrap());
    keep(reply_offset(reply, &sent, t1, t4));
}

/// The `main` of every target's binary: under cargo-afl, AFL++'s persistent loop.
#[cfg(fuzzing)]
pub fn main(target: Target) {
    afl::fuzz!(|data: &[u8]| target(data));
}

/// The `main` of every target's binary in a plain build: runs the target over each file named
/// on the command line, or over standard input without one.
#[cfg(not(fuzzing))]
pub fn main(target: Target) {
    let files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() {
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut data).expect("read stdin");
        target(&data);
    }
    for f in files {
        let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{f}: {e}"));
        eprintln!("{f}: {} bytes", data.len());
        target(&data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_takes_its_seeds_and_odd_bytes() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
        for (name, target) in TARGETS {
            let dir = seeds.join(name);
            let files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            assert!(!files.is_empty(), "{name} has no seeds");
            for f in files {
                target(&std::fs::read(&f).unwrap());
            }
            for odd in [&b""[..], b"\xff", b"\0\0\0", &[0xc3; 64]] {
                target(odd);
            }
        }
    }
}
