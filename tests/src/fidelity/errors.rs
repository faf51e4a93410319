//! The EC2 errors the layer answers with itself (missing parameters, unknown volumes, internal
//! errors).

use crate::query::{Ec2Error, Params};

pub(super) fn required<'a>(params: &'a Params, key: &str) -> Result<&'a str, Ec2Error> {
    params
        .get(key)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| missing(key))
}

pub(super) fn missing(key: &str) -> Ec2Error {
    Ec2Error::new(
        "MissingParameter",
        format!("The request must contain the parameter {key}"),
    )
}

pub(super) fn volume_not_found(volume_id: &str) -> Ec2Error {
    // kubernetes-sigs/aws-ebs-csi-driver#1343.
    Ec2Error::new(
        "InvalidVolume.NotFound",
        format!("The volume '{volume_id}' does not exist."),
    )
}

pub(super) fn internal_error() -> Ec2Error {
    Ec2Error::new("InternalError", "An internal error has occurred")
}

pub(super) fn unreadable(action: &str, detail: impl std::fmt::Display) -> Ec2Error {
    eprintln!("spotworld fidelity: unreadable {action} answer from moto: {detail}");
    internal_error()
}
