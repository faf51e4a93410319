//! IMDS's documents, parsed and checked: they come from outside (whoever launched the
//! instance chose some of what IMDS serves), and what they name ends up in EC2 calls, tags,
//! the hostname and console lines.

use super::{Identity, SpotAction};

/// Why an IMDS document is refused.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("bad identity document: {0}")]
    Identity(#[source] serde_json::Error),
    #[error("the identity document's instanceId, region or availabilityZone is not of EC2's form")]
    IdentityForm,
    #[error("bad instance-action document: {0}")]
    SpotAction(#[source] serde_json::Error),
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct IdentityDocument {
    instance_id: String,
    region: String,
    availability_zone: String,
    #[serde(default)]
    account_id: String,
    #[serde(default)]
    instance_type: String,
    #[serde(default)]
    image_id: String,
}

pub fn parse_identity(doc: &str) -> Result<Identity, DocumentError> {
    let d: IdentityDocument = serde_json::from_str(doc).map_err(DocumentError::Identity)?;
    let instance_ok = d
        .instance_id
        .strip_prefix("i-")
        .is_some_and(|h| (8..=17).contains(&h.len()) && h.chars().all(|c| c.is_ascii_hexdigit()));
    let region_ok = crate::config::is_region(&d.region);
    // us-east-1a, or a Local Zone's us-west-2-lax-1a.
    let zone = &d.availability_zone;
    let zone_ok = zone.len() <= 32
        && zone.len() > d.region.len()
        && zone.starts_with(d.region.as_str())
        && zone
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !(instance_ok && region_ok && zone_ok) {
        return Err(DocumentError::IdentityForm);
    }
    Ok(Identity {
        instance_id: d.instance_id,
        region: d.region,
        zone: d.availability_zone,
        account_id: d.account_id,
        instance_type: d.instance_type,
        image_id: d.image_id,
    })
}

#[derive(serde::Deserialize)]
struct InstanceAction {
    action: String,
    time: String,
}

pub fn parse_spot_action(doc: &str) -> Result<SpotAction, DocumentError> {
    let a: InstanceAction = serde_json::from_str(doc).map_err(DocumentError::SpotAction)?;
    Ok(SpotAction {
        action: a.action,
        time: a.time,
    })
}

/// The rebalance recommendation's notice time (the document as it is if it is not JSON).
pub fn parse_rebalance(doc: &str) -> String {
    serde_json::from_str::<serde_json::Value>(doc)
        .ok()
        .and_then(|v| v["noticeTime"].as_str().map(str::to_string))
        .unwrap_or_else(|| doc.chars().take(64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_document_parses() {
        let doc = r#"{"accountId":"123456789012","architecture":"x86_64","availabilityZone":"us-east-1b",
            "imageId":"ami-03cf127a","instanceId":"i-0abc1234def567890","instanceType":"t3.small","region":"us-east-1",
            "privateIp":"10.0.0.5","version":"2017-09-30"}"#;
        let id = parse_identity(doc).unwrap();
        assert_eq!(id.instance_id, "i-0abc1234def567890");
        assert_eq!(id.zone, "us-east-1b");
        assert_eq!(id.region, "us-east-1");
    }

    #[test]
    fn spot_action_parses() {
        let a = parse_spot_action(r#"{"action": "terminate", "time": "2026-11-26T12:00:00Z"}"#)
            .unwrap();
        assert_eq!(a.action, "terminate");
        assert_eq!(a.time, "2026-11-26T12:00:00Z");
        let e = parse_spot_action("nope").unwrap_err();
        let json = serde_json::from_str::<serde_json::Value>("nope").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("bad instance-action document: {json}")
        );
        assert!(std::error::Error::source(&e)
            .unwrap()
            .is::<serde_json::Error>());
    }

    #[test]
    fn an_identity_of_the_wrong_form_is_refused() {
        let doc = |id: &str, region: &str, zone: &str| {
            format!(r#"{{"instanceId":"{id}","region":"{region}","availabilityZone":"{zone}"}}"#)
        };
        assert!(parse_identity(&doc("i-0abc1234", "eu-west-1", "eu-west-1a")).is_ok());
        assert_eq!(
            parse_identity(&doc("i-0abc1234", "eu-west-1", "euw1-az1"))
                .unwrap_err()
                .to_string(),
            "the identity document's instanceId, region or availabilityZone is not of EC2's form"
        );
        assert!(parse_identity(&doc("i-0abc/../x", "eu-west-1", "eu-west-1a")).is_err());
        assert!(parse_identity(&doc("i-0abc1234", "eu west 1", "eu west 1a")).is_err());
        assert_eq!(
            parse_rebalance(r#"{"noticeTime":"2026-11-26T12:00:00Z"}"#),
            "2026-11-26T12:00:00Z"
        );
    }
}
