//! Unit tests of the pool's choice: slots and their duplicates, the order volumes are tried in,
//! when a new one may be created, and which of two racing new volumes stays.

use super::*;

fn vol(id: &str, zone: &str, slot: Option<u32>, created_ms: i64) -> VolumeInfo {
    let mut tags = BTreeMap::from([(tags::POOL.to_string(), "p".to_string())]);
    if let Some(n) = slot {
        tags.insert(tags::SLOT.into(), n.to_string());
    }
    VolumeInfo {
        id: id.into(),
        zone: zone.into(),
        state: "available".into(),
        tags,
        created_ms: Some(created_ms),
        ..VolumeInfo::default()
    }
}

fn me() -> Identity {
    Identity {
        instance_id: "i-me".into(),
        region: "us-east-1".into(),
        zone: "us-east-1a".into(),
        account_id: "123456789012".into(),
        instance_type: "t3.micro".into(),
        image_id: "ami-1".into(),
    }
}

fn cfg(pool_max: u32) -> config::Volume {
    config::Volume {
        pool: Some("p".into()),
        pool_max,
        ..config::Volume::default()
    }
}

fn ids(ms: &[Member]) -> Vec<&str> {
    ms.iter().map(|m| m.volume.id.as_str()).collect()
}

#[test]
fn the_older_volume_keeps_a_slot_and_a_blank_duplicate_does_not_count() {
    let mut formatted = vol("vol-d", "us-east-1a", Some(2), 300);
    formatted.tags.insert(tags::FORMAT.into(), "done".into());
    let view = sort_out(vec![
        vol("vol-b", "us-east-1a", Some(1), 200),
        vol("vol-a", "us-east-1a", Some(1), 100),
        vol("vol-c", "us-east-1a", Some(2), 100),
        formatted,
        vol("vol-e", "us-east-1a", None, 50),
        vol("vol-f", "us-east-1a", Some(0), 50),
    ]);
    assert_eq!(ids(&view.members), ["vol-a", "vol-c"]);
    let passed: Vec<&str> = view.passed_over.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(passed, ["vol-e", "vol-f", "vol-b", "vol-d"]);
    assert!(view.passed_over[2].1.contains("blank duplicate of slot 1"));
    assert!(view.passed_over[3].1.contains("holds data"));
    // vol-b is a blank leftover its creator deletes; the others may hold a state.
    assert_eq!(view.count, 5);
    assert_eq!(lowest_free_slot(&view), 3);
    assert_eq!(
        lowest_free_slot(&sort_out(vec![vol("vol-x", "z", Some(2), 1)])),
        1
    );
}

#[test]
fn its_own_then_free_then_a_dead_holders_then_create_then_another_zone() {
    let view = sort_out(vec![
        vol("vol-1", "us-east-1a", Some(1), 1),
        vol("vol-2", "us-east-1a", Some(2), 2),
        vol("vol-3", "us-east-1a", Some(3), 3),
        vol("vol-4", "us-east-1b", Some(4), 4),
        vol("vol-5", "us-east-1a", Some(5), 5),
        vol("vol-6", "us-east-1a", Some(6), 6),
    ]);
    let holding = BTreeMap::from([
        ("vol-1".to_string(), Holding::Dead("i-gone".into())),
        ("vol-2".to_string(), Holding::Live("i-other".into())),
        ("vol-5".to_string(), Holding::Mine),
    ]);
    let p = plan(&view, &holding, &cfg(7), &me());
    assert_eq!(ids(&p.here), ["vol-5", "vol-3", "vol-6", "vol-1"]);
    assert_eq!(p.new_slot, Some(7));
    assert_eq!(ids(&p.elsewhere), ["vol-4"]);
    assert_eq!(p.held.len(), 1);
    assert_eq!(p.held[0].1, "i-other");
    // Full: no new slot. Not following across zones: nothing elsewhere.
    let full = plan(&view, &holding, &cfg(6), &me());
    assert_eq!(full.new_slot, None);
    let stay = config::Volume {
        follow_across_zones: false,
        ..cfg(6)
    };
    assert!(plan(&view, &holding, &stay, &me()).elsewhere.is_empty());
    let no_create = config::Volume {
        create: false,
        ..cfg(100)
    };
    assert_eq!(plan(&view, &holding, &no_create, &me()).new_slot, None);
}

#[test]
fn a_volume_still_being_created_is_not_taken() {
    let mut v = vol("vol-1", "us-east-1a", Some(1), 1);
    v.state = VolumeState::Creating;
    let view = sort_out(vec![v]);
    let p = plan(&view, &BTreeMap::new(), &cfg(1), &me());
    assert!(p.here.is_empty());
    assert_eq!(p.new_slot, None, "it counts toward the maximum");
}

#[test]
fn of_racing_new_volumes_the_oldest_keeps_the_slot_and_the_pool_stays_within_its_maximum() {
    let ours = vol("vol-b", "us-east-1a", Some(3), 200);
    let rival = vol("vol-a", "us-east-1a", Some(3), 100);
    let view = sort_out(vec![
        vol("vol-1", "us-east-1a", Some(1), 1),
        vol("vol-2", "us-east-1a", Some(2), 2),
        rival.clone(),
        ours.clone(),
    ]);
    let lost = kept_after_creation(&view, &ours, 3, 4).unwrap_err();
    assert!(lost.contains("older vol-a has slot 3"), "{lost}");
    assert_eq!(kept_after_creation(&view, &rival, 3, 4), Ok(()));
    // Two new volumes with different slots (each creator saw the pool differently): the one
    // beyond the maximum goes.
    let late = vol("vol-c", "us-east-1a", Some(4), 300);
    let view = sort_out(vec![
        vol("vol-1", "us-east-1a", Some(1), 1),
        vol("vol-2", "us-east-1a", Some(2), 2),
        rival.clone(),
        late.clone(),
    ]);
    assert_eq!(kept_after_creation(&view, &rival, 3, 3), Ok(()));
    let over = kept_after_creation(&view, &late, 4, 3).unwrap_err();
    assert!(over.contains("volume.pool_max = 3"), "{over}");
}

#[test]
fn only_a_terminated_holder_is_waited_out_a_stopped_one_keeps_its_volume() {
    for (state, dead) in [
        ("shutting-down", true),
        ("terminated", true),
        ("stopping", false),
        ("stopped", false),
        ("running", false),
        ("pending", false),
    ] {
        let h = held_by("i-1", &InstanceState::from(state));
        assert_eq!(matches!(h, Holding::Dead(_)), dead, "{state}: {h:?}");
    }
}
