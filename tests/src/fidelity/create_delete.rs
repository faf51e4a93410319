//! CreateVolume, CreateSnapshot and DeleteVolume: the block-device side follows, new volumes are
//! `creating` and new snapshots `pending` for a while, a volume in use cannot be deleted.

use std::sync::Arc;
use std::time::Instant;

use crate::moto::{parse_snapshot, parse_volume};
use crate::query::{Ec2Error, Params, XmlEdits};

use super::dispatch::Reply;
use super::errors::{internal_error, required, unreadable};
use super::state::{Shared, VolumePhase};

impl Shared {
    pub(super) async fn create_volume(
        self: &Arc<Self>,
        params: &Params,
        authorization: Option<&str>,
    ) -> Reply {
        let now = Instant::now();
        if let Some(snapshot_id) = params.get("SnapshotId") {
            if self.lock().snapshot_progress(snapshot_id, now).is_some() {
                return Err(Ec2Error::new(
                    "IncorrectState",
                    format!("Snapshot '{snapshot_id}' is in the 'pending' state."),
                ));
            }
        }
        let _guard = self.mutations.lock().await;
        let (status, body) = self.forward(params, authorization).await?;
        if status >= 400 {
            return Ok((status, body));
        }
        let doc = roxmltree::Document::parse(&body).map_err(|e| unreadable("CreateVolume", e))?;
        let volume = parse_volume(doc.root_element()).map_err(|e| unreadable("CreateVolume", e))?;
        if let Err(why) = self
            .hooks
            .volume_created(&volume.id, volume.size_gib, volume.snapshot_id.as_deref())
            .await
        {
            eprintln!(
                "spotworld fidelity: the block-device layer could not create {} ({} GiB{}): {why}",
                volume.id,
                volume.size_gib,
                volume
                    .snapshot_id
                    .as_deref()
                    .map(|s| format!(" from {s}"))
                    .unwrap_or_default()
            );
            let _ = self
                .moto_call("DeleteVolume", &[("VolumeId", &volume.id)], authorization)
                .await;
            return Err(internal_error());
        }
        self.lock()
            .creating
            .insert(volume.id.clone(), now + self.settings.volume_creation);
        let mut edits = XmlEdits::new();
        edits.set_path_text(doc.root_element(), &["status"], "creating");
        Ok((status, edits.apply(&body)))
    }

    pub(super) async fn create_snapshot(
        self: &Arc<Self>,
        params: &Params,
        authorization: Option<&str>,
    ) -> Reply {
        let _guard = self.mutations.lock().await;
        let (status, body) = self.forward(params, authorization).await?;
        if status >= 400 {
            return Ok((status, body));
        }
        let doc = roxmltree::Document::parse(&body).map_err(|e| unreadable("CreateSnapshot", e))?;
        let snapshot =
            parse_snapshot(doc.root_element()).map_err(|e| unreadable("CreateSnapshot", e))?;
        if let Err(why) = self
            .hooks
            .snapshot_created(&snapshot.id, &snapshot.volume_id)
            .await
        {
            eprintln!(
                "spotworld fidelity: the block-device layer could not snapshot {} as {}: {why}",
                snapshot.volume_id, snapshot.id
            );
            let _ = self
                .moto_call(
                    "DeleteSnapshot",
                    &[("SnapshotId", &snapshot.id)],
                    authorization,
                )
                .await;
            return Err(internal_error());
        }
        self.lock().snapshots.insert(
            snapshot.id.clone(),
            (Instant::now(), self.settings.snapshot_duration),
        );
        let mut edits = XmlEdits::new();
        edits.set_path_text(doc.root_element(), &["status"], "pending");
        edits.set_path_text(doc.root_element(), &["progress"], "0%");
        Ok((status, edits.apply(&body)))
    }

    pub(super) async fn delete_volume(
        self: &Arc<Self>,
        params: &Params,
        authorization: Option<&str>,
    ) -> Reply {
        let volume_id = required(params, "VolumeId")?;
        let _guard = self.mutations.lock().await;
        let holder = self.lock().volumes.get(volume_id).map(|p| match p {
            VolumePhase::Attaching { instance, .. }
            | VolumePhase::Detaching { instance, .. }
            | VolumePhase::Busy { instance, .. }
            | VolumePhase::Held { instance, .. } => instance.clone(),
        });
        if let Some(instance) = holder {
            // nixops-aws#104 shows EC2's wording.
            return Err(Ec2Error::new(
                "VolumeInUse",
                format!("Volume {volume_id} is currently attached to {instance}"),
            ));
        }
        let reply = self.forward(params, authorization).await?;
        if reply.0 < 400 {
            self.lock().creating.remove(volume_id);
        }
        Ok(reply)
    }
}
