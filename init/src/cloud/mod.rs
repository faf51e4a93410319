//! The cloud, behind two small traits: [`Metadata`] (IMDSv2) and [`Ec2`] (the few EC2 calls we
//! use). Only this module knows the AWS crates; everything above works on the plain types here.

pub mod documents;
#[cfg(feature = "aws")]
pub mod ec2;
#[cfg(feature = "aws")]
pub mod imds;
#[cfg(feature = "aws")]
mod sdk;
mod states;

pub use states::{
    tags, AttachmentState, InstanceState, ModificationState, SnapshotState, VolumeState,
};

use crate::retry::{Attempt, Retry};
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;

/// A cloud call under `retry`: again while the error is retryable (throttling, 5xx, timeouts),
/// at once otherwise.
pub async fn with_retries<T, F, Fut>(retry: &Retry, mut call: F) -> Result<T, CloudError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CloudError>>,
{
    retry
        .run(|_| {
            let fut = call();
            async move {
                fut.await.map_err(|e| {
                    if e.is_retryable() {
                        Attempt::Retry(e)
                    } else {
                        Attempt::Fail(e)
                    }
                })
            }
        })
        .await
        .map_err(|e| e.into_inner())
}

/// Who and where this instance is, from the IMDS identity document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub instance_id: String,
    pub region: String,
    pub zone: String,
    pub account_id: String,
    pub instance_type: String,
    pub image_id: String,
}

/// A spot interruption notice: what EC2 will do, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpotAction {
    /// terminate, stop or hibernate.
    pub action: String,
    /// RFC 3339, UTC.
    pub time: String,
}

/// An EC2 scheduled event of this instance (IMDS `events/maintenance/scheduled`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledEvent {
    pub id: String,
    /// instance-reboot, system-reboot, system-maintenance, instance-retirement, instance-stop.
    pub code: String,
    pub description: String,
    /// active, completed or canceled.
    pub state: String,
    /// As IMDS writes it: "21 Jan 2019 09:00:43 GMT".
    pub not_before: String,
}

impl ScheduledEvent {
    /// EC2 stops or terminates the instance at the event: its state volume must be let go of
    /// before then.
    pub fn ends_the_instance(&self) -> bool {
        matches!(self.code.as_str(), "instance-retirement" | "instance-stop")
    }

    pub fn is_active(&self) -> bool {
        self.state.is_empty() || self.state.eq_ignore_ascii_case("active")
    }
}

pub trait Metadata: Send + Sync + 'static {
    fn identity(&self) -> impl Future<Output = Result<Identity, CloudError>> + Send;
    fn local_hostname(&self) -> impl Future<Output = Result<Option<String>, CloudError>> + Send;
    /// None when the instance was launched without user data.
    fn user_data(&self) -> impl Future<Output = Result<Option<String>, CloudError>> + Send;
    /// None until EC2 posts an interruption notice.
    fn spot_action(&self) -> impl Future<Output = Result<Option<SpotAction>, CloudError>> + Send;
    /// The rebalance recommendation's notice time, once there is one.
    fn rebalance(&self) -> impl Future<Output = Result<Option<String>, CloudError>> + Send;
    /// The instance's scheduled events (retirement, reboots, maintenance); none is empty.
    fn scheduled_events(
        &self,
    ) -> impl Future<Output = Result<Vec<ScheduledEvent>, CloudError>> + Send;
    /// The public key of the EC2 key pair the instance was launched with, if any.
    fn key_pair(&self) -> impl Future<Output = Result<Option<String>, CloudError>> + Send;
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attachment {
    pub instance_id: String,
    pub device: String,
    pub state: AttachmentState,
}

/// What a volume is, as CreateVolume takes it and DescribeVolumes returns it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeSpec {
    pub size_gib: u32,
    /// gp3, gp2, io1, io2, st1, sc1, standard.
    pub volume_type: String,
    pub iops: Option<u32>,
    pub throughput_mibps: Option<u32>,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
}

impl VolumeSpec {
    /// The same volume again (a copy in another zone): IOPS and throughput only for the types
    /// that take them, since CreateVolume refuses them for the others.
    pub fn for_copy(&self) -> VolumeSpec {
        let t = self.volume_type.as_str();
        VolumeSpec {
            iops: self.iops.filter(|_| takes_iops(t)),
            throughput_mibps: self.throughput_mibps.filter(|_| takes_throughput(t)),
            ..self.clone()
        }
    }
}

/// Whether a volume type has settable IOPS (EC2 refuses them for the others).
pub fn takes_iops(volume_type: &str) -> bool {
    ["gp3", "io1", "io2"].contains(&volume_type)
}

/// Whether a volume type has settable throughput.
pub fn takes_throughput(volume_type: &str) -> bool {
    volume_type == "gp3"
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: String,
    pub zone: String,
    pub state: VolumeState,
    pub spec: VolumeSpec,
    pub snapshot_id: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub attachments: Vec<Attachment>,
    /// When EC2 created it, in milliseconds since the Unix epoch (orders racing copies).
    pub created_ms: Option<i64>,
}

impl VolumeInfo {
    /// The value of one tag, if the volume carries it.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
}

/// True when `tags` holds every key of `wanted` with exactly its value. EC2's tag filters
/// treat `*` and `?` as wildcards; this is the exact check after them.
pub fn has_tags(tags: &BTreeMap<String, String>, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| tags.get(k) == Some(v))
}

/// A tag value as a literal EC2 filter value: `*`, `?` and `\` are escaped with a backslash
/// (otherwise `*` and `?` are wildcards).
pub fn literal_filter_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '*' | '?' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `tagged Name=x,Env=y` for messages.
pub fn describe_tags(tags: &BTreeMap<String, String>) -> String {
    let t: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("tagged {}", t.join(","))
}

/// Tag keys starting with `aws:` (any case) belong to AWS (CloudFormation, Backup, Auto
/// Scaling): EC2 refuses them in CreateVolume and CreateTags.
pub fn is_reserved_tag_key(key: &str) -> bool {
    key.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("aws:"))
}

/// A volume to create (from scratch, or from a snapshot when `snapshot_id` is set).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewVolume {
    pub zone: String,
    pub spec: VolumeSpec,
    pub snapshot_id: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// Idempotency token: a retried CreateVolume whose first try did reach EC2 returns the
    /// same volume instead of a second one.
    pub client_token: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    pub zone: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub volume_id: String,
    pub state: SnapshotState,
    /// "42%".
    pub progress: String,
    /// RFC 3339.
    pub start_time: String,
    pub tags: BTreeMap<String, String>,
}

/// What a ModifyVolume asks to change; `None` keeps the volume's own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeChange {
    pub size_gib: Option<u32>,
    pub volume_type: Option<String>,
    pub iops: Option<u32>,
    pub throughput_mibps: Option<u32>,
}

/// A volume's latest modification, as DescribeVolumesModifications shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Modification {
    pub state: ModificationState,
    /// 0 to 100.
    pub progress: u32,
    pub target_size_gib: Option<u32>,
    /// Why it failed, when it did.
    pub status_message: Option<String>,
}

pub trait Ec2: Send + Sync + 'static {
    fn describe_volume(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<VolumeInfo>, CloudError>> + Send;
    /// Volumes carrying all these tags.
    fn find_volumes(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<Vec<VolumeInfo>, CloudError>> + Send;
    fn create_volume(
        &self,
        v: &NewVolume,
    ) -> impl Future<Output = Result<VolumeInfo, CloudError>> + Send;
    fn delete_volume(&self, id: &str) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Starts a modification (ModifyVolume) and returns it as EC2 answered.
    fn modify_volume(
        &self,
        id: &str,
        change: &VolumeChange,
    ) -> impl Future<Output = Result<Modification, CloudError>> + Send;
    /// The volume's latest modification; None if it was never modified.
    fn volume_modification(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Modification>, CloudError>> + Send;
    /// Returns the attachment state EC2 answered with.
    fn attach_volume(
        &self,
        volume: &str,
        instance: &str,
        device: &str,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    fn detach_volume(
        &self,
        volume: &str,
        instance: &str,
        force: bool,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    fn describe_instance(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<InstanceInfo>, CloudError>> + Send;
    fn create_snapshot(
        &self,
        volume: &str,
        description: &str,
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    fn describe_snapshot(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<SnapshotInfo>, CloudError>> + Send;
    /// Our own snapshots carrying all these tags.
    fn find_snapshots(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<Vec<SnapshotInfo>, CloudError>> + Send;
    fn delete_snapshot(&self, id: &str) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn create_tags(
        &self,
        resource: &str,
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn associate_address(
        &self,
        allocation_id: &str,
        instance: &str,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    /// The allocation ids of the Elastic IPs carrying all these tags.
    fn find_addresses(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<Vec<String>, CloudError>> + Send;
}

/// What kind of failure a cloud call had, which decides whether to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// RequestLimitExceeded / Throttling: retry with jittered backoff.
    Throttled,
    /// 5xx, timeouts, connection failures: retry.
    Transient,
    /// The role lacks the IAM permission for this call.
    Unauthorized,
    /// The resource does not exist.
    NotFound,
    /// VolumeInUse: attached elsewhere.
    InUse,
    /// IncorrectState / IncorrectInstanceState.
    IncorrectState,
    /// InvalidVolume.ZoneMismatch.
    ZoneMismatch,
    /// Anything else EC2 refused.
    Refused,
}

/// A failed cloud call: which call, about what, EC2's code and message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct CloudError {
    pub call: &'static str,
    pub target: String,
    pub kind: ErrorKind,
    pub code: Option<String>,
    pub message: String,
}

impl CloudError {
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Throttled | ErrorKind::Transient)
    }

    /// Classifies an EC2 error code.
    pub fn from_code(
        call: &'static str,
        target: impl Into<String>,
        code: Option<&str>,
        message: impl Into<String>,
        http_status: Option<u16>,
    ) -> Self {
        let kind = match code.unwrap_or_default() {
            "RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "RequestThrottled" => {
                ErrorKind::Throttled
            }
            "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
                ErrorKind::Transient
            }
            // Signed with a wrong clock: passes once chronyd has corrected it.
            "RequestExpired" | "RequestTimeTooSkewed" => ErrorKind::Transient,
            "UnauthorizedOperation" | "AuthFailure" | "AccessDenied" | "Blocked" => {
                ErrorKind::Unauthorized
            }
            "VolumeInUse" => ErrorKind::InUse,
            "IncorrectState" | "IncorrectInstanceState" => ErrorKind::IncorrectState,
            "InvalidVolume.ZoneMismatch" => ErrorKind::ZoneMismatch,
            c if c.ends_with(".NotFound") || (c.ends_with(".Malformed") && c.contains("ID")) => {
                ErrorKind::NotFound
            }
            _ if http_status.is_some_and(|s| s >= 500) => ErrorKind::Transient,
            "" => ErrorKind::Transient,
            _ => ErrorKind::Refused,
        };
        CloudError {
            call,
            target: target.into(),
            kind,
            code: code.map(str::to_string),
            message: message.into(),
        }
    }
}

impl fmt::Display for CloudError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.call, self.target)?;
        match &self.code {
            Some(c) => write!(f, ": {c}: {}", self.message)?,
            None => write!(f, ": {}", self.message)?,
        }
        if matches!(
            self.code.as_deref(),
            Some("RequestExpired" | "RequestTimeTooSkewed")
        ) {
            write!(
                f,
                " (the instance's clock is wrong: see the clock line above; chronyd keeps correcting it)"
            )?;
        }
        if self.kind == ErrorKind::Unauthorized {
            write!(
                f,
                " (the instance role needs ec2:{} — see the IAM policy in the README)",
                self.call
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_keeps_the_volume_and_drops_what_its_type_does_not_take() {
        let gp3 = VolumeSpec {
            size_gib: 100,
            volume_type: "gp3".into(),
            iops: Some(4000),
            throughput_mibps: Some(250),
            encrypted: true,
            kms_key_id: Some("alias/state".into()),
        };
        assert_eq!(gp3.for_copy(), gp3);
        let io2 = VolumeSpec {
            volume_type: "io2".into(),
            ..gp3.clone()
        };
        assert_eq!(io2.for_copy().iops, Some(4000));
        assert_eq!(io2.for_copy().throughput_mibps, None);
        // gp2 reports a baseline IOPS figure that CreateVolume would refuse.
        let gp2 = VolumeSpec {
            volume_type: "gp2".into(),
            ..gp3.clone()
        };
        let copy = gp2.for_copy();
        assert_eq!((copy.iops, copy.throughput_mibps), (None, None));
        assert_eq!((copy.size_gib, copy.encrypted), (100, true));
        assert_eq!(copy.kms_key_id.as_deref(), Some("alias/state"));
    }

    #[test]
    fn codes_classify() {
        let k = |c: &str| CloudError::from_code("X", "t", Some(c), "m", Some(400)).kind;
        assert_eq!(k("RequestLimitExceeded"), ErrorKind::Throttled);
        assert_eq!(k("UnauthorizedOperation"), ErrorKind::Unauthorized);
        assert_eq!(k("InvalidVolume.NotFound"), ErrorKind::NotFound);
        assert_eq!(k("VolumeInUse"), ErrorKind::InUse);
        assert_eq!(k("InvalidVolume.ZoneMismatch"), ErrorKind::ZoneMismatch);
        assert_eq!(k("InvalidParameterValue"), ErrorKind::Refused);
        let e = CloudError::from_code("X", "t", Some("Weird"), "m", Some(503));
        assert!(e.is_retryable());
    }

    #[test]
    fn filter_values_are_literal_and_tags_match_exactly() {
        assert_eq!(literal_filter_value("a*b?c\\d"), "a\\*b\\?c\\\\d");
        assert_eq!(literal_filter_value("plain"), "plain");
        let tags = BTreeMap::from([("Name".to_string(), "git*".to_string())]);
        let want = |v: &str| BTreeMap::from([("Name".to_string(), v.to_string())]);
        assert!(has_tags(&tags, &want("git*")));
        assert!(!has_tags(&tags, &want("gitlab")));
        assert!(!has_tags(&BTreeMap::new(), &want("git*")));
    }

    #[test]
    fn aws_prefixed_keys_are_reserved_in_any_case() {
        assert!(is_reserved_tag_key("aws:cloudformation:stack-name"));
        assert!(is_reserved_tag_key("AWS:backup:source-resource"));
        assert!(!is_reserved_tag_key("aws-team"));
        assert!(!is_reserved_tag_key("Name"));
    }

    #[test]
    fn unauthorized_names_the_iam_action() {
        let e = CloudError::from_code(
            "AttachVolume",
            "vol-1",
            Some("UnauthorizedOperation"),
            "You are not authorized",
            Some(403),
        );
        let s = e.to_string();
        assert!(s.contains("ec2:AttachVolume"), "{s}");
        assert!(s.contains("vol-1"), "{s}");
    }
}
