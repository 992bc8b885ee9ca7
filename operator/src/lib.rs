//! airouter operator: reconciles `Credential` and `RouterPool` resources (crate `airouter-crds`)
//! into a running, live-updated data plane.
//!
//! - [`router_pool`]: the pool pipeline — resolve (I/O) → render and desired state (pure) →
//!   server-side apply (I/O) → push the config to every ready pod's admin port (I/O) → status
//!   (pure build, written only on change).
//! - [`credential`]: Credential status — `Ready`, the pools using it, and the live state read
//!   from the data plane's `/admin/state`.
//! - [`triggers`]: which watch events reach which objects; [`controller`]: the wiring;
//!   [`leader`]: Lease-based leader election; [`metrics`]: Prometheus metrics and probes.
//! - [`status_patch`]: the status writer of readable objects (only on change); [`malformed`]:
//!   what an object the current schema cannot read gets instead of a reconcile (its own merge
//!   patch, written each time the object changes).

pub mod context;
pub mod controller;
pub mod credential;
pub mod error;
pub mod leader;
pub mod malformed;
pub mod metrics;
pub mod router_pool;
pub mod status_patch;
pub mod triggers;
