//! IMDS's documents, parsed and checked: they come from outside (whoever launched the
//! instance chose some of what IMDS serves), and what they name ends up in EC2 calls, tags,
//! the hostname and console lines.

use super::{Identity, ScheduledEvent, SpotAction};

/// Why an IMDS document is refused.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("bad identity document: {0}")]
    Identity(#[source] serde_json::Error),
    #[error("the identity document's instanceId, region or availabilityZone is not of EC2's form")]
    IdentityForm,
    #[error("bad instance-action document: {0}")]
    SpotAction(#[source] serde_json::Error),
    #[error("bad scheduled events document: {0}")]
    ScheduledEvents(#[source] serde_json::Error),
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

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EventDocument {
    code: String,
    #[serde(default)]
    description: String,
    event_id: String,
    not_before: String,
    #[serde(default)]
    state: String,
}

/// The events of `events/maintenance/scheduled`. Their text ends up in console lines: control
/// characters are dropped and each field is kept short.
pub fn parse_scheduled_events(doc: &str) -> Result<Vec<ScheduledEvent>, DocumentError> {
    let events: Vec<EventDocument> =
        serde_json::from_str(doc).map_err(DocumentError::ScheduledEvents)?;
    let clean = |s: String, max: usize| -> String {
        s.chars().filter(|c| !c.is_control()).take(max).collect()
    };
    Ok(events
        .into_iter()
        .map(|e| ScheduledEvent {
            id: clean(e.event_id, 64),
            code: clean(e.code, 64),
            description: clean(e.description, 256),
            state: clean(e.state, 32),
            not_before: clean(e.not_before, 64),
        })
        .collect())
}

/// IMDS's event time, "21 Jan 2019 09:00:43 GMT".
pub fn parse_event_time(s: &str) -> Option<std::time::SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut words = s.split_ascii_whitespace();
    let day: u32 = words.next()?.parse().ok()?;
    let month_name = words.next()?;
    let month = MONTHS.iter().position(|m| *m == month_name)? + 1;
    let year: u32 = words.next()?.parse().ok()?;
    let time = words.next()?;
    if words.next() != Some("GMT") || words.next().is_some() || !(1..=31).contains(&day) {
        return None;
    }
    let hms: Vec<u32> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms[..] else { return None };
    if year > 9999 || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    crate::volume::layout::parse_rfc3339(&format!(
        "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{sec:02}Z"
    ))
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
    fn scheduled_events_parse_as_imds_writes_them() {
        // The EC2 user guide's example, and a canceled one.
        let doc = r#"[ {
  "NotBefore" : "21 Jan 2019 09:00:43 GMT",
  "Code" : "system-reboot",
  "Description" : "scheduled reboot",
  "EventId" : "instance-event-0d59937288b749b32",
  "NotAfter" : "21 Jan 2019 09:17:23 GMT",
  "State" : "active"
}, {
  "NotBefore" : "1 Feb 2019 00:00:00 GMT",
  "Code" : "instance-retirement",
  "Description" : "The instance is running on degraded hardware\u0007",
  "EventId" : "instance-event-1",
  "State" : "canceled"
} ]"#;
        let events = parse_scheduled_events(doc).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].code, "system-reboot");
        assert_eq!(events[0].id, "instance-event-0d59937288b749b32");
        assert!(events[0].is_active() && !events[0].ends_the_instance());
        assert!(!events[1].is_active() && events[1].ends_the_instance());
        assert_eq!(
            events[1].description, "The instance is running on degraded hardware",
            "control characters dropped"
        );
        assert_eq!(
            parse_event_time(&events[0].not_before).map(crate::volume::layout::rfc3339),
            Some("2019-01-21T09:00:43Z".to_string())
        );
        assert_eq!(
            parse_event_time("1 Feb 2019 00:00:00 GMT").map(crate::volume::layout::rfc3339),
            Some("2019-02-01T00:00:00Z".to_string())
        );
        for bad in [
            "21 Jan 2019 09:00:43",
            "21 Foo 2019 09:00:43 GMT",
            "32 Jan 2019 09:00:43 GMT",
            "21 Jan 2019 24:00:00 GMT",
            "21 Jan 2019 09:00 GMT",
            "",
        ] {
            assert_eq!(parse_event_time(bad), None, "{bad:?}");
        }
        assert!(parse_scheduled_events("[]").unwrap().is_empty());
        assert!(parse_scheduled_events("{").is_err());
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
