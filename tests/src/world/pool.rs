//! Volume pools (`volume.pool`): the tags that make a volume one of a pool's, the console line an
//! instance prints when it takes one, and the check that a pool's volumes and its instances pair
//! up one to one.

use std::collections::BTreeMap;

use super::World;
use crate::moto::Volume;
use crate::qemu::Result;

/// The tag naming a volume's pool.
pub const POOL_TAG: &str = "spotinit:pool";
/// The tag numbering a volume within its pool (1, 2, ...).
pub const SLOT_TAG: &str = "spotinit:slot";

/// What `volume: pool <pool>: took slot <k> (<vol-id> in <zone>)` says: the volume is attached to
/// the instance that printed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TookSlot {
    pub slot: u32,
    pub volume_id: String,
    pub zone: String,
}

impl TookSlot {
    /// The line's beginning for `pool`, to wait on.
    pub fn marker(pool: &str) -> String {
        format!("volume: pool {pool}: took slot ")
    }

    /// Reads the line (with or without the console's prefix); `None` if it is not one.
    pub fn parse(pool: &str, text: &str) -> Option<TookSlot> {
        let rest = text.split(&Self::marker(pool)).nth(1)?;
        let (slot, rest) = rest.split_once(" (")?;
        let (volume_id, rest) = rest.split_once(" in ")?;
        let (zone, _) = rest.split_once(')')?;
        Some(TookSlot {
            slot: slot.parse().ok()?,
            volume_id: volume_id.to_owned(),
            zone: zone.to_owned(),
        })
    }
}

/// What `volume: pool <pool>: <vol-id> (slot <k>) was taken by <instance-id>; trying the next`
/// says: another instance attached the volume first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostRace {
    pub volume_id: String,
    pub slot: u32,
    pub taken_by: String,
}

impl LostRace {
    pub fn parse(pool: &str, text: &str) -> Option<LostRace> {
        let rest = text.split(&format!("volume: pool {pool}: ")).nth(1)?;
        let (volume_id, rest) = rest.split_once(" (slot ")?;
        let (slot, rest) = rest.split_once(") was taken by ")?;
        let (taken_by, _) = rest.split_once("; trying the next")?;
        Some(LostRace {
            volume_id: volume_id.to_owned(),
            slot: slot.parse().ok()?,
            taken_by: taken_by.to_owned(),
        })
    }
}

/// A volume's slot, from its tag.
pub fn slot_of(v: &Volume) -> Option<u32> {
    v.tags.get(SLOT_TAG)?.parse().ok()
}

/// Checks that the pool's volumes and `instance_ids` pair up one to one: each volume attached
/// (`attached`) to exactly one of the instances, each instance holding exactly one of the
/// volumes. Returns the volume id each instance holds, in the order of `instance_ids`; otherwise
/// every mismatch, with the volumes as EC2 shows them.
pub fn one_volume_each(
    volumes: &[Volume],
    instance_ids: &[&str],
) -> std::result::Result<Vec<String>, String> {
    let mut problems = Vec::new();
    let mut held: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for v in volumes {
        match v.attachments.as_slice() {
            [a] if a.state == "attached" && instance_ids.contains(&a.instance_id.as_str()) => {
                held.entry(a.instance_id.as_str()).or_default().push(&v.id);
            }
            other => problems.push(format!(
                "{} (slot {:?}) is not attached to exactly one of the instances: {other:?}",
                v.id,
                slot_of(v)
            )),
        }
    }
    let mut each = Vec::new();
    for id in instance_ids {
        match held.get(id).map(Vec::as_slice) {
            Some([v]) => each.push((*v).to_owned()),
            Some(vs) => problems.push(format!("{id} holds {} volumes: {vs:?}", vs.len())),
            None => problems.push(format!("{id} holds no volume of the pool")),
        }
    }
    if problems.is_empty() {
        Ok(each)
    } else {
        Err(format!(
            "{}\nthe pool's volumes: {volumes:#?}",
            problems.join("\n")
        ))
    }
}

impl World {
    /// Creates a blank volume of `pool` through the API, as an operator would ahead of the
    /// group: tagged `Name` (the user data's `volume.tags`), the pool and its slot.
    pub async fn create_pool_volume(
        &self,
        zone: &str,
        volume_name: &str,
        pool: &str,
        slot: u32,
    ) -> Result<String> {
        let slot = slot.to_string();
        self.create_volume(
            zone,
            1,
            &[("Name", volume_name), (POOL_TAG, pool), (SLOT_TAG, &slot)],
        )
        .await
    }

    /// The volumes tagged as `pool`'s, by slot.
    pub async fn pool_volumes(&self, pool: &str) -> Result<Vec<Volume>> {
        let mut v = self.volumes().await?;
        v.retain(|v| v.tags.get(POOL_TAG).map(String::as_str) == Some(pool));
        v.sort_by_key(slot_of);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moto::VolumeAttachment;

    #[test]
    fn console_lines_parse() {
        assert_eq!(
            TookSlot::parse(
                "web",
                "spotinit: volume: pool web: took slot 12 (vol-0abc in us-east-1a)"
            ),
            Some(TookSlot {
                slot: 12,
                volume_id: "vol-0abc".into(),
                zone: "us-east-1a".into()
            })
        );
        assert_eq!(
            TookSlot::parse("web", "volume: pool webs: took slot 1 (vol-1 in z)"),
            None
        );
        assert_eq!(
            LostRace::parse(
                "web",
                "volume: pool web: vol-0abc (slot 2) was taken by i-0123; trying the next"
            ),
            Some(LostRace {
                volume_id: "vol-0abc".into(),
                slot: 2,
                taken_by: "i-0123".into()
            })
        );
        assert_eq!(
            LostRace::parse("web", "volume: pool web: took slot 2 (vol-1 in z)"),
            None
        );
    }

    fn volume(id: &str, slot: u32, holders: &[&str]) -> Volume {
        Volume {
            id: id.into(),
            zone: "us-east-1a".into(),
            state: if holders.is_empty() {
                "available"
            } else {
                "in-use"
            }
            .into(),
            size_gib: 1,
            snapshot_id: None,
            tags: [(SLOT_TAG.to_owned(), slot.to_string())].into(),
            attachments: holders
                .iter()
                .map(|i| VolumeAttachment {
                    instance_id: (*i).into(),
                    device: "/dev/sdf".into(),
                    state: "attached".into(),
                    attach_time: None,
                })
                .collect(),
        }
    }

    #[test]
    fn one_volume_each_pairs_volumes_and_instances() {
        let ok = [volume("v1", 1, &["i-b"]), volume("v2", 2, &["i-a"])];
        assert_eq!(
            one_volume_each(&ok, &["i-a", "i-b"]).unwrap(),
            vec!["v2".to_owned(), "v1".to_owned()]
        );
        // Two volumes on one instance, none on the other.
        let doubled = [volume("v1", 1, &["i-a"]), volume("v2", 2, &["i-a"])];
        let e = one_volume_each(&doubled, &["i-a", "i-b"]).unwrap_err();
        assert!(
            e.contains("i-a holds 2 volumes") && e.contains("i-b holds no volume"),
            "{e}"
        );
        // A free volume, and one held by an instance that is not ours.
        let stray = [volume("v1", 1, &[]), volume("v2", 2, &["i-x"])];
        let e = one_volume_each(&stray, &["i-a"]).unwrap_err();
        assert!(
            e.contains("v1 (slot Some(1))") && e.contains("v2 (slot Some(2))"),
            "{e}"
        );
    }
}
