//! Scenario 12, containers cannot reach IMDS: the instance role's credentials are served at
//! 169.254.169.254, and a container (a compromised one, a CI job) must not get them. On
//! `Net::LinkLocal` IMDS is at the real 169.254.169.254:80 inside the guest, as on EC2. By default
//! spotinit keeps Docker's networks away from it: a container's HTTP request gets no answer
//! (connection refused) and never reaches the IMDS mock, while spotinit itself still reads IMDS
//! (a rebalance recommendation is seen). With `docker.block_imds = false` a container does reach
//! it (HTTP 401: IMDSv2 wants a token — an answer, which proves the connection). And when the
//! rules cannot be installed (the kernel refuses the netfilter modules), Docker does not start:
//! the boot fails closed naming the firewall and the way out.
//!
//! Run: `nice -n 10 cargo test --release -p spotworld --test e2e e2e_12_imds_blocked -- --nocapture`

use std::time::Instant;

use crate::common::{expect, never, report, BOOT, STEP};
use spotworld::docker::{deploy_counter, COUNTER_NAME};
use spotworld::world::{docker_api_toml, InstanceSpec, Net, SimInstance, World, WorldSettings};

const META: &str = "/latest/meta-data/";

/// Docker state on tmpfs (no volume needed for this), the Engine API on TCP (with TLS) for the
/// test.
fn user_data(block_imds: Option<bool>) -> String {
    let mut u = String::from("[volume]\nmode = \"none\"\n\n[docker]\n");
    if let Some(b) = block_imds {
        u.push_str(&format!("block_imds = {b}\n"));
    }
    u.push_str(&docker_api_toml());
    u
}

/// Runs busybox wget against IMDS in the counter container; its exit code and output.
async fn wget_imds(i: &SimInstance) -> (i64, String) {
    let docker = i.docker().unwrap();
    docker.wait_ping(STEP).await.unwrap();
    let id = deploy_counter(&docker).await.unwrap();
    docker.wait_running(COUNTER_NAME, STEP).await.unwrap();
    let before = i.imds().requests(META);
    let (code, out) = docker
        .exec(
            &id,
            // (busybox 1.35's `wget -T` crashes; its `timeout` applet bounds the request.)
            &[
                "timeout",
                "30",
                "wget",
                "-S",
                "-O",
                "-",
                &format!("http://169.254.169.254{META}"),
            ],
        )
        .await
        .unwrap();
    let reached = i.imds().requests(META) - before;
    println!(
        "{}: wget in a container: exit {code}, {reached} request(s) reached IMDS:\n{}",
        i.name,
        out.trim()
    );
    (code, out)
}

#[tokio::test]
async fn containers_cannot_reach_imds_unless_allowed() {
    let _turn = crate::common::one_scenario_at_a_time().await;
    let t0 = Instant::now();
    let world = World::start(WorldSettings::new("e2e-12-imds-blocked"))
        .await
        .unwrap();

    let blocked = world
        .launch(
            InstanceSpec::new("blocked", "us-east-1a")
                .net(Net::LinkLocal)
                .user_data(user_data(None)),
        )
        .await
        .unwrap();
    let mut c = blocked.console();
    let rule = c
        .wait_until(
            "the IMDS rule's line",
            |t| t.contains("docker: containers cannot reach IMDS") || t.contains("IMDS: "),
            BOOT,
        )
        .await
        .unwrap();
    assert!(
        rule.text
            .contains("containers cannot reach IMDS (169.254.169.254/32"),
        "{}\n{}",
        rule.text,
        blocked.diagnostics()
    );
    blocked.wait_ready(BOOT).await.unwrap();
    never(&blocked, "could not keep containers away from IMDS");
    let before = blocked.imds().requests(META);
    let (code, out) = wget_imds(&blocked).await;
    assert_ne!(code, 0, "the container reached IMDS: {out}");
    assert!(
        out.contains("Connection refused") || out.contains("Connection reset"),
        "expected the connection to be refused: {out}"
    );
    assert!(
        !out.contains("HTTP/1."),
        "IMDS answered the container: {out}"
    );
    assert_eq!(
        blocked.imds().requests(META),
        before,
        "a request from the container reached the IMDS mock"
    );
    // spotinit itself still reads IMDS: it sees a rebalance recommendation.
    let mut c = blocked.console_from_now();
    blocked.post_rebalance();
    expect(&mut c, "spot: rebalance recommendation at", STEP).await;
    report("blocked: container refused, spotinit still reads IMDS", t0);
    drop(blocked);

    let open = world
        .launch(
            InstanceSpec::new("allowed", "us-east-1a")
                .net(Net::LinkLocal)
                .user_data(user_data(Some(false))),
        )
        .await
        .unwrap();
    open.wait_ready(BOOT).await.unwrap();
    never(&open, "containers cannot reach IMDS");
    let before = open.imds().requests(META);
    let (code, out) = wget_imds(&open).await;
    assert_ne!(code, 0, "IMDSv2 answers 401 without a token: {out}");
    assert!(out.contains("401"), "expected IMDS's 401: {out}");
    assert!(open.imds().requests(META) > before);
    drop(open);
    report("allowed: the container reaches IMDS", t0);

    // The kernel refuses to load netfilter: the rules cannot go in, so Docker must not start.
    let no_rules = world
        .launch(
            InstanceSpec::new("no-rules", "us-east-1a")
                .net(Net::LinkLocal)
                .extra_cmdline("module_blacklist=nf_tables,ip_tables,ip6_tables,x_tables")
                .user_data(user_data(None)),
        )
        .await
        .unwrap();
    let mut c = no_rules.console();
    let failed = expect(&mut c, "BOOT FAILED: ", BOOT).await;
    assert!(
        failed
            .text
            .contains("cannot install the firewall rules that keep containers away from IMDS")
            && failed.text.contains("docker.block_imds = false"),
        "{}\n{}",
        failed.text,
        no_rules.diagnostics()
    );
    expect(&mut c, "Docker was not started", STEP).await;
    assert!(no_rules.wait_poweroff(STEP).await.unwrap());
    never(&no_rules, "phase dockerd: done");
    never(&no_rules, "spotinit: ready in");
    println!("no-rules: {}", failed.text);
    report("scenario 12", t0);
}
