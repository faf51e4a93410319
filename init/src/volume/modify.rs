//! What a ModifyVolume must change so the volume matches `[volume]`: EBS grows a volume and
//! changes its type, IOPS and throughput in place, but never shrinks it.

use crate::cloud::{takes_iops, takes_throughput, VolumeChange, VolumeSpec};
use crate::config;

/// The change to ask for, and a smaller size the configuration asks for and cannot have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub change: Option<VolumeChange>,
    /// `(has, asked)` in GiB when `volume.size_gib` is below the volume's size.
    pub shrink_refused: Option<(u32, u32)>,
}

/// Compares the volume with the configuration. Settings left unset (IOPS, throughput) are not
/// changes; IOPS and throughput count only for the types that take them.
pub fn plan(has: &VolumeSpec, wanted: &config::Volume) -> Plan {
    let size_gib = (wanted.size_gib > has.size_gib).then_some(wanted.size_gib);
    let shrink_refused =
        (wanted.size_gib < has.size_gib).then_some((has.size_gib, wanted.size_gib));
    let volume_type = (!has.volume_type.is_empty() && wanted.volume_type != has.volume_type)
        .then(|| wanted.volume_type.clone());
    let target = wanted.volume_type.as_str();
    let iops = wanted
        .iops
        .filter(|i| has.iops != Some(*i) && takes_iops(target));
    let throughput_mibps = wanted
        .throughput_mibps
        .filter(|t| has.throughput_mibps != Some(*t) && takes_throughput(target));
    let change = VolumeChange {
        size_gib,
        volume_type,
        iops,
        throughput_mibps,
    };
    Plan {
        change: (change != VolumeChange::default()).then_some(change),
        shrink_refused,
    }
}

/// "size 1 → 2 GiB, type gp2 → gp3" for the console.
pub fn describe(has: &VolumeSpec, change: &VolumeChange) -> String {
    let mut parts = Vec::new();
    if let Some(s) = change.size_gib {
        parts.push(format!("size {} → {s} GiB", has.size_gib));
    }
    if let Some(t) = &change.volume_type {
        parts.push(format!("type {} → {t}", has.volume_type));
    }
    let or_default = |v: Option<u32>| v.map_or("default".to_string(), |v| v.to_string());
    if let Some(i) = change.iops {
        parts.push(format!("IOPS {} → {i}", or_default(has.iops)));
    }
    if let Some(t) = change.throughput_mibps {
        parts.push(format!(
            "throughput {} → {t} MiB/s",
            or_default(has.throughput_mibps)
        ));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(size_gib: u32, volume_type: &str) -> VolumeSpec {
        VolumeSpec {
            size_gib,
            volume_type: volume_type.into(),
            iops: Some(3000),
            throughput_mibps: Some(125),
            ..VolumeSpec::default()
        }
    }

    fn wanted(size_gib: u32, volume_type: &str) -> config::Volume {
        config::Volume {
            size_gib,
            volume_type: volume_type.into(),
            ..config::Volume::default()
        }
    }

    #[test]
    fn a_larger_size_is_a_change_and_a_smaller_one_is_refused() {
        let grow = plan(&has(1, "gp3"), &wanted(2, "gp3"));
        assert_eq!(
            grow.change,
            Some(VolumeChange {
                size_gib: Some(2),
                ..VolumeChange::default()
            })
        );
        assert_eq!(grow.shrink_refused, None);
        assert_eq!(
            describe(&has(1, "gp3"), grow.change.as_ref().unwrap()),
            "size 1 → 2 GiB"
        );

        let shrink = plan(&has(8, "gp3"), &wanted(2, "gp3"));
        assert_eq!(shrink.change, None);
        assert_eq!(shrink.shrink_refused, Some((8, 2)));

        assert_eq!(plan(&has(2, "gp3"), &wanted(2, "gp3")), Plan::default());
    }

    #[test]
    fn type_iops_and_throughput_change_only_when_asked_and_taken() {
        let mut w = wanted(2, "gp3");
        w.iops = Some(6000);
        w.throughput_mibps = Some(250);
        let p = plan(&has(2, "gp2"), &w);
        let change = p.change.unwrap();
        assert_eq!(change.volume_type.as_deref(), Some("gp3"));
        assert_eq!(
            (change.iops, change.throughput_mibps),
            (Some(6000), Some(250))
        );
        assert_eq!(
            describe(&has(2, "gp2"), &change),
            "type gp2 → gp3, IOPS 3000 → 6000, throughput 125 → 250 MiB/s"
        );

        // Unset means "whatever it has", and st1 takes neither IOPS nor throughput.
        let mut st1 = wanted(2, "st1");
        st1.iops = Some(6000);
        st1.throughput_mibps = Some(250);
        let p = plan(&has(2, "st1"), &st1);
        assert_eq!(p.change, None);
        assert_eq!(plan(&has(2, "gp3"), &wanted(2, "gp3")).change, None);

        // A volume whose type EC2 did not say is not changed on a guess.
        assert_eq!(plan(&has(2, ""), &wanted(2, "gp3")).change, None);
    }
}
