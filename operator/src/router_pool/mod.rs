//! RouterPool reconciliation steps.

pub mod desired;
pub mod push;
pub mod render;

use airouter_crds::CredentialSpec;

/// What the resolve step found for one pool: the hand-off to [`render::render_config`].
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// From `spec.masterKeySecretRef`.
    pub master_key: String,
    /// The token the operator pushes configs with (its own Secret per pool).
    pub admin_token: String,
    /// The Credentials the selector picked whose references all resolved, in any order.
    pub credentials: Vec<ResolvedCredential>,
}

/// One selected Credential with its Secrets read.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedCredential {
    /// The Credential's object name: the credential name in the router config.
    pub name: String,
    pub spec: CredentialSpec,
    /// From `spec.apiKeySecretRef`.
    pub api_key: Option<String>,
    /// For `spec.proxy.routerPoolRef`: the target pool's Service URL and master key.
    pub proxy_target: Option<ProxyTarget>,
    /// For vertex-ai: the service-account JSON from `spec.vertex.credentialsSecretRef`.
    pub vertex_credentials_json: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyTarget {
    pub url: String,
    pub master_key: String,
}
