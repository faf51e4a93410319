//! The raw EC2 Query client: form-encoded POSTs, XML answers, and typed helpers for the calls
//! the tests make.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::query::{parse_error_document, Params, DEFAULT_ACCOUNT_ID, EC2_API_VERSION};

use super::error::CallError;
use super::parse::{parse_instances, parse_snapshots, parse_volumes};
use super::types::{Instance, Snapshot, Volume};
use super::{TEST_AUTHORIZATION, TEST_IMAGE_ID, TEST_INSTANCE_TYPE};

/// A raw EC2 Query client: form-encoded POSTs, XML answers.
#[derive(Clone)]
pub struct Ec2Client {
    endpoint: String,
    authorization: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Ec2Client {
    /// A client for the EC2 Query endpoint `endpoint` (`http://127.0.0.1:PORT`).
    pub fn new(endpoint: &str) -> Ec2Client {
        Ec2Client {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            authorization: TEST_AUTHORIZATION.to_string(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Posts a form body with the given Authorization header; returns status and body as they
    /// came (the fidelity layer forwards requests with this).
    pub async fn send_raw(
        &self,
        body: String,
        authorization: Option<&str>,
    ) -> Result<(u16, String), String> {
        let request = hyper::Request::post(format!("{}/", self.endpoint))
            .header(
                hyper::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .header(
                hyper::header::AUTHORIZATION,
                authorization.unwrap_or(&self.authorization),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("cannot build request: {e}"))?;
        let response = self
            .http
            .request(request)
            .await
            .map_err(|e| format!("POST {}: {e}", self.endpoint))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer of {}: {e}", self.endpoint))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Calls `action` with `params` (Version is added); the XML answer, or the EC2 error.
    pub async fn call(&self, action: &str, params: &[(&str, &str)]) -> Result<String, CallError> {
        self.call_with(action, Params::from_pairs(params.iter().copied()))
            .await
    }

    /// Calls `action` with `params` built beforehand (Version is added).
    pub async fn call_with(&self, action: &str, params: Params) -> Result<String, CallError> {
        let mut p = Params::from_pairs([("Action", action), ("Version", EC2_API_VERSION)]);
        for (k, v) in params.into_pairs() {
            p.push(k, v);
        }
        self.call_params(&p).await
    }

    /// Calls with prepared parameters (which must hold Action and Version).
    pub async fn call_params(&self, params: &Params) -> Result<String, CallError> {
        let action = params.action().unwrap_or("?").to_string();
        let (status, body) = self
            .send_raw(params.encode(), None)
            .await
            .map_err(|detail| CallError::Transport {
                action: action.clone(),
                detail,
            })?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        match parse_error_document(&body) {
            Some(error) => Err(CallError::Api {
                action,
                status,
                error,
            }),
            None => Err(CallError::Response {
                action,
                detail: format!(
                    "HTTP {status}: {}",
                    body.chars().take(300).collect::<String>()
                ),
            }),
        }
    }

    /// Launches one `t3.small` of [`TEST_IMAGE_ID`] in `zone`; its instance id.
    pub async fn run_instance(&self, zone: &str) -> Result<String, CallError> {
        let xml = self
            .call(
                "RunInstances",
                &[
                    ("ImageId", TEST_IMAGE_ID),
                    ("InstanceType", TEST_INSTANCE_TYPE),
                    ("MinCount", "1"),
                    ("MaxCount", "1"),
                    ("Placement.AvailabilityZone", zone),
                ],
            )
            .await?;
        let instances = parse_instances(&xml).map_err(|detail| CallError::Response {
            action: "RunInstances".into(),
            detail,
        })?;
        instances
            .into_iter()
            .next()
            .map(|i| i.id)
            .ok_or_else(|| CallError::Response {
                action: "RunInstances".into(),
                detail: format!("no instance in the answer: {xml}"),
            })
    }

    /// TerminateInstances. Against moto the instance's volumes are free at once; against the
    /// fidelity layer they are held for its release delay, as on EC2.
    pub async fn terminate_instance(&self, instance_id: &str) -> Result<(), CallError> {
        self.call("TerminateInstances", &[("InstanceId.1", instance_id)])
            .await
            .map(drop)
    }

    pub async fn describe_volume(&self, volume_id: &str) -> Result<Volume, CallError> {
        let xml = self
            .call("DescribeVolumes", &[("VolumeId.1", volume_id)])
            .await?;
        let volumes = parse_volumes(&xml).map_err(|detail| CallError::Response {
            action: "DescribeVolumes".into(),
            detail,
        })?;
        volumes
            .into_iter()
            .find(|v| v.id == volume_id)
            .ok_or_else(|| CallError::Response {
                action: "DescribeVolumes".into(),
                detail: format!("{volume_id} missing from the answer"),
            })
    }

    /// Every volume (root volumes of the instances included).
    pub async fn describe_volumes_all(&self) -> Result<Vec<Volume>, CallError> {
        let xml = self.call("DescribeVolumes", &[]).await?;
        parse_volumes(&xml).map_err(|detail| CallError::Response {
            action: "DescribeVolumes".into(),
            detail,
        })
    }

    pub async fn describe_instance(&self, instance_id: &str) -> Result<Instance, CallError> {
        let xml = self
            .call("DescribeInstances", &[("InstanceId.1", instance_id)])
            .await?;
        let instances = parse_instances(&xml).map_err(|detail| CallError::Response {
            action: "DescribeInstances".into(),
            detail,
        })?;
        instances
            .into_iter()
            .find(|i| i.id == instance_id)
            .ok_or_else(|| CallError::Response {
                action: "DescribeInstances".into(),
                detail: format!("{instance_id} missing from the answer"),
            })
    }

    /// The snapshots this account owns (`Owner.1=self`). moto ignores `Owner` and also lists the
    /// snapshots behind its public AMIs, so the answer is filtered on the owner id here too.
    pub async fn describe_snapshots(&self) -> Result<Vec<Snapshot>, CallError> {
        let xml = self
            .call("DescribeSnapshots", &[("Owner.1", "self")])
            .await?;
        let snapshots = parse_snapshots(&xml).map_err(|detail| CallError::Response {
            action: "DescribeSnapshots".into(),
            detail,
        })?;
        Ok(snapshots
            .into_iter()
            .filter(|s| s.owner_id == DEFAULT_ACCOUNT_ID)
            .collect())
    }
}
