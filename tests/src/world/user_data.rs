//! The user data the scenarios share, written as TOML, and the `[docker]` lines that serve the
//! Engine API with TLS.

use super::DOCKER_API_PORT;

/// The user data the scenarios share, as fields; [`UserData::to_toml`] writes it.
#[derive(Clone, Debug)]
pub struct UserData {
    /// The volume's `Name` tag (one per test, so worlds never share a volume by accident).
    pub volume_name: String,
    /// `volume.id`: this volume (and wherever its state moved), whatever the tags say.
    pub volume_id: Option<String>,
    /// `volume.pool`: take a free volume of this pool (tagged `spotinit:pool`), or create one.
    pub pool: Option<String>,
    /// `volume.pool_max`: how many volumes the pool may hold; written only with `pool`.
    pub pool_max: u32,
    pub size_gib: u32,
    pub create: bool,
    pub storage_driver: String,
    /// spotinit refuses less than 60.
    pub release_wait_secs: u64,
    /// 0 here (spotinit's default is 600): the scenarios of a live holder expect the boot to
    /// fail at once and retry; the handover scenario waits.
    pub live_holder_wait_secs: u64,
    pub force_detach: bool,
    pub failure_action: String,
    pub retry_for_secs: u64,
    pub retry_interval_secs: u64,
    pub after_drain: String,
    /// The Engine API on TCP with TLS client certificates ([`docker_api_toml`]), so the host
    /// reaches it.
    pub docker_api: bool,
    /// TOML appended as is (new tables only).
    pub extra: String,
}

impl UserData {
    pub fn new(volume_name: &str) -> UserData {
        UserData {
            volume_name: volume_name.to_owned(),
            volume_id: None,
            pool: None,
            pool_max: 0,
            size_gib: 1,
            create: true,
            storage_driver: "overlay2".into(),
            release_wait_secs: 60,
            live_holder_wait_secs: 0,
            force_detach: false,
            failure_action: "poweroff".into(),
            retry_for_secs: 60,
            retry_interval_secs: 5,
            after_drain: "wait".into(),
            docker_api: true,
            extra: String::new(),
        }
    }

    pub fn to_toml(&self) -> String {
        let mut t = format!(
            "[volume]\nsize_gib = {}\ncreate = {}\nrelease_wait_secs = {}\nlive_holder_wait_secs = {}\nforce_detach = {}\n\
             attach_timeout_secs = 120\ndevice_timeout_secs = 60\nsnapshot_timeout_secs = 300\n\
             [volume.tags]\nName = \"{}\"\n\n[docker]\nstorage_driver = \"{}\"\n",
            self.size_gib,
            self.create,
            self.release_wait_secs,
            self.live_holder_wait_secs,
            self.force_detach,
            self.volume_name,
            self.storage_driver
        );
        if let Some(pool) = &self.pool {
            let keys = format!("pool = \"{pool}\"\npool_max = {}\n", self.pool_max);
            t = t.replacen("[volume]\n", &format!("[volume]\n{keys}"), 1);
        }
        if let Some(id) = &self.volume_id {
            t = t.replacen("[volume]\n", &format!("[volume]\nid = \"{id}\"\n"), 1);
        }
        if self.docker_api {
            t.push_str(&docker_api_toml());
        }
        t.push_str(&format!(
            "\n[failure]\naction = \"{}\"\nretry_for_secs = {}\nretry_interval_secs = {}\n\n\
             [spot]\nafter_drain = \"{}\"\n",
            self.failure_action, self.retry_for_secs, self.retry_interval_secs, self.after_drain
        ));
        if !self.extra.is_empty() {
            t.push('\n');
            t.push_str(&self.extra);
            t.push('\n');
        }
        t
    }
}

/// The `[docker]` lines that serve the Engine API on [`DOCKER_API_PORT`] with TLS client
/// certificates (the server's side of the test PKI): to append inside a `[docker]` table.
pub fn docker_api_toml() -> String {
    let pki = crate::tls::Pki::get().unwrap_or_else(|e| panic!("the test PKI: {e}"));
    format!(
        "daemon = {{ hosts = [\"tcp://0.0.0.0:{DOCKER_API_PORT}\"] }}\n{}",
        pki.docker_tls_toml()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_is_valid_toml_with_the_tag() {
        let mut u = UserData::new("t1");
        u.extra = "[snapshots]\nkeep = 2".into();
        let text = u.to_toml();
        // The TLS table's PEM blocks are multi-line strings the flat reader below does not take.
        let tls_at = text.find("[docker.tls]").expect("the Engine API's TLS");
        let tls_end = tls_at
            + text[tls_at..]
                .find("\n[failure]")
                .expect("a table after it");
        assert_eq!(text[tls_at..tls_end].matches("-----BEGIN ").count(), 3);
        let flat = format!("{}{}", &text[..tls_at], &text[tls_end..]);
        let t: toml_check::Table = toml_check::parse(&flat);
        assert_eq!(
            t.get("volume.tags.Name").map(String::as_str),
            Some("\"t1\"")
        );
        assert_eq!(
            t.get("docker.daemon").map(String::as_str),
            Some("{ hosts = [\"tcp://0.0.0.0:2376\"] }")
        );
        assert_eq!(t.get("volume.pool"), None);
        assert_eq!(t.get("volume.pool_max"), None);
    }

    #[test]
    fn a_pool_is_written_into_the_volume_table() {
        let mut u = UserData::new("t2");
        u.docker_api = false;
        u.pool = Some("runners".into());
        u.pool_max = 4;
        let t = toml_check::parse(&u.to_toml());
        assert_eq!(
            t.get("volume.pool").map(String::as_str),
            Some("\"runners\"")
        );
        assert_eq!(t.get("volume.pool_max").map(String::as_str), Some("4"));
        assert_eq!(
            t.get("volume.tags.Name").map(String::as_str),
            Some("\"t2\"")
        );
    }

    /// A tiny reader of the flat TOML `to_toml` writes (no TOML crate in this package).
    mod toml_check {
        pub type Table = std::collections::HashMap<String, String>;
        pub fn parse(text: &str) -> Table {
            let mut section = String::new();
            let mut t = Table::new();
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                if let Some(s) = line.strip_prefix('[') {
                    section = s.trim_end_matches(']').to_owned();
                    continue;
                }
                let (k, v) = line.split_once(" = ").expect("key = value");
                assert!(t.insert(format!("{section}.{k}"), v.to_owned()).is_none());
            }
            t
        }
    }
}
