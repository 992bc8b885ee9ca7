//! Log setup shared by the `airouter` and `airouter-operator` binaries: `tracing` lines as
//! text or JSON, filtered by `RUST_LOG` when set, else by the binary's default filter — which
//! [`set_default_filter`] can replace while the process runs (a reloaded `logging_level`).

use std::sync::OnceLock;

use tracing_subscriber::{prelude::*, reload, EnvFilter, Registry};

/// Log line format (`--log-format`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Swaps the installed filter; set by [`init_tracing`] unless `RUST_LOG` chose the filter.
static RELOAD: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber. ANSI colours only when stdout is a terminal.
pub fn init_tracing(default_filter: &str, format: LogFormat) {
    let from_env = EnvFilter::try_from_default_env().ok();
    let pinned = from_env.is_some();
    let (filter, handle) =
        reload::Layer::new(from_env.unwrap_or_else(|| EnvFilter::new(default_filter)));
    let lines = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(lines.json().flatten_event(true)).init(),
        LogFormat::Text => registry.with(lines).init(),
    }
    if !pinned {
        let _ = RELOAD.set(handle);
    }
}

/// Replaces the default filter of [`init_tracing`]; `false` when `RUST_LOG` set the filter
/// (it wins over the config) or no subscriber was installed.
pub fn set_default_filter(filter: &str) -> bool {
    RELOAD
        .get()
        .is_some_and(|handle| handle.reload(EnvFilter::new(filter)).is_ok())
}
