//! Unit tests of the volume choice: claims, which copy wins, and which copies are orphans.

use super::*;

fn vol(id: &str, tags: &[(&str, &str)], created_ms: i64) -> VolumeInfo {
    VolumeInfo {
        id: id.into(),
        zone: "us-east-1a".into(),
        state: "available".into(),
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        created_ms: Some(created_ms),
        ..VolumeInfo::default()
    }
}

#[test]
fn claims_round_trip_and_an_empty_one_is_none() {
    let c = MoveClaim {
        instance: "i-1".into(),
        zone: "us-east-1b".into(),
        since: "2026-11-29T10:00:00Z".into(),
    };
    assert_eq!(MoveClaim::parse(&c.value()), Some(c));
    assert_eq!(MoveClaim::parse(""), None);
    assert_eq!(MoveClaim::parse("i-1 zone"), None);
    assert_eq!(MoveClaim::parse("i-1 z t extra"), None);
}

#[test]
fn the_oldest_copy_wins_then_the_lowest_id() {
    let a = vol("vol-b", &[], 100);
    let b = vol("vol-a", &[], 100);
    let c = vol("vol-0", &[], 200);
    assert_eq!(oldest([&a, &b, &c]).unwrap().id, "vol-a");
    assert_eq!(oldest([&c]).unwrap().id, "vol-0");
}

#[test]
fn copies_that_never_held_the_state_are_orphans() {
    let claim = "i-1 us-east-1b 2026-11-29T10:00:00Z";
    // The source is superseded by another copy: this one lost.
    let s = vol("vol-s", &[(tags::SUPERSEDED_BY, "vol-w")], 1);
    let w = vol("vol-w", &[(tags::MOVED_FROM, "vol-s")], 5);
    let l = vol("vol-l", &[(tags::MOVED_FROM, "vol-s")], 6);
    let found = [s.clone(), w.clone(), l.clone()];
    assert!(orphan_reason(&w, &found).is_none());
    assert!(orphan_reason(&l, &found)
        .unwrap()
        .contains("continues as vol-w"));
    // The source was taken back (claim cleared or changed): the copy was abandoned.
    let s = vol("vol-s", &[(tags::MOVING, "")], 1);
    let c = vol(
        "vol-c",
        &[(tags::MOVED_FROM, "vol-s"), (tags::MOVE_CLAIM, claim)],
        5,
    );
    assert!(orphan_reason(&c, &[s, c.clone()])
        .unwrap()
        .contains("abandoned"));
    // A copy without a claim is not trusted either.
    let s = vol("vol-s", &[], 1);
    let c = vol("vol-c", &[(tags::MOVED_FROM, "vol-s")], 5);
    assert!(orphan_reason(&c, &[s, c.clone()]).is_some());
    // A move under way (the claims match) is not an orphan: it is resolved with its source.
    let s = vol("vol-s", &[(tags::MOVING, claim)], 1);
    let c = vol(
        "vol-c",
        &[(tags::MOVED_FROM, "vol-s"), (tags::MOVE_CLAIM, claim)],
        5,
    );
    assert!(orphan_reason(&c, &[s, c.clone()]).is_none());
    // The source is gone: the oldest copy continues it, the others lost.
    let a = vol("vol-a", &[(tags::MOVED_FROM, "vol-gone")], 5);
    let b = vol("vol-b", &[(tags::MOVED_FROM, "vol-gone")], 7);
    let found = [a.clone(), b.clone()];
    assert!(orphan_reason(&a, &found).is_none());
    assert!(orphan_reason(&b, &found)
        .unwrap()
        .contains("lost a move race to vol-a"));
    // Not a copy at all.
    assert!(orphan_reason(&vol("vol-x", &[], 1), &[]).is_none());
}
