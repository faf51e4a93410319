//! Where a setting came from, and a configuration error naming it (source, line, key).

use super::model::IMAGE_CONFIG;
use std::fmt;

/// Where a piece of configuration came from, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    KernelCommandLine,
    UserData,
    ImageFile,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::KernelCommandLine => "kernel command line",
            Source::UserData => "user data",
            Source::ImageFile => IMAGE_CONFIG,
        })
    }
}

/// An invalid configuration: where, which key, what was expected.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigError {
    pub source: Source,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(l) = self.line {
            write!(f, ", line {l}")?;
        }
        if let Some(k) = &self.key {
            write!(f, ", key {k}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}
