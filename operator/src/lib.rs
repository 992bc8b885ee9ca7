//! airouter operator. A RouterPool is reconciled as typed steps (design §1, style §11.3):
//! resolve (I/O: Credentials, Secrets, proxy targets) → [`router_pool::render`] (pure: the
//! data plane's own `RouterConfig`) → apply → push → status.
//!
//! This release has the pure steps ([`router_pool::render`], [`router_pool::desired`]) and the
//! push to pods ([`router_pool::push`]); resolve, apply, status and the controller are next.

pub mod router_pool;
