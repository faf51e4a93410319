//! IMDSv2 through aws-config's client (tokens with a TTL, refreshed before they expire; IMDSv1 is
//! never used). The same client feeds the instance-role credentials to the EC2 client.

use super::documents::{
    parse_identity, parse_rebalance, parse_scheduled_events, parse_spot_action,
};
use super::sdk::{error_chain, http_client, TokioSleep};
use super::{CloudError, ErrorKind, Identity, Metadata, ScheduledEvent, SpotAction};
use aws_config::imds::client::error::ImdsError;
use aws_config::imds::Client;
use aws_config::provider_config::ProviderConfig;
use std::time::Duration;

/// The link-local endpoint every EC2 instance has.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
/// The same on IPv6 (Nitro instances in subnets with IPv6, and IPv6-only subnets).
pub const DEFAULT_ENDPOINT_V6: &str = "http://[fd00:ec2::254]";

/// IMDS. Without a configured endpoint it talks to the IPv4 address and, if that cannot be
/// reached, the IPv6 one; whichever answered first is kept.
#[derive(Clone, Debug)]
pub struct Imds {
    endpoints: Vec<(String, Client)>,
    /// Index of the endpoint in use.
    chosen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn client_for(endpoint: &str) -> Result<Client, CloudError> {
    let provider = ProviderConfig::empty()
        .with_http_client(http_client())
        .with_sleep_impl(TokioSleep);
    Ok(Client::builder()
        .configure(&provider)
        .endpoint(endpoint)
        .map_err(|e| CloudError {
            call: "IMDS",
            target: endpoint.into(),
            kind: ErrorKind::Refused,
            code: None,
            message: format!("invalid IMDS endpoint: {e}"),
        })?
        .token_ttl(Duration::from_secs(6 * 3600))
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(5))
        .max_attempts(4)
        .build())
}

impl Imds {
    pub fn new(endpoint: Option<&str>) -> Result<Self, CloudError> {
        match endpoint {
            Some(e) => Self::with_endpoints(&[e]),
            None => Self::with_endpoints(&[DEFAULT_ENDPOINT, DEFAULT_ENDPOINT_V6]),
        }
    }

    /// Endpoints in order of preference.
    pub fn with_endpoints(list: &[&str]) -> Result<Self, CloudError> {
        let endpoints = list
            .iter()
            .map(|e| {
                let e = e.trim_end_matches('/');
                Ok((e.to_string(), client_for(e)?))
            })
            .collect::<Result<Vec<_>, CloudError>>()?;
        Ok(Imds {
            endpoints,
            chosen: Default::default(),
        })
    }

    fn current(&self) -> &(String, Client) {
        let i = self.chosen.load(std::sync::atomic::Ordering::Relaxed);
        &self.endpoints[i.min(self.endpoints.len() - 1)]
    }

    /// The client of the endpoint in use (for the instance-role credentials).
    pub fn client(&self) -> &Client {
        &self.current().1
    }

    pub fn endpoint(&self) -> &str {
        &self.current().0
    }

    /// GET a path; a 404 is `None`. An endpoint that cannot be reached at all hands over to
    /// the next one (IPv4 -> IPv6), which then stays in use.
    pub async fn get_optional(&self, path: &str) -> Result<Option<String>, CloudError> {
        let start = self.chosen.load(std::sync::atomic::Ordering::Relaxed);
        let mut last = None;
        for i in start..self.endpoints.len() {
            let (endpoint, client) = &self.endpoints[i];
            match client.get(path).await {
                Ok(v) => {
                    if i != start {
                        self.chosen.store(i, std::sync::atomic::Ordering::Relaxed);
                        crate::log!(
                            "IMDS: {} cannot be reached; using {endpoint}",
                            self.endpoints[start].0
                        );
                    }
                    return Ok(Some(v.as_ref().to_string()));
                }
                Err(ImdsError::ErrorResponse(r)) if r.response().status().as_u16() == 404 => {
                    return Ok(None)
                }
                // An answer, even an error, means this endpoint is the one.
                Err(e @ ImdsError::ErrorResponse(_)) => return Err(imds_error(path, e)),
                Err(e) => last = Some(imds_error(path, e)),
            }
        }
        Err(last.expect("at least one endpoint"))
    }

    pub async fn get(&self, path: &str) -> Result<String, CloudError> {
        self.get_optional(path).await?.ok_or_else(|| CloudError {
            call: "IMDS",
            target: path.into(),
            kind: ErrorKind::NotFound,
            code: Some("404".into()),
            message: "not found".into(),
        })
    }
}

fn imds_error(path: &str, e: ImdsError) -> CloudError {
    let (kind, message) = match &e {
        ImdsError::ErrorResponse(r) => {
            let status = r.response().status().as_u16();
            let kind = if status >= 500 {
                ErrorKind::Transient
            } else {
                ErrorKind::Refused
            };
            (kind, format!("HTTP {status}"))
        }
        other => (ErrorKind::Transient, error_chain(other)),
    };
    CloudError {
        call: "IMDS",
        target: path.into(),
        kind,
        code: None,
        message,
    }
}

impl Metadata for Imds {
    async fn identity(&self) -> Result<Identity, CloudError> {
        let path = "/latest/dynamic/instance-identity/document";
        let doc = self.get(path).await?;
        parse_identity(&doc).map_err(|m| CloudError {
            call: "IMDS",
            target: path.into(),
            kind: ErrorKind::Refused,
            code: None,
            message: m.to_string(),
        })
    }

    async fn local_hostname(&self) -> Result<Option<String>, CloudError> {
        self.get_optional("/latest/meta-data/local-hostname").await
    }

    async fn user_data(&self) -> Result<Option<String>, CloudError> {
        self.get_optional("/latest/user-data").await
    }

    async fn spot_action(&self) -> Result<Option<SpotAction>, CloudError> {
        let path = "/latest/meta-data/spot/instance-action";
        match self.get_optional(path).await? {
            None => Ok(None),
            Some(doc) => parse_spot_action(&doc).map(Some).map_err(|m| CloudError {
                call: "IMDS",
                target: path.into(),
                kind: ErrorKind::Refused,
                code: None,
                message: m.to_string(),
            }),
        }
    }

    async fn key_pair(&self) -> Result<Option<String>, CloudError> {
        self.get_optional("/latest/meta-data/public-keys/0/openssh-key")
            .await
    }

    async fn scheduled_events(&self) -> Result<Vec<ScheduledEvent>, CloudError> {
        let path = "/latest/meta-data/events/maintenance/scheduled";
        match self.get_optional(path).await? {
            None => Ok(Vec::new()),
            Some(doc) => parse_scheduled_events(&doc).map_err(|m| CloudError {
                call: "IMDS",
                target: path.into(),
                kind: ErrorKind::Refused,
                code: None,
                message: m.to_string(),
            }),
        }
    }

    async fn rebalance(&self) -> Result<Option<String>, CloudError> {
        let path = "/latest/meta-data/events/recommendations/rebalance";
        Ok(self
            .get_optional(path)
            .await?
            .map(|doc| parse_rebalance(&doc)))
    }
}
