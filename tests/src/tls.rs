//! The Docker Engine API as a careful user exposes it: TCP with TLS client certificates. One
//! throwaway PKI per test process (a CA, the server's certificate for the guest's dockerd, a
//! client certificate for the tests), made with `openssl` in a temporary directory; the user
//! data carries the server's side in `[docker.tls]`, and [`crate::docker::Docker`] presents the
//! client's.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::qemu::Error;

/// The guest port of the Engine API over TLS (Docker's convention).
pub const DOCKER_TLS_PORT: u16 = 2376;

/// The PEM files of one PKI.
#[derive(Clone, Debug)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

static PKI: OnceLock<Result<Pki, String>> = OnceLock::new();

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("run openssl (apt-get install openssl): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Makes a CA, a server certificate (127.0.0.1 and localhost: the guest's port is forwarded to
/// the host's loopback; 10.0.2.2: the host as the guests reach it, for the test registry) and a client certificate, P-256 keys, valid two days.
fn make(dir: &Path) -> Result<Pki, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=spotworld test CA",
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca-key.pem", "-out", "ca.pem"]);
    openssl(dir, &ca)?;
    for (name, cn, ext) in [
        (
            "server",
            "spotinit dockerd",
            "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.2.2\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "spotworld tests", "extendedKeyUsage=clientAuth\n"),
    ] {
        let key = format!("{name}-key.pem");
        let csr = format!("{name}.csr");
        let cert = format!("{name}.pem");
        let extfile = format!("{name}.ext");
        std::fs::write(dir.join(&extfile), ext).map_err(|e| e.to_string())?;
        let subj = format!("/CN={cn}");
        let mut req = vec!["req", "-new", "-subj", &subj];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr]);
        openssl(dir, &req)?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &extfile,
                "-out",
                &cert,
            ],
        )?;
    }
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).map_err(|e| format!("read {}/{f}: {e}", dir.display()))
    };
    Ok(Pki {
        dir: dir.to_path_buf(),
        ca: read("ca.pem")?,
        server_cert: read("server.pem")?,
        server_key: read("server-key.pem")?,
        client_cert: read("client.pem")?,
        client_key: read("client-key.pem")?,
    })
}

impl Pki {
    /// This process's PKI, made on first use.
    pub fn get() -> Result<&'static Pki, String> {
        PKI.get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("spotworld-pki-{}", std::process::id()));
            make(&dir)
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    /// The user data's `[docker.tls]` table for the guest's dockerd.
    pub fn docker_tls_toml(&self) -> String {
        format!(
            "[docker.tls]\nca = '''\n{}'''\ncert = '''\n{}'''\nkey = '''\n{}'''\n",
            self.ca, self.server_cert, self.server_key
        )
    }

    /// A TLS client that trusts only this CA and presents the client certificate.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca.as_bytes()) {
            roots
                .add(c.map_err(|e| format!("the test CA: {e}"))?)
                .map_err(|e| format!("the test CA: {e}"))?;
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.client_cert.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("the client certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(self.client_key.as_bytes())
            .map_err(|e| format!("the client key: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("the client certificate: {e}"))?;
        Ok(Arc::new(config))
    }
}

/// One HTTP/1.1 request over TLS to `127.0.0.1:<port>` on a connection of its own, answered
/// within `deadline`: the status, the headers and the whole body. Errors start with `what`.
pub async fn exchange(
    tls: &tokio_rustls::TlsConnector,
    port: u16,
    req: hyper::Request<Full<Bytes>>,
    deadline: Duration,
    what: &str,
) -> crate::qemu::Result<(u16, hyper::HeaderMap, Bytes)> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .map_err(|e| Error::new(format!("{what}: connect: {e}")))?;
        let name = rustls::pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let tls = tls
            .connect(name, tcp)
            .await
            .map_err(|e| Error::new(format!("{what}: TLS: {e}")))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| Error::new(format!("{what}: {}", error_chain(&e))))?;
        tokio::spawn(connection);
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Error::new(format!("{what}: {}", error_chain(&e))))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::new(format!("{what}: reading the answer: {e}")))?
            .to_bytes();
        Ok((status, headers, body))
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .map_err(|_| Error::new(format!("{what}: no answer within {} s", deadline.as_secs())))?
}

/// An error and its sources, one after another.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
