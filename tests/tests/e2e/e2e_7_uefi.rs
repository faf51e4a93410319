//! Scenario 7, the disk that becomes the AMI: `spotinit.raw` boots under OVMF (systemd-boot, the
//! unified kernel image with its sealed command line, the initrd, the erofs root) and spotinit
//! goes all the way to `ready` on a state volume — with IMDS at the real 169.254.169.254 (nothing
//! on the command line can point elsewhere) and the EC2 endpoint from the user data. The power
//! button then drains it and detaches the volume.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_7_uefi -- --nocapture`

use std::time::Instant;

use crate::common::{expect, report, BOOT, STEP};
use spotworld::world::{InstanceSpec, UserData, World, WorldSettings};

#[tokio::test]
async fn the_uefi_disk_boots_under_ovmf_to_ready_on_its_volume() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-7-uefi"))
        .await
        .unwrap();
    let mut ud = UserData::new("e2e-7");
    ud.docker_api = false;
    let u = world
        .launch(
            InstanceSpec::new("uefi", "us-east-1a")
                .uefi()
                .user_data(ud.to_toml()),
        )
        .await
        .unwrap();
    let mut c = u.console();
    let initrd = expect(&mut c, "initrd: root /dev/nvme0n1p2 (erofs) mounted", BOOT).await;
    // The command line sealed in the UKI, not one of ours.
    let cmdline = world.image().cmdline.clone();
    expect(&mut c, "starting as PID 1", STEP).await;
    let net = expect(&mut c, "network: eth0 169.254.", STEP).await;
    let ep = expect(&mut c, "aws: EC2 endpoint http://169.254.2.2:", STEP).await;
    let ready = u.wait_ready(BOOT).await.unwrap();
    println!(
        "uefi: initrd at {:.1} s, ready at {:.1} s after QEMU start\n  {}\n  {}\n  {}",
        initrd.at.as_secs_f64(),
        ready.at.as_secs_f64(),
        net.text,
        ep.text,
        ready.text
    );
    // Its IMDS was reached, and only 169.254.169.254:80 leads there (the sealed command line,
    // `{cmdline}`, names no endpoint).
    assert!(
        u.imds().requests("/latest/api/token") > 0 && u.imds().requests("/latest/user-data") > 0,
        "IMDS at 169.254.169.254 was never asked (command line {cmdline})"
    );
    let vols = world.volumes().await.unwrap();
    assert_eq!(vols.len(), 1, "{vols:?}");
    assert_eq!(vols[0].attachments[0].instance_id, u.id);
    report("uefi: ready", t0);

    let mut c = u.console_from_now();
    u.powerdown().await.unwrap();
    expect(&mut c, &format!("volume: {} detached in", vols[0].id), STEP).await;
    expect(&mut c, "powering off", STEP).await;
    assert!(u.wait_poweroff(STEP).await.unwrap(), "{}", u.diagnostics());
    assert_eq!(world.volume(&vols[0].id).await.unwrap().state, "available");
    report("scenario 7", t0);
}
