//! `RouterPool`: one data-plane Deployment and the routing policy it runs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{condition::Condition, credential::SecretKeyRef};

/// A Go-style duration (`30s`, `5m`, `1h30m`) or `permanent`.
const DURATION_PATTERN: &str = r"^(permanent|0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$";

/// Fail2ban: ban a (credential, model) pair that keeps failing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fail2BanSpec {
    /// Failures of one counted code before the pair is banned (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_attempts: Option<i32>,
    /// How long a ban lasts: a duration such as 5m, or `permanent` (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub ban_duration: Option<String>,
    /// The HTTP status codes that count (default 429).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub error_codes: Vec<StatusCode>,
    /// Per-code thresholds and durations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["code"]))]
    pub error_code_rules: Vec<ErrorCodeRule>,
}

/// An HTTP status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct StatusCode(#[schemars(range(min = 100, max = 599))] pub i32);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorCodeRule {
    #[schemars(range(min = 100, max = 599))]
    pub code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_attempts: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub ban_duration: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitBackend {
    /// Each replica enforces its share of every limit.
    #[default]
    Local,
    /// Replicas share exact windows and bans in Redis.
    Redis,
}

/// Where RPM/TPM windows and bans are kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    cel,
    validation = Rule::new("self.backend != 'redis' || has(self.redis)")
        .message("spec.rateLimit.redis.urlSecretRef is required when backend is redis")
)]
pub struct RateLimitSpec {
    #[serde(default)]
    pub backend: RateLimitBackend,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// The Secret key holding the Redis URL (it may contain a password).
    pub url_secret_ref: SecretKeyRef,
    /// The URL is one node of a Redis Cluster: the routers learn the other nodes from it and
    /// follow the cluster's redirections.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    Error,
}

/// Data-plane server settings (the `server` section of the router config).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// Upstream connect + response-header timeout, e.g. 60s; 0: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub request_timeout: Option<String>,
    /// A client connection that takes no bytes of its answer for this long is closed (a
    /// limit on progress, not on the whole answer), e.g. 60s (the default); 0: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub write_timeout: Option<String>,
    /// Largest accepted request body, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_body_size_mb: Option<i32>,
    /// Further credentials tried after a failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_provider_retries: Option<i32>,
    /// Routers a request may already have passed before this one refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_hops: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging_level: Option<LogLevel>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

/// The Service in front of the pool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A data-plane Deployment, the Credentials it routes over and its routing policy.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "airouter.dev",
    version = "v1alpha1",
    kind = "RouterPool",
    namespaced,
    status = "RouterPoolStatus",
    shortname = "rp",
    category = "airouter",
    doc = "A pool of airouter data-plane replicas routing over the Credentials its selector picks.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Synced",
        type_ = "integer",
        json_path = ".status.syncedReplicas"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(
        name = "Credentials",
        type_ = "integer",
        json_path = ".status.primaryCredentials"
    ),
    printcolumn(
        name = "Fallbacks",
        type_ = "integer",
        json_path = ".status.fallbackCredentials",
        priority = 1
    ),
    printcolumn(name = "Config", type_ = "string", json_path = ".status.configHash"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RouterPoolSpec {
    /// Data-plane replicas (default 2).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Which Credentials of this namespace the pool routes over.
    pub credential_selector: LabelSelector,
    /// The Secret key holding the master key clients authenticate with.
    pub master_key_secret_ref: SecretKeyRef,
    /// Model aliases: the name clients send → the model id routed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub model_aliases: BTreeMap<String, String>,
    /// RPM of a (credential, model) pair whose model sets none; -1 or absent: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1))]
    pub default_models_rpm: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail2ban: Option<Fail2BanSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerSpec>,
    /// The data-plane image (default: the chart's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSpec>,
    /// PEM CA certificates the pods trust for https upstreams (besides the built-in roots) and
    /// for a `rediss://` rate-limit Redis: a key of a ConfigMap, such as a trust-manager
    /// bundle. Pods roll when its content changes.
    #[serde(default, rename = "trustedCA", skip_serializing_if = "Option::is_none")]
    pub trusted_ca: Option<ConfigMapKeyRef>,
}

/// A key in a ConfigMap of the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ConfigMapKeyRef {
    /// The ConfigMap's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within the ConfigMap's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_replicas() -> i32 {
    2
}

/// What the operator reports about a RouterPool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterPoolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `ConfigSynced`, `Available`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The hash of the config the pods should serve (the data plane's `/admin/config/hash`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    #[serde(default)]
    pub primary_credentials: i32,
    #[serde(default)]
    pub fallback_credentials: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// Ready pods serving `configHash`.
    #[serde(default)]
    pub synced_replicas: i32,
    /// The Service URL clients use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}
