//! Scenario 11, operator SSH: A is launched with an EC2 key pair whose public key (made here with
//! `ssh-keygen -t ed25519`) IMDS serves; spotinit starts dropbear with that key authorized and a
//! host key it keeps on the state volume. `ssh root@A docker ps` works (the host key accepted as
//! new). After a spot notice on A, its successor B on the same volume presents the same host key:
//! the same known_hosts, with `StrictHostKeyChecking=yes`, logs in to B without a word. And an
//! instance launched without any key says `ssh: off` and nothing answers on port 22. Each says
//! after `ready` what listens beyond loopback: dropbear on 22 with the key, nothing without.
//!
//! Needs `ssh` and `ssh-keygen` on the host (openssh-client; tests/setup.sh installs it).
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_11_ssh -- --nocapture`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{expect, report, BOOT, STEP};
use spotworld::world::{InstanceSpec, SimInstance, UserData, World, WorldSettings};
use tokio::io::AsyncReadExt as _;

const SSH_PORT: u16 = 22;
/// Both instances are the same service to the operator (behind an Elastic IP, say): one name in
/// known_hosts, whatever host port the simulator forwarded this time.
const HOST_ALIAS: &str = "spotinit-e2e-11";

/// `ssh -i KEY -p PORT ... root@127.0.0.1 COMMAND` with `strict` host key checking; exit code
/// and output (stdout, then stderr).
async fn ssh(
    key: &Path,
    known_hosts: &Path,
    port: u16,
    strict: &str,
    command: &str,
) -> (i32, String) {
    let out = tokio::process::Command::new("ssh")
        .args(["-F", "/dev/null", "-i"])
        .arg(key)
        .args(["-p", &port.to_string()])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            &format!("StrictHostKeyChecking={strict}"),
            "-o",
            &format!("HostKeyAlias={HOST_ALIAS}"),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=30",
            "root@127.0.0.1",
            command,
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(STEP, out)
        .await
        .expect("ssh did not finish within its step")
        .expect("run ssh (apt-get install openssh-client)");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Retries the login while dropbear may still be starting (slirp accepts before the guest does).
async fn ssh_until_ok(
    i: &SimInstance,
    key: &Path,
    known_hosts: &Path,
    strict: &str,
    command: &str,
) -> String {
    let port = i.host_port(SSH_PORT).unwrap();
    let until = Instant::now() + STEP;
    loop {
        let (code, out) = ssh(key, known_hosts, port, strict, command).await;
        if code == 0 {
            return out;
        }
        // A refused or changed host key is an answer, not a guest still starting.
        assert!(
            !out.contains("Host key verification failed")
                && !out.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
                && !out.contains("Permission denied"),
            "ssh to {} failed: {out}\n{}",
            i.name,
            i.diagnostics()
        );
        assert!(
            Instant::now() < until,
            "ssh to {} kept failing (exit {code}): {out}\n{}",
            i.name,
            i.diagnostics()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Makes an ed25519 key pair with ssh-keygen; returns (private key file, public key line).
fn keygen(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("id_ed25519");
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(key.with_extension("pub"));
    let out = std::process::Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "operator@e2e-11",
            "-f",
        ])
        .arg(&key)
        .output()
        .expect("run ssh-keygen (apt-get install openssh-client)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().to_owned())
}

#[tokio::test]
async fn ssh_with_the_key_pair_from_imds_and_the_same_host_key_after_a_replacement() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-11-ssh"))
        .await
        .unwrap();
    let (key, public) = keygen(world.dir());
    let known_hosts = world.dir().join("known_hosts");
    let mut ud = UserData::new("e2e-11");
    ud.docker_api = false;
    let spec = |name: &str| {
        InstanceSpec::new(name, "us-east-1a")
            .user_data(ud.to_toml())
            .key_pair("operator", &public)
            .forward(SSH_PORT)
    };

    let a = world.launch(spec("a")).await.unwrap();
    let mut c = a.console();
    let started = expect(
        &mut c,
        "ssh: dropbear on port 22, 1 authorized key(s), host key",
        BOOT,
    )
    .await;
    assert!(started.text.ends_with("(new)"), "{}", started.text);
    a.wait_ready(BOOT).await.unwrap();
    // What listens beyond loopback: SSH (a key is configured), nothing else.
    let listening = expect(&mut c, "listening: ", STEP).await;
    let outside = listening
        .text
        .split("listening: ")
        .nth(1)
        .unwrap_or_default();
    assert!(
        outside.split(", ").all(|l| l.ends_with(":22 (dropbear)")),
        "{}",
        listening.text
    );
    let out = ssh_until_ok(&a, &key, &known_hosts, "accept-new", "docker ps").await;
    assert!(out.contains("CONTAINER ID"), "docker ps on a: {out}");
    let recorded = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(
        recorded.contains(HOST_ALIAS) && recorded.contains("ssh-ed25519"),
        "{recorded}"
    );
    println!("a: {}\n   known_hosts: {}", started.text, recorded.trim());
    report("a: ssh root@a docker ps", t0);

    // Spot notice; the successor takes the volume, and with it the host key.
    let mut c = a.console_from_now();
    a.post_spot_notice(Duration::from_secs(120));
    expect(&mut c, "shutdown: state volume released in", STEP).await;
    expect(&mut c, "drained; waiting for EC2", STEP).await;
    a.reclaim().await.unwrap();

    let b = world.launch(spec("b")).await.unwrap();
    let mut c = b.console();
    let kept = expect(
        &mut c,
        "ssh: dropbear on port 22, 1 authorized key(s), host key",
        BOOT,
    )
    .await;
    assert!(
        kept.text.ends_with("(kept from an earlier instance)"),
        "{}",
        kept.text
    );
    b.wait_ready(BOOT).await.unwrap();
    let out = ssh_until_ok(&b, &key, &known_hosts, "yes", "docker ps && hostname").await;
    assert!(out.contains("CONTAINER ID"), "docker ps on b: {out}");
    assert_eq!(
        std::fs::read_to_string(&known_hosts).unwrap(),
        recorded,
        "known_hosts changed: B presented another host key"
    );
    println!(
        "b: {}\n   ssh with StrictHostKeyChecking=yes: {out}",
        kept.text.trim()
    );
    report("b: same host key, ssh root@b docker ps", t0);
    let mut c = b.console_from_now();
    b.powerdown().await.unwrap();
    expect(&mut c, "powering off", STEP).await;
    b.wait_poweroff(STEP).await.unwrap();

    // No key anywhere: no SSH server.
    let mut ud = UserData::new("e2e-11-nokey");
    ud.docker_api = false;
    let n = world
        .launch(
            InstanceSpec::new("no-key", "us-east-1a")
                .user_data(ud.to_toml())
                .forward(SSH_PORT),
        )
        .await
        .unwrap();
    let mut c = n.console();
    let off = expect(&mut c, "ssh: ", BOOT).await;
    assert!(off.text.contains("ssh: off"), "{}", off.text);
    n.wait_ready(BOOT).await.unwrap();
    let listening = expect(&mut c, "listening: ", STEP).await;
    assert!(
        listening
            .text
            .ends_with("listening: nothing beyond loopback"),
        "{}",
        listening.text
    );
    // slirp accepts on the host side, then closes (or resets) once the guest refuses: no banner.
    let port = n.host_port(SSH_PORT).unwrap();
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut buf))
        .await
        .expect("port 22 should be closed at once, not hang");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "something answered on port 22: {:?}",
        read.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    let (code, out) = ssh(&key, &known_hosts, port, "yes", "true").await;
    assert_ne!(code, 0, "{out}");
    println!("no-key: {}\n   ssh: exit {code}: {}", off.text, out.trim());
    report("scenario 11", t0);
}
