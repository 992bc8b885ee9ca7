//! `Credential`: one provider key and what it may serve.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;

/// The provider behind a credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialType {
    Openai,
    Anthropic,
    Gemini,
    VertexAi,
    Bedrock,
    /// Another airouter (or Auto AI Router) instance: router chaining.
    Proxy,
}

/// A key in a Secret of the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A RouterPool of the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LocalRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Where a `proxy` credential forwards when it points at a RouterPool in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxySpec {
    /// The RouterPool whose Service (and master key) the operator resolves.
    pub router_pool_ref: LocalRef,
}

/// A model the credential serves, with its own limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ModelSpec {
    /// The model name clients ask for.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The real name sent to the provider, when it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Requests per minute for this model on this credential; -1 or absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1))]
    pub rpm: Option<i64>,
    /// Tokens per minute for this model on this credential; -1 or absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1))]
    pub tpm: Option<i64>,
}

/// Google Vertex AI settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VertexSpec {
    pub project_id: String,
    pub location: String,
    /// The service-account JSON.
    pub credentials_secret_ref: SecretKeyRef,
}

/// One provider credential (an API key and its quota) that RouterPools select by label.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "airouter.dev",
    version = "v1alpha1",
    kind = "Credential",
    namespaced,
    status = "CredentialStatus",
    shortname = "cred",
    category = "airouter",
    doc = "A provider API key with its RPM/TPM quota and the models it may serve. RouterPools select Credentials by label.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Fallback", type_ = "boolean", json_path = ".spec.isFallback"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Banned", type_ = "boolean", json_path = ".status.live.banned"),
    printcolumn(name = "RPM", type_ = "integer", json_path = ".status.live.rpmUsed"),
    printcolumn(name = "Limit", type_ = "integer", json_path = ".spec.rpm"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    cel,
    validation = Rule::new("self.type != 'proxy' || (has(self.baseUrl) != has(self.proxy))")
        .message("a proxy credential needs exactly one of spec.baseUrl or spec.proxy.routerPoolRef"),
    validation = Rule::new("self.type == 'proxy' || !has(self.proxy)")
        .message("spec.proxy is only for credentials of type proxy"),
    validation = Rule::new("self.type in ['proxy', 'vertex-ai'] || has(self.apiKeySecretRef)")
        .message("spec.apiKeySecretRef is required for this credential type (only proxy and vertex-ai may omit it)"),
    validation = Rule::new("self.type in ['proxy', 'vertex-ai'] || has(self.baseUrl)")
        .message("spec.baseUrl is required for this credential type"),
    validation = Rule::new("self.type != 'vertex-ai' || has(self.vertex)")
        .message("spec.vertex (projectId, location, credentialsSecretRef) is required for type vertex-ai"),
    validation = Rule::new("!has(self.rpm) || self.rpm != 0")
        .message("spec.rpm: use -1 (or omit it) for unlimited; 0 would refuse every request"),
    validation = Rule::new("!has(self.models) || self.models.all(m, !has(m.rpm) || m.rpm != 0)")
        .message("spec.models[].rpm: use -1 (or omit it) for unlimited; 0 would refuse every request")
)]
#[serde(rename_all = "camelCase")]
pub struct CredentialSpec {
    /// The provider: openai, anthropic, gemini, vertex-ai, bedrock, or proxy (another router).
    #[serde(rename = "type")]
    pub type_: CredentialType,
    /// The provider's (or remote router's) base URL, e.g. https://api.openai.com.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("spec.baseUrl must start with http:// or https://"))]
    #[schemars(length(max = 2048))]
    pub base_url: Option<String>,
    /// The Secret key holding the API key (for proxy: the remote router's master key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
    /// For type proxy: forward to a RouterPool in this namespace instead of a baseUrl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxySpec>,
    /// Requests per minute across all models; -1 or absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1))]
    pub rpm: Option<i64>,
    /// Tokens per minute across all models; -1, 0 or absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1))]
    pub tpm: Option<i64>,
    /// Used only after every primary credential for a model is exhausted.
    #[serde(default)]
    pub is_fallback: bool,
    /// The models served; absent: every model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub models: Option<Vec<ModelSpec>>,
    /// Vertex AI settings (type vertex-ai).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vertex: Option<VertexSpec>,
    /// The HTTP version spoken to the upstream: auto (the default: HTTP/2 where TLS ALPN
    /// offers it, HTTP/1.1 otherwise), http1, or http2 (required in ALPN for https://,
    /// prior knowledge for http://). HTTP/2 connections are added as the provider's
    /// concurrent-stream limit fills.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_version: Option<HttpVersion>,
}

/// Which HTTP version a credential's upstream is spoken to with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersion {
    Auto,
    Http1,
    Http2,
}

/// What the operator and the data plane report about a Credential.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (reasons: `Resolved`, `SecretNotFound`, `SecretKeyMissing`, `Invalid`).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The RouterPools whose selector picks this credential.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<String>,
    /// Live state read from the data plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveState>,
}

/// What the routers currently see for this credential.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LiveState {
    /// Some model of the credential is banned by fail2ban.
    pub banned: bool,
    /// When the longest current ban ends (RFC 3339); absent: none, or permanent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub banned_until: Option<String>,
    /// Requests in the last 60 s, summed over the pool's replicas.
    pub rpm_used: i64,
    /// Tokens in the last 60 s, summed over the pool's replicas.
    pub tpm_used: i64,
}
