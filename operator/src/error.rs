//! The operator's one error type. Every variant has a PascalCase [`Error::reason`] that feeds
//! condition reasons, Event reasons and the `reason` label of the error metric, and says whether
//! it is the user's to fix ([`Error::is_user_error`]: wait for a change) or transient (back
//! off and retry). Messages name the object and field; they never contain a secret value.

use crate::router_pool::{desired::MissingMetadata, render::RenderError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed (network, conflict, 5xx, RBAC).
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    /// The object could not be read as the type (for example a field of the wrong type that
    /// the schema let through because the CRD was changed after the object was written).
    #[error("{kind} {name} cannot be read: {message}")]
    Malformed {
        kind: &'static str,
        name: String,
        message: String,
    },

    /// A Secret the pool itself needs is missing (its master key).
    #[error("Secret {secret} (from {field}) does not exist in namespace {namespace}")]
    SecretNotFound {
        namespace: String,
        secret: String,
        field: &'static str,
    },

    /// The Secret exists but lacks the key, or the value is not UTF-8.
    #[error("Secret {secret} has no usable key {key:?} (from {field})")]
    SecretKeyMissing {
        secret: String,
        key: String,
        field: &'static str,
    },

    /// `spec.trustedCA` names a ConfigMap that is missing, lacks the key, or holds no PEM
    /// certificate.
    #[error("ConfigMap {namespace}/{name} (from spec.trustedCA): {problem}")]
    TrustedCa {
        namespace: String,
        name: String,
        problem: String,
        reason: &'static str,
    },

    /// A label selector that cannot be evaluated.
    #[error("RouterPool spec.credentialSelector: {0}")]
    BadSelector(String),

    /// The spec renders to no config the data plane could run.
    #[error(transparent)]
    Render(#[from] RenderError),

    #[error(transparent)]
    Metadata(#[from] MissingMetadata),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) if status.code == 403 => "Forbidden",
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => "Conflict",
            Error::Kube(_) => "KubernetesApiError",
            Error::Malformed { .. } => "Malformed",
            Error::SecretNotFound { .. } => "SecretNotFound",
            Error::SecretKeyMissing { .. } => "SecretKeyMissing",
            Error::TrustedCa { reason, .. } => reason,
            Error::BadSelector(_) => "InvalidSpec",
            Error::Render(e) => e.reason(),
            Error::Metadata(_) => "MissingMetadata",
        }
    }

    /// True when only a change to the user's objects can fix it: the reconciler records it
    /// in status and waits for a watch event instead of retrying.
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::Kube(_) | Error::Metadata(_) => false,
            Error::Malformed { .. }
            | Error::SecretNotFound { .. }
            | Error::SecretKeyMissing { .. }
            | Error::TrustedCa { .. }
            | Error::BadSelector(_)
            | Error::Render(_) => true,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
