//! airouter data plane: one OpenAI-compatible endpoint in front of many provider credentials,
//! with round-robin selection, exact per-credential and per-model RPM/TPM limits, fail2ban,
//! retries and fallback to other routers.
//!
//! Pipeline (one module each): [`config`] (the document) → [`runtime`] (compiled snapshot,
//! swapped by [`store`]) → [`proxy`] (the request path: [`request`] probing and rewrites,
//! [`select`] with [`limit`], [`upstream`] or [`mock`], [`stream`] accounting) → responses and
//! [`error`]s; [`health`] views and [`metrics`]; [`server`] accepts connections
//! (and [`stall`] closes those whose client stopped reading). [`app`] owns
//! the one path by which a document becomes the running config ([`admin`] API, [`reload`] on
//! SIGHUP or file change); [`remote`] syncs what chained routers report; [`telemetry`] sets up
//! logs for both binaries.

pub mod admin;
pub mod app;
pub mod body;
pub mod config;
pub mod drain;
pub mod error;
pub mod health;
pub mod json;

/// A hash map for the request path: `ahash` is several times faster than SipHash on short
/// keys and still seeded per process, so client-chosen model names cannot force collisions.
pub type FastMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
pub type FastSet<T> = std::collections::HashSet<T, ahash::RandomState>;

pub mod limit;
pub mod metrics;
pub mod mock;
pub mod proxy;
pub mod reload;
pub mod remote;
pub mod request;
pub mod runtime;
pub mod secret;
pub mod select;
pub mod server;
pub mod stall;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod upstream;
