//! Scenario 10, a wrong clock: instances can start with their clock far off, and EC2 refuses
//! SigV4 requests whose date is more than 15 minutes from its own (RequestExpired; the fidelity
//! layer checks the same against the host's clock). A boots with its hardware clock six hours in
//! the past (`-rtc base=`): spotinit's probe of the time server (the world's NTP server, given
//! in `time.servers`) sees it, waits for chronyd to step the clock, and only then makes its first
//! EC2 call; the volume phase succeeds and EC2 never answered RequestExpired.
//!
//! A clock 12 s behind (more than the whole-second RTC explains, less than the 30 s beyond which
//! the boot waits) does not hold the boot: the console says chronyd steps it in the background,
//! and no EC2 call is refused.
//!
//! The control: the same wrong clock with the time server silent (`time.servers` on the kernel
//! command line pointing at a UDP port that never answers). The boot warns that the clock is not
//! synchronised, and the first EC2 call goes out on the wrong clock: EC2 refuses it with
//! RequestExpired, and the console names the clock as the cause. (That refusal is what the first
//! instance's clean record is measured against.) The SDK then signs with EC2's time, taken from
//! the refusal's `Date`, so the retry succeeds and the boot goes on to ready on the right volume.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_10_wrong_clock -- --nocapture`

use std::time::{Duration, Instant, SystemTime};

use crate::common::{expect, never, report, BOOT, STEP};
use spotworld::query::format_time;
use spotworld::world::{InstanceSpec, UserData, World, WorldSettings, BOOT_FAILED_MARKER};

/// How far behind the guest's clock starts.
const BEHIND: Duration = Duration::from_secs(6 * 3600);
/// A clock off by this much is stepped while the boot goes on (the wait starts beyond 30 s).
const SLIGHTLY_BEHIND: Duration = Duration::from_secs(12);

/// `-rtc base=` for a clock `behind` the host's (QEMU takes `YYYY-MM-DDTHH:MM:SS`, UTC).
fn rtc_base_behind(behind: Duration) -> String {
    format_time(SystemTime::now() - behind, false)
        .trim_end_matches('Z')
        .to_owned()
}

/// `-rtc base=` for a clock `BEHIND` the host's.
fn rtc_base() -> String {
    rtc_base_behind(BEHIND)
}

#[tokio::test]
async fn a_clock_hours_behind_is_stepped_before_the_first_ec2_call() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-10-wrong-clock"))
        .await
        .unwrap();
    let mut ud = UserData::new("e2e-10");
    ud.docker_api = false;
    let a = world
        .launch(
            InstanceSpec::new("a", "us-east-1a")
                .user_data(ud.to_toml())
                .rtc_base(&rtc_base()),
        )
        .await
        .unwrap();
    let mut c = a.console();
    let probe = expect(&mut c, "waiting for chronyd to step it", BOOT).await;
    assert!(probe.text.contains(" behind "), "{}", probe.text);
    let synced = expect(&mut c, "clock: synchronised with", STEP).await;
    assert!(
        synced.text.contains("stepped forward"),
        "the clock should have been stepped forward: {}",
        synced.text
    );
    let first_volume_line = expect(&mut c, "spotinit: volume: ", STEP).await;
    expect(&mut c, "phase volume: done", STEP).await;
    a.wait_ready(BOOT).await.unwrap();
    // In console order: the probe, the step, then the first line of the volume phase (the EC2
    // calls start there); nothing of the volume phase before the step.
    let lines = a.console().lines();
    let pos = |l: &spotworld::qemu::ConsoleLine| lines.iter().position(|x| x.text == l.text);
    assert!(pos(&probe) < pos(&synced) && pos(&synced) < pos(&first_volume_line));
    never(&a, "RequestExpired");
    let requests = world.fidelity().requests();
    let expired: Vec<_> = requests
        .iter()
        .filter(|r| r.code.as_deref() == Some("RequestExpired"))
        .collect();
    assert!(expired.is_empty(), "EC2 refused: {expired:?}");
    assert!(
        requests
            .iter()
            .any(|r| r.action == "AttachVolume" && r.status == 200),
        "{requests:?}"
    );
    println!(
        "a: {}\n   {}\n   first EC2 step: {}\n   {} EC2 requests, none RequestExpired; NTP server \
         answered {} requests",
        probe.text,
        synced.text,
        first_volume_line.text,
        requests.len(),
        world.ntp().requests()
    );
    report("a: clock stepped, volume phase done, ready", t0);
    let mut c = a.console_from_now();
    a.powerdown().await.unwrap();
    expect(&mut c, "powering off", STEP).await;
    a.wait_poweroff(STEP).await.unwrap();

    // A clock a few seconds off, as QEMU's and Nitro's whole-second RTC make it at every boot
    // (and a bit more): signing works, so the boot does not wait; chronyd steps it meanwhile.
    let before = world.fidelity().requests().len();
    let mut ud = UserData::new("e2e-10");
    ud.docker_api = false;
    let s = world
        .launch(
            InstanceSpec::new("slightly-off", "us-east-1a")
                .user_data(ud.to_toml())
                .rtc_base(&rtc_base_behind(SLIGHTLY_BEHIND)),
        )
        .await
        .unwrap();
    let mut c = s.console();
    let background = expect(&mut c, "chronyd steps it in the background", BOOT).await;
    assert!(background.text.contains(" behind "), "{}", background.text);
    expect(&mut c, "phase volume: done", STEP).await;
    s.wait_ready(BOOT).await.unwrap();
    never(&s, "waiting for chronyd to step it");
    never(&s, "clock: synchronised with");
    let expired = world.fidelity().requests()[before..]
        .iter()
        .filter(|r| r.code.as_deref() == Some("RequestExpired"))
        .count();
    assert_eq!(
        expired, 0,
        "EC2 refused a request of the slightly-off clock"
    );
    println!("slightly-off: {}", background.text);
    let mut c = s.console_from_now();
    s.powerdown().await.unwrap();
    expect(&mut c, "powering off", STEP).await;
    s.wait_poweroff(STEP).await.unwrap();

    // The control: no time server answers. (A bound UDP port that never replies.)
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let before = world.fidelity().requests().len();
    let mut ud = UserData::new("e2e-10");
    ud.docker_api = false;
    let b = world
        .launch(
            InstanceSpec::new("no-ntp", "us-east-1a")
                .user_data(ud.to_toml())
                .rtc_base(&rtc_base())
                // The command line's last word wins over the world's own time.servers.
                .extra_cmdline(&format!(
                    "spotinit.time.servers=['10.0.2.2:{silent_port}'] spotinit.time.sync_timeout_secs=5"
                )),
        )
        .await
        .unwrap();
    let mut c = b.console();
    let warned = expect(&mut c, "clock: NOT synchronised", BOOT).await;
    assert!(
        warned.text.contains("the clock was not stepped"),
        "{}",
        warned.text
    );
    let refused = expect(&mut c, "RequestExpired", STEP).await;
    assert!(
        refused.text.contains("the instance's clock is wrong") && refused.text.contains("retrying"),
        "the refusal should name the clock and be retried: {}",
        refused.text
    );
    expect(
        &mut c,
        "/var/lib/docker and /var/lib/containerd are on it",
        STEP,
    )
    .await;
    b.wait_ready(BOOT).await.unwrap();
    never(&b, BOOT_FAILED_MARKER);
    let after: Vec<_> = world.fidelity().requests()[before..].to_vec();
    // (The world's own RunInstances comes first; the instance starts with the volume lookup.)
    let first = after
        .iter()
        .find(|r| r.action == "DescribeVolumes")
        .expect("the control looked for its volume");
    assert_eq!(
        first.code.as_deref(),
        Some("RequestExpired"),
        "the first call on the wrong clock should have been refused: {first:?}"
    );
    assert!(
        after
            .iter()
            .any(|r| r.action == "AttachVolume" && r.status == 200),
        "{after:?}"
    );
    let expired = after
        .iter()
        .filter(|r| r.code.as_deref() == Some("RequestExpired"))
        .count();
    println!(
        "no-ntp: {}\n   {}\n   {expired} request(s) refused with RequestExpired, then signed with \
         EC2's time; ready",
        warned.text, refused.text
    );
    drop(silent);
    report("scenario 10", t0);
}
