//! Why an EC2 call failed: an error document, a transport failure, or an unexpected answer.

use std::fmt;

use crate::query::Ec2Error;

/// Why an EC2 call failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// EC2 answered with an error document.
    Api {
        action: String,
        status: u16,
        error: Ec2Error,
    },
    /// No usable HTTP exchange (connection refused, reset, ...).
    Transport { action: String, detail: String },
    /// An answer that is neither a response nor an EC2 error document.
    Response { action: String, detail: String },
}

impl CallError {
    /// The EC2 error code, for API errors.
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::Api { error, .. } => Some(&error.code),
            _ => None,
        }
    }

    /// The EC2 error message, for API errors.
    pub fn message(&self) -> Option<&str> {
        match self {
            CallError::Api { error, .. } => Some(&error.message),
            _ => None,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Api {
                action,
                status,
                error,
            } => write!(f, "{action}: {} (HTTP {status})", error),
            CallError::Transport { action, detail } => write!(f, "{action}: transport: {detail}"),
            CallError::Response { action, detail } => {
                write!(f, "{action}: unexpected response: {detail}")
            }
        }
    }
}

impl std::error::Error for CallError {}
