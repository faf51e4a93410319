//! Notifications of the spot lifecycle to a Slack-compatible HTTPS webhook (`[notify]`): boot
//! ready, boot failed, spot notice, rebalance recommendation, scheduled event, zone move, drain
//! done. Sending never waits on the receiver: events go into a queue that a task of their own
//! delivers in order, each with a bounded time and three attempts; only the drain waits, for at
//! most the time it can spare, so its last event gets out before the power goes.

use crate::config::Notify;
use crate::retry::{Attempt, Retry};
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// One event as the webhook receives it (JSON). `text` is what Slack shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Note {
    pub text: String,
    /// boot-ready, boot-failed, spot-notice, rebalance, scheduled-event, zone-move, drain-done.
    pub event: &'static str,
    pub instance: String,
    /// RFC 3339, UTC.
    pub time: String,
    /// Which of this instance's events it is, from 1: a receiver can tell a repeat from a loss.
    pub sequence: u64,
}

/// The webhook's address, from `https://host[:port]/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Option<Endpoint> {
        let rest = url.strip_prefix("https://")?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        if authority.contains('@') || authority.is_empty() {
            return None;
        }
        // `[v6]` or `[v6]:port`, else `host` or `host:port`.
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, rest) = v6.split_once(']')?;
                match rest {
                    "" => (host, 443),
                    _ => (host, rest.strip_prefix(':')?.parse().ok()?),
                }
            }
            None => match authority.split_once(':') {
                Some((h, p)) => (h, p.parse().ok()?),
                None => (authority, 443),
            },
        };
        (!host.is_empty()).then(|| Endpoint {
            host: host.to_string(),
            port,
            path,
        })
    }
}

struct Notifier {
    instance: String,
    queue: mpsc::UnboundedSender<Note>,
    /// Events queued and not yet delivered or given up.
    pending: Arc<AtomicUsize>,
    delivered: Arc<tokio::sync::Notify>,
    sequence: AtomicUsize,
}

static NOTIFIER: OnceLock<Notifier> = OnceLock::new();

/// Starts delivering events to the configured webhook, if any (once; later calls do nothing).
pub fn start(cfg: &Notify, instance: &str) {
    let Some(url) = &cfg.webhook_url else {
        return;
    };
    let Some(endpoint) = Endpoint::parse(url) else {
        crate::log!("notify: cannot use notify.webhook_url; no notifications");
        return;
    };
    let tls = match transport::client_config(cfg.ca_pem.as_deref()) {
        Ok(tls) => tls,
        Err(e) => {
            crate::log!("notify: {e}; no notifications");
            return;
        }
    };
    let (queue, rx) = mpsc::unbounded_channel();
    let pending = Arc::new(AtomicUsize::new(0));
    let delivered = Arc::new(tokio::sync::Notify::new());
    let notifier = Notifier {
        instance: instance.to_string(),
        queue,
        pending: pending.clone(),
        delivered: delivered.clone(),
        sequence: AtomicUsize::new(0),
    };
    if NOTIFIER.set(notifier).is_err() {
        return;
    }
    crate::log!(
        "notify: events go to https://{}:{}/…",
        endpoint.host,
        endpoint.port
    );
    let per_try = Duration::from_secs(cfg.timeout_secs);
    tokio::spawn(deliver(endpoint, tls, per_try, rx, pending, delivered));
}

/// Queues an event; returns at once.
pub fn event(kind: &'static str, text: impl Into<String>) {
    let Some(n) = NOTIFIER.get() else {
        return;
    };
    let note = Note {
        text: format!("{}: {}", n.instance, text.into()),
        event: kind,
        instance: n.instance.clone(),
        time: crate::volume::layout::rfc3339(std::time::SystemTime::now()),
        sequence: n.sequence.fetch_add(1, Ordering::SeqCst) as u64 + 1,
    };
    n.pending.fetch_add(1, Ordering::SeqCst);
    if n.queue.send(note).is_err() {
        n.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits until every queued event is delivered or given up, for at most `limit`.
pub async fn flush(limit: Duration) {
    let Some(n) = NOTIFIER.get() else {
        return;
    };
    let _ = tokio::time::timeout(limit, async {
        loop {
            let woken = n.delivered.notified();
            if n.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            woken.await;
        }
    })
    .await;
}

async fn deliver(
    endpoint: Endpoint,
    tls: Arc<transport::TlsConfig>,
    per_try: Duration,
    mut rx: mpsc::UnboundedReceiver<Note>,
    pending: Arc<AtomicUsize>,
    delivered: Arc<tokio::sync::Notify>,
) {
    let mut failing = false;
    while let Some(note) = rx.recv().await {
        let body = serde_json::to_string(&note).unwrap_or_default();
        // Three attempts, a bounded time each, one and two seconds apart.
        let outcome = Retry::new("notify")
            .every(Duration::from_secs(1))
            .for_at_most(per_try * 3 + Duration::from_secs(3))
            .at_most_attempts(3)
            .quiet()
            .run(|_| async {
                match tokio::time::timeout(per_try, transport::post(&endpoint, &tls, &body)).await {
                    Ok(r) => r.map_err(Attempt::Retry),
                    Err(_) => Err(Attempt::Retry(format!(
                        "no answer within {}",
                        crate::console::human(per_try)
                    ))),
                }
            })
            .await;
        match outcome {
            Ok(()) if failing => {
                crate::log!("notify: the webhook answers again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                crate::log!(
                    "notify: could not deliver {} #{} ({e}); going on without it",
                    note.event,
                    note.sequence
                );
                failing = true;
            }
        }
        pending.fetch_sub(1, Ordering::SeqCst);
        delivered.notify_waiters();
    }
}

#[cfg(feature = "aws")]
mod transport {
    //! One POST over TLS, HTTP/1.1, `Connection: close`: all a webhook needs.

    use super::Endpoint;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::{ClientConfig, RootCertStore};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub type TlsConfig = ClientConfig;

    /// The image's CAs, and `extra_ca` if given.
    pub fn client_config(extra_ca: Option<&str>) -> Result<Arc<ClientConfig>, String> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if let Some(pem) = extra_ca {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("notify.ca_pem: {e}"))?;
            for c in certs {
                roots.add(c).map_err(|e| format!("notify.ca_pem: {e}"))?;
            }
        } else if added == 0 {
            return Err("no CA certificates in the image to check the webhook with".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    pub async fn post(e: &Endpoint, tls: &Arc<ClientConfig>, body: &str) -> Result<(), String> {
        let tcp = tokio::net::TcpStream::connect((e.host.as_str(), e.port))
            .await
            .map_err(|err| format!("connect: {err}"))?;
        let name = ServerName::try_from(e.host.clone()).map_err(|err| err.to_string())?;
        let mut s = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|err| format!("TLS: {err}"))?;
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: spotinit\r\n\r\n{body}",
            e.path,
            e.host,
            body.len()
        );
        s.write_all(request.as_bytes())
            .await
            .map_err(|err| format!("send: {err}"))?;
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
            let n = s
                .read(&mut buf)
                .await
                .map_err(|err| format!("read: {err}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| "no HTTP answer".to_string())?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    }
}

/// Without the AWS feature (the fuzz build) there is no TLS stack: nothing is sent.
#[cfg(not(feature = "aws"))]
mod transport {
    use super::Endpoint;
    use std::sync::Arc;

    pub struct TlsConfig;

    pub fn client_config(_: Option<&str>) -> Result<Arc<TlsConfig>, String> {
        Err("built without TLS (the aws feature)".into())
    }

    pub async fn post(_: &Endpoint, _: &Arc<TlsConfig>, _: &str) -> Result<(), String> {
        Err("built without TLS".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_comes_from_an_https_url() {
        assert_eq!(
            Endpoint::parse("https://hooks.slack.com/services/T0/B0/x"),
            Some(Endpoint {
                host: "hooks.slack.com".into(),
                port: 443,
                path: "/services/T0/B0/x".into()
            })
        );
        assert_eq!(
            Endpoint::parse("https://10.0.2.2:8443"),
            Some(Endpoint {
                host: "10.0.2.2".into(),
                port: 8443,
                path: "/".into()
            })
        );
        for (url, host, port) in [
            ("https://[fd00::1]/x", "fd00::1", 443),
            ("https://[::1]:8443/", "::1", 8443),
        ] {
            let e = Endpoint::parse(url).unwrap_or_else(|| panic!("{url}"));
            assert_eq!((e.host.as_str(), e.port), (host, port), "{url}");
        }
        assert_eq!(
            Endpoint::parse("https://example.com?token=1").map(|e| e.path),
            Some("/?token=1".into())
        );
        for bad in [
            "http://example.com/",
            "https://",
            "https://user@example.com/",
            "https://example.com:notaport/",
            "https://[::1/",
            "https://[::1]8443/",
        ] {
            assert_eq!(Endpoint::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_note_is_slack_compatible_json() {
        let note = Note {
            text: "i-1: ready in 20 s".into(),
            event: "boot-ready",
            instance: "i-1".into(),
            time: "2026-11-30T09:00:00Z".into(),
            sequence: 1,
        };
        let v: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&note).unwrap()).unwrap();
        assert_eq!(v["text"], "i-1: ready in 20 s");
        assert_eq!(v["event"], "boot-ready");
        assert_eq!(v["sequence"], 1);
    }
}
