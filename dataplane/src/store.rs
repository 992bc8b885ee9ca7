//! `ConfigStore`: the running config, swapped whole.
//!
//! A new config is compiled into a complete [`Runtime`] first (off the request path); only
//! then is it published with one atomic store, so a request sees either the old config or the
//! new one, never a mix. Requests that started on the old runtime keep their `Arc` to it and
//! finish on it. Limiter windows, bans and cursors live in the shared [`Registry`] and carry
//! over by credential name and model.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::{
    config::RouterConfig,
    runtime::{Registry, Runtime},
};

pub struct ConfigStore {
    current: ArcSwap<Runtime>,
    registry: Arc<Registry>,
}

impl ConfigStore {
    pub fn new(config: RouterConfig) -> Self {
        let registry = Arc::new(Registry::default());
        let runtime = Runtime::compile(config, registry.clone());
        Self {
            current: ArcSwap::from_pointee(runtime),
            registry,
        }
    }

    /// The runtime a new request should use.
    pub fn current(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    /// Whether `rt` is still the running config (a guard load: no reference count touched,
    /// for the request path).
    pub fn is_current(&self, rt: &Runtime) -> bool {
        std::ptr::eq(&**self.current.load(), rt)
    }

    /// Compiles `config` and makes it current; returns the new runtime.
    ///
    /// A credential whose key or endpoint changed keeps its windows (the quota is the
    /// provider's) but loses its bans: they were earned by the old key.
    pub fn apply(&self, config: RouterConfig) -> Arc<Runtime> {
        let previous = self.current();
        let runtime = Arc::new(Runtime::compile(config, self.registry.clone()));
        for cred in &runtime.credentials {
            let rotated = previous
                .credential(&cred.name)
                .is_some_and(|old| old.ban_scope != cred.ban_scope);
            if rotated {
                cred.state.clear_bans();
            }
        }
        self.current.store(runtime.clone());
        self.registry.retain_credentials(&runtime);
        runtime
    }
}
