//! Scenario 6, bad input: malformed user data, an unknown key, a missing volume with creation
//! off, a storage-driver mismatch with the state on the volume, and a missing IAM permission.
//! Each boot stops before Docker with a console message naming the cause (and the fix), says
//! Docker was not started, and powers off (the default failure policy; for a configuration that
//! cannot be read, the only one).
//!
//! The cases boot one after another in one world (the IAM denial is world-wide, so it comes
//! last); every case is checked and all failures are reported together.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_6_bad_input -- --nocapture`

use std::time::Instant;

use crate::common::{BOOT, STEP};
use spotworld::world::{
    debugfs, InstanceSpec, SimInstance, UserData, World, WorldSettings, BOOT_FAILED_MARKER,
};

/// Boots `user_data`, waits for the failure report and the power-off; returns the failure lines
/// (one string) or why the case went wrong.
async fn failed_boot(
    world: &World,
    name: &str,
    user_data: &str,
) -> Result<(SimInstance, String), String> {
    let i = world
        .launch(InstanceSpec::new(name, "us-east-1a").user_data(user_data))
        .await
        .map_err(|e| e.to_string())?;
    let mut c = i.console();
    c.wait_for(BOOT_FAILED_MARKER, BOOT)
        .await
        .map_err(|e| e.to_string())?;
    c.wait_for("Docker was not started", STEP)
        .await
        .map_err(|e| e.to_string())?;
    c.wait_for("powering off", STEP)
        .await
        .map_err(|e| e.to_string())?;
    let clean = i.wait_poweroff(STEP).await.map_err(|e| e.to_string())?;
    let lines = i.console().lines();
    let failure: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.text.split(BOOT_FAILED_MARKER).nth(1))
        .collect();
    let failure = failure.join("\n");
    let mut problems = Vec::new();
    if !clean {
        problems.push("QEMU did not exit cleanly after the power-off".to_string());
    }
    for forbidden in ["phase containerd", "phase dockerd", "spotinit: ready"] {
        if lines.iter().any(|l| l.text.contains(forbidden)) {
            problems.push(format!("the console shows {forbidden:?}"));
        }
    }
    if problems.is_empty() {
        Ok((i, failure))
    } else {
        Err(format!("{}\n{}", problems.join("; "), i.diagnostics()))
    }
}

/// Checks that `failure` contains every `want`.
fn check(case: &str, failure: &str, wants: &[&str], problems: &mut Vec<String>) {
    println!("--- {case}:\n{failure}");
    for want in wants {
        if !failure.contains(want) {
            problems.push(format!(
                "{case}: the failure does not say {want:?}:\n{failure}"
            ));
        }
    }
}

/// A volume with spotinit's state made with overlay2, as a previous instance leaves it:
/// ext4 labelled spotinit-state, docker/ and containerd/, the record of a clean shutdown.
async fn volume_with_overlay2_state(world: &World, name: &str) -> String {
    let id = world
        .create_volume("us-east-1a", 1, &[("Name", name)])
        .await
        .unwrap();
    let file = world.volume_file(&id);
    let ok = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "spotinit-state"])
        .arg(&file)
        .status()
        .expect("mkfs.ext4 (apt-get install e2fsprogs)")
        .success();
    assert!(ok, "mkfs.ext4 {}", file.display());
    let record = world.dir().join("record.toml");
    std::fs::write(
        &record,
        format!(
            "format = 1\nvolume_id = \"{id}\"\nstorage_driver = \"overlay2\"\n\
             created_by = \"i-0123456789abcdef0\"\ncreated_at = \"2026-11-01T10:00:00Z\"\n\
             last_instance = \"i-0123456789abcdef0\"\nlast_boot_at = \"2026-11-20T10:00:00Z\"\n\
             boot_count = 7\nclean_shutdown = true\nlast_shutdown_at = \"2026-11-25T10:00:00Z\"\n"
        ),
    )
    .unwrap();
    let script = world.dir().join("debugfs.cmds");
    std::fs::write(
        &script,
        format!(
            "mkdir docker\nmkdir containerd\nmkdir .spotinit\ncd .spotinit\nwrite {} record.toml\n",
            record.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = debugfs(&file, "cat /.spotinit/record.toml").unwrap();
    assert!(back.contains("storage_driver = \"overlay2\""), "{back}");
    id
}

#[tokio::test]
async fn bad_input_fails_closed_with_a_clear_message_and_no_docker() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-6-bad-input"))
        .await
        .unwrap();
    let mut problems: Vec<String> = Vec::new();

    // Malformed TOML: the line and what is wrong with it.
    match failed_boot(&world, "malformed", "[volume\nsize_gib = 1\n").await {
        Ok((_, f)) => check(
            "malformed user data",
            &f,
            &["invalid configuration", "user data, line 1"],
            &mut problems,
        ),
        Err(e) => problems.push(format!("malformed user data: {e}")),
    }

    // A typo: unknown keys are errors, never silently defaults.
    match failed_boot(&world, "unknown-key", "[volume]\nsize_gib = 1\nsizee = 2\n").await {
        Ok((_, f)) => check(
            "unknown key",
            &f,
            &["user data, line 3", "unknown field `sizee`", "size_gib"],
            &mut problems,
        ),
        Err(e) => problems.push(format!("unknown key: {e}")),
    }

    // No volume, and creation is off.
    let mut ud = UserData::new("e2e-6-missing");
    ud.create = false;
    ud.docker_api = false;
    match failed_boot(&world, "missing-volume", &ud.to_toml()).await {
        Ok((_, f)) => check(
            "missing volume, creation off",
            &f,
            &[
                "no state volume tagged Name=e2e-6-missing",
                "volume.create = false",
                "Create one in us-east-1a",
            ],
            &mut problems,
        ),
        Err(e) => problems.push(format!("missing volume: {e}")),
    }
    match world.volumes().await {
        Ok(v) if v.is_empty() => {}
        other => problems.push(format!("creation was off, yet: {other:?}")),
    }

    // The volume holds overlay2 state; the configuration says vfs.
    let volume = volume_with_overlay2_state(&world, "e2e-6-driver").await;
    let mut ud = UserData::new("e2e-6-driver");
    ud.storage_driver = "vfs".into();
    ud.docker_api = false;
    match failed_boot(&world, "driver-mismatch", &ud.to_toml()).await {
        Ok((_, f)) => check(
            "storage-driver mismatch",
            &f,
            &[
                &volume,
                "made with the overlay2 storage driver, but docker.storage_driver is vfs",
                "docker.storage_driver = \"overlay2\"",
            ],
            &mut problems,
        ),
        Err(e) => problems.push(format!("storage-driver mismatch: {e}")),
    }
    // It gave the volume back on its way out, its state untouched.
    match world.volume(&volume).await {
        Ok(v) if v.state == "available" => {
            let record = debugfs(&world.volume_file(&volume), "cat /.spotinit/record.toml")
                .unwrap_or_else(|e| e.to_string());
            if !record.contains("boot_count = 7") {
                problems.push(format!("the refused volume's record changed:\n{record}"));
            }
        }
        other => problems.push(format!(
            "after the mismatch the volume should be detached: {other:?}"
        )),
    }

    // The instance role lacks ec2:AttachVolume.
    let volume = world
        .create_volume("us-east-1a", 1, &[("Name", "e2e-6-iam")])
        .await
        .unwrap();
    world.fidelity().deny("AttachVolume");
    let mut ud = UserData::new("e2e-6-iam");
    ud.docker_api = false;
    match failed_boot(&world, "denied", &ud.to_toml()).await {
        Ok((i, f)) => check(
            "missing IAM permission",
            &f,
            &[
                "cannot attach the state volume",
                "UnauthorizedOperation",
                &format!("assumed-role/spotinit-test-role/{}", i.id),
                &format!("volume/{volume}"),
                "the instance role needs ec2:AttachVolume",
            ],
            &mut problems,
        ),
        Err(e) => problems.push(format!("missing IAM permission: {e}")),
    }
    world.fidelity().allow("AttachVolume");

    println!("scenario 6: {:.1} s", t0.elapsed().as_secs_f64());
    assert!(
        problems.is_empty(),
        "{} case(s) went wrong:\n\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}
