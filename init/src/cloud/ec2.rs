//! The EC2 calls spotinit makes, on aws-sdk-ec2. The SDK's own retries are off: callers retry
//! with [`crate::retry::Retry`] so every retry shows on the console and policy lives in one place.

use super::{
    Attachment, CloudError, Ec2, ErrorKind, InstanceInfo, Modification, NewVolume, SnapshotInfo,
    VolumeChange, VolumeInfo, VolumeSpec,
};
use aws_sdk_ec2::config::{BehaviorVersion, Region, SharedCredentialsProvider};
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification, VolumeType};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Ec2Client {
    client: aws_sdk_ec2::Client,
}

/// The endpoint to use: the configuration key, else the standard `AWS_ENDPOINT_URL_EC2`, else
/// `AWS_ENDPOINT_URL`, else the SDK's regional endpoint. (The kernel passes unknown
/// `NAME=value` words of its command line to PID 1 as environment variables.)
pub fn endpoint(configured: Option<&str>) -> Option<String> {
    configured
        .map(str::to_string)
        .or_else(|| std::env::var("AWS_ENDPOINT_URL_EC2").ok())
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .filter(|s| !s.is_empty())
}

impl Ec2Client {
    /// A client signing with `credentials` (the instance role through IMDS in production).
    pub fn new(
        region: &str,
        endpoint: Option<&str>,
        credentials: SharedCredentialsProvider,
    ) -> Self {
        let timeouts = aws_smithy_types::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(3))
            .operation_attempt_timeout(Duration::from_secs(30))
            .build();
        let mut b = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.to_string()))
            .credentials_provider(credentials)
            .http_client(super::sdk::http_client())
            .sleep_impl(super::sdk::TokioSleep)
            .retry_config(aws_smithy_types::retry::RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(ep) = endpoint {
            b = b.endpoint_url(ep);
        }
        Ec2Client {
            client: aws_sdk_ec2::Client::from_conf(b.build()),
        }
    }

    /// Instance-role credentials served by IMDS.
    pub fn with_instance_role(
        region: &str,
        endpoint: Option<&str>,
        imds: &super::imds::Imds,
    ) -> Self {
        let provider = aws_config::imds::credentials::ImdsCredentialsProvider::builder()
            .imds_client(imds.client().clone())
            .build();
        Self::new(region, endpoint, SharedCredentialsProvider::new(provider))
    }
}

fn sdk_error<E>(
    call: &'static str,
    target: &str,
    e: SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    match &e {
        SdkError::ServiceError(se) => CloudError::from_code(
            call,
            target,
            se.err().code(),
            se.err().message().unwrap_or("no message"),
            status,
        ),
        _ => CloudError {
            call,
            target: target.into(),
            kind: ErrorKind::Transient,
            code: None,
            message: super::sdk::error_chain(&e),
        },
    }
}

/// A describe of one id: "no such resource" is an answer (None), not a failure.
fn absent_is_none<T>(e: CloudError) -> Result<Option<T>, CloudError> {
    if e.kind == ErrorKind::NotFound {
        Ok(None)
    } else {
        Err(e)
    }
}

fn tags_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_string(),
                t.value().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

fn tag_list(tags: &BTreeMap<String, String>) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// One filter per tag, each value literal (EC2 reads `*` and `?` in filter values as wildcards).
fn tag_filters(tags: &BTreeMap<String, String>) -> Vec<Filter> {
    tags.iter()
        .map(|(k, v)| {
            Filter::builder()
                .name(format!("tag:{k}"))
                .values(super::literal_filter_value(v))
                .build()
        })
        .collect()
}

/// The fields a `Volume` (DescribeVolumes) and a `CreateVolumeOutput` share, read the same way.
macro_rules! volume_fields {
    ($v:expr, $attachments:expr) => {
        VolumeInfo {
            id: $v.volume_id().unwrap_or_default().into(),
            zone: $v.availability_zone().unwrap_or_default().into(),
            state: $v.state().map(|s| s.as_str().into()).unwrap_or_default(),
            spec: VolumeSpec {
                size_gib: $v.size().unwrap_or_default().max(0) as u32,
                volume_type: $v
                    .volume_type()
                    .map(|t| t.as_str().to_string())
                    .unwrap_or_default(),
                iops: $v.iops().map(|i| i.max(0) as u32),
                throughput_mibps: $v.throughput().map(|i| i.max(0) as u32),
                encrypted: $v.encrypted().unwrap_or(false),
                kms_key_id: $v.kms_key_id().map(str::to_string),
            },
            snapshot_id: $v
                .snapshot_id()
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            tags: tags_map($v.tags()),
            attachments: $attachments,
            created_ms: $v.create_time().map(|t| t.to_millis().unwrap_or(i64::MAX)),
        }
    };
}

fn volume_info(v: &aws_sdk_ec2::types::Volume) -> VolumeInfo {
    let attachments = v
        .attachments()
        .iter()
        .map(|a| Attachment {
            instance_id: a.instance_id().unwrap_or_default().into(),
            device: a.device().unwrap_or_default().into(),
            state: a.state().map(|s| s.as_str().into()).unwrap_or_default(),
        })
        .collect();
    volume_fields!(v, attachments)
}

fn snapshot_info(s: &aws_sdk_ec2::types::Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        id: s.snapshot_id().unwrap_or_default().into(),
        volume_id: s.volume_id().unwrap_or_default().into(),
        state: s.state().map(|x| x.as_str().into()).unwrap_or_default(),
        progress: s.progress().unwrap_or_default().into(),
        start_time: s
            .start_time()
            .and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok())
            .unwrap_or_default(),
        tags: tags_map(s.tags()),
    }
}

fn modification(m: &aws_sdk_ec2::types::VolumeModification) -> Modification {
    Modification {
        state: m
            .modification_state()
            .map(|s| s.as_str().into())
            .unwrap_or_default(),
        progress: m.progress().unwrap_or_default().clamp(0, 100) as u32,
        target_size_gib: m.target_size().map(|s| s.max(0) as u32),
        status_message: m.status_message().map(str::to_string),
    }
}

impl Ec2 for Ec2Client {
    async fn describe_volume(&self, id: &str) -> Result<Option<VolumeInfo>, CloudError> {
        match self.client.describe_volumes().volume_ids(id).send().await {
            Ok(out) => Ok(out.volumes().first().map(volume_info)),
            Err(e) => absent_is_none(sdk_error("DescribeVolumes", id, e)),
        }
    }

    async fn find_volumes(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<VolumeInfo>, CloudError> {
        let mut out: Vec<VolumeInfo> = self
            .client
            .describe_volumes()
            .set_filters(Some(tag_filters(tags)))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| sdk_error("DescribeVolumes", &super::describe_tags(tags), e))?
            .iter()
            .map(volume_info)
            .collect();
        // Deleted volumes linger in DescribeVolumes for a while; they are not candidates. And
        // the filter is checked again exactly, whatever EC2 made of it.
        out.retain(|v| !v.state.is_going() && super::has_tags(&v.tags, tags));
        Ok(out)
    }

    async fn create_volume(&self, v: &NewVolume) -> Result<VolumeInfo, CloudError> {
        let target = format!("in {}", v.zone);
        let mut req = self
            .client
            .create_volume()
            .availability_zone(&v.zone)
            .size(v.spec.size_gib as i32)
            .volume_type(VolumeType::from(v.spec.volume_type.as_str()))
            .encrypted(v.spec.encrypted)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(tag_list(&v.tags)))
                    .build(),
            );
        if let Some(i) = v.spec.iops {
            req = req.iops(i as i32);
        }
        if let Some(t) = v.spec.throughput_mibps {
            req = req.throughput(t as i32);
        }
        if let Some(k) = &v.spec.kms_key_id {
            req = req.kms_key_id(k);
        }
        if let Some(s) = &v.snapshot_id {
            req = req.snapshot_id(s);
        }
        if let Some(t) = &v.client_token {
            req = req.client_token(t);
        }
        let out = req
            .send()
            .await
            .map_err(|e| sdk_error("CreateVolume", &target, e))?;
        // Just created: attached to nothing yet.
        Ok(volume_fields!(out, Vec::new()))
    }

    async fn modify_volume(
        &self,
        id: &str,
        change: &VolumeChange,
    ) -> Result<Modification, CloudError> {
        let out = self
            .client
            .modify_volume()
            .volume_id(id)
            .set_size(change.size_gib.map(|s| s as i32))
            .set_volume_type(change.volume_type.as_deref().map(VolumeType::from))
            .set_iops(change.iops.map(|i| i as i32))
            .set_throughput(change.throughput_mibps.map(|t| t as i32))
            .send()
            .await
            .map_err(|e| sdk_error("ModifyVolume", id, e))?;
        Ok(out
            .volume_modification()
            .map(modification)
            .unwrap_or_default())
    }

    async fn volume_modification(&self, id: &str) -> Result<Option<Modification>, CloudError> {
        let out = self
            .client
            .describe_volumes_modifications()
            .volume_ids(id)
            .send()
            .await
            .map_err(|e| sdk_error("DescribeVolumesModifications", id, e))?;
        // EC2 describes only the latest; should a list come, the last one is the latest.
        Ok(out
            .volumes_modifications()
            .iter()
            .rfind(|m| m.volume_id() == Some(id) && m.modification_state().is_some())
            .map(modification))
    }

    async fn delete_volume(&self, id: &str) -> Result<(), CloudError> {
        self.client
            .delete_volume()
            .volume_id(id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error("DeleteVolume", id, e))
    }

    async fn attach_volume(
        &self,
        volume: &str,
        instance: &str,
        device: &str,
    ) -> Result<String, CloudError> {
        self.client
            .attach_volume()
            .volume_id(volume)
            .instance_id(instance)
            .device(device)
            .send()
            .await
            .map(|o| {
                o.state()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default()
            })
            .map_err(|e| sdk_error("AttachVolume", &format!("{volume} to {instance}"), e))
    }

    async fn detach_volume(
        &self,
        volume: &str,
        instance: &str,
        force: bool,
    ) -> Result<String, CloudError> {
        // Always name the instance: EC2 then refuses to detach the volume from anyone else.
        self.client
            .detach_volume()
            .volume_id(volume)
            .instance_id(instance)
            .force(force)
            .send()
            .await
            .map(|o| {
                o.state()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default()
            })
            .map_err(|e| sdk_error("DetachVolume", &format!("{volume} from {instance}"), e))
    }

    async fn describe_instance(&self, id: &str) -> Result<Option<InstanceInfo>, CloudError> {
        match self
            .client
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
        {
            Ok(out) => Ok(out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .find(|i| i.instance_id() == Some(id))
                .map(|i| InstanceInfo {
                    id: id.into(),
                    state: i
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().into())
                        .unwrap_or_default(),
                    zone: i
                        .placement()
                        .and_then(|p| p.availability_zone())
                        .unwrap_or_default()
                        .into(),
                })),
            Err(e) => absent_is_none(sdk_error("DescribeInstances", id, e)),
        }
    }

    async fn create_snapshot(
        &self,
        volume: &str,
        description: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<String, CloudError> {
        self.client
            .create_snapshot()
            .volume_id(volume)
            .description(description)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Snapshot)
                    .set_tags(Some(tag_list(tags)))
                    .build(),
            )
            .send()
            .await
            .map(|o| o.snapshot_id().unwrap_or_default().to_string())
            .map_err(|e| sdk_error("CreateSnapshot", volume, e))
    }

    async fn describe_snapshot(&self, id: &str) -> Result<Option<SnapshotInfo>, CloudError> {
        match self
            .client
            .describe_snapshots()
            .snapshot_ids(id)
            .send()
            .await
        {
            Ok(out) => Ok(out.snapshots().first().map(snapshot_info)),
            Err(e) => absent_is_none(sdk_error("DescribeSnapshots", id, e)),
        }
    }

    async fn find_snapshots(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<SnapshotInfo>, CloudError> {
        let out = self
            .client
            .describe_snapshots()
            .owner_ids("self")
            .set_filters(Some(tag_filters(tags)))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| sdk_error("DescribeSnapshots", &super::describe_tags(tags), e))?
            .iter()
            .map(snapshot_info)
            .collect();
        Ok(out)
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), CloudError> {
        self.client
            .delete_snapshot()
            .snapshot_id(id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error("DeleteSnapshot", id, e))
    }

    async fn create_tags(
        &self,
        resource: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), CloudError> {
        self.client
            .create_tags()
            .resources(resource)
            .set_tags(Some(tag_list(tags)))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error("CreateTags", resource, e))
    }

    async fn associate_address(
        &self,
        allocation_id: &str,
        instance: &str,
    ) -> Result<String, CloudError> {
        self.client
            .associate_address()
            .allocation_id(allocation_id)
            .instance_id(instance)
            .allow_reassociation(true)
            .send()
            .await
            .map(|o| o.association_id().unwrap_or_default().to_string())
            .map_err(|e| {
                sdk_error(
                    "AssociateAddress",
                    &format!("{allocation_id} to {instance}"),
                    e,
                )
            })
    }

    async fn find_addresses(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<String>, CloudError> {
        let out = self
            .client
            .describe_addresses()
            .set_filters(Some(tag_filters(tags)))
            .send()
            .await
            .map_err(|e| sdk_error("DescribeAddresses", &super::describe_tags(tags), e))?;
        // The filter is checked again exactly, as for volumes.
        Ok(out
            .addresses()
            .iter()
            .filter(|a| super::has_tags(&tags_map(a.tags()), tags))
            .filter_map(|a| a.allocation_id().map(str::to_string))
            .collect())
    }
}
