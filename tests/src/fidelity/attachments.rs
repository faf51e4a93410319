//! AttachVolume and DetachVolume as EC2 checks and paces them: attaching and detaching last,
//! the block-device hooks run inside, a failed detach leaves the volume `busy`.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::query::{format_time, xml_escape, Ec2Error, Params, EC2_XMLNS};

use super::dispatch::Reply;
use super::errors::required;
use super::state::{ModificationState, Shared, VolumePhase};
use super::{Attachment, AttachmentEnd};

impl Shared {
    pub(super) async fn attach_volume(
        self: &Arc<Self>,
        params: &Params,
        authorization: Option<&str>,
    ) -> Reply {
        let volume_id = required(params, "VolumeId")?;
        let instance_id = required(params, "InstanceId")?;
        let device = required(params, "Device")?;
        if !valid_device_name(device) {
            // As EC2 words it (base2genomics/batchit#15).
            return Err(Ec2Error::new(
                "InvalidParameterValue",
                format!("Value ({device}) for parameter device is invalid. {device} is not a valid EBS device name."),
            ));
        }
        let _guard = self.mutations.lock().await;
        let volume = self.moto_volume(volume_id, authorization).await?;
        let instance = self.moto_instance(instance_id, authorization).await?;
        let now = Instant::now();
        {
            let state = self.lock();
            let instance_state = state
                .instance_view(instance_id, now)
                .map(|(name, _)| name)
                .unwrap_or(instance.state.as_str());
            // EC2 attaches to running and stopped instances only; its wording for the rest
            // (ansible-collections/amazon.aws#497): "Instance 'i-...' is not 'running'."
            if instance_state != "running" && instance_state != "stopped" {
                return Err(Ec2Error::new(
                    "IncorrectState",
                    format!("Instance '{instance_id}' is not 'running'."),
                ));
            }
            if state.creating.get(volume_id).is_some_and(|t| *t > now) {
                // jsmartin/raidformer#5, kubernetes/kubernetes#15058.
                return Err(Ec2Error::new(
                    "IncorrectState",
                    format!("{volume_id} is not 'available'."),
                ));
            }
            if state.modification_state(volume_id, now) == Some(ModificationState::Modifying) {
                // ansible-collections/amazon.aws#1558.
                return Err(Ec2Error::new(
                    "OperationNotPermitted",
                    format!(
                        "Cannot attach volume {volume_id} when it is in modification state: MODIFYING"
                    ),
                ));
            }
            if !volume.attachments.is_empty() || state.volumes.contains_key(volume_id) {
                // hashicorp/terraform-provider-aws#8565, portworx/px-dev#42.
                return Err(Ec2Error::new(
                    "VolumeInUse",
                    format!("{volume_id} is already attached to an instance"),
                ));
            }
        }
        if volume.zone != instance.zone {
            // linuxkit/linuxkit#2388.
            return Err(Ec2Error::new(
                "InvalidVolume.ZoneMismatch",
                format!(
                    "The volume '{volume_id}' is not in the same availability zone as instance '{instance_id}'"
                ),
            ));
        }
        if instance.devices.iter().any(|d| d == device) {
            // nanovms/ops#1189.
            return Err(Ec2Error::new(
                "InvalidParameterValue",
                format!("Invalid value '{device}' for unixDevice. Attachment point {device} is already in use"),
            ));
        }
        let (status, body) = self.forward(params, authorization).await?;
        if status >= 400 {
            return Ok((status, body));
        }
        let generation = self.next_generation();
        {
            let mut state = self.lock();
            state.volumes.insert(
                volume_id.to_string(),
                VolumePhase::Attaching {
                    instance: instance_id.to_string(),
                    device: device.to_string(),
                    generation,
                },
            );
            state.attachments.push(Attachment {
                volume: volume_id.to_string(),
                instance: instance_id.to_string(),
                device: device.to_string(),
                from: Instant::now(),
                until: None,
                ended_by: None,
            });
        }
        let shared = self.clone();
        let (volume_id, instance_id) = (volume_id.to_string(), instance_id.to_string());
        self.spawn(async move {
            shared
                .finish_attach(volume_id, instance_id, generation, now)
                .await
        });
        // moto's answer already says `attaching`.
        Ok((status, body))
    }

    /// The device appears in the guest (the hook), then `attached` once the latency is over;
    /// if the hook fails the attachment goes away and the volume is `available` again.
    async fn finish_attach(
        self: Arc<Self>,
        volume_id: String,
        instance_id: String,
        generation: u64,
        started: Instant,
    ) {
        let result = self.hooks.attach(&instance_id, &volume_id).await;
        if result.is_ok() {
            tokio::time::sleep_until((started + self.settings.attach_latency).into()).await;
        }
        let _guard = self.mutations.lock().await;
        let ours = matches!(
            self.lock().volumes.get(&volume_id),
            Some(VolumePhase::Attaching { generation: g, .. }) if *g == generation
        );
        if !ours {
            // Overtaken (the instance was terminated meanwhile): that path owns the volume now.
            return;
        }
        match result {
            Ok(()) => {
                self.lock().volumes.remove(&volume_id);
            }
            Err(why) => {
                eprintln!(
                    "spotworld fidelity: attaching {volume_id} to {instance_id} failed in the \
                     block-device layer: {why}; the attachment is dropped and the volume is \
                     available again"
                );
                match self
                    .moto_call(
                        "DetachVolume",
                        &[("VolumeId", &volume_id), ("InstanceId", &instance_id)],
                        None,
                    )
                    .await
                {
                    Ok(_) => self.lock().end_attachment(
                        &volume_id,
                        &instance_id,
                        AttachmentEnd::AttachFailed,
                    ),
                    Err(e) => eprintln!("spotworld fidelity: undoing the attachment of {volume_id} in moto failed: {e}"),
                }
                self.lock().volumes.remove(&volume_id);
            }
        }
    }

    pub(super) async fn detach_volume(
        self: &Arc<Self>,
        params: &Params,
        authorization: Option<&str>,
        request_id: &str,
    ) -> Reply {
        let volume_id = required(params, "VolumeId")?;
        let force = params.flag("Force");
        let _guard = self.mutations.lock().await;
        let volume = self.moto_volume(volume_id, authorization).await?;
        let Some(attachment) = volume.attachments.first().cloned() else {
            // The wire capture in kubernetes-sigs/aws-ebs-csi-driver#1801.
            return Err(Ec2Error::new(
                "IncorrectState",
                format!("Volume '{volume_id}' is in the 'available' state."),
            ));
        };
        let holder = attachment.instance_id.clone();
        if let Some(asked) = params.get("InstanceId") {
            if asked != holder {
                return Err(Ec2Error::new(
                    "InvalidAttachment.NotFound",
                    format!("Volume {volume_id} can not be detached from {asked} because it is not attached"),
                ));
            }
        }
        if let Some(asked) = params.get("Device") {
            if asked != attachment.device {
                return Err(Ec2Error::new(
                    "InvalidAttachment.NotFound",
                    format!("The volume {volume_id} is not attached to instance {holder} as device {asked}"),
                ));
            }
        }
        let answer = |status: &str| {
            detach_response(
                request_id,
                volume_id,
                &holder,
                &attachment.device,
                status,
                attachment.attach_time.as_deref(),
            )
        };
        let phase = self.lock().volumes.get(volume_id).cloned();
        match phase {
            Some(VolumePhase::Attaching { .. }) => Err(Ec2Error::new(
                "IncorrectState",
                format!("Volume '{volume_id}' is in the 'attaching' state."),
            )),
            Some(VolumePhase::Held { instance, .. }) if !force => {
                // What EC2 answers while the holder is being terminated
                // (hashicorp/terraform#18965); only a force-detach takes the volume earlier.
                Err(Ec2Error::new(
                    "IncorrectInstanceState",
                    format!(
                        "Unable to detach volume '{volume_id}' from instance '{instance}'. The \
                         instance is not in a state in which volumes can be detached."
                    ),
                ))
            }
            Some(VolumePhase::Held { instance, .. }) => {
                // Force: the dying instance's device is already gone (instance_gone), so EC2
                // just lets go of the volume.
                self.moto_call(
                    "DetachVolume",
                    &[("VolumeId", volume_id), ("InstanceId", &instance)],
                    authorization,
                )
                .await?;
                {
                    let mut state = self.lock();
                    state.volumes.remove(volume_id);
                    state.end_attachment(volume_id, &instance, AttachmentEnd::ForceDetached);
                }
                eprintln!(
                    "spotworld fidelity: {volume_id} force-detached from terminating {instance}"
                );
                Ok((200, answer("detaching")))
            }
            Some(VolumePhase::Detaching { .. }) | Some(VolumePhase::Busy { .. }) if force => {
                if let Err(why) = self.hooks.detach(&holder, volume_id).await {
                    eprintln!(
                        "spotworld fidelity: force-detach of {volume_id} from {holder}: the \
                         block-device layer still failed ({why}); EC2 lets go regardless"
                    );
                }
                self.moto_call(
                    "DetachVolume",
                    &[("VolumeId", volume_id), ("InstanceId", &holder)],
                    authorization,
                )
                .await?;
                {
                    let mut state = self.lock();
                    state.volumes.remove(volume_id);
                    state.end_attachment(volume_id, &holder, AttachmentEnd::ForceDetached);
                }
                Ok((200, answer("detaching")))
            }
            // Asking again while it is under way changes nothing.
            Some(VolumePhase::Detaching { .. }) => Ok((200, answer("detaching"))),
            Some(VolumePhase::Busy { .. }) => Ok((200, answer("busy"))),
            None => {
                let generation = self.next_generation();
                self.lock().volumes.insert(
                    volume_id.to_string(),
                    VolumePhase::Detaching {
                        instance: holder.clone(),
                        device: attachment.device.clone(),
                        generation,
                    },
                );
                let shared = self.clone();
                let (volume_id, holder2) = (volume_id.to_string(), holder.clone());
                self.spawn(
                    async move { shared.finish_detach(volume_id, holder2, generation).await },
                );
                Ok((200, answer("detaching")))
            }
        }
    }

    /// The device leaves the guest (the hook), the latency passes, then the detach reaches moto
    /// (always with the instance id: moto crashes without it) and the volume is `available`.
    async fn finish_detach(
        self: Arc<Self>,
        volume_id: String,
        instance_id: String,
        generation: u64,
    ) {
        let started = Instant::now();
        let result = self.hooks.detach(&instance_id, &volume_id).await;
        if result.is_ok() {
            tokio::time::sleep_until((started + self.settings.detach_latency).into()).await;
        }
        let _guard = self.mutations.lock().await;
        let device = match self.lock().volumes.get(&volume_id) {
            Some(VolumePhase::Detaching {
                device,
                generation: g,
                ..
            }) if *g == generation => device.clone(),
            // Overtaken (a force-detach or a termination): that path owns the volume now.
            _ => return,
        };
        match result {
            Ok(()) => {
                match self
                    .moto_call(
                        "DetachVolume",
                        &[("VolumeId", &volume_id), ("InstanceId", &instance_id)],
                        None,
                    )
                    .await
                {
                    Ok(_) => self.lock().end_attachment(
                        &volume_id,
                        &instance_id,
                        AttachmentEnd::Detached,
                    ),
                    Err(e) => eprintln!("spotworld fidelity: detaching {volume_id} from {instance_id} in moto failed: {e}"),
                }
                self.lock().volumes.remove(&volume_id);
            }
            Err(why) => {
                eprintln!(
                    "spotworld fidelity: detaching {volume_id} from {instance_id} failed in the \
                     block-device layer: {why}; the attachment is now 'busy' until a force-detach"
                );
                self.lock().volumes.insert(
                    volume_id,
                    VolumePhase::Busy {
                        instance: instance_id,
                        device,
                    },
                );
            }
        }
    }
}

/// `/dev/sd[b-z]`, `/dev/xvd[b-z]`, optionally a second letter or a partition number, as EC2
/// accepts for EBS on Linux.
fn valid_device_name(device: &str) -> bool {
    let rest = device
        .strip_prefix("/dev/sd")
        .or_else(|| device.strip_prefix("/dev/xvd"));
    let Some(rest) = rest else { return false };
    let letters = rest.chars().take_while(|c| c.is_ascii_lowercase()).count();
    let digits = &rest[letters..];
    (1..=2).contains(&letters) && digits.chars().all(|c| c.is_ascii_digit()) && digits.len() <= 2
}

fn detach_response(
    request_id: &str,
    volume_id: &str,
    instance_id: &str,
    device: &str,
    status: &str,
    attach_time: Option<&str>,
) -> String {
    let attach_time = attach_time
        .map(str::to_string)
        .unwrap_or_else(|| format_time(SystemTime::now(), true));
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DetachVolumeResponse xmlns=\"{EC2_XMLNS}\">\
         <requestId>{}</requestId><volumeId>{}</volumeId><instanceId>{}</instanceId>\
         <device>{}</device><status>{}</status><attachTime>{}</attachTime></DetachVolumeResponse>",
        xml_escape(request_id),
        xml_escape(volume_id),
        xml_escape(instance_id),
        xml_escape(device),
        xml_escape(status),
        xml_escape(&attach_time)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        for ok in [
            "/dev/sdf",
            "/dev/xvdf",
            "/dev/sdba",
            "/dev/sda1",
            "/dev/xvdbb",
        ] {
            assert!(valid_device_name(ok), "{ok}");
        }
        for bad in [
            "/dev/foo",
            "sdf",
            "/dev/sd",
            "/dev/nvme1n1",
            "/dev/sdF",
            "/dev/sdabc",
        ] {
            assert!(!valid_device_name(bad), "{bad}");
        }
    }
}
