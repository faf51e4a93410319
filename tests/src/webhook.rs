//! A webhook receiver for spotinit's notifications: HTTPS on a loopback port with the test
//! PKI's server certificate (guests reach it as `https://10.0.2.2:PORT`), recording each POST's
//! JSON body. It can answer, fail (HTTP 500), or hang without answering.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::tls::Pki;

/// How the receiver answers a POST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Ok,
    Fail,
    /// Reads the request, then never answers (until the client gives up).
    Hang,
}

/// One POST as it arrived.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    pub body: serde_json::Value,
    pub answered: Answer,
}

struct Shared {
    answer: Answer,
    received: Vec<Received>,
}

/// The receiver; stops when dropped.
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    server: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start() -> Result<WebhookReceiver, String> {
        let pki = Pki::get()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(pki)?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("webhook receiver: bind: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let shared = Arc::new(Mutex::new(Shared {
            answer: Answer::Ok,
            received: Vec::new(),
        }));
        let state = shared.clone();
        let server = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, state) = (acceptor.clone(), state.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve_one(tls, &state).await;
                    }
                });
            }
        });
        Ok(WebhookReceiver {
            addr,
            shared,
            server,
        })
    }

    /// As a guest reaches it.
    pub fn url(&self) -> String {
        format!("https://10.0.2.2:{}/hook", self.addr.port())
    }

    /// As the host reaches it.
    pub fn local_url(&self) -> String {
        format!("https://127.0.0.1:{}/hook", self.addr.port())
    }

    /// The user data's `[notify]` table for a guest.
    pub fn notify_toml(&self) -> Result<String, String> {
        Ok(format!(
            "[notify]\nwebhook_url = \"{}\"\ntimeout_secs = 2\nca_pem = '''\n{}'''\n",
            self.url(),
            Pki::get()?.ca
        ))
    }

    pub fn set_answer(&self, answer: Answer) {
        self.lock().answer = answer;
    }

    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// The `event` of each POST answered 200, in order.
    pub fn delivered_events(&self) -> Vec<String> {
        self.lock()
            .received
            .iter()
            .filter(|r| r.answered == Answer::Ok)
            .map(|r| r.body["event"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn server_config(pki: &Pki) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pki.server_cert.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the server certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(pki.server_key.as_bytes())
        .map_err(|e| format!("the server key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("the server certificate: {e}"))?;
    Ok(Arc::new(config))
}

/// Reads one request (headers, then Content-Length bytes), records it, answers as told.
async fn serve_one<S>(mut s: S, state: &Mutex<Shared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let body_at = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
        if data.len() > 1 << 20 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&data[..body_at]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while data.len() < body_at + length {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
    let body =
        serde_json::from_slice(&data[body_at..body_at + length]).unwrap_or(serde_json::Value::Null);
    let answer = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        let answer = st.answer;
        st.received.push(Received {
            at: Instant::now(),
            body,
            answered: answer,
        });
        answer
    };
    let reply: &[u8] = match answer {
        Answer::Ok => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        Answer::Fail => {
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        }
        Answer::Hang => {
            std::future::pending::<()>().await;
            return;
        }
    };
    let _ = s.write_all(reply).await;
    let _ = s.shutdown().await;
}
