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

    /// Compiles `config` and makes it current; returns the new runtime.
    pub fn apply(&self, config: RouterConfig) -> Arc<Runtime> {
        let runtime = Arc::new(Runtime::compile(config, self.registry.clone()));
        self.current.store(runtime.clone());
        self.registry.retain_credentials(&runtime);
        runtime
    }
}
