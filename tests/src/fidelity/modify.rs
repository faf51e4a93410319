//! ModifyVolume and DescribeVolumesModifications: moto completes a modification the moment it is
//! asked and checks nothing; EC2 goes `modifying` → `optimizing` → `completed`, refuses a second
//! modification while one runs and for six hours after one started, refuses to shrink, and
//! refuses to attach a volume while it is `modifying`. The block device takes its new size when
//! the modification reaches `optimizing` (from then on the new size is usable, EBS user guide,
//! "Monitor the progress of volume modifications").

use std::sync::Arc;
use std::time::Instant;

use crate::query::{child_text, items, Ec2Error, Params, XmlEdits};

use super::dispatch::Reply;
use super::errors::{required, unreadable, volume_not_found};
use super::state::{Modification, ModificationState, Shared};

impl Shared {
    pub(super) async fn modify_volume(
        self: &Arc<Self>,
        params: &Params,
        authorization: Option<&str>,
    ) -> Reply {
        let volume_id = required(params, "VolumeId")?.to_string();
        let _guard = self.mutations.lock().await;
        let volume = self.moto_volume(&volume_id, authorization).await?;
        let now = Instant::now();
        {
            let state = self.lock();
            if let Some(last) = state.modifications.get(&volume_id).and_then(|m| m.last()) {
                match last.state(now) {
                    // sodafoundation/strato#1120 has EC2's wording.
                    running @ (ModificationState::Modifying | ModificationState::Optimizing) => {
                        return Err(Ec2Error::new(
                            "IncorrectModificationState",
                            format!(
                                "Volume {volume_id} cannot be modified in modification state {}",
                                running.as_str().to_uppercase()
                            ),
                        ));
                    }
                    _ if now < last.started + self.settings.modification_cooldown => {
                        // hashicorp/terraform-provider-aws#44612.
                        return Err(Ec2Error::new(
                            "VolumeModificationRateExceeded",
                            "You've reached the maximum modification rate per volume limit. Wait at least 6 hours between modifications per EBS volume.",
                        ));
                    }
                    _ => {}
                }
            }
        }
        let target_size = match params.get("Size") {
            None => None,
            Some(s) => Some(s.parse::<u64>().map_err(|_| {
                Ec2Error::new(
                    "InvalidParameterValue",
                    format!("Value ({s}) for parameter size is invalid."),
                )
            })?),
        };
        if target_size.is_some_and(|t| t < volume.size_gib) {
            // The wording aws-cli users quote (e.g. in Terraform and CDK reports).
            return Err(Ec2Error::new(
                "InvalidParameterValue",
                "New size cannot be smaller than existing size",
            ));
        }
        let (status, body) = self.forward(params, authorization).await?;
        if status >= 400 {
            return Ok((status, body));
        }
        let doc = roxmltree::Document::parse(&body).map_err(|e| unreadable("ModifyVolume", e))?;
        let modification = Modification {
            started: now,
            optimizing_at: now + self.settings.modification_modifying,
            completed_at: now
                + self.settings.modification_modifying
                + self.settings.modification_optimizing,
            resized: target_size.is_none_or(|t| t == volume.size_gib),
            failed: false,
        };
        self.lock()
            .modifications
            .entry(volume_id.clone())
            .or_default()
            .push(modification);
        if let Some(size_gib) = target_size.filter(|t| *t != volume.size_gib) {
            let shared = self.clone();
            let delay = self.settings.modification_modifying;
            self.spawn(async move {
                tokio::time::sleep(delay).await;
                shared.finish_resize(&volume_id, size_gib).await;
            });
        }
        let mut edits = XmlEdits::new();
        for item in doc.root_element().children().filter(|c| c.is_element()) {
            if item.tag_name().name() == "volumeModification" {
                show(&mut edits, item, ModificationState::Modifying, 0);
            }
        }
        Ok((status, edits.apply(&body)))
    }

    /// The block device takes the new size; until it has, the modification stays `modifying`.
    async fn finish_resize(&self, volume_id: &str, size_gib: u64) {
        let resized = self.hooks.volume_resized(volume_id, size_gib).await;
        if let Err(why) = &resized {
            eprintln!("spotworld fidelity: the block-device layer could not resize {volume_id} to {size_gib} GiB: {why}");
        }
        let mut state = self.lock();
        if let Some(m) = state
            .modifications
            .get_mut(volume_id)
            .and_then(|m| m.last_mut())
        {
            m.resized = true;
            m.failed = resized.is_err();
        }
    }

    pub(super) async fn describe_volumes_modifications(
        &self,
        params: &Params,
        authorization: Option<&str>,
    ) -> Reply {
        let (status, body) = self.forward(params, authorization).await?;
        if status >= 400 {
            // moto words an unknown volume `'{'vol-…'}'`; EC2 names it plainly.
            let unknown = params
                .list("VolumeId")
                .into_iter()
                .find(|id| body.contains(&format!("'{id}'")));
            if let Some(id) = unknown.filter(|_| body.contains("InvalidVolume.NotFound")) {
                return Err(volume_not_found(&id));
            }
            return Ok((status, body));
        }
        let doc = roxmltree::Document::parse(&body)
            .map_err(|e| unreadable("DescribeVolumesModifications", e))?;
        let now = Instant::now();
        let state = self.lock();
        let mut edits = XmlEdits::new();
        // moto lists every modification of a volume, oldest first; EC2 "describes the most
        // recent volume modification request" of each (API reference).
        let listed = items(doc.root_element(), &["volumeModificationSet"]);
        for (i, item) in listed.iter().enumerate() {
            let id = child_text(*item, "volumeId").unwrap_or("");
            let later = listed[i + 1..]
                .iter()
                .any(|l| child_text(*l, "volumeId") == Some(id));
            if later {
                edits.remove(*item);
            } else if let Some(m) = state.modifications.get(id).and_then(|m| m.last()) {
                show(&mut edits, *item, m.state(now), m.progress(now));
            }
        }
        Ok((status, edits.apply(&body)))
    }
}

/// Rewrites moto's completed modification to show `state` and `progress`; only a finished one
/// has an end time.
fn show(edits: &mut XmlEdits, item: roxmltree::Node, state: ModificationState, progress: u32) {
    edits.set_path_text(item, &["modificationState"], state.as_str());
    edits.set_path_text(item, &["progress"], &progress.to_string());
    if !matches!(
        state,
        ModificationState::Completed | ModificationState::Failed
    ) {
        if let Some(end) = item
            .children()
            .find(|c| c.is_element() && c.tag_name().name() == "endTime")
        {
            edits.remove(end);
        }
    }
}
