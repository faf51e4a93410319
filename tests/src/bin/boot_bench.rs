//! Benchmark: how fast spotinit boots a Docker host, against a control that does nothing else.
//!
//! Four variants boot from the same image, alternating, N rounds each (default 5):
//!
//! - **control**: the image with a shell script as PID 1 (`init=/bin/busybox -- sh -c …`) that
//!   mounts what Docker needs, loads Docker's modules in the background, starts containerd and
//!   dockerd together and waits until the Engine API answers: no IMDS, no EC2, no volume, no
//!   firewall, no drain. Its console line gives the guest's uptime when dockerd answered.
//! - **volume**: spotinit on an existing state volume, EC2 with no latency at all.
//! - **volume, 2 s attach**: the same with EC2's attach latency of 2 s (and 1 s detach).
//! - **no volume**: spotinit with `volume.mode = "none"`.
//!
//! spotinit's figures come from its console: `ready in X s since power-on` (the guest's
//! uptime, as the control's), its own CPU time and memory on that line, and each
//! `phase P: done in D`. The table gives each variant's medians and its ratio to the control.
//! The volume variants drain through the power button between rounds (that is how the next
//! round finds the volume available at once); the others are killed once measured.
//!
//! Needs what the end-to-end tests need (the built image, QEMU, moto); run with
//! `cargo run --release -p spotworld --bin boot_bench [-- --rounds N]`.

use std::time::Duration;

use spotworld::fidelity::Settings;
use spotworld::world::{
    parse_human, phase_timings, InstanceSpec, SimInstance, UserData, World, WorldSettings,
};

const BOOT: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(120);
/// What the control prints once dockerd answers (then its uptime, then " s uptime").
const CONTROL_MARKER: &str = "control: dockerd answers at ";

type Outcome<T> = std::result::Result<T, String>;

/// The control's PID 1: the least a script must do to get a working dockerd from this image.
/// `docker version` asks the daemon (as `/_ping` does, it answers once the API is up).
const CONTROL_SCRIPT: &str = r#"B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
$B mount -t cgroup2 cgroup2 /sys/fs/cgroup
for d in /run /tmp /var /etc/docker; do $B mount -t tmpfs tmpfs $d; done
$B ln -s ../run /var/run
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/run
modprobe -a -q overlay br_netfilter veth nf_conntrack &
containerd >/run/containerd.log 2>&1 &
dockerd --containerd=/run/containerd/containerd.sock >/run/dockerd.log 2>&1 &
until docker version >/dev/null 2>&1; do $B sleep 0.05; done
read -r up _ </proc/uptime
echo "control: dockerd answers at $up s uptime"
exec $B sleep 100000
"#;

/// Base64 (standard alphabet, padded): the script travels on the kernel command line, where
/// only a double-quoted word may hold spaces and nothing may hold a double quote or a newline.
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The kernel command line words that make the control script PID 1 (the initrd hands the
/// words after `--` to the `init=` program).
fn control_cmdline() -> String {
    format!(
        "init=/bin/busybox -- sh -c \"echo {}|/bin/busybox base64 -d|/bin/busybox sh\"",
        base64(CONTROL_SCRIPT.as_bytes())
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Control,
    Volume,
    VolumeAttachLatency,
    NoVolume,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::Control,
        Variant::Volume,
        Variant::VolumeAttachLatency,
        Variant::NoVolume,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Control => "control (sh as PID 1)",
            Variant::Volume => "volume",
            Variant::VolumeAttachLatency => "volume, 2 s attach",
            Variant::NoVolume => "no volume",
        }
    }
}

/// One boot's figures (seconds).
#[derive(Default)]
struct Boot {
    /// The guest's uptime at ready (spotinit) or when dockerd answered (control).
    ready: f64,
    /// From QEMU's start to that line, on the host's clock.
    host: f64,
    /// spotinit's own CPU time and resident memory (kB) at ready.
    cpu: Option<f64>,
    memory_kb: Option<f64>,
    phases: Vec<(String, f64)>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `… ready in 23.44 s since power-on (spotinit's part 19.35 s, its CPU time 61 ms, its
/// memory 9608 kB)` → (23.44, CPU 0.061, memory 9608).
fn parse_ready(text: &str) -> Option<(f64, Option<f64>, Option<f64>)> {
    let after = text.split("ready in ").nth(1)?;
    let ready = parse_human(after.split(" since").next()?)?;
    let cpu = text
        .split("its CPU time ")
        .nth(1)
        .and_then(|t| parse_human(t.split(',').next()?));
    let memory = text
        .split("its memory ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next()?.parse().ok());
    Some((ready, cpu, memory))
}

async fn control(world: &World, round: usize) -> Outcome<Boot> {
    let spec = InstanceSpec::new(&format!("control-{round}"), "us-east-1a")
        .extra_cmdline(&control_cmdline());
    let i = world.launch(spec).await.map_err(|e| e.to_string())?;
    let line = i
        .console()
        .wait_for(CONTROL_MARKER, BOOT)
        .await
        .map_err(|e| format!("control: {e}\n{}", i.diagnostics()))?;
    let ready = line
        .text
        .split(CONTROL_MARKER)
        .nth(1)
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("control: no uptime in {:?}", line.text))?;
    i.kill_hard().await.map_err(|e| e.to_string())?;
    Ok(Boot {
        ready,
        host: line.at.as_secs_f64(),
        ..Boot::default()
    })
}

async fn spotinit(world: &World, variant: Variant, round: usize) -> Outcome<Boot> {
    let user_data = if variant == Variant::NoVolume {
        "[volume]\nmode = \"none\"\n".to_owned()
    } else {
        let mut ud = UserData::new(&format!("boot-bench-{round}"));
        // Each round on the volume the first round made: the name is the same for every round.
        ud.volume_name = "boot-bench".into();
        ud.docker_api = false;
        ud.to_toml()
    };
    let name = format!(
        "{}-{round}",
        match variant {
            Variant::NoVolume => "none",
            Variant::Volume => "vol",
            _ => "vol-latency",
        }
    );
    let i = world
        .launch(InstanceSpec::new(&name, "us-east-1a").user_data(user_data))
        .await
        .map_err(|e| e.to_string())?;
    let line = i
        .wait_ready(BOOT)
        .await
        .map_err(|e| format!("{name}: {e}\n{}", i.diagnostics()))?;
    let (ready, cpu, memory_kb) =
        parse_ready(&line.text).ok_or_else(|| format!("{name}: cannot read {:?}", line.text))?;
    let boot = Boot {
        ready,
        host: line.at.as_secs_f64(),
        cpu,
        memory_kb,
        phases: phase_timings(&i.console().lines()),
    };
    finish(&i, variant).await?;
    Ok(boot)
}

/// A volume variant drains and detaches (so the next round finds its volume available); the
/// others just end.
async fn finish(i: &SimInstance, variant: Variant) -> Outcome<()> {
    if variant != Variant::NoVolume {
        i.powerdown().await.map_err(|e| e.to_string())?;
        i.wait_poweroff(STEP)
            .await
            .map_err(|e| format!("{}: {e}", i.name))?;
    }
    i.kill_hard().await.map_err(|e| e.to_string())
}

/// A world whose EC2 takes no time for anything.
fn instant_ec2() -> Settings {
    Settings {
        attach_latency: Duration::ZERO,
        detach_latency: Duration::ZERO,
        volume_creation: Duration::ZERO,
        snapshot_duration: Duration::ZERO,
        shutting_down: Duration::ZERO,
        release_after_termination: Duration::ZERO,
        ..Settings::default()
    }
}

fn parse_rounds(args: &[String]) -> Outcome<usize> {
    match args {
        [] => Ok(5),
        [flag, n] if flag == "--rounds" => n
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("--rounds wants a positive count, not {n:?}")),
        _ => Err(format!("usage: boot_bench [--rounds N] (got {args:?})")),
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds = match parse_rounds(&args) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("boot_bench: {e}");
            std::process::exit(2);
        }
    };
    match run(rounds).await {
        Ok(()) => {}
        Err(e) => {
            eprintln!("boot_bench: FAILED: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(rounds: usize) -> Outcome<()> {
    let mut fast = WorldSettings::new("boot-bench");
    fast.fidelity = instant_ec2();
    let fast = World::start(fast).await.map_err(|e| e.to_string())?;
    let slow = World::start(WorldSettings::new("boot-bench-attach-latency"))
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "boot_bench: {rounds} round(s) of {} variants; {}",
        Variant::ALL.len(),
        fast.image().version_line()
    );
    // The state volumes exist before the first measured round (created, formatted, drained).
    for (world, label) in [(&fast, "no latency"), (&slow, "2 s attach")] {
        spotinit(world, Variant::Volume, 0)
            .await
            .map_err(|e| format!("creating the volume ({label}): {e}"))?;
    }
    let mut boots: Vec<(Variant, Boot)> = Vec::new();
    for round in 1..=rounds {
        for v in Variant::ALL {
            let b = match v {
                Variant::Control => control(&fast, round).await?,
                Variant::VolumeAttachLatency => spotinit(&slow, v, round).await?,
                _ => spotinit(&fast, v, round).await?,
            };
            println!(
                "  round {round}: {:<22} ready at {:>6.2} s uptime ({:.1} s after QEMU started)",
                v.name(),
                b.ready,
                b.host
            );
            boots.push((v, b));
        }
    }
    print_table(&boots, rounds);
    Ok(())
}

fn print_table(boots: &[(Variant, Boot)], rounds: usize) {
    let of = |v: Variant| boots.iter().filter(move |(w, _)| *w == v).map(|(_, b)| b);
    let control = median(of(Variant::Control).map(|b| b.ready).collect()).unwrap_or(f64::NAN);
    println!("\nmedians of {rounds} round(s), seconds of guest uptime:");
    println!(
        "| variant | ready | x control | QEMU start → ready | spotinit CPU | spotinit memory |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for v in Variant::ALL {
        let ready = median(of(v).map(|b| b.ready).collect()).unwrap_or(f64::NAN);
        let host = median(of(v).map(|b| b.host).collect()).unwrap_or(f64::NAN);
        let cpu = median(of(v).filter_map(|b| b.cpu).collect());
        let mem = median(of(v).filter_map(|b| b.memory_kb).collect());
        println!(
            "| {} | {ready:.2} | {:.2} | {host:.2} | {} | {} |",
            v.name(),
            ready / control,
            cpu.map(|c| format!("{:.0} ms", c * 1000.0))
                .unwrap_or("-".into()),
            mem.map(|m| format!("{:.1} MiB", m / 1024.0))
                .unwrap_or("-".into()),
        );
    }
    // Phases in boot order (as the first spotinit boot logged them), a column per variant.
    let mut phases: Vec<String> = Vec::new();
    for (_, b) in boots {
        for (p, _) in &b.phases {
            if !phases.contains(p) {
                phases.push(p.clone());
            }
        }
    }
    let spotinit: Vec<Variant> = Variant::ALL
        .into_iter()
        .filter(|v| *v != Variant::Control)
        .collect();
    println!("\nspotinit's phases (`phase P: done in D`), medians in seconds:");
    print!("| phase |");
    for v in &spotinit {
        print!(" {} |", v.name());
    }
    println!("\n| --- |{}", " --- |".repeat(spotinit.len()));
    for p in &phases {
        print!("| {p} |");
        for v in &spotinit {
            let m = median(
                of(*v)
                    .filter_map(|b| b.phases.iter().find(|(q, _)| q == p).map(|(_, d)| *d))
                    .collect(),
            );
            match m {
                Some(d) => print!(" {d:.2} |"),
                None => print!(" - |"),
            }
        }
        println!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_busybox_decodes_it() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn the_control_fits_on_a_kernel_command_line_without_a_quote_or_newline() {
        let words = control_cmdline();
        // 2048 bytes for the whole line on x86; the world's own words take ~400.
        assert!(words.len() < 1400, "{}", words.len());
        let quoted = words.split('"').nth(1).unwrap();
        assert!(!quoted.contains('\n'));
        assert_eq!(words.matches('"').count(), 2);
    }

    #[test]
    fn ready_lines_parse() {
        let (ready, cpu, mem) = parse_ready(
            "[  23.442] spotinit: ready in 23.44 s since power-on (spotinit's part 19.35 s, its \
             CPU time 61 ms, its memory 9608 kB)",
        )
        .unwrap();
        assert_eq!((ready, mem), (23.44, Some(9608.0)));
        assert!((cpu.unwrap() - 0.061).abs() < 1e-9);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(parse_rounds(&["--rounds".into(), "0".into()]).ok(), None);
    }
}
