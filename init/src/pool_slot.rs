//! The pool slot as this host's identity (`volume.pool`): whichever instance holds the slot's
//! volume is that host again. Its name is `<pool>-<slot>` (or `<hostname>-<slot>`), the slot is
//! in [`SLOT_FILE`] and [`ENV_FILE`] for programs and containers to read (bind-mount it, or use
//! `--env-file`), and the declared containers get it in their environment.

use crate::config::containers::Container;
use crate::sys::{FileError, Paths};
use crate::volume::Slot;

/// The slot number alone.
pub const SLOT_FILE: &str = "/run/spotinit/slot";
/// `SPOTINIT_POOL=`, `SPOTINIT_SLOT=` and `SPOTINIT_VOLUME=` lines (docker run --env-file).
pub const ENV_FILE: &str = "/run/spotinit/pool.env";

/// The variables a container of this host sees: the pool and the slot.
pub fn environment(slot: &Slot) -> [(&'static str, String); 2] {
    [
        ("SPOTINIT_POOL", slot.pool.clone()),
        ("SPOTINIT_SLOT", slot.number.to_string()),
    ]
}

/// Writes [`SLOT_FILE`] and [`ENV_FILE`].
pub fn publish(paths: &Paths, slot: &Slot, volume_id: &str) -> Result<(), FileError> {
    let slot_file = paths.p(SLOT_FILE);
    std::fs::write(&slot_file, format!("{}\n", slot.number))
        .map_err(FileError::at("write", &slot_file))?;
    let mut env: String = environment(slot)
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    env.push_str(&format!("SPOTINIT_VOLUME={volume_id}\n"));
    let env_file = paths.p(ENV_FILE);
    std::fs::write(&env_file, env).map_err(FileError::at("write", &env_file))
}

/// The declared containers with the slot in their environment (a container's own setting of
/// the same variable wins).
pub fn into_containers(containers: &mut [Container], slot: &Slot) {
    for c in containers {
        for (k, v) in environment(slot) {
            c.environment.entry(k.to_string()).or_insert(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> Slot {
        Slot {
            pool: "runners".into(),
            number: 3,
        }
    }

    #[test]
    fn the_slot_is_published_for_programs_and_containers_to_read() {
        let dir = std::env::temp_dir().join(format!("spotinit-slot-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("run/spotinit")).unwrap();
        let paths = Paths::under(&dir);
        publish(&paths, &slot(), "vol-0abc").unwrap();
        let read = |f: &str| std::fs::read_to_string(paths.p(f)).unwrap();
        assert_eq!(read(SLOT_FILE), "3\n");
        assert_eq!(
            read(ENV_FILE),
            "SPOTINIT_POOL=runners\nSPOTINIT_SLOT=3\nSPOTINIT_VOLUME=vol-0abc\n"
        );
        assert_eq!(slot().host_name(None), "runners-3");
        assert_eq!(slot().host_name(Some("gitlab")), "gitlab-3");
        assert_eq!(
            slot().host_name(Some("gitlab.example.com")),
            "gitlab-3.example.com"
        );
        let long = "a".repeat(63);
        assert_eq!(slot().host_name(Some(&long)), format!("{}-3", &long[..61]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn declared_containers_get_the_slot_unless_they_set_it_themselves() {
        let mut c: Vec<Container> = toml::from_str::<crate::config::Config>(
            "[[containers]]\nname = \"a\"\nimage = \"busybox\"\n[[containers]]\nname = \"b\"\nimage = \"busybox\"\nenvironment = { SPOTINIT_SLOT = \"mine\" }\n",
        )
        .unwrap()
        .containers;
        into_containers(&mut c, &slot());
        assert_eq!(c[0].environment["SPOTINIT_SLOT"], "3");
        assert_eq!(c[0].environment["SPOTINIT_POOL"], "runners");
        assert_eq!(c[1].environment["SPOTINIT_SLOT"], "mine");
    }
}
