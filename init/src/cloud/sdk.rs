//! The AWS SDK's plumbing, shared by the IMDS and the EC2 clients: one HTTP client (one rustls
//! stack with ring), tokio's timer, and errors with their sources on one line.

use std::time::Duration;

/// One HTTP client (one rustls stack, ring) for IMDS and EC2.
pub fn http_client() -> aws_sdk_ec2::config::SharedHttpClient {
    use aws_smithy_http_client::tls;
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// tokio's timer for the SDK (default features are off, so we hand it over ourselves).
#[derive(Debug, Clone, Copy)]
pub struct TokioSleep;

impl aws_sdk_ec2::config::AsyncSleep for TokioSleep {
    fn sleep(&self, d: Duration) -> aws_sdk_ec2::config::Sleep {
        aws_sdk_ec2::config::Sleep::new(tokio::time::sleep(d))
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
