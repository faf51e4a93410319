//! Notifications against the world's HTTPS webhook receiver: delivered once each, in order, with
//! their fields; a receiver that hangs or fails costs the sender nothing and the drain's flush
//! no more than its limit. (The notifier is one per process, so this is one test.)

use spotinit::config::Notify;
use spotinit::notify;
use spotworld::tls::Pki;
use spotworld::webhook::{Answer, WebhookReceiver};
use std::time::{Duration, Instant};

async fn until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_once_in_order_and_a_dead_receiver_delays_nothing() {
    let receiver = WebhookReceiver::start().await.unwrap();
    let cfg = Notify {
        webhook_url: Some(receiver.local_url()),
        ca_pem: Some(Pki::get().unwrap().ca.clone()),
        timeout_secs: 1,
    };
    notify::start(&cfg, "i-0123456789abcdef0");
    notify::event("boot-ready", "ready in 20 s");
    notify::event("spot-notice", "spot interruption notice: terminate");
    notify::flush(Duration::from_secs(10)).await;
    assert_eq!(receiver.delivered_events(), ["boot-ready", "spot-notice"]);
    let first = &receiver.received()[0].body;
    assert_eq!(first["instance"], "i-0123456789abcdef0");
    assert_eq!(first["text"], "i-0123456789abcdef0: ready in 20 s");
    assert_eq!(first["sequence"], 1);
    assert!(first["time"].as_str().unwrap().ends_with('Z'), "{first}");

    // A receiver that hangs: sending returns at once, the flush gives up at its limit.
    receiver.set_answer(Answer::Hang);
    let t = Instant::now();
    notify::event("drain-done", "drained in 3 s");
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    let t = Instant::now();
    notify::flush(Duration::from_millis(1500)).await;
    let flushed = t.elapsed();
    assert!(
        flushed >= Duration::from_millis(1400) && flushed < Duration::from_secs(3),
        "{flushed:?}"
    );
    // Three attempts of a second each, then it is given up; the next event gets through.
    until("three attempts", Duration::from_secs(10), || {
        receiver.received().len() >= 5
    })
    .await;
    // A receiver that fails: three attempts, given up, nothing else held back.
    receiver.set_answer(Answer::Fail);
    notify::event("zone-move", "moved");
    until("three failed attempts", Duration::from_secs(15), || {
        receiver
            .received()
            .iter()
            .filter(|r| r.body["event"] == "zone-move")
            .count()
            >= 3
    })
    .await;
    receiver.set_answer(Answer::Ok);
    notify::event("boot-ready", "ready again");
    notify::flush(Duration::from_secs(20)).await;
    let all = receiver.received();
    let sequences: Vec<_> = all
        .iter()
        .map(|r| (r.body["sequence"].as_u64().unwrap(), r.answered))
        .collect();
    assert_eq!(
        receiver.delivered_events().last().map(String::as_str),
        Some("boot-ready"),
        "{sequences:?}"
    );
    let drain_attempts = all
        .iter()
        .filter(|r| r.body["event"] == "drain-done")
        .count();
    assert_eq!(drain_attempts, 3, "{sequences:?}");
    // Order holds: no event overtakes an earlier one.
    let seen: Vec<u64> = all
        .iter()
        .map(|r| r.body["sequence"].as_u64().unwrap())
        .collect();
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
}
