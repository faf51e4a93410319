//! Request dispatch: each request's `Action` read from its form, the clock and fault checks
//! that come first, then the handler (the layer's own, or moto's through `forward`).

use std::sync::Arc;

use bytes::Bytes;

use crate::query::{
    http_response, parse_error_document, request_id, Ec2Error, HttpResponse, Params,
};

use super::skew::{clock_skew, MAX_CLOCK_SKEW};
use super::state::Shared;
use super::{parse_amz_date, Request};

/// A handler's answer: HTTP status and body, or the EC2 error to answer with.
pub(super) type Reply = Result<(u16, String), Ec2Error>;

impl Shared {
    pub(super) async fn handle(self: Arc<Self>, req: hyper::Request<Bytes>) -> HttpResponse {
        let mut params = Params::parse(req.body());
        if let Some(query) = req.uri().query() {
            for (k, v) in Params::parse(query.as_bytes()).into_pairs() {
                params.push(k, v);
            }
        }
        let authorization = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let request_id = request_id();
        let action = params.action().unwrap_or("").to_string();
        let signed_at = req
            .headers()
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_amz_date);
        let reply = match signed_at.map(clock_skew) {
            Some(skew) if skew > MAX_CLOCK_SKEW => {
                Err(Ec2Error::new("RequestExpired", "Request has expired."))
            }
            _ => {
                self.dispatch(&action, &params, authorization.as_deref(), &request_id)
                    .await
            }
        };
        let (status, body) = match reply {
            Ok(reply) => reply,
            Err(error) => (error.status(), error.document(&request_id)),
        };
        let code = if status >= 400 {
            parse_error_document(&body).map(|e| e.code)
        } else {
            None
        };
        self.lock().requests.push(Request {
            action,
            params: params.into_pairs(),
            status,
            code,
        });
        http_response(
            status,
            &[
                ("content-type", "text/xml;charset=UTF-8"),
                ("server", "AmazonEC2"),
                ("x-amzn-requestid", &request_id),
            ],
            body,
        )
    }

    async fn dispatch(
        self: &Arc<Self>,
        action: &str,
        params: &Params,
        authorization: Option<&str>,
        request_id: &str,
    ) -> Reply {
        if action.is_empty() {
            return Err(Ec2Error::new(
                "MissingAction",
                "The request must contain the parameter Action",
            ));
        }
        self.check_faults(action, params, authorization)?;
        if matches!(
            action,
            "CreateTags" | "CreateVolume" | "CreateSnapshot" | "RunInstances"
        ) {
            Self::check_reserved_tags(params)?;
        }
        match action {
            "AttachVolume" => self.attach_volume(params, authorization).await,
            "DetachVolume" => self.detach_volume(params, authorization, request_id).await,
            "DescribeVolumes" => self.describe_volumes(params, authorization).await,
            "DescribeInstances" => self.describe_instances(params, authorization).await,
            "DescribeSnapshots" => self.describe_snapshots(params, authorization).await,
            "CreateVolume" => self.create_volume(params, authorization).await,
            "CreateSnapshot" => self.create_snapshot(params, authorization).await,
            "TerminateInstances" => self.terminate_instances(params, request_id).await,
            "DeleteVolume" => self.delete_volume(params, authorization).await,
            "ModifyVolume" => self.modify_volume(params, authorization).await,
            "DescribeVolumesModifications" => {
                self.describe_volumes_modifications(params, authorization)
                    .await
            }
            _ => self.forward(params, authorization).await,
        }
    }

    /// EC2 refuses tag keys that start with `aws:` (any case) wherever a client sets tags:
    /// "Value ( aws:cloudformation:stack-name ) for parameter key is invalid. Tag keys starting
    /// with 'aws:' are reserved for internal use" (InvalidParameterValue; the wording in
    /// AndrewFarley/AWS-Automated-Daily-Instance-AMI-Snapshots#7). Resources made by AWS
    /// services carry such tags all the same.
    fn check_reserved_tags(params: &Params) -> Result<(), Ec2Error> {
        let reserved = params.iter().find(|(k, v)| {
            k.ends_with(".Key")
                && (k.starts_with("Tag.") || k.starts_with("TagSpecification."))
                && v.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("aws:"))
        });
        match reserved {
            Some((_, key)) => Err(Ec2Error::new(
                "InvalidParameterValue",
                format!(
                    "Value ( {key} ) for parameter key is invalid. Tag keys starting with 'aws:' are reserved for internal use"
                ),
            )),
            None => Ok(()),
        }
    }
}
