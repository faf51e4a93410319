//! Injected faults: denied actions and queued or random throttling, server errors and
//! `IncorrectState`, answered as EC2 words them (`UnauthorizedOperation` names the caller).

use std::collections::VecDeque;
use std::time::SystemTime;

use crate::query::{random_token, Ec2Error, Params};

use super::state::{Shared, State};

/// A fault to inject into the next requests of one action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 503 `RequestLimitExceeded`.
    Throttle,
    /// HTTP 500 `InternalError`.
    ServerError,
    /// HTTP 503 `Unavailable`.
    Unavailable,
    /// HTTP 403 `UnauthorizedOperation`, naming the action.
    Unauthorized,
    /// HTTP 400 `IncorrectState`, as EC2 answers a call the resource's state does not allow
    /// yet (a DetachVolume while EC2 is still settling an attachment).
    IncorrectState,
}

/// A random number in [0, 1), for fault rates (the kernel's getrandom through std's hasher
/// seeds; good enough to spread faults, not for anything else).
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

impl Shared {
    /// Denied actions and injected faults, before anything else (as IAM and throttling are).
    pub(super) fn check_faults(
        &self,
        action: &str,
        params: &Params,
        authorization: Option<&str>,
    ) -> Result<(), Ec2Error> {
        let mut state = self.lock();
        let fault = if state.denied.contains(action) {
            Some(Fault::Unauthorized)
        } else {
            state
                .faults
                .get_mut(action)
                .and_then(VecDeque::pop_front)
                .or_else(|| {
                    let mut roll = random_unit();
                    state.fault_rates.get(action)?.iter().find_map(|(f, rate)| {
                        roll -= rate;
                        (roll < 0.0).then_some(*f)
                    })
                })
        };
        match fault {
            None => Ok(()),
            Some(Fault::Throttle) => Err(Ec2Error::new(
                "RequestLimitExceeded",
                "Request limit exceeded.",
            )),
            Some(Fault::ServerError) => Err(Ec2Error::new(
                "InternalError",
                "An internal error has occurred",
            )),
            Some(Fault::Unavailable) => Err(Ec2Error::new(
                "Unavailable",
                "The server is overloaded and can't handle the request.",
            )),
            Some(Fault::Unauthorized) => {
                Err(self.unauthorized(&state, action, params, authorization))
            }
            Some(Fault::IncorrectState) => Err(Ec2Error::new(
                "IncorrectState",
                format!(
                    "Volume '{}' is in the 'busy' state.",
                    params.get("VolumeId").unwrap_or("vol-?")
                ),
            )),
        }
    }

    /// EC2's wording: "You are not authorized to perform this operation. User:
    /// arn:aws:sts::ACCOUNT:assumed-role/ROLE/i-... is not authorized to perform: ec2:ACTION on
    /// resource: ARN because no identity-based policy allows the ec2:ACTION action. Encoded
    /// authorization failure message: ...".
    fn unauthorized(
        &self,
        state: &State,
        action: &str,
        params: &Params,
        authorization: Option<&str>,
    ) -> Ec2Error {
        let (access_key, region) = credential_scope(authorization);
        let account = &self.settings.account_id;
        let session = state
            .callers
            .get(&access_key)
            .cloned()
            .unwrap_or(access_key);
        let resource = [
            ("VolumeId", "volume"),
            ("InstanceId", "instance"),
            ("InstanceId.1", "instance"),
            ("SnapshotId", "snapshot"),
        ]
        .iter()
        .find_map(|(param, kind)| {
            params
                .get(param)
                .map(|id| format!(" on resource: arn:aws:ec2:{region}:{account}:{kind}/{id}"))
        })
        .unwrap_or_default();
        Ec2Error::new(
            "UnauthorizedOperation",
            format!(
                "You are not authorized to perform this operation. User: \
                 arn:aws:sts::{account}:assumed-role/{}/{session} is not authorized to perform: \
                 ec2:{action}{resource} because no identity-based policy allows the ec2:{action} \
                 action. Encoded authorization failure message: {}",
                self.settings.role_name,
                random_token(96)
            ),
        )
    }
}

/// The access key id and region of a SigV4 Authorization header
/// (`... Credential=AKID/20260101/us-east-1/ec2/aws4_request, ...`).
fn credential_scope(authorization: Option<&str>) -> (String, String) {
    let scope = authorization
        .and_then(|a| a.split("Credential=").nth(1))
        .and_then(|c| c.split([',', ' ']).next())
        .unwrap_or("");
    let mut parts = scope.split('/');
    let access_key = parts.next().filter(|s| !s.is_empty()).unwrap_or("unknown");
    let region = parts
        .nth(1)
        .filter(|s| !s.is_empty())
        .unwrap_or("us-east-1");
    (access_key.to_string(), region.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_scope_of_sigv4_headers() {
        assert_eq!(
            credential_scope(Some(
                "AWS4-HMAC-SHA256 Credential=ASIAXYZ/20260101/eu-west-1/ec2/aws4_request, SignedHeaders=host, Signature=00"
            )),
            ("ASIAXYZ".to_string(), "eu-west-1".to_string())
        );
        assert_eq!(
            credential_scope(None),
            ("unknown".to_string(), "us-east-1".to_string())
        );
    }
}
