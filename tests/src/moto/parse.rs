//! Reading EC2's XML answers into the types of `types`: volumes, instances, snapshots, and a
//! text under the root element.

use std::collections::BTreeMap;

use crate::query::{child, child_text, items, path_text};

use super::types::{Instance, Snapshot, Volume, VolumeAttachment};

fn parse_tags(node: roxmltree::Node) -> BTreeMap<String, String> {
    items(node, &["tagSet"])
        .into_iter()
        .filter_map(|t| {
            Some((
                child_text(t, "key")?.to_string(),
                child_text(t, "value").unwrap_or("").to_string(),
            ))
        })
        .collect()
}

fn required(node: roxmltree::Node, name: &str, what: &str) -> Result<String, String> {
    child_text(node, name)
        .map(str::to_string)
        .ok_or_else(|| format!("{what} without <{name}>"))
}

/// The volumes of a DescribeVolumes answer.
pub fn parse_volumes(xml: &str) -> Result<Vec<Volume>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid XML: {e}"))?;
    items(doc.root_element(), &["volumeSet"])
        .into_iter()
        .map(parse_volume)
        .collect()
}

/// A volume element (an `item` of `volumeSet`, or the root of a CreateVolume answer).
pub fn parse_volume(v: roxmltree::Node) -> Result<Volume, String> {
    let id = required(v, "volumeId", "volume")?;
    let attachments = items(v, &["attachmentSet"])
        .into_iter()
        .map(|a| {
            Ok(VolumeAttachment {
                instance_id: required(a, "instanceId", "attachment")?,
                device: child_text(a, "device").unwrap_or("").to_string(),
                state: required(a, "status", "attachment")?,
                attach_time: child_text(a, "attachTime").map(str::to_string),
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Volume {
        zone: required(v, "availabilityZone", &id)?,
        state: required(v, "status", &id)?,
        size_gib: child_text(v, "size")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{id}: no valid <size>"))?,
        snapshot_id: child_text(v, "snapshotId")
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        tags: parse_tags(v),
        attachments,
        id,
    })
}

/// The instances of a DescribeInstances or RunInstances answer.
pub fn parse_instances(xml: &str) -> Result<Vec<Instance>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid XML: {e}"))?;
    let root = doc.root_element();
    let mut nodes = items(root, &["instancesSet"]);
    for reservation in items(root, &["reservationSet"]) {
        nodes.extend(items(reservation, &["instancesSet"]));
    }
    nodes
        .into_iter()
        .map(|i| {
            let id = required(i, "instanceId", "instance")?;
            Ok(Instance {
                zone: path_text(i, &["placement", "availabilityZone"])
                    .ok_or_else(|| format!("{id}: no placement/availabilityZone"))?
                    .to_string(),
                state: path_text(i, &["instanceState", "name"])
                    .ok_or_else(|| format!("{id}: no instanceState/name"))?
                    .to_string(),
                state_code: path_text(i, &["instanceState", "code"])
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| format!("{id}: no valid instanceState/code"))?,
                private_ip: child_text(i, "privateIpAddress")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
                devices: items(i, &["blockDeviceMapping"])
                    .into_iter()
                    .filter_map(|m| child_text(m, "deviceName").map(str::to_string))
                    .collect(),
                id,
            })
        })
        .collect()
}

/// The snapshots of a DescribeSnapshots answer.
pub fn parse_snapshots(xml: &str) -> Result<Vec<Snapshot>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid XML: {e}"))?;
    items(doc.root_element(), &["snapshotSet"])
        .into_iter()
        .map(parse_snapshot)
        .collect()
}

/// A snapshot element (an `item` of `snapshotSet`, or the root of a CreateSnapshot answer).
pub fn parse_snapshot(s: roxmltree::Node) -> Result<Snapshot, String> {
    let id = required(s, "snapshotId", "snapshot")?;
    Ok(Snapshot {
        volume_id: child_text(s, "volumeId").unwrap_or("").to_string(),
        state: required(s, "status", &id)?,
        progress: child_text(s, "progress").unwrap_or("").to_string(),
        owner_id: child_text(s, "ownerId").unwrap_or("").to_string(),
        tags: parse_tags(s),
        id,
    })
}

/// The text of `<name>` directly under the root element of an answer (e.g. the `volumeId` of a
/// CreateVolume answer).
pub fn root_text(xml: &str, name: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    child(doc.root_element(), name).map(|n| n.text().unwrap_or("").to_string())
}
