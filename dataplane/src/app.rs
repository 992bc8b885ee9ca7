//! `App`: what every handler shares, and the one path by which a config document becomes the
//! running config — from the admin API, SIGHUP or the file watcher alike.

use std::{
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc},
};

use serde::Serialize;
use tracing::{info, warn};

use crate::{
    config::{ConfigError, LogLevel, Problem, RouterConfig},
    metrics::Metrics,
    remote::RemoteHealth,
    runtime::Runtime,
    store::ConfigStore,
    upstream,
};

pub struct App {
    pub store: ConfigStore,
    pub client: upstream::Client,
    pub metrics: Metrics,
    pub remote: Arc<RemoteHealth>,
    /// False once shutdown has begun: readiness fails so traffic drains away.
    pub ready: AtomicBool,
    /// The file the config came from, re-read on SIGHUP and when it changes.
    pub config_path: Option<PathBuf>,
}

/// The result of applying a document.
#[derive(Clone, Debug, Serialize)]
pub struct Applied {
    pub hash: String,
    /// False when the document equals the running config (nothing was swapped).
    pub changed: bool,
    pub warnings: Vec<Problem>,
}

impl App {
    pub fn new(config: RouterConfig, config_path: Option<PathBuf>) -> Arc<App> {
        let client = upstream::Client::new(&config.server);
        let metrics = Metrics::new();
        let store = ConfigStore::new(config);
        metrics.config_applied("startup", true, Some(&store.current().hash));
        Arc::new(App {
            store,
            client,
            metrics,
            remote: Arc::default(),
            ready: AtomicBool::new(true),
            config_path,
        })
    }

    pub fn current(&self) -> Arc<Runtime> {
        self.store.current()
    }

    /// Validates `text` completely, then swaps it in at once. On any problem the running
    /// config is untouched and every problem is returned.
    pub fn apply_text(&self, text: &str, source: &str) -> Result<Applied, ConfigError> {
        let loaded = match RouterConfig::from_yaml(text, &|name| std::env::var(name).ok()) {
            Ok(loaded) => loaded,
            Err(e) => {
                self.metrics.config_applied(source, false, None);
                warn!(
                    source,
                    problems = e.problems.len(),
                    "config rejected; the running config keeps serving: {e}"
                );
                return Err(e);
            }
        };
        let mut warnings = loaded.warnings;
        let current = self.current();
        let new = loaded.config;
        if new.hash() == current.hash {
            return Ok(Applied {
                hash: current.hash.clone(),
                changed: false,
                warnings,
            });
        }
        let (old_server, new_server) = (&current.config.server, &new.server);
        for (field, changed) in [
            ("server.host", old_server.host != new_server.host),
            ("server.port", old_server.port != new_server.port),
            (
                "server.admin_port",
                old_server.admin_port != new_server.admin_port,
            ),
            (
                "server.idle_conn_timeout",
                old_server.idle_conn_timeout != new_server.idle_conn_timeout,
            ),
            (
                "server.max_idle_conns_per_host",
                old_server.max_idle_conns_per_host != new_server.max_idle_conns_per_host,
            ),
            (
                "server.idle_timeout",
                old_server.idle_timeout != new_server.idle_timeout,
            ),
        ] {
            if changed {
                warnings.push(Problem { field: field.into(), message: "changed, but listeners and the connection pool keep their settings until a restart".into() });
            }
        }
        if old_server.request_timeout != new_server.request_timeout {
            warnings.push(Problem {
                field: "server.request_timeout".into(),
                message: "applies to new requests now; the upstream connect timeout taken from it keeps its value until a restart".into(),
            });
        }
        if old_server.logging_level != new_server.logging_level
            && !crate::telemetry::set_default_filter(&log_filter(new_server.logging_level))
        {
            warnings.push(Problem {
                field: "server.logging_level".into(),
                message: "not applied: RUST_LOG chooses the log filter of this process".into(),
            });
        }
        let runtime = self.store.apply(new);
        self.metrics
            .config_applied(source, true, Some(&runtime.hash));
        self.remote.wake();
        info!(source, hash = %runtime.hash, previous = %current.hash, credentials = runtime.credentials.len(), "config applied");
        Ok(Applied {
            hash: runtime.hash.clone(),
            changed: true,
            warnings,
        })
    }

    /// Re-reads the config file (SIGHUP, file change).
    pub fn reload_file(&self, source: &str) -> Result<Applied, ConfigError> {
        let Some(path) = &self.config_path else {
            return Err(ConfigError {
                problems: vec![Problem {
                    field: "config file".into(),
                    message: "the router was not started from a file".into(),
                }],
            });
        };
        match std::fs::read_to_string(path) {
            Ok(text) => self.apply_text(&text, source),
            Err(e) => {
                self.metrics.config_applied(source, false, None);
                let problem = Problem {
                    field: path.display().to_string(),
                    message: format!("cannot read the config file: {e}"),
                };
                warn!(source, "{problem}; the running config keeps serving");
                Err(ConfigError {
                    problems: vec![problem],
                })
            }
        }
    }
}

/// The log filter for `server.logging_level` (the libraries' own chatter stays at warn).
pub fn log_filter(level: LogLevel) -> String {
    format!("{},hyper=warn,rustls=warn", level.as_str())
}
