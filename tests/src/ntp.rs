//! A small NTP server (RFC 5905 server mode, stratum 1, the host's clock) on 127.0.0.1, standing
//! in for the Amazon Time Sync Service (169.254.169.123). A guest under QEMU user networking
//! reaches it as 10.0.2.2:PORT (slirp forwards UDP to the host's loopback).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::net::UdpSocket;

/// Seconds from 1900 (NTP's era 0) to 1970.
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

pub struct NtpServer {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// An NTP timestamp: seconds since 1900 and a 32-bit fraction.
pub fn ntp_timestamp(t: SystemTime) -> [u8; 8] {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = (d.as_secs() + NTP_UNIX_OFFSET) as u32;
    let frac = ((u64::from(d.subsec_nanos()) << 32) / 1_000_000_000) as u32;
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&secs.to_be_bytes());
    b[4..].copy_from_slice(&frac.to_be_bytes());
    b
}

/// The server's answer to one client request (None if it is not a client-mode packet).
pub fn answer(request: &[u8], received: SystemTime, now: SystemTime) -> Option<[u8; 48]> {
    if request.len() < 48 || request[0] & 0x07 != 3 {
        return None;
    }
    let version = (request[0] >> 3) & 0x07;
    let mut r = [0u8; 48];
    r[0] = (version << 3) | 4; // LI 0 (no warning), server mode
    r[1] = 1; // stratum 1: a reference clock
    r[2] = request[2]; // poll, as asked
    r[3] = (-20i8) as u8; // precision ~1 µs
                          // root delay 0, root dispersion ~0.1 ms
    r[8..12].copy_from_slice(&0x0000_0007u32.to_be_bytes());
    r[12..16].copy_from_slice(b"SPOT");
    r[16..24].copy_from_slice(&ntp_timestamp(now)); // reference
    r[24..32].copy_from_slice(&request[40..48]); // originate = the client's transmit
    r[32..40].copy_from_slice(&ntp_timestamp(received));
    r[40..48].copy_from_slice(&ntp_timestamp(now));
    Some(r)
}

impl NtpServer {
    pub async fn start() -> std::io::Result<NtpServer> {
        let sock = UdpSocket::bind("127.0.0.1:0").await?;
        let addr = sock.local_addr()?;
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                let received = SystemTime::now();
                if let Some(reply) = answer(&buf[..n], received, SystemTime::now()) {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = sock.send_to(&reply, peer).await;
                }
            }
        });
        Ok(NtpServer {
            addr,
            requests,
            task,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many client requests it answered.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for NtpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_count_from_1900() {
        let t = UNIX_EPOCH + Duration::from_millis(1500);
        let b = ntp_timestamp(t);
        assert_eq!(u32::from_be_bytes([b[0], b[1], b[2], b[3]]), 2_208_988_801);
        assert_eq!(u32::from_be_bytes([b[4], b[5], b[6], b[7]]), 1 << 31);
    }

    #[tokio::test]
    async fn answers_a_client_request_with_its_origin_and_the_time() {
        let server = NtpServer::start().await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut req = [0u8; 48];
        req[0] = (4 << 3) | 3; // v4, client
        req[40..48].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        client
            .send_to(&req, ("127.0.0.1", server.port()))
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 48);
        assert_eq!(buf[0] & 7, 4, "server mode");
        assert_eq!(buf[1], 1, "stratum 1");
        assert_eq!(
            &buf[24..32],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            "origin = client's transmit"
        );
        let secs = u32::from_be_bytes([buf[40], buf[41], buf[42], buf[43]]) as u64;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + NTP_UNIX_OFFSET;
        assert!(secs.abs_diff(now) <= 2);
        assert_eq!(server.requests(), 1);
        // A server-mode packet gets no answer.
        assert!(answer(&buf[..48], SystemTime::now(), SystemTime::now()).is_none());
    }
}
