//! airouter operator. A RouterPool is reconciled as typed steps (design §1, style §11.3):
//! resolve (I/O: Credentials, Secrets, proxy targets) → [`router_pool::render`] (pure: the
//! data plane's own `RouterConfig`) → apply → push → status.
//!
//! This release has the pure rendering step; the controller around it is the next step.

pub mod router_pool;
