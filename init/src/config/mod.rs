//! Configuration: one TOML schema, three sources. In order of precedence:
//! 1. the kernel command line, `spotinit.<dotted.key>=<value>` (tests and images set these);
//! 2. EC2 user data (TOML), fetched over IMDSv2;
//! 3. an optional file baked into the image, `/etc/spotinit/config.toml`;
//!
//! and built-in defaults for everything else. Every error names its source, the key and, for
//! TOML text, the line, and says what is expected. Unknown keys are errors: a typo must not
//! silently fall back to a default that could, say, create a second volume.

mod checks;
pub mod containers;
mod error;
mod forms;
mod model;
mod sources;

pub use error::{ConfigError, Source};
pub use model::*;

pub use checks::MAX_DAEMON_DEPTH;
pub use forms::{is_hostname, is_region, ssh_key_problem, time_server_problem};
pub use sources::{cmdline_table, cmdline_words, line_of_key, redact, Text, MAX_TEXT_BYTES};

use serde::Serialize;
use sources::{merge, origin, parse_text, toml_message};

impl Config {
    /// Merges the sources (highest precedence last wins) over the defaults and validates.
    pub fn load(
        cmdline: &str,
        user_data: Option<&str>,
        image_file: Option<&str>,
    ) -> Result<Config, Vec<ConfigError>> {
        let mut merged = toml::Table::new();
        let mut errors = Vec::new();
        let texts = [
            image_file.map(|t| Text {
                source: Source::ImageFile,
                text: t,
            }),
            user_data.map(|t| Text {
                source: Source::UserData,
                text: t,
            }),
        ];
        for t in texts.into_iter().flatten() {
            match parse_text(&t) {
                Ok(table) => merge(&mut merged, table),
                Err(mut e) => errors.append(&mut e),
            }
        }
        match cmdline_table(cmdline) {
            Ok(table) => merge(&mut merged, table),
            Err(mut e) => errors.append(&mut e),
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let config: Config = match merged.clone().try_into() {
            Ok(c) => c,
            // Each text source was already checked alone, so this is a command-line value.
            Err(e) => {
                return Err(vec![ConfigError {
                    source: Source::KernelCommandLine,
                    line: None,
                    key: None,
                    message: toml_message(&e),
                }])
            }
        };
        let problems = config.problems();
        if problems.is_empty() {
            return Ok(config);
        }
        // Attribute each problem to the source that set the key, with its line if it is text.
        Err(problems
            .into_iter()
            .map(|(key, message)| {
                let (source, line) = origin(&key, cmdline, user_data, image_file);
                ConfigError {
                    source,
                    line,
                    key: Some(key),
                    message,
                }
            })
            .collect())
    }

    /// One line for the console: what this configuration will do.
    pub fn summary(&self) -> String {
        let v = &self.volume;
        let which = match (&v.mode, &v.id) {
            (VolumeMode::None, _) => return "no state volume: Docker state lives on tmpfs".into(),
            (_, Some(id)) => format!("volume {id}"),
            (_, None) => format!(
                "volume tagged {}",
                v.tags
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        let create = if v.create {
            format!(
                ", created if missing ({} GiB {}{})",
                v.size_gib,
                v.volume_type,
                if v.encrypted { ", encrypted" } else { "" }
            )
        } else {
            ", never created".into()
        };
        format!(
            "{which}{create}, mode {}, docker storage driver {}, on failure {}",
            variant_name(&v.mode),
            self.docker.storage_driver,
            variant_name(&self.failure.action)
        )
    }
}

/// The name a unit enum variant has in the TOML (`persisted-root`, `poweroff`).
pub fn variant_name<T: Serialize>(v: &T) -> String {
    toml::Value::try_from(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
