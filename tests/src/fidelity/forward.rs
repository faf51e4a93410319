//! Calls to moto: a client's request forwarded as it is (moto's quirks smoothed), and the calls
//! the layer makes on its own behalf.

use crate::moto::Volume;
use crate::query::{parse_error_document, request_id, Ec2Error, Params};

use super::dispatch::Reply;
use super::errors::{internal_error, volume_not_found};
use super::state::Shared;
use super::Request;

impl Shared {
    /// Sends `params` to moto as they are; moto's answer, with its quirks smoothed.
    pub(super) async fn forward(&self, params: &Params, authorization: Option<&str>) -> Reply {
        let action = params.action().unwrap_or("").to_string();
        let result = self.moto.send_raw(params.encode(), authorization).await;
        let (status, body) = match result {
            Ok((status, body)) => (status, body),
            Err(e) => {
                eprintln!("spotworld fidelity: {action}: moto unreachable: {e}");
                return Err(internal_error());
            }
        };
        let (status, body) = if status >= 400 {
            match parse_error_document(&body) {
                // moto formats some ids as Python sets: "The volume '{'vol-1'}' does not exist."
                Some(e) => (
                    status,
                    Ec2Error::new(e.code, e.message.replace("'{'", "'").replace("'}'", "'"))
                        .document(&request_id()),
                ),
                None => {
                    eprintln!(
                        "spotworld fidelity: {action}: moto answered HTTP {status} without an \
                         EC2 error document: {}",
                        body.chars().take(300).collect::<String>()
                    );
                    (500, internal_error().document(&request_id()))
                }
            }
        } else {
            (status, body)
        };
        self.lock().moto_requests.push(Request {
            action,
            params: params.pairs().to_vec(),
            status,
            code: if status >= 400 {
                parse_error_document(&body).map(|e| e.code)
            } else {
                None
            },
        });
        Ok((status, body))
    }

    /// Forwards a call the layer makes on its own behalf; the answer body, or the EC2 error.
    pub(super) async fn moto_call(
        &self,
        action: &str,
        pairs: &[(&str, &str)],
        authorization: Option<&str>,
    ) -> Result<String, Ec2Error> {
        let mut params = Params::from_pairs([("Action", action), ("Version", "2016-11-15")]);
        for (k, v) in pairs {
            params.push(*k, *v);
        }
        let (status, body) = self.forward(&params, authorization).await?;
        if status >= 400 {
            return Err(parse_error_document(&body).unwrap_or_else(internal_error));
        }
        Ok(body)
    }

    pub(super) async fn moto_volume(
        &self,
        volume_id: &str,
        authorization: Option<&str>,
    ) -> Result<Volume, Ec2Error> {
        let body = self
            .moto_call(
                "DescribeVolumes",
                &[("VolumeId.1", volume_id)],
                authorization,
            )
            .await
            .map_err(|e| {
                if e.code == "InvalidVolume.NotFound" {
                    volume_not_found(volume_id)
                } else {
                    e
                }
            })?;
        crate::moto::parse_volumes(&body)
            .ok()
            .and_then(|vs| vs.into_iter().find(|v| v.id == volume_id))
            .ok_or_else(|| volume_not_found(volume_id))
    }

    pub(super) async fn moto_instance(
        &self,
        instance_id: &str,
        authorization: Option<&str>,
    ) -> Result<crate::moto::Instance, Ec2Error> {
        let not_found = || {
            Ec2Error::new(
                "InvalidInstanceID.NotFound",
                format!("The instance ID '{instance_id}' does not exist"),
            )
        };
        let body = self
            .moto_call(
                "DescribeInstances",
                &[("InstanceId.1", instance_id)],
                authorization,
            )
            .await
            .map_err(|e| {
                if e.code.starts_with("InvalidInstanceID") {
                    not_found()
                } else {
                    e
                }
            })?;
        crate::moto::parse_instances(&body)
            .ok()
            .and_then(|is| is.into_iter().find(|i| i.id == instance_id))
            .ok_or_else(not_found)
    }
}
