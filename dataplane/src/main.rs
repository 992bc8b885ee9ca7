//! The `airouter` binary: `run` the router, or `check-config` a file.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use airouter::{
    app::App,
    config::{ConfigError, Loaded, RouterConfig},
    reload,
    server::{self, Role},
    telemetry::{init_tracing, LogFormat},
};
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

/// mimalloc (built without transparent huge pages): its RSS stays flat across bursts of
/// thousands of connections, where glibc's grows with fragmentation (`bench/NOTES.md`,
/// fourth round).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a config that does not validate (sysexits EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "airouter", version, about = "OpenAI-compatible LLM API router")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router.
    Run {
        /// Config file (Auto AI Router format).
        #[arg(
            long,
            short = 'c',
            env = "AIROUTER_CONFIG",
            default_value = "config.yaml"
        )]
        config: PathBuf,
        /// Log line format.
        #[arg(long, env = "AIROUTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
        /// Listen on this address instead of `server.host` (for example the pod IP from the
        /// downward API); both listeners use it, and config pushes never change it.
        #[arg(long, env = "AIROUTER_LISTEN_HOST")]
        listen_host: Option<String>,
    },
    /// Validate a config file: print every problem with its field path; exit 64 if invalid.
    CheckConfig {
        /// Config file to check.
        file: PathBuf,
    },
}

/// Accepts the upstream spelling (`-config FILE`, no subcommand) so existing deployment
/// scripts keep working.
fn normalise_args(args: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 1);
    let mut iter = args.into_iter();
    out.extend(iter.next());
    let rest: Vec<String> = iter
        .map(|a| match a.as_str() {
            "-config" => "--config".to_owned(),
            s if s.starts_with("-config=") => format!("-{s}"),
            _ => a,
        })
        .collect();
    let has_command = rest.first().is_some_and(|a| !a.starts_with('-'))
        || rest
            .iter()
            .any(|a| matches!(a.as_str(), "-h" | "--help" | "-V" | "--version"));
    if !has_command {
        out.push("run".to_owned());
    }
    out.extend(rest);
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(normalise_args(std::env::args().collect()));
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Run {
            config,
            log_format,
            listen_host,
        } => run(&config, log_format, listen_host),
    }
}

fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        problems: vec![airouter::config::Problem {
            field: path.display().to_string(),
            message: format!("cannot read the config file: {e}"),
        }],
    })?;
    RouterConfig::from_yaml(&text, &|name| std::env::var(name).ok())
}

fn check_config(path: &Path) -> ExitCode {
    match load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                println!("warning: {w}");
            }
            let c = &loaded.config;
            let unsupported: Vec<_> = c
                .credentials
                .iter()
                .filter(|c| !c.kind.is_supported())
                .collect();
            for cred in &unsupported {
                println!("warning: credential {:?} has type {} whose adapter airouter does not have yet; it will never be selected", cred.name, cred.kind);
            }
            println!(
                "{}: ok ({} credentials, {} model entries, {} aliases)",
                path.display(),
                c.credentials.len(),
                c.models.len(),
                c.model_alias.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            for p in &e.problems {
                println!("error: {p}");
            }
            println!(
                "{}: {} problem(s); the config was not accepted",
                path.display(),
                e.problems.len()
            );
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

fn run(path: &Path, log_format: LogFormat, listen_host: Option<String>) -> ExitCode {
    let loaded = match load(path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("airouter: {} is not a valid config:", path.display());
            for p in &e.problems {
                eprintln!("  {p}");
            }
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_tracing(
        &airouter::app::log_filter(loaded.config.server.logging_level),
        log_format,
    );
    for w in &loaded.warnings {
        warn!(field = %w.field, "{}", w.message);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("airouter: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On a worker thread, not the main one: connection state is then allocated (and freed)
    // by the threads that use it, in their own allocator heaps, instead of split between the
    // main thread's (accept, spawn) and the workers'.
    let served = runtime.block_on(async move {
        tokio::spawn(serve(loaded.config, path.to_path_buf(), listen_host))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the server task failed: {e}")))
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    config: RouterConfig,
    path: PathBuf,
    listen_host: Option<String>,
) -> anyhow::Result<()> {
    let server = config.server.clone();
    let host = listen_host.unwrap_or_else(|| server.host.clone());
    let app = App::new(config, Some(path));
    let rt = app.current();
    for cred in rt.unsupported_credentials() {
        warn!(credential = %cred.name, r#type = %cred.kind, "credential type has no adapter yet; it is never selected");
    }
    let listener = server::bind(&host, server.port).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {host}:{} (server.host/server.port): {e}",
            server.port
        )
    })?;
    let admin = match server.admin_port {
        Some(port) => Some(server::bind(&host, port).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on {host}:{port} (server.admin_port): {e}")
        })?),
        None => None,
    };
    info!(
        address = %listener.local_addr()?,
        admin = ?admin.as_ref().and_then(|l| l.local_addr().ok()),
        credentials = rt.credentials.len(),
        models = rt.model_ids.len(),
        config_hash = %rt.hash,
        "airouter listening"
    );
    drop(rt);

    let _watcher = reload::spawn(app.clone());
    {
        let app = app.clone();
        let remote = app.remote.clone();
        let client = app.client.clone();
        tokio::spawn(remote.run(move || app.current(), client));
    }

    // SIGTERM: readiness fails at once; both listeners keep serving for `shutdown_grace`
    // (load balancers stop sending), then close and drain for up to `shutdown_timeout`.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let app = app.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            app.ready.store(false, std::sync::atomic::Ordering::Relaxed);
            let grace = app.current().config.server.shutdown_grace;
            info!(
                grace_ms = grace.as_millis() as u64,
                "readiness off; still serving during the grace period"
            );
            tokio::time::sleep(grace).await;
            let _ = stop_tx.send(true);
        });
    }
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let public = server::serve(
        listener,
        app.clone(),
        Role::Public,
        stopped(stop_rx.clone()),
    );
    match admin {
        Some(admin) => {
            tokio::join!(
                public,
                server::serve(admin, app, Role::Admin, stopped(stop_rx))
            );
        }
        None => public.await,
    }
    info!("airouter stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        normalise_args(a.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn upstream_spelling_runs() {
        assert_eq!(
            args(&["airouter", "-config", "c.yaml"]),
            ["airouter", "run", "--config", "c.yaml"]
        );
        assert_eq!(args(&["airouter"]), ["airouter", "run"]);
        assert_eq!(
            args(&["airouter", "check-config", "x"]),
            ["airouter", "check-config", "x"]
        );
        assert_eq!(args(&["airouter", "--help"]), ["airouter", "--help"]);
    }
}
