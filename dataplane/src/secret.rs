//! A string that must never reach a log line, an error message, `/health` or a metric label.
//!
//! Hand-written rather than `secrecy::SecretString` because the operator renders configs
//! (secrets inline) through `Serialize`, and `secrecy` deliberately makes that awkward; the
//! redaction guarantee that matters — `Debug` and `Display` never print the value — is the
//! same.

use std::{fmt, sync::Arc};

use serde::{Serialize, Serializer};
use subtle::ConstantTimeEq;

/// A secret value: cheap to clone, redacted when formatted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The value itself, for building an upstream header. Keep the result out of logs.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time comparison, so a client cannot learn the key byte by byte from timing.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(candidate).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Serialising exposes the value: only config documents are serialised, and they are stored
/// as Kubernetes Secrets.
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_formats_the_value() {
        let s = Secret::new("sk-very-secret");
        assert!(!format!("{s:?} {s}").contains("sk-very"));
        assert!(s.matches(b"sk-very-secret"));
        assert!(!s.matches(b"sk-very-secreT"));
        assert!(!s.matches(b"sk"));
    }
}
