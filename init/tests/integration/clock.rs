//! The clock probe against the simulator's NTP server (the stand-in for 169.254.169.123).

use spotinit::services::clock::offset_from;
use spotworld::ntp::NtpServer;
use std::time::Duration;

#[tokio::test]
async fn the_probe_measures_a_small_offset_against_a_good_server() {
    let server = NtpServer::start().await.unwrap();
    let spec = format!("127.0.0.1:{}", server.port());
    let offset = offset_from(&spec, Duration::from_secs(2))
        .await
        .expect("an answer");
    // Same host, same clock: only the round trip's asymmetry remains.
    assert!(offset.abs() < 0.1, "offset {offset}");
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn no_answer_is_none_within_the_timeout() {
    // A port where nothing answers (bound, then never read).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let spec = format!("127.0.0.1:{}", silent.local_addr().unwrap().port());
    let start = std::time::Instant::now();
    assert_eq!(offset_from(&spec, Duration::from_millis(300)).await, None);
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(
        offset_from("not-an-address", Duration::from_millis(300)).await,
        None
    );
}
