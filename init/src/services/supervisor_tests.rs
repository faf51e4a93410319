//! Unit tests of the supervisor against the fake system: restarts with a growing delay, stops with a deadline, and SIGKILL.

use super::*;
use crate::sys::fake::{Behavior, FakeSystem};

fn spec(name: &str) -> ServiceSpec {
    ServiceSpec::new(name, CommandSpec::new(format!("/usr/bin/{name}")))
        .stop_timeout(Duration::from_secs(5))
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn crashed_service_restarts_with_growing_delay() {
    let fake = Arc::new(FakeSystem::new("/r"));
    fake.behave("containerd", Behavior::Run);
    let sup = Supervisor::start(fake.clone());
    sup.launch(spec("containerd")).await.unwrap();
    let spawns = |f: &FakeSystem| {
        f.briefs()
            .iter()
            .filter(|b| *b == "spawn containerd")
            .count()
    };
    // Crash 1: restarted after 1 s, not before.
    assert!(fake.crash("containerd", 2));
    settle().await;
    tokio::time::advance(Duration::from_millis(900)).await;
    settle().await;
    assert_eq!(spawns(&fake), 1);
    tokio::time::advance(Duration::from_millis(200)).await;
    settle().await;
    assert_eq!(spawns(&fake), 2);
    // Crash 2: after 2 s.
    assert!(fake.crash("containerd", 2));
    settle().await;
    tokio::time::advance(Duration::from_millis(1900)).await;
    settle().await;
    assert_eq!(spawns(&fake), 2);
    tokio::time::advance(Duration::from_millis(200)).await;
    settle().await;
    assert_eq!(spawns(&fake), 3);
    assert_eq!(sup.running().await.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn stop_sends_term_and_does_not_restart() {
    let fake = Arc::new(FakeSystem::new("/r"));
    fake.behave("dockerd", Behavior::Run);
    let sup = Supervisor::start(fake.clone());
    sup.launch(spec("dockerd")).await.unwrap();
    let s = sup.stop("dockerd").await;
    assert!(s.was_running && !s.killed);
    tokio::time::advance(Duration::from_secs(60)).await;
    settle().await;
    assert_eq!(fake.briefs(), vec!["spawn dockerd", "kill dockerd SIGTERM"]);
    assert!(sup.running().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn stuck_service_is_killed_at_its_deadline() {
    let fake = Arc::new(FakeSystem::new("/r"));
    fake.behave("stuck", Behavior::IgnoreTerm);
    let sup = Supervisor::start(fake.clone());
    sup.launch(spec("stuck")).await.unwrap();
    let s = sup.stop("stuck").await;
    assert!(s.killed);
    assert_eq!(s.took, Duration::from_secs(5));
    assert_eq!(
        fake.briefs(),
        vec!["spawn stuck", "kill stuck SIGTERM", "kill stuck SIGKILL"]
    );
}

#[tokio::test(start_paused = true)]
async fn stop_during_restart_delay_cancels_the_restart() {
    let fake = Arc::new(FakeSystem::new("/r"));
    fake.behave("flaky", Behavior::Run);
    let sup = Supervisor::start(fake.clone());
    sup.launch(spec("flaky")).await.unwrap();
    fake.crash("flaky", 1);
    settle().await;
    let s = sup.stop("flaky").await;
    assert!(!s.was_running);
    tokio::time::advance(Duration::from_secs(60)).await;
    settle().await;
    assert_eq!(fake.briefs(), vec!["spawn flaky"]);
}

#[tokio::test(start_paused = true)]
async fn a_stop_limit_shorter_than_the_timeout_kills_sooner() {
    let fake = Arc::new(FakeSystem::new("/r"));
    fake.behave("dockerd", Behavior::IgnoreTerm);
    let sup = Supervisor::start(fake.clone());
    sup.launch(spec("dockerd")).await.unwrap();
    let s = sup
        .stop_within("dockerd", Some(Duration::from_secs(2)))
        .await;
    assert!(s.killed && !s.lingering);
    assert_eq!(s.took, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn a_process_that_outlives_sigkill_is_not_waited_for_for_ever() {
    let fake = Arc::new(FakeSystem::new("/r"));
    fake.behave("stuck", Behavior::IgnoreAll);
    let sup = Supervisor::start(fake.clone());
    sup.launch(spec("stuck")).await.unwrap();
    let s = sup.stop("stuck").await;
    assert!(s.killed && s.lingering);
    assert_eq!(s.took, Duration::from_secs(5) + KILL_GRACE);
}

#[test]
fn backoff_caps() {
    let b = Backoff::default();
    let d: Vec<u64> = (1..=7).map(|n| b.delay(n).as_secs()).collect();
    assert_eq!(d, vec![1, 2, 4, 8, 16, 30, 30]);
}
