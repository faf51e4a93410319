//! Termination: TerminateInstances, and the termination the simulator asks for when it kills a
//! VM. The instance is `shutting-down`, then `terminated`; its volumes stay held until released.

use std::sync::Arc;
use std::time::Instant;

use crate::query::{Ec2Error, Params, EC2_XMLNS};

use super::dispatch::Reply;
use super::errors::{internal_error, missing};
use super::state::{Shared, Termination, VolumePhase};
use super::AttachmentEnd;

impl Shared {
    /// Starts the termination of `instance_id` (the caller holds `mutations`). Returns the
    /// state the instance was in, or `None` if it was already terminating or terminated.
    pub(super) async fn terminate_locked(
        self: &Arc<Self>,
        instance_id: &str,
        authorization: Option<&str>,
    ) -> Result<Option<(&'static str, u32)>, Ec2Error> {
        let instance = self.moto_instance(instance_id, authorization).await?;
        if self.lock().terminations.contains_key(instance_id) || instance.state == "terminated" {
            return Ok(None);
        }
        let previous = match instance.state.as_str() {
            "pending" => ("pending", 0),
            "stopping" => ("stopping", 64),
            "stopped" => ("stopped", 80),
            _ => ("running", 16),
        };
        let body = self
            .moto_call(
                "DescribeVolumes",
                &[
                    ("Filter.1.Name", "attachment.instance-id"),
                    ("Filter.1.Value.1", instance_id),
                ],
                authorization,
            )
            .await?;
        let attached = crate::moto::parse_volumes(&body).map_err(|e| {
            eprintln!("spotworld fidelity: unreadable DescribeVolumes answer: {e}");
            internal_error()
        })?;
        self.hooks.instance_gone(instance_id).await;
        let now = Instant::now();
        let termination = Termination {
            shutting_down_until: now + self.settings.shutting_down,
            release_at: now
                + self
                    .settings
                    .release_after_termination
                    .max(self.settings.shutting_down),
        };
        {
            let mut state = self.lock();
            for volume in &attached {
                for a in volume
                    .attachments
                    .iter()
                    .filter(|a| a.instance_id == instance_id)
                {
                    // Replaces any attaching/detaching phase: its task sees it was overtaken.
                    state.volumes.insert(
                        volume.id.clone(),
                        VolumePhase::Held {
                            instance: instance_id.to_string(),
                            device: a.device.clone(),
                        },
                    );
                }
            }
            state
                .terminations
                .insert(instance_id.to_string(), termination);
        }
        eprintln!(
            "spotworld fidelity: {instance_id} terminated; holding {} volume(s) for {:?}",
            attached.len(),
            termination.release_at - now
        );
        let shared = self.clone();
        let instance_id = instance_id.to_string();
        self.spawn(async move {
            tokio::time::sleep_until(termination.release_at.into()).await;
            let _guard = shared.mutations.lock().await;
            // Now moto may terminate it: that frees whatever is still attached.
            let released = shared
                .moto_call(
                    "TerminateInstances",
                    &[("InstanceId.1", &instance_id)],
                    None,
                )
                .await;
            let mut state = shared.lock();
            match released {
                Ok(_) => state.end_attachments_of(&instance_id, AttachmentEnd::Released),
                Err(e) => eprintln!(
                    "spotworld fidelity: TerminateInstances {instance_id} in moto failed: {e}"
                ),
            }
            state.volumes.retain(|_, phase| {
                !matches!(phase, VolumePhase::Held { instance, .. } if *instance == instance_id)
            });
            state.terminations.remove(&instance_id);
        });
        Ok(Some(previous))
    }

    pub(super) async fn terminate_instances(
        self: &Arc<Self>,
        params: &Params,
        request_id: &str,
    ) -> Reply {
        let ids = params.list("InstanceId");
        if ids.is_empty() {
            return Err(missing("InstanceId"));
        }
        let _guard = self.mutations.lock().await;
        let mut items = String::new();
        for id in &ids {
            let previous = self.terminate_locked(id, None).await?;
            let now = Instant::now();
            let (prev_name, prev_code) = previous.unwrap_or_else(|| {
                self.lock()
                    .instance_view(id, now)
                    .unwrap_or(("terminated", 48))
            });
            let (name, code) = self
                .lock()
                .instance_view(id, now)
                .unwrap_or(("terminated", 48));
            items.push_str(&format!(
                "<item><instanceId>{id}</instanceId><currentState><code>{code}</code><name>{name}</name></currentState>\
                 <previousState><code>{prev_code}</code><name>{prev_name}</name></previousState></item>"
            ));
        }
        Ok((
            200,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<TerminateInstancesResponse xmlns=\"{EC2_XMLNS}\">\
                 <requestId>{request_id}</requestId><instancesSet>{items}</instancesSet></TerminateInstancesResponse>"
            ),
        ))
    }
}
