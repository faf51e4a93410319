//! What the layer records for tests to check: every request it saw or forwarded, and every
//! attachment from the moment it reached moto until it ended.

use std::time::Instant;

/// One request as the layer saw it: from a client, or forwarded to moto.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub action: String,
    pub params: Vec<(String, String)>,
    /// The HTTP status answered.
    pub status: u16,
    /// The EC2 error code, when the answer was an error.
    pub code: Option<String>,
}

/// One attachment of a volume to an instance as EC2 (moto) holds it: from the moment an
/// AttachVolume reached moto until the volume was let go of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub volume: String,
    pub instance: String,
    pub device: String,
    pub from: Instant,
    /// `None` while it lasts.
    pub until: Option<Instant>,
    pub ended_by: Option<AttachmentEnd>,
}

/// How an attachment ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachmentEnd {
    /// A DetachVolume completed.
    Detached,
    /// A force-detach let go of it (busy, detaching, or held by a terminating instance).
    ForceDetached,
    /// The instance was terminated and EC2 released its volumes after the release delay.
    Released,
    /// The block-device side could not attach it: the attachment was undone.
    AttachFailed,
}

impl Attachment {
    /// Whether the two attachments were in force at a common instant (an open one lasts until
    /// `now`).
    pub fn overlaps(&self, other: &Attachment, now: Instant) -> bool {
        self.from < other.until.unwrap_or(now) && other.from < self.until.unwrap_or(now)
    }
}

impl Request {
    /// The first value of a parameter.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}
