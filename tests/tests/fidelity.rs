//! The EC2-fidelity layer, driven through the real `aws-sdk-ec2` client as spotinit drives it,
//! with moto behind it and a recording `EbsHooks` standing in for the block devices.
//!
//! Needs `moto_server` on PATH (`pip install -r tests/requirements.txt`).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    Filter, InstanceStateName, ResourceType, SnapshotState, Tag, TagSpecification,
    VolumeAttachmentState, VolumeModificationState, VolumeState,
};
use spotworld::fidelity::{AttachmentEnd, Fault, Fidelity, Settings};
use spotworld::moto::MotoServer;
use spotworld::{BoxFuture, EbsHooks};
use tokio::sync::Semaphore;

const ZONE_A: &str = "us-east-1a";
const ZONE_B: &str = "us-east-1b";

// ---------------------------------------------------------------------------------------------
// The world of one test
// ---------------------------------------------------------------------------------------------

/// Block-device hooks that record what they are told, can hold an attach until the test lets
/// it go, and can fail on request.
#[derive(Default)]
struct RecordingHooks {
    events: Mutex<Vec<(Instant, String)>>,
    attach_gate: Mutex<Option<Arc<Semaphore>>>,
    fail_attach: Mutex<Option<String>>,
    fail_detach: Mutex<Option<String>>,
}

impl RecordingHooks {
    fn record(&self, event: String) {
        self.events.lock().unwrap().push((Instant::now(), event));
    }

    fn events(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// When `event` was recorded (the first time).
    fn when(&self, event: &str) -> Option<Instant> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|(_, e)| e == event)
            .map(|(t, _)| *t)
    }

    /// Attach hooks wait until [`RecordingHooks::open_attach_gate`].
    fn close_attach_gate(&self) {
        *self.attach_gate.lock().unwrap() = Some(Arc::new(Semaphore::new(0)));
    }

    /// Lets the waiting attach hooks (and later ones) through.
    fn open_attach_gate(&self) {
        if let Some(gate) = self.attach_gate.lock().unwrap().take() {
            gate.close();
        }
    }
}

impl EbsHooks for RecordingHooks {
    fn volume_created<'a>(
        &'a self,
        volume_id: &'a str,
        size_gib: u64,
        snapshot_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.record(format!(
                "volume_created {volume_id} {size_gib} {}",
                snapshot_id.unwrap_or("-")
            ));
            Ok(())
        })
    }

    fn snapshot_created<'a>(
        &'a self,
        snapshot_id: &'a str,
        volume_id: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.record(format!("snapshot_created {snapshot_id} {volume_id}"));
            Ok(())
        })
    }

    fn volume_resized<'a>(
        &'a self,
        volume_id: &'a str,
        size_gib: u64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.record(format!("volume_resized {volume_id} {size_gib}"));
            Ok(())
        })
    }

    fn attach<'a>(
        &'a self,
        instance_id: &'a str,
        volume_id: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.record(format!("attach begin {instance_id} {volume_id}"));
            let gate = self.attach_gate.lock().unwrap().clone();
            if let Some(gate) = gate {
                // Closing the semaphore is what opens the gate.
                let _ = gate.acquire().await;
            }
            if let Some(why) = self.fail_attach.lock().unwrap().clone() {
                self.record(format!("attach failed {instance_id} {volume_id}"));
                return Err(why);
            }
            self.record(format!("attach end {instance_id} {volume_id}"));
            Ok(())
        })
    }

    fn detach<'a>(
        &'a self,
        instance_id: &'a str,
        volume_id: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if let Some(why) = self.fail_detach.lock().unwrap().clone() {
                self.record(format!("detach failed {instance_id} {volume_id}"));
                return Err(why);
            }
            self.record(format!("detach {instance_id} {volume_id}"));
            Ok(())
        })
    }

    fn instance_gone<'a>(&'a self, instance_id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.record(format!("instance_gone {instance_id}")) })
    }
}

struct World {
    // Dropped in this order: the layer, then moto.
    fidelity: Fidelity,
    moto: MotoServer,
    hooks: Arc<RecordingHooks>,
    /// The SDK as spotinit configures it (standard retries).
    ec2: aws_sdk_ec2::Client,
    /// The SDK without retries, to see each error as it comes.
    ec2_once: aws_sdk_ec2::Client,
}

/// Fast settings: transitions long enough to observe, short enough for tests.
fn fast_settings() -> Settings {
    Settings {
        attach_latency: Duration::from_millis(600),
        detach_latency: Duration::from_millis(400),
        volume_creation: Duration::from_millis(300),
        snapshot_duration: Duration::from_millis(2000),
        shutting_down: Duration::from_millis(1000),
        release_after_termination: Duration::from_secs(3),
        modification_modifying: Duration::from_millis(1000),
        modification_optimizing: Duration::from_millis(1000),
        ..Settings::default()
    }
}

async fn world(settings: Settings) -> World {
    let moto = MotoServer::start().await.expect("moto_server starts");
    let hooks = Arc::new(RecordingHooks::default());
    let fidelity = Fidelity::start(moto.endpoint(), hooks.clone(), settings)
        .await
        .expect("fidelity layer starts");
    let ec2 = sdk(&fidelity.endpoint(), 3);
    let ec2_once = sdk(&fidelity.endpoint(), 1);
    World {
        fidelity,
        moto,
        hooks,
        ec2,
        ec2_once,
    }
}

fn sdk(endpoint: &str, max_attempts: u32) -> aws_sdk_ec2::Client {
    use aws_sdk_ec2::config::{retry::RetryConfig, BehaviorVersion, Credentials, Region};
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(
            "AKIDTEST",
            "test-secret",
            None,
            None,
            "test",
        ))
        .http_client(http)
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(max_attempts)
                .with_initial_backoff(Duration::from_millis(20)),
        )
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

/// Polls `probe` every 50 ms until it gives a value; panics naming `what` after `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl World {
    async fn run_instance(&self, zone: &str) -> String {
        self.fidelity
            .client()
            .run_instance(zone)
            .await
            .unwrap_or_else(|e| panic!("RunInstances in {zone}: {e}"))
    }

    async fn create_volume(&self, zone: &str, size: i32) -> String {
        let out = self
            .ec2
            .create_volume()
            .availability_zone(zone)
            .size(size)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .tags(Tag::builder().key("Name").value("spotinit-state").build())
                    .build(),
            )
            .send()
            .await
            .unwrap_or_else(|e| panic!("CreateVolume in {zone}: {e:?}"));
        assert_eq!(
            out.state(),
            Some(&VolumeState::Creating),
            "a new volume is creating"
        );
        let id = out
            .volume_id()
            .expect("CreateVolume gives an id")
            .to_string();
        self.wait_volume(&id, "available", Duration::from_secs(5))
            .await;
        id
    }

    /// The volume's state and its attachments' states, as the SDK reads them.
    async fn volume(&self, volume_id: &str) -> (String, Vec<(String, String)>) {
        let out = self
            .ec2
            .describe_volumes()
            .volume_ids(volume_id)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DescribeVolumes {volume_id}: {e:?}"));
        let v = &out.volumes()[0];
        (
            v.state().expect("volume state").as_str().to_string(),
            v.attachments()
                .iter()
                .map(|a| {
                    (
                        a.instance_id().unwrap_or("").to_string(),
                        a.state().expect("attachment state").as_str().to_string(),
                    )
                })
                .collect(),
        )
    }

    async fn wait_volume(&self, volume_id: &str, state: &str, limit: Duration) {
        wait_for(
            &format!("{volume_id} to be {state}"),
            limit,
            || async move { (self.volume(volume_id).await.0 == state).then_some(()) },
        )
        .await
    }

    async fn wait_attachment(&self, volume_id: &str, state: &str, limit: Duration) {
        wait_for(
            &format!("{volume_id}'s attachment to be {state}"),
            limit,
            || async move {
                let (_, attachments) = self.volume(volume_id).await;
                attachments.iter().any(|(_, s)| s == state).then_some(())
            },
        )
        .await
    }

    async fn attach(&self, volume_id: &str, instance_id: &str, device: &str) {
        let out = self
            .ec2
            .attach_volume()
            .volume_id(volume_id)
            .instance_id(instance_id)
            .device(device)
            .send()
            .await
            .unwrap_or_else(|e| panic!("AttachVolume {volume_id} to {instance_id}: {e:?}"));
        assert_eq!(out.state(), Some(&VolumeAttachmentState::Attaching));
    }

    async fn attach_error(
        &self,
        volume_id: &str,
        instance_id: &str,
        device: &str,
    ) -> (String, String) {
        let err = self
            .ec2_once
            .attach_volume()
            .volume_id(volume_id)
            .instance_id(instance_id)
            .device(device)
            .send()
            .await
            .expect_err("AttachVolume must be refused");
        (
            err.code().unwrap_or("<no code>").to_string(),
            err.message().unwrap_or("").to_string(),
        )
    }

    async fn instance_state(&self, instance_id: &str) -> (InstanceStateName, i32) {
        let out = self
            .ec2
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DescribeInstances {instance_id}: {e:?}"));
        let state = out.reservations()[0].instances()[0]
            .state()
            .expect("instance state")
            .clone();
        (
            state.name().expect("state name").clone(),
            state.code().expect("state code"),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Attach
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_is_attaching_until_the_hook_returned_and_the_latency_passed() {
    let w = world(fast_settings()).await;
    let instance = w.run_instance(ZONE_A).await;
    let volume = w.create_volume(ZONE_A, 10).await;
    assert!(
        w.hooks
            .events()
            .contains(&format!("volume_created {volume} 10 -")),
        "the block-device side heard of the new volume: {:?}",
        w.hooks.events()
    );

    // The device takes longer to appear than the API latency: the attachment waits for it.
    w.hooks.close_attach_gate();
    let asked = Instant::now();
    w.attach(&volume, &instance, "/dev/sdf").await;
    let attach_begin = &format!("attach begin {instance} {volume}");
    let hooks = &w.hooks;
    wait_for(
        "the attach hook to be called",
        Duration::from_secs(5),
        || async move { hooks.when(attach_begin) },
    )
    .await;
    // Well past the latency, still attaching while the hook has not returned.
    while asked.elapsed() < w.fidelity.settings().attach_latency * 3 {
        let (state, attachments) = w.volume(&volume).await;
        assert_eq!(state, "in-use");
        assert_eq!(
            attachments,
            vec![(instance.clone(), "attaching".to_string())]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Filters on the overlaid state work as on EC2.
    let attaching = w
        .ec2
        .describe_volumes()
        .filters(
            Filter::builder()
                .name("attachment.status")
                .values("attaching")
                .build(),
        )
        .send()
        .await
        .expect("DescribeVolumes with a filter");
    assert_eq!(
        attaching
            .volumes()
            .iter()
            .filter_map(|v| v.volume_id())
            .collect::<Vec<_>>(),
        vec![volume.as_str()]
    );

    w.hooks.open_attach_gate();
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;
    let attached_seen = Instant::now();
    let hook_done = w
        .hooks
        .when(&format!("attach end {instance} {volume}"))
        .expect("the attach hook returned");
    assert!(hook_done <= attached_seen);

    // With a quick hook, `attached` still comes no sooner than the latency.
    let second = w.create_volume(ZONE_A, 5).await;
    let asked = Instant::now();
    w.attach(&second, &instance, "/dev/sdg").await;
    w.wait_attachment(&second, "attached", Duration::from_secs(5))
        .await;
    assert!(
        asked.elapsed() >= w.fidelity.settings().attach_latency,
        "attached after {:?}, before the latency",
        asked.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_volume_is_volume_in_use_and_a_used_device_is_refused() {
    let w = world(fast_settings()).await;
    let a = w.run_instance(ZONE_A).await;
    let b = w.run_instance(ZONE_A).await;
    let volume = w.create_volume(ZONE_A, 10).await;
    w.attach(&volume, &a, "/dev/sdf").await;

    // While attaching, and once attached: EC2's code and wording.
    let (code, message) = w.attach_error(&volume, &b, "/dev/sdf").await;
    assert_eq!(code, "VolumeInUse");
    assert_eq!(
        message,
        format!("{volume} is already attached to an instance")
    );
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;
    let (code, _) = w.attach_error(&volume, &b, "/dev/sdf").await;
    assert_eq!(code, "VolumeInUse");
    // moto did not move it (it would have).
    let in_moto = w.moto.client().describe_volume(&volume).await.unwrap();
    assert_eq!(in_moto.attachments.len(), 1);
    assert_eq!(in_moto.attachments[0].instance_id, a);

    let other = w.create_volume(ZONE_A, 10).await;
    let (code, message) = w.attach_error(&other, &a, "/dev/sdf").await;
    assert_eq!(code, "InvalidParameterValue");
    assert_eq!(
        message,
        "Invalid value '/dev/sdf' for unixDevice. Attachment point /dev/sdf is already in use"
    );
    // The root device counts too.
    let (code, _) = w.attach_error(&other, &a, "/dev/sda1").await;
    assert_eq!(code, "InvalidParameterValue");
    let (code, message) = w.attach_error(&other, &a, "/dev/nvme1n1").await;
    assert_eq!(code, "InvalidParameterValue");
    assert!(
        message.contains("is not a valid EBS device name"),
        "{message}"
    );

    // Unknown ids, as EC2 names them.
    let (code, message) = w
        .attach_error("vol-0123456789abcdef0", &a, "/dev/sdh")
        .await;
    assert_eq!(code, "InvalidVolume.NotFound");
    assert_eq!(
        message,
        "The volume 'vol-0123456789abcdef0' does not exist."
    );
    let (code, _) = w
        .attach_error(&other, "i-0123456789abcdef0", "/dev/sdh")
        .await;
    assert_eq!(code, "InvalidInstanceID.NotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaching_across_zones_is_a_zone_mismatch() {
    let w = world(fast_settings()).await;
    let instance = w.run_instance(ZONE_B).await;
    let volume = w.create_volume(ZONE_A, 10).await;
    let (code, message) = w.attach_error(&volume, &instance, "/dev/sdf").await;
    assert_eq!(code, "InvalidVolume.ZoneMismatch");
    assert_eq!(
        message,
        format!(
            "The volume '{volume}' is not in the same availability zone as instance '{instance}'"
        )
    );
    assert!(w
        .moto
        .client()
        .describe_volume(&volume)
        .await
        .unwrap()
        .attachments
        .is_empty());
    assert!(!w.hooks.events().iter().any(|e| e.starts_with("attach")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creating_volume_is_not_available_for_attach() {
    let w = world(Settings {
        volume_creation: Duration::from_secs(30),
        ..fast_settings()
    })
    .await;
    let instance = w.run_instance(ZONE_A).await;
    let out = w
        .ec2
        .create_volume()
        .availability_zone(ZONE_A)
        .size(1)
        .send()
        .await
        .expect("CreateVolume");
    let volume = out.volume_id().unwrap().to_string();
    assert_eq!(w.volume(&volume).await.0, "creating");
    let (code, message) = w.attach_error(&volume, &instance, "/dev/sdf").await;
    assert_eq!(code, "IncorrectState");
    assert_eq!(message, format!("{volume} is not 'available'."));
    // A status filter sees the overlaid state, not moto's.
    let available = w
        .ec2
        .describe_volumes()
        .filters(Filter::builder().name("status").values("available").build())
        .send()
        .await
        .unwrap();
    assert!(!available
        .volumes()
        .iter()
        .any(|v| v.volume_id() == Some(volume.as_str())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_attaches_have_exactly_one_winner() {
    let w = world(fast_settings()).await;
    let a = w.run_instance(ZONE_A).await;
    let b = w.run_instance(ZONE_A).await;
    let volume = w.create_volume(ZONE_A, 10).await;
    let attach = |instance: String| {
        let ec2 = w.ec2_once.clone();
        let volume = volume.clone();
        async move {
            ec2.attach_volume()
                .volume_id(volume)
                .instance_id(instance)
                .device("/dev/sdf")
                .send()
                .await
        }
    };
    let (ra, rb) = tokio::join!(attach(a.clone()), attach(b.clone()));
    let (winner, loser) = match (ra, rb) {
        (Ok(_), Err(e)) => (a, e),
        (Err(e), Ok(_)) => (b, e),
        (ra, rb) => panic!(
            "exactly one attach must win: {:?} / {:?}",
            ra.map(drop),
            rb.map(drop)
        ),
    };
    assert_eq!(loser.code(), Some("VolumeInUse"));
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;
    assert_eq!(
        w.volume(&volume).await.1,
        vec![(winner, "attached".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attach_hook_leaves_the_volume_available() {
    let w = world(fast_settings()).await;
    let instance = w.run_instance(ZONE_A).await;
    let volume = w.create_volume(ZONE_A, 10).await;
    *w.hooks.fail_attach.lock().unwrap() = Some("no free PCIe root port".into());
    w.attach(&volume, &instance, "/dev/sdf").await;
    w.wait_volume(&volume, "available", Duration::from_secs(5))
        .await;
    assert!(w.volume(&volume).await.1.is_empty());
    assert!(w
        .moto
        .client()
        .describe_volume(&volume)
        .await
        .unwrap()
        .attachments
        .is_empty());
    assert!(w
        .hooks
        .events()
        .contains(&format!("attach failed {instance} {volume}")));
    // And it can be attached again.
    *w.hooks.fail_attach.lock().unwrap() = None;
    w.attach(&volume, &instance, "/dev/sdf").await;
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;
}

// ---------------------------------------------------------------------------------------------
// Detach
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_runs_the_hook_waits_the_latency_and_reaches_moto_with_the_instance_id() {
    let w = world(fast_settings()).await;
    let instance = w.run_instance(ZONE_A).await;
    let other = w.run_instance(ZONE_A).await;
    let volume = w.create_volume(ZONE_A, 10).await;
    w.attach(&volume, &instance, "/dev/sdf").await;
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;

    // The wrong instance is refused.
    let err = w
        .ec2_once
        .detach_volume()
        .volume_id(&volume)
        .instance_id(&other)
        .send()
        .await
        .expect_err("detach from the wrong instance");
    assert_eq!(err.code(), Some("InvalidAttachment.NotFound"));

    // Without InstanceId (which crashes moto): the layer adds it when it forwards.
    let asked = Instant::now();
    let out = w
        .ec2
        .detach_volume()
        .volume_id(&volume)
        .send()
        .await
        .expect("DetachVolume without InstanceId");
    assert_eq!(out.state(), Some(&VolumeAttachmentState::Detaching));
    assert_eq!(out.instance_id(), Some(instance.as_str()));
    assert_eq!(out.device(), Some("/dev/sdf"));
    assert_eq!(
        w.volume(&volume).await,
        (
            "in-use".to_string(),
            vec![(instance.clone(), "detaching".to_string())]
        )
    );
    w.wait_volume(&volume, "available", Duration::from_secs(5))
        .await;
    assert!(asked.elapsed() >= w.fidelity.settings().detach_latency);
    assert!(w
        .hooks
        .events()
        .contains(&format!("detach {instance} {volume}")));

    let forwarded: Vec<_> = w
        .fidelity
        .moto_requests()
        .into_iter()
        .filter(|r| r.action == "DetachVolume")
        .collect();
    assert_eq!(forwarded.len(), 1, "one detach reached moto: {forwarded:?}");
    assert_eq!(forwarded[0].param("InstanceId"), Some(instance.as_str()));
    assert_eq!(forwarded[0].status, 200);
    // The client's own request log still shows what spotinit sent.
    assert!(w
        .fidelity
        .requests()
        .iter()
        .any(|r| r.action == "DetachVolume" && r.param("InstanceId").is_none() && r.status == 200));

    // Detaching an available volume: EC2's IncorrectState.
    let err = w
        .ec2_once
        .detach_volume()
        .volume_id(&volume)
        .instance_id(&instance)
        .send()
        .await
        .expect_err("detach of an available volume");
    assert_eq!(err.code(), Some("IncorrectState"));
    assert_eq!(
        err.message(),
        Some(format!("Volume '{volume}' is in the 'available' state.").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_detach_hook_leaves_the_volume_busy_until_a_force_detach() {
    let w = world(fast_settings()).await;
    let instance = w.run_instance(ZONE_A).await;
    let volume = w.create_volume(ZONE_A, 10).await;
    w.attach(&volume, &instance, "/dev/sdf").await;
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;
    *w.hooks.fail_detach.lock().unwrap() = Some("device_del timed out: still mounted".into());
    w.ec2
        .detach_volume()
        .volume_id(&volume)
        .instance_id(&instance)
        .send()
        .await
        .unwrap();
    w.wait_attachment(&volume, "busy", Duration::from_secs(5))
        .await;
    assert_eq!(w.volume(&volume).await.0, "in-use");
    w.ec2
        .detach_volume()
        .volume_id(&volume)
        .force(true)
        .send()
        .await
        .expect("force-detach");
    assert_eq!(w.volume(&volume).await, ("available".to_string(), vec![]));
}

// ---------------------------------------------------------------------------------------------
// Termination
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_instance_holds_its_volume_until_the_release_delay() {
    // Shutting down long enough to look at it calmly on a loaded machine.
    let w = world(Settings {
        shutting_down: Duration::from_secs(2),
        release_after_termination: Duration::from_secs(4),
        ..fast_settings()
    })
    .await;
    let dead = w.run_instance(ZONE_A).await;
    let next = w.run_instance(ZONE_A).await;
    let volume = w.create_volume(ZONE_A, 10).await;
    w.attach(&volume, &dead, "/dev/sdf").await;
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;

    let killed = Instant::now();
    w.fidelity.terminate(&dead).await.expect("terminate");
    assert!(w.hooks.events().contains(&format!("instance_gone {dead}")));
    assert_eq!(
        w.instance_state(&dead).await,
        (InstanceStateName::ShuttingDown, 32)
    );
    assert_eq!(
        w.volume(&volume).await,
        (
            "in-use".to_string(),
            vec![(dead.clone(), "attached".to_string())]
        )
    );

    // Held: the next instance cannot take it, and a plain detach is refused.
    let (code, _) = w.attach_error(&volume, &next, "/dev/sdf").await;
    assert_eq!(code, "VolumeInUse");
    let err = w
        .ec2_once
        .detach_volume()
        .volume_id(&volume)
        .instance_id(&dead)
        .send()
        .await
        .expect_err("plain detach from a terminating instance");
    assert_eq!(err.code(), Some("IncorrectInstanceState"));

    let (world, dead_id) = (&w, dead.as_str());
    wait_for(
        "the instance to be terminated",
        Duration::from_secs(5),
        || async move {
            (world.instance_state(dead_id).await == (InstanceStateName::Terminated, 48))
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        w.volume(&volume).await,
        (
            "in-use".to_string(),
            vec![(dead.clone(), "detaching".to_string())]
        )
    );

    w.wait_volume(&volume, "available", Duration::from_secs(10))
        .await;
    let release = w.fidelity.settings().release_after_termination;
    assert!(
        killed.elapsed() >= release,
        "released after {:?}, before {release:?}",
        killed.elapsed()
    );
    // moto was told only now: it shows the instance terminated.
    assert_eq!(
        w.moto
            .client()
            .describe_instance(&dead)
            .await
            .unwrap()
            .state,
        "terminated"
    );
    w.attach(&volume, &next, "/dev/sdf").await;
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_detach_releases_a_held_volume_at_once() {
    let w = world(Settings {
        release_after_termination: Duration::from_secs(600),
        ..fast_settings()
    })
    .await;
    let dead = w.run_instance(ZONE_A).await;
    let next = w.run_instance(ZONE_A).await;
    let volume = w.create_volume(ZONE_A, 10).await;
    w.attach(&volume, &dead, "/dev/sdf").await;
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;

    // Through the API this time, as EC2 answers it.
    let out = w
        .ec2
        .terminate_instances()
        .instance_ids(&dead)
        .send()
        .await
        .expect("TerminateInstances");
    let change = &out.terminating_instances()[0];
    assert_eq!(
        change.current_state().and_then(|s| s.name()),
        Some(&InstanceStateName::ShuttingDown)
    );
    assert_eq!(
        change.previous_state().and_then(|s| s.name()),
        Some(&InstanceStateName::Running)
    );
    assert!(w.hooks.events().contains(&format!("instance_gone {dead}")));
    assert_eq!(w.volume(&volume).await.0, "in-use");

    // From the next instance, without naming the holder.
    w.ec2
        .detach_volume()
        .volume_id(&volume)
        .force(true)
        .send()
        .await
        .expect("force-detach of a held volume");
    assert_eq!(w.volume(&volume).await, ("available".to_string(), vec![]));
    w.attach(&volume, &next, "/dev/sdf").await;
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;
    // The dying instance is still shutting down or terminated meanwhile, not running.
    assert_ne!(w.instance_state(&dead).await.0, InstanceStateName::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attachment_history_spans_each_attachment_from_moto_to_its_end() {
    let w = world(fast_settings()).await;
    let settings = w.fidelity.settings().clone();
    let a = w.run_instance(ZONE_A).await;
    let b = w.run_instance(ZONE_A).await;
    let c = w.run_instance(ZONE_A).await;
    let d = w.run_instance(ZONE_A).await;
    let elsewhere = w.run_instance(ZONE_B).await;
    let volume = w.create_volume(ZONE_A, 10).await;

    // Refused before moto: no attachment.
    let (code, _) = w.attach_error(&volume, &elsewhere, "/dev/sdf").await;
    assert_eq!(code, "InvalidVolume.ZoneMismatch");
    assert!(w.fidelity.attachment_history().is_empty());

    // Attached, then detached: open from the attach until the detach completed.
    let asked = Instant::now();
    w.attach(&volume, &a, "/dev/sdf").await;
    let history = w.fidelity.attachment_history();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(
        (history[0].volume.as_str(), history[0].instance.as_str()),
        (volume.as_str(), a.as_str())
    );
    assert_eq!(history[0].device, "/dev/sdf");
    assert!(history[0].from >= asked);
    assert_eq!((history[0].until, history[0].ended_by), (None, None));
    let (code, _) = w.attach_error(&volume, &b, "/dev/sdg").await;
    assert_eq!(code, "VolumeInUse");
    assert_eq!(w.fidelity.attachment_history().len(), 1);
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;
    w.ec2
        .detach_volume()
        .volume_id(&volume)
        .instance_id(&a)
        .send()
        .await
        .expect("DetachVolume");
    // Still in force while detaching.
    assert_eq!(w.fidelity.attachment_history()[0].until, None);
    w.wait_volume(&volume, "available", Duration::from_secs(5))
        .await;
    let first = w.fidelity.attachment_history()[0].clone();
    assert_eq!(first.ended_by, Some(AttachmentEnd::Detached));
    let lasted = first.until.expect("closed") - first.from;
    assert!(
        lasted >= settings.attach_latency + settings.detach_latency,
        "{lasted:?}"
    );

    // The holder is terminated: held until EC2's release delay, then released.
    w.attach(&volume, &b, "/dev/sdf").await;
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;
    let killed = Instant::now();
    w.fidelity.terminate(&b).await.expect("terminate");
    assert_eq!(w.fidelity.attachment_history()[1].until, None);
    w.wait_volume(&volume, "available", Duration::from_secs(10))
        .await;
    let second = w.fidelity.attachment_history()[1].clone();
    assert_eq!(second.instance, b);
    assert_eq!(second.ended_by, Some(AttachmentEnd::Released));
    assert!(second.until.expect("closed") >= killed + settings.release_after_termination);

    // A force-detach lets go of a held volume at once.
    w.attach(&volume, &c, "/dev/sdf").await;
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;
    w.fidelity.terminate(&c).await.expect("terminate");
    let forced = Instant::now();
    w.ec2
        .detach_volume()
        .volume_id(&volume)
        .force(true)
        .send()
        .await
        .expect("force-detach");
    let third = w.fidelity.attachment_history()[2].clone();
    assert_eq!(third.instance, c);
    assert_eq!(third.ended_by, Some(AttachmentEnd::ForceDetached));
    assert!(third.until.expect("closed") >= forced);

    // The block device never appeared: the attachment is undone.
    *w.hooks.fail_attach.lock().unwrap() = Some("no free PCIe root port".into());
    w.attach(&volume, &d, "/dev/sdf").await;
    w.wait_volume(&volume, "available", Duration::from_secs(5))
        .await;
    let history = w.fidelity.attachment_history();
    assert_eq!(history.len(), 4, "{history:?}");
    assert_eq!(history[3].instance, d);
    assert_eq!(history[3].ended_by, Some(AttachmentEnd::AttachFailed));

    // One at a time, as EC2 allows.
    let now = Instant::now();
    for (i, x) in history.iter().enumerate() {
        for y in &history[i + 1..] {
            assert!(!x.overlaps(y, now), "{x:?} overlaps {y:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_pending_with_rising_progress_then_completed() {
    let w = world(fast_settings()).await;
    let volume = w.create_volume(ZONE_A, 8).await;
    let out = w
        .ec2
        .create_snapshot()
        .volume_id(&volume)
        .description("spotinit: move to us-east-1b")
        .send()
        .await
        .expect("CreateSnapshot");
    assert_eq!(out.state(), Some(&SnapshotState::Pending));
    let snapshot = out.snapshot_id().unwrap().to_string();
    assert!(w
        .hooks
        .events()
        .contains(&format!("snapshot_created {snapshot} {volume}")));

    // Not usable while pending.
    let err = w
        .ec2_once
        .create_volume()
        .availability_zone(ZONE_B)
        .snapshot_id(&snapshot)
        .send()
        .await
        .expect_err("a volume from a pending snapshot");
    assert_eq!(err.code(), Some("IncorrectState"));

    let mut progress_seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = w
            .ec2
            .describe_snapshots()
            .owner_ids("self")
            .send()
            .await
            .expect("DescribeSnapshots");
        // Only this account's snapshots, not the ones behind moto's public AMIs.
        assert_eq!(
            out.snapshots().len(),
            1,
            "Owner=self lists our snapshot only"
        );
        let s = &out.snapshots()[0];
        let percent: u32 = s
            .progress()
            .unwrap_or("0%")
            .trim_end_matches('%')
            .parse()
            .unwrap();
        progress_seen.push(percent);
        match s.state() {
            Some(SnapshotState::Completed) => break,
            Some(SnapshotState::Pending) => {}
            other => panic!("unexpected snapshot state {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "snapshot not completed after 10 s: {progress_seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(progress_seen.last(), Some(&100));
    assert!(
        progress_seen.windows(2).all(|p| p[0] <= p[1]),
        "progress never goes back: {progress_seen:?}"
    );
    assert!(
        progress_seen.iter().any(|p| (1..100).contains(p)),
        "progress rose through the middle: {progress_seen:?}"
    );

    // Now a volume in another zone can come from it.
    let out = w
        .ec2
        .create_volume()
        .availability_zone(ZONE_B)
        .snapshot_id(&snapshot)
        .send()
        .await
        .expect("CreateVolume from the completed snapshot");
    let copy = out.volume_id().unwrap();
    assert!(w
        .hooks
        .events()
        .contains(&format!("volume_created {copy} 8 {snapshot}")));
}

/// ModifyVolume goes through EC2's states, the block device grows when it reaches `optimizing`,
/// and what EC2 refuses is refused: a second modification while one runs or within six hours, a
/// smaller size, an attach while `modifying`, an unknown volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modification_is_modifying_then_optimizing_then_completed_and_grows_the_device() {
    let w = world(fast_settings()).await;
    let volume = w.create_volume(ZONE_A, 1).await;
    let instance = w.run_instance(ZONE_A).await;
    let out = w
        .ec2
        .modify_volume()
        .volume_id(&volume)
        .size(2)
        .send()
        .await
        .expect("ModifyVolume");
    let m = out.volume_modification().expect("a modification");
    assert_eq!(
        m.modification_state(),
        Some(&VolumeModificationState::Modifying)
    );
    assert_eq!((m.original_size(), m.target_size()), (Some(1), Some(2)));
    assert_eq!(m.progress(), Some(0));
    assert!(m.end_time().is_none(), "no end time while it runs");

    let again = w
        .ec2_once
        .modify_volume()
        .volume_id(&volume)
        .size(3)
        .send()
        .await
        .expect_err("a second modification while one runs");
    assert_eq!(again.code(), Some("IncorrectModificationState"));
    assert_eq!(
        again.message(),
        Some(
            format!("Volume {volume} cannot be modified in modification state MODIFYING").as_str()
        )
    );
    assert_eq!(
        w.attach_error(&volume, &instance, "/dev/sdf").await,
        (
            "OperationNotPermitted".to_string(),
            format!("Cannot attach volume {volume} when it is in modification state: MODIFYING")
        )
    );

    let mut seen = Vec::new();
    let mut resized_before_optimizing = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = w
            .ec2
            .describe_volumes_modifications()
            .volume_ids(&volume)
            .send()
            .await
            .expect("DescribeVolumesModifications");
        let m = &out.volumes_modifications()[0];
        let state = m.modification_state().expect("a state").clone();
        if state == VolumeModificationState::Optimizing && resized_before_optimizing.is_none() {
            resized_before_optimizing = Some(
                w.hooks
                    .events()
                    .contains(&format!("volume_resized {volume} 2")),
            );
        }
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if state == VolumeModificationState::Completed {
            assert_eq!(m.progress(), Some(100));
            assert!(m.end_time().is_some(), "a completed modification has ended");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not completed after 10 s: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        seen,
        vec![
            VolumeModificationState::Modifying,
            VolumeModificationState::Optimizing,
            VolumeModificationState::Completed
        ]
    );
    assert_eq!(
        resized_before_optimizing,
        Some(true),
        "the device grows as the modification reaches optimizing"
    );

    // Six hours must pass before the next one; the volume attaches now.
    let rate = w
        .ec2_once
        .modify_volume()
        .volume_id(&volume)
        .size(3)
        .send()
        .await
        .expect_err("a modification within six hours of the last");
    assert_eq!(rate.code(), Some("VolumeModificationRateExceeded"));
    w.attach(&volume, &instance, "/dev/sdf").await;

    let bigger = w.create_volume(ZONE_A, 4).await;
    let shrink = w
        .ec2_once
        .modify_volume()
        .volume_id(&bigger)
        .size(3)
        .send()
        .await
        .expect_err("a smaller size");
    assert_eq!(shrink.code(), Some("InvalidParameterValue"));
    assert_eq!(
        shrink.message(),
        Some("New size cannot be smaller than existing size")
    );

    let unknown = w
        .ec2_once
        .describe_volumes_modifications()
        .volume_ids("vol-0123456789abcdef0")
        .send()
        .await
        .expect_err("an unknown volume");
    assert_eq!(unknown.code(), Some("InvalidVolume.NotFound"));
    assert_eq!(
        unknown.message(),
        Some("The volume 'vol-0123456789abcdef0' does not exist.")
    );
}

/// DescribeVolumesModifications shows a volume's latest modification only (moto lists all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_latest_modification_is_described() {
    let w = world(Settings {
        modification_modifying: Duration::from_millis(200),
        modification_optimizing: Duration::from_millis(200),
        modification_cooldown: Duration::ZERO,
        ..fast_settings()
    })
    .await;
    let volume = w.create_volume(ZONE_A, 1).await;
    for size in [2, 3] {
        w.ec2
            .modify_volume()
            .volume_id(&volume)
            .size(size)
            .send()
            .await
            .expect("ModifyVolume");
        wait_for(
            "the modification to complete",
            Duration::from_secs(5),
            || {
                let ec2 = w.ec2.clone();
                let volume = volume.clone();
                async move {
                    let out = ec2
                        .describe_volumes_modifications()
                        .volume_ids(&volume)
                        .send()
                        .await
                        .expect("DescribeVolumesModifications");
                    let listed = out.volumes_modifications();
                    assert_eq!(listed.len(), 1, "one modification per volume: {listed:?}");
                    (listed[0].modification_state() == Some(&VolumeModificationState::Completed)
                        && listed[0].target_size() == Some(size))
                    .then_some(())
                }
            },
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_reach_the_sdk_with_ec2s_codes_and_retries_get_through() {
    let w = world(fast_settings()).await;
    let instance = w.run_instance(ZONE_A).await;
    let volume = w.create_volume(ZONE_A, 10).await;

    // Throttled twice, then served: the SDK's standard retries get through.
    w.fidelity.inject("DescribeVolumes", Fault::Throttle, 2);
    let before = w.fidelity.requests().len();
    w.ec2
        .describe_volumes()
        .volume_ids(&volume)
        .send()
        .await
        .expect("retried DescribeVolumes");
    let seen: Vec<_> = w.fidelity.requests()[before..]
        .iter()
        .map(|r| (r.action.clone(), r.status, r.code.clone()))
        .collect();
    let throttled = (
        "DescribeVolumes".to_string(),
        503,
        Some("RequestLimitExceeded".to_string()),
    );
    assert_eq!(
        seen,
        vec![
            throttled.clone(),
            throttled,
            ("DescribeVolumes".to_string(), 200, None)
        ]
    );

    // Without retries each fault shows as itself.
    for (fault, code, status) in [
        (Fault::Throttle, "RequestLimitExceeded", 503),
        (Fault::ServerError, "InternalError", 500),
        (Fault::Unavailable, "Unavailable", 503),
        (Fault::Unauthorized, "UnauthorizedOperation", 403),
    ] {
        w.fidelity.inject("AttachVolume", fault, 1);
        let err = w
            .ec2_once
            .attach_volume()
            .volume_id(&volume)
            .instance_id(&instance)
            .device("/dev/sdf")
            .send()
            .await
            .expect_err("injected fault");
        assert_eq!(err.code(), Some(code), "{fault:?}");
        let logged = w.fidelity.requests().pop().unwrap();
        assert_eq!(
            (logged.status, logged.code.as_deref()),
            (status, Some(code))
        );
        if fault == Fault::Unauthorized {
            let message = err.message().unwrap();
            assert!(
                message.starts_with("You are not authorized to perform this operation. User: arn:aws:sts::123456789012:assumed-role/spotinit-test-role/")
                    && message.contains("is not authorized to perform: ec2:AttachVolume on resource: arn:aws:ec2:us-east-1:123456789012:volume/"),
                "{message}"
            );
        }
    }
    // The faults were used up: the attach itself was never forwarded, and now goes through.
    assert!(!w
        .fidelity
        .moto_requests()
        .iter()
        .any(|r| r.action == "AttachVolume"));
    w.attach(&volume, &instance, "/dev/sdf").await;

    // A policy without the action: every call is refused, naming the caller's session.
    w.fidelity.register_caller("AKIDTEST", &instance);
    w.fidelity.deny("CreateSnapshot");
    for _ in 0..2 {
        let err = w
            .ec2
            .create_snapshot()
            .volume_id(&volume)
            .send()
            .await
            .expect_err("denied");
        assert_eq!(err.code(), Some("UnauthorizedOperation"));
        assert!(err.message().unwrap().contains(&format!(
            "spotinit-test-role/{instance} is not authorized to perform: ec2:CreateSnapshot"
        )));
    }
    w.fidelity.allow("CreateSnapshot");
    w.ec2
        .create_snapshot()
        .volume_id(&volume)
        .send()
        .await
        .expect("allowed again");
}

#[tokio::test]
async fn tag_keys_starting_with_aws_are_refused_as_ec2_refuses_them() {
    let w = world(fast_settings()).await;
    let volume = w.create_volume(ZONE_A, 10).await;
    for key in [
        "aws:cloudformation:stack-name",
        "AWS:backup:source-resource",
    ] {
        let err = w
            .ec2_once
            .create_tags()
            .resources(&volume)
            .tags(Tag::builder().key(key).value("x").build())
            .send()
            .await
            .expect_err("reserved key");
        assert_eq!(err.code(), Some("InvalidParameterValue"), "{key}");
        assert_eq!(
            err.message(),
            Some(
                format!(
                    "Value ( {key} ) for parameter key is invalid. Tag keys starting with 'aws:' are reserved for internal use"
                )
                .as_str()
            )
        );
        let err = w
            .ec2_once
            .create_volume()
            .availability_zone(ZONE_A)
            .size(1)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .tags(Tag::builder().key("Name").value("n").build())
                    .tags(Tag::builder().key(key).value("x").build())
                    .build(),
            )
            .send()
            .await
            .expect_err("reserved key on create");
        assert_eq!(err.code(), Some("InvalidParameterValue"));
    }
    // Nothing reached moto; a key that merely begins with "aws" is the user's own.
    assert!(!w
        .fidelity
        .moto_requests()
        .iter()
        .any(|r| r.action == "CreateTags"));
    w.ec2
        .create_tags()
        .resources(&volume)
        .tags(Tag::builder().key("aws-team").value("x").build())
        .send()
        .await
        .expect("an ordinary key");
    // Resources AWS services made carry such tags all the same (moto, behind the layer).
    let p = spotworld::query::Params::from_pairs([
        ("Action", "CreateTags"),
        ("Version", "2016-11-15"),
        ("ResourceId.1", volume.as_str()),
        ("Tag.1.Key", "aws:cloudformation:stack-name"),
        ("Tag.1.Value", "gitlab"),
    ]);
    let (status, _) = w.moto.client().send_raw(p.encode(), None).await.unwrap();
    assert_eq!(status, 200);
    let out = w
        .ec2
        .describe_volumes()
        .volume_ids(&volume)
        .send()
        .await
        .unwrap();
    assert!(out.volumes()[0]
        .tags()
        .iter()
        .any(|t| t.key() == Some("aws:cloudformation:stack-name")));
}

#[tokio::test]
async fn an_incorrect_state_fault_and_fault_rates_reach_the_sdk() {
    let w = world(fast_settings()).await;
    let instance = w.run_instance(ZONE_A).await;
    let volume = w.create_volume(ZONE_A, 10).await;
    w.attach(&volume, &instance, "/dev/sdf").await;
    w.wait_attachment(&volume, "attached", Duration::from_secs(5))
        .await;
    w.fidelity.inject("DetachVolume", Fault::IncorrectState, 1);
    let err = w
        .ec2_once
        .detach_volume()
        .volume_id(&volume)
        .instance_id(&instance)
        .send()
        .await
        .expect_err("injected IncorrectState");
    assert_eq!(err.code(), Some("IncorrectState"));
    assert_eq!(
        err.message(),
        Some(format!("Volume '{volume}' is in the 'busy' state.").as_str())
    );
    // Still attached: the refusal changed nothing.
    let (_, attachments) = w.volume(&volume).await;
    assert_eq!(attachments[0].1, "attached");

    // About a fifth of 200 requests throttled, the rest served.
    w.fidelity
        .inject_rate("DescribeVolumes", Fault::Throttle, 0.2);
    let mut throttled = 0;
    for _ in 0..200 {
        match w
            .ec2_once
            .describe_volumes()
            .volume_ids(&volume)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Some("RequestLimitExceeded"));
                throttled += 1;
            }
        }
    }
    assert!(
        (15..=70).contains(&throttled),
        "{throttled} of 200 throttled"
    );
    // Cleared: every request served again.
    w.fidelity.clear_fault_rates();
    for _ in 0..20 {
        w.ec2_once
            .describe_volumes()
            .volume_ids(&volume)
            .send()
            .await
            .expect("no fault after clear_fault_rates");
    }
}

#[tokio::test]
async fn tag_filters_take_ec2s_wildcards_and_escapes() {
    let w = world(fast_settings()).await;
    let mut ids = Vec::new();
    for name in ["git*", "gitlab", "x[1]"] {
        let id = w.create_volume(ZONE_A, 1).await;
        w.ec2
            .create_tags()
            .resources(&id)
            .tags(Tag::builder().key("Name").value(name).build())
            .send()
            .await
            .unwrap();
        ids.push(id);
    }
    let found = |value: &'static str| {
        let ec2 = w.ec2.clone();
        async move {
            let out = ec2
                .describe_volumes()
                .filters(Filter::builder().name("tag:Name").values(value).build())
                .send()
                .await
                .unwrap();
            let mut v: Vec<String> = out
                .volumes()
                .iter()
                .filter_map(|v| v.volume_id().map(str::to_string))
                .collect();
            v.sort();
            v
        }
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        found("git*").await,
        sorted(vec![ids[0].clone(), ids[1].clone()])
    );
    assert_eq!(found("git\\*").await, vec![ids[0].clone()]);
    assert_eq!(found("x[1]").await, vec![ids[2].clone()]);
    assert_eq!(found("gitla?").await, vec![ids[1].clone()]);
}
