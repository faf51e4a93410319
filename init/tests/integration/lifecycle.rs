//! The spot lifecycle against the world in a box: the notice watcher against the IMDS mock, and
//! snapshots and addresses against moto behind the fidelity layer, through the real SDKs.

use spotinit::cloud::ec2::Ec2Client;
use spotinit::cloud::imds::Imds;
use spotinit::cloud::Identity;
use spotinit::config::Config;
use spotinit::lifecycle::{self, Event, Snapshots};
use spotinit::machine::Then;
use spotworld::fidelity::{Fidelity, Settings};
use spotworld::imds::ImdsMock;
use spotworld::moto::MotoServer;
use spotworld::NoDevices;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

fn identity(id: &str) -> Identity {
    Identity {
        instance_id: id.into(),
        region: "us-east-1".into(),
        zone: "us-east-1a".into(),
        account_id: "123456789012".into(),
        instance_type: "t3.small".into(),
        image_id: "ami-03cf127a".into(),
    }
}

fn config(poll_secs: u64) -> Config {
    let mut c = Config::default();
    c.spot.poll_secs = poll_secs;
    c
}

#[tokio::test]
async fn a_notice_becomes_one_request_with_ec2s_deadline_and_failures_do_not_stop_the_watcher() {
    let mock = ImdsMock::start(
        spotworld::imds::Identity::new("i-0aaaaaaaaaaaaaaaa", "us-east-1a"),
        None,
    )
    .await
    .unwrap();
    // Tokens live one second: the client must keep fetching new ones.
    mock.set_max_token_ttl(1);
    let meta = Imds::new(Some(&mock.endpoint())).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (etx, mut erx) = mpsc::unbounded_channel();
    lifecycle::watch(meta, &config(1), tx, etx);

    // IMDS fails for a while: the watcher keeps going.
    mock.fail_next(6);
    let polled = Instant::now();
    while mock.requests("/latest/meta-data/spot/instance-action") < 3 {
        assert!(
            polled.elapsed() < Duration::from_secs(30),
            "the watcher stopped polling"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rx.try_recv().is_err(), "no notice yet");

    mock.post_rebalance(SystemTime::now());
    let ev = timeout(Duration::from_secs(10), erx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ev, Event::Rebalance(_)));

    let at = SystemTime::now() + Duration::from_secs(120);
    mock.post_spot_notice("terminate", at);
    let req = timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a request within two polls")
        .unwrap();
    assert_eq!(req.then, Then::Wait, "never power off early by default");
    assert!(req.reason.contains("terminate"), "{}", req.reason);
    let left = req
        .deadline
        .unwrap()
        .saturating_duration_since(Instant::now());
    assert!(
        left > Duration::from_secs(100) && left <= Duration::from_secs(120),
        "{left:?}"
    );
    // Acted on once: the notice stays posted, no second request comes.
    let polls = mock.requests("/latest/meta-data/spot/instance-action");
    let again = timeout(Duration::from_secs(3), rx.recv()).await;
    assert!(
        matches!(again, Err(_) | Ok(None)),
        "a second request: {again:?}"
    );
    assert_eq!(
        mock.requests("/latest/meta-data/spot/instance-action"),
        polls,
        "the watcher stops after acting"
    );
}

/// EC2 schedules the instance's retirement: with `spot.drain_before_retirement` the watcher
/// asks for a drain and a power-off ten minutes ahead of it, with the time left as the deadline;
/// a reboot on the same list is only reported.
#[tokio::test]
async fn a_scheduled_retirement_drains_and_powers_off_ten_minutes_ahead() {
    let mock = ImdsMock::start(
        spotworld::imds::Identity::new("i-0bbbbbbbbbbbbbbbb", "us-east-1a"),
        None,
    )
    .await
    .unwrap();
    let now = SystemTime::now();
    mock.post_scheduled_event(
        "system-reboot",
        "scheduled reboot",
        now + Duration::from_secs(3600),
    );
    let lead = spotinit::scheduled::RETIREMENT_LEAD;
    let retirement = mock.post_scheduled_event(
        "instance-retirement",
        "The instance is running on degraded hardware",
        now + lead + Duration::from_secs(4),
    );
    let meta = Imds::new(Some(&mock.endpoint())).unwrap();
    let mut cfg = config(1);
    cfg.spot.drain_before_retirement = true;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (etx, _erx) = mpsc::unbounded_channel();
    lifecycle::watch(meta, &cfg, tx, etx);
    let req = timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a drain request about 4 s from now")
        .unwrap();
    assert_eq!(req.then, Then::PowerOff);
    assert!(
        req.reason.contains("instance-retirement") && req.reason.contains(&retirement),
        "{}",
        req.reason
    );
    let left = req
        .deadline
        .unwrap()
        .saturating_duration_since(Instant::now());
    assert!(
        left > lead - Duration::from_secs(5) && left <= lead,
        "{left:?}"
    );
    assert!(
        mock.requests("/latest/meta-data/events/maintenance/scheduled") >= 1,
        "the events were read"
    );
}

struct World {
    _moto: MotoServer,
    fidelity: Fidelity,
    _imds: ImdsMock,
    ec2: Arc<Ec2Client>,
}

async fn world(instance: &str) -> World {
    let moto = MotoServer::start().await.unwrap();
    let settings = Settings {
        snapshot_duration: Duration::from_millis(300),
        volume_creation: Duration::from_millis(100),
        ..Settings::default()
    };
    let fidelity = Fidelity::start(moto.endpoint(), Arc::new(NoDevices), settings)
        .await
        .unwrap();
    let imds = ImdsMock::start(spotworld::imds::Identity::new(instance, "us-east-1a"), None)
        .await
        .unwrap();
    let meta = Imds::new(Some(&imds.endpoint())).unwrap();
    let ec2 = Arc::new(Ec2Client::with_instance_role(
        "us-east-1",
        Some(&fidelity.endpoint()),
        &meta,
    ));
    World {
        _moto: moto,
        fidelity,
        _imds: imds,
        ec2,
    }
}

async fn snapshots_of(w: &World, volume: &str) -> Vec<spotworld::moto::Snapshot> {
    let mut v: Vec<_> = w
        .fidelity
        .client()
        .describe_snapshots()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.volume_id == volume)
        .collect();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

async fn wait_completed(w: &World, volume: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    while snapshots_of(w, volume)
        .await
        .iter()
        .any(|s| s.state != "completed")
    {
        assert!(Instant::now() < until, "snapshots of {volume} stay pending");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// EC2 gives snapshot start times to the second: wait for the next one so "newest" is clear.
async fn next_second() {
    let now = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let s = now();
    while now() == s {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn pruning_keeps_the_newest_and_never_deletes_a_snapshot_spotinit_did_not_create() {
    let w = world("i-0bbbbbbbbbbbbbbbb").await;
    let api = w.fidelity.client();
    let vol = spotworld::moto::root_text(
        &api.call(
            "CreateVolume",
            &[("AvailabilityZone", "us-east-1a"), ("Size", "1")],
        )
        .await
        .unwrap(),
        "volumeId",
    )
    .unwrap();
    // Someone else's snapshots of the same volume: untagged, a move snapshot, and a "backup"
    // that claims another volume.
    let foreign: Vec<String> = {
        let mut ids = Vec::new();
        for tags in [
            vec![],
            vec![("spotinit:purpose", "move")],
            vec![
                ("spotinit:purpose", "backup"),
                ("spotinit:volume", "vol-0other"),
            ],
        ] {
            let mut params = spotworld::query::Params::from_pairs([("VolumeId", vol.as_str())]);
            params.push_tag_specification("snapshot", &tags);
            let xml = api.call_with("CreateSnapshot", params).await.unwrap();
            ids.push(spotworld::moto::root_text(&xml, "snapshotId").unwrap());
        }
        ids
    };
    wait_completed(&w, &vol).await;
    let snaps = Snapshots {
        ec2: w.ec2.clone(),
        volume_id: vol.clone(),
        me: identity("i-0bbbbbbbbbbbbbbbb"),
        keep: 2,
    };
    let mut ours = Vec::new();
    for i in 0..4 {
        next_second().await;
        ours.push(snaps.take(&format!("test {i}")).await.unwrap());
        wait_completed(&w, &vol).await;
    }
    // Each take prunes; after the fourth, only the two newest of ours remain.
    snaps.prune().await.unwrap();
    let left: Vec<String> = snapshots_of(&w, &vol)
        .await
        .into_iter()
        .map(|s| s.id)
        .collect();
    for f in &foreign {
        assert!(
            left.contains(f),
            "foreign snapshot {f} was deleted: {left:?}"
        );
    }
    assert!(
        !left.contains(&ours[0]) && !left.contains(&ours[1]),
        "{left:?}"
    );
    assert!(
        left.contains(&ours[2]) && left.contains(&ours[3]),
        "{left:?}"
    );
    // Ours carry what they are.
    let s = snapshots_of(&w, &vol)
        .await
        .into_iter()
        .find(|s| s.id == ours[3])
        .unwrap();
    assert_eq!(
        s.tags.get("spotinit:purpose").map(String::as_str),
        Some("backup")
    );
    assert_eq!(
        s.tags.get("spotinit:reason").map(String::as_str),
        Some("test 3")
    );
    let deletes = w
        .fidelity
        .requests()
        .into_iter()
        .filter(|r| r.action == "DeleteSnapshot")
        .count();
    assert_eq!(deletes, 2);
}

#[tokio::test]
async fn the_elastic_ip_follows_the_instance_from_its_dead_predecessor() {
    let w = world("i-0ccccccccccccccccc").await;
    let moto = w.fidelity.client();
    let alloc = spotworld::moto::root_text(
        &moto
            .call("AllocateAddress", &[("Domain", "vpc")])
            .await
            .unwrap(),
        "allocationId",
    )
    .unwrap();
    let a = moto.run_instance("us-east-1a").await.unwrap();
    let b = moto.run_instance("us-east-1a").await.unwrap();
    assert!(lifecycle::associate_address(&*w.ec2, &alloc, &identity(&a)).await);
    moto.terminate_instance(&a).await.unwrap();
    assert!(lifecycle::associate_address(&*w.ec2, &alloc, &identity(&b)).await);
    let xml = moto
        .call("DescribeAddresses", &[("AllocationId.1", &alloc)])
        .await
        .unwrap();
    let holder = xml
        .split("<instanceId>")
        .nth(1)
        .and_then(|t| t.split('<').next());
    assert_eq!(holder, Some(b.as_str()), "{xml}");
    // A missing permission is reported, not fatal.
    w.fidelity.deny("AssociateAddress");
    assert!(!lifecycle::associate_address(&*w.ec2, &alloc, &identity(&a)).await);
}

/// `address.from_pool`: the Elastic IP tagged with the pool and this host's slot is the one
/// associated; none, or two, for the slot: said, and nothing associated.
#[tokio::test]
async fn each_slot_of_a_pool_gets_the_elastic_ip_tagged_for_it() {
    let w = world("i-0dddddddddddddddd").await;
    let moto = w.fidelity.client();
    let allocate = |tags: Vec<(&'static str, &'static str)>| {
        let moto = moto.clone();
        async move {
            let mut params = spotworld::query::Params::from_pairs([("Domain", "vpc")]);
            params.push_tag_specification("elastic-ip", &tags);
            let xml = moto.call_with("AllocateAddress", params).await.unwrap();
            spotworld::moto::root_text(&xml, "allocationId").unwrap()
        }
    };
    let slot = |n| spotinit::volume::Slot {
        pool: "runners".into(),
        number: n,
    };
    let _one = allocate(vec![("spotinit:pool", "runners"), ("spotinit:slot", "1")]).await;
    let two = allocate(vec![("spotinit:pool", "runners"), ("spotinit:slot", "2")]).await;
    let _other_pool = allocate(vec![("spotinit:pool", "other"), ("spotinit:slot", "2")]).await;
    let a = moto.run_instance("us-east-1a").await.unwrap();
    assert!(lifecycle::associate_slot_address(&*w.ec2, &slot(2), &identity(&a)).await);
    let xml = moto
        .call("DescribeAddresses", &[("AllocationId.1", &two)])
        .await
        .unwrap();
    assert!(
        xml.contains(&format!("<instanceId>{a}</instanceId>")),
        "{xml}"
    );
    // No Elastic IP for slot 3; two for slot 1.
    assert!(!lifecycle::associate_slot_address(&*w.ec2, &slot(3), &identity(&a)).await);
    allocate(vec![("spotinit:pool", "runners"), ("spotinit:slot", "1")]).await;
    assert!(!lifecycle::associate_slot_address(&*w.ec2, &slot(1), &identity(&a)).await);
    let associations = w
        .fidelity
        .requests()
        .into_iter()
        .filter(|r| r.action == "AssociateAddress")
        .count();
    assert_eq!(associations, 1);
}

#[tokio::test]
async fn imds_falls_back_to_the_second_endpoint_and_keeps_it() {
    use spotinit::cloud::Metadata;
    let mock = ImdsMock::start(
        spotworld::imds::Identity::new("i-0dddddddddddddddd", "us-east-1a"),
        Some("[volume]\nsize_gib = 5\n".into()),
    )
    .await
    .unwrap();
    // Where nothing listens: the stand-in for an IPv4 endpoint an IPv6-only subnet cannot reach.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let imds = Imds::with_endpoints(&[&closed, &mock.endpoint()]).unwrap();
    assert_eq!(
        imds.identity().await.unwrap().instance_id,
        "i-0dddddddddddddddd"
    );
    assert_eq!(
        imds.endpoint(),
        mock.endpoint(),
        "the answering endpoint is kept"
    );
    assert_eq!(
        imds.user_data().await.unwrap().as_deref(),
        Some("[volume]\nsize_gib = 5\n")
    );
}
