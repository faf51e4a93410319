//! DescribeVolumes, DescribeInstances and DescribeSnapshots: moto's answers rewritten to show the
//! layer's transitions, and the filters that depend on them applied here.

use std::time::Instant;

use crate::query::{child_text, items, path_text, Filter, Params, XmlEdits};

use super::dispatch::Reply;
use super::errors::unreadable;
use super::state::Shared;

impl Shared {
    pub(super) async fn describe_volumes(
        &self,
        params: &Params,
        authorization: Option<&str>,
    ) -> Reply {
        // Tag filters too: moto reads their values with Python's fnmatch, which has no
        // backslash escapes (EC2's `\*` for a literal `*`) and has `[...]` classes EC2 has not.
        let (ours, forwarded) = split_filters_by(params, |name| {
            matches!(name, "status" | "attachment.status") || name.starts_with("tag:")
        });
        let (status, body) = self.forward(&forwarded, authorization).await?;
        if status >= 400 {
            return Ok((status, body));
        }
        let doc =
            roxmltree::Document::parse(&body).map_err(|e| unreadable("DescribeVolumes", e))?;
        let now = Instant::now();
        let state = self.lock();
        let mut edits = XmlEdits::new();
        for item in items(doc.root_element(), &["volumeSet"]) {
            let id = child_text(item, "volumeId").unwrap_or("");
            let view = state.volume_view(id, now);
            let status = view
                .status
                .unwrap_or(child_text(item, "status").unwrap_or(""));
            if let Some(s) = view.status {
                edits.set_path_text(item, &["status"], s);
            }
            let mut attachment_states = Vec::new();
            for a in items(item, &["attachmentSet"]) {
                let s = view
                    .attachment
                    .unwrap_or(child_text(a, "status").unwrap_or(""));
                if let Some(s) = view.attachment {
                    edits.set_path_text(a, &["status"], s);
                }
                attachment_states.push(s);
            }
            let tags: Vec<(&str, &str)> = items(item, &["tagSet"])
                .into_iter()
                .map(|t| {
                    (
                        child_text(t, "key").unwrap_or(""),
                        child_text(t, "value").unwrap_or(""),
                    )
                })
                .collect();
            let keep = ours.iter().all(|f| match f.name.as_str() {
                "status" => f.matches(status),
                "attachment.status" => attachment_states.iter().any(|s| f.matches(s)),
                name => {
                    let key = name.trim_start_matches("tag:");
                    tags.iter().any(|(k, v)| *k == key && f.matches(v))
                }
            });
            if !keep {
                edits.remove(item);
            }
        }
        Ok((status, edits.apply(&body)))
    }

    pub(super) async fn describe_instances(
        &self,
        params: &Params,
        authorization: Option<&str>,
    ) -> Reply {
        let (ours, forwarded) =
            split_filters(params, &["instance-state-name", "instance-state-code"]);
        let (status, body) = self.forward(&forwarded, authorization).await?;
        if status >= 400 {
            return Ok((status, body));
        }
        let doc =
            roxmltree::Document::parse(&body).map_err(|e| unreadable("DescribeInstances", e))?;
        let now = Instant::now();
        let state = self.lock();
        let mut edits = XmlEdits::new();
        for reservation in items(doc.root_element(), &["reservationSet"]) {
            let instances = items(reservation, &["instancesSet"]);
            let mut kept = 0;
            let mut removed = Vec::new();
            for instance in &instances {
                let id = child_text(*instance, "instanceId").unwrap_or("");
                let (name, code) = match state.instance_view(id, now) {
                    Some((name, code)) => {
                        edits.set_path_text(*instance, &["instanceState", "name"], name);
                        edits.set_path_text(
                            *instance,
                            &["instanceState", "code"],
                            &code.to_string(),
                        );
                        (name.to_string(), code.to_string())
                    }
                    None => (
                        path_text(*instance, &["instanceState", "name"])
                            .unwrap_or("")
                            .to_string(),
                        path_text(*instance, &["instanceState", "code"])
                            .unwrap_or("")
                            .to_string(),
                    ),
                };
                for mapping in items(*instance, &["blockDeviceMapping"]) {
                    let volume = path_text(mapping, &["ebs", "volumeId"]).unwrap_or("");
                    if let Some(s) = state.volume_view(volume, now).attachment {
                        edits.set_path_text(mapping, &["ebs", "status"], s);
                    }
                }
                let keep = ours.iter().all(|f| match f.name.as_str() {
                    "instance-state-name" => f.matches(&name),
                    _ => f.matches(&code),
                });
                if keep {
                    kept += 1;
                } else {
                    removed.push(*instance);
                }
            }
            if kept == 0 && !instances.is_empty() {
                edits.remove(reservation);
            } else {
                for instance in removed {
                    edits.remove(instance);
                }
            }
        }
        Ok((status, edits.apply(&body)))
    }

    pub(super) async fn describe_snapshots(
        &self,
        params: &Params,
        authorization: Option<&str>,
    ) -> Reply {
        let (ours, mut forwarded) = split_filters(params, &["status", "progress"]);
        // moto ignores Owner and lists the snapshots behind its public AMIs too; EC2 filters.
        let owners = params.list("Owner");
        forwarded.remove_members("Owner");
        let (status, body) = self.forward(&forwarded, authorization).await?;
        if status >= 400 {
            return Ok((status, body));
        }
        let doc =
            roxmltree::Document::parse(&body).map_err(|e| unreadable("DescribeSnapshots", e))?;
        let now = Instant::now();
        let state = self.lock();
        let account = &self.settings.account_id;
        let mut edits = XmlEdits::new();
        for item in items(doc.root_element(), &["snapshotSet"]) {
            let id = child_text(item, "snapshotId").unwrap_or("");
            let owner = child_text(item, "ownerId").unwrap_or("");
            let owner_ok = owners.is_empty()
                || owners.iter().any(|o| match o.as_str() {
                    "self" => owner == account,
                    "amazon" | "aws-marketplace" => owner != account,
                    other => owner == other,
                });
            let (status, progress) = match state.snapshot_progress(id, now) {
                Some(percent) => {
                    let progress = format!("{percent}%");
                    edits.set_path_text(item, &["status"], "pending");
                    edits.set_path_text(item, &["progress"], &progress);
                    ("pending".to_string(), progress)
                }
                None => (
                    child_text(item, "status").unwrap_or("").to_string(),
                    child_text(item, "progress").unwrap_or("").to_string(),
                ),
            };
            let keep = owner_ok
                && ours.iter().all(|f| match f.name.as_str() {
                    "status" => f.matches(&status),
                    _ => f.matches(&progress),
                });
            if !keep {
                edits.remove(item);
            }
        }
        Ok((status, edits.apply(&body)))
    }
}

/// Splits the filters named in `ours` (which depend on state only this layer knows) from the
/// rest, which moto applies; returns them and the request to forward without them.
fn split_filters(params: &Params, ours: &[&str]) -> (Vec<Filter>, Params) {
    split_filters_by(params, |name| ours.contains(&name))
}

/// The filters whose name `ours` says the layer applies itself, and the request without them.
fn split_filters_by(params: &Params, ours: impl Fn(&str) -> bool) -> (Vec<Filter>, Params) {
    let (mine, theirs): (Vec<Filter>, Vec<Filter>) =
        params.filters().into_iter().partition(|f| ours(&f.name));
    let mut forwarded = params.clone();
    forwarded.set_filters(&theirs);
    (mine, forwarded)
}
