//! The `airouter-operator` binary: connect to the API server, serve metrics and probes, win
//! the leader Lease, then run the controllers until SIGTERM.

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use airouter::telemetry::{init_tracing, LogFormat};
use airouter_operator::{
    context::Settings,
    controller,
    leader::{self, LeaseSettings},
    metrics::{self, Metrics},
    router_pool::desired::Defaults,
};
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::{runtime::events::Reporter, Client};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "airouter-operator",
    version,
    about = "Reconciles airouter Credential and RouterPool resources into a live-updated data plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator (in a cluster, or against the current kubeconfig context).
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The data-plane image pools run unless they set spec.image.
    #[arg(
        long,
        env = "AIROUTER_DATAPLANE_IMAGE",
        default_value = concat!("ghcr.io/airouter/airouter:", env!("CARGO_PKG_VERSION"))
    )]
    dataplane_image: String,
    /// Data-plane container resources (JSON, as in a pod spec) for pools without spec.resources.
    #[arg(long, env = "AIROUTER_DATAPLANE_RESOURCES", value_parser = parse_resources)]
    dataplane_resources: Option<ResourceRequirements>,
    /// Address of the /metrics, /healthz and /readyz listener.
    #[arg(long, env = "AIROUTER_METRICS_ADDR", default_value = "0.0.0.0:8081")]
    metrics_addr: SocketAddr,
    /// Run without leader election (a single replica only).
    #[arg(long, env = "AIROUTER_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Namespace of the leader Lease (default: the kubeconfig's or the pod's namespace).
    #[arg(long, env = "AIROUTER_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    #[arg(long, env = "AIROUTER_LEASE_NAME", default_value = "airouter-operator")]
    lease_name: String,
    /// This replica's name in the Lease (default: the pod name, else a random id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// A leader that has not renewed the Lease for this long is replaced.
    #[arg(long, env = "AIROUTER_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// The leader renews this long before the Lease would expire.
    #[arg(long, env = "AIROUTER_LEASE_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    lease_grace: Duration,
    /// How long one pod may take to answer a config push.
    #[arg(long, env = "AIROUTER_PUSH_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    push_timeout: Duration,
    /// How often pods' /admin/state is read into Credential status.
    #[arg(long, env = "AIROUTER_LIVE_STATE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    live_state_interval: Duration,
    /// How often every object is reconciled with no event (drift repair).
    #[arg(long, env = "AIROUTER_RESYNC", default_value = "5m", value_parser = humantime::parse_duration)]
    resync: Duration,
    /// Log line format.
    #[arg(long, env = "AIROUTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let Command::Run(args) = Cli::parse().command;
    init_tracing(
        "info,kube=warn,kube_lease_manager=warn,hyper=warn",
        args.log_format,
    );
    if args.lease_grace >= args.lease_duration {
        error!("--lease-grace must be shorter than --lease-duration");
        return ExitCode::from(64);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_resources(text: &str) -> Result<ResourceRequirements, String> {
    const EXAMPLE: &str = r#"{"requests":{"cpu":"100m"}}"#;
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| format!("not a resources object such as {EXAMPLE}: {e}"))?;
    // The typed read ignores unknown keys: a misspelt `request` would silently mean none.
    if let Some(key) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "limits" | "requests" | "claims"))
    {
        return Err(format!(
            "unknown key {key:?}: a resources object has `limits`, `requests` and `claims`, e.g. {EXAMPLE}"
        ));
    }
    serde_json::from_value(serde_json::Value::Object(object))
        .map_err(|e| format!("not a resources object such as {EXAMPLE}: {e}"))
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    {
        let (metrics, ready) = (metrics.clone(), ready.clone());
        let addr = args.metrics_addr;
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, metrics, ready).await {
                error!("cannot serve metrics on {addr}: {e}");
                std::process::exit(1);
            }
        });
    }

    let client = Client::try_default().await?;
    let version = client.apiserver_version().await?;
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("airouter-operator-{}", uuid::Uuid::new_v4().simple()));
    info!(
        apiserver = %version.git_version,
        identity = %identity,
        metrics = %args.metrics_addr,
        "connected to the API server"
    );
    let settings = Settings {
        defaults: Defaults {
            image: args.dataplane_image.clone(),
            resources: args.dataplane_resources.clone(),
        },
        push_timeout: args.push_timeout,
        live_interval: args.live_state_interval,
        resync: args.resync,
    };
    let reporter = Reporter {
        controller: "airouter-operator".into(),
        instance: Some(identity.clone()),
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    if args.no_leader_election {
        metrics.leader.set(1);
        controller::run(client, settings, metrics, reporter, stopped()).await;
        return Ok(ExitCode::SUCCESS);
    }

    let lease = LeaseSettings {
        namespace: args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned()),
        name: args.lease_name.clone(),
        identity,
        duration: args.lease_duration,
        grace: args.lease_grace,
    };
    let leadership = leader::start(client.clone(), &lease).await?;
    info!(lease = %lease.name, namespace = %lease.namespace, "waiting to become the leader");
    let mut watch_leader = leadership.is_leader.clone();
    let became = tokio::select! {
        became = watch_leader.wait_for(|leading| *leading) => Some(became.is_ok()),
        _ = stopped() => None,
    };
    let Some(became) = became else {
        drop(watch_leader);
        leadership.release().await;
        return Ok(ExitCode::SUCCESS);
    };
    if !became {
        anyhow::bail!("leader election stopped before this replica became the leader");
    }
    info!("became the leader; starting the controllers");
    metrics.leader.set(1);

    let lost = async move {
        let _ = watch_leader.wait_for(|leading| !*leading).await;
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let controllers = tokio::spawn(controller::run(
        client,
        settings,
        metrics.clone(),
        reporter,
        async move {
            let _ = done_rx.await;
        },
    ));
    tokio::select! {
        _ = lost => {
            metrics.leader.set(0);
            // Another replica holds the Lease now: stop writing at once.
            error!("lost the leader Lease; exiting so that only the new leader writes");
            return Ok(ExitCode::FAILURE);
        }
        _ = stopped() => {}
    }
    info!("stopping the controllers");
    let _ = done_tx.send(());
    if tokio::time::timeout(Duration::from_secs(10), controllers)
        .await
        .is_err()
    {
        warn!("controllers did not stop within 10 s");
    }
    metrics.leader.set(0);
    leadership.release().await;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_resources;

    #[test]
    fn dataplane_resources_refuse_unknown_keys_and_bad_json() {
        let ok = parse_resources(r#"{"requests":{"cpu":"100m"},"limits":{"memory":"512Mi"}}"#)
            .expect("valid resources");
        assert_eq!(ok.requests.expect("requests")["cpu"].0, "100m");
        let typo = parse_resources(r#"{"request":{"cpu":"100m"}}"#).unwrap_err();
        assert!(typo.contains(r#"unknown key "request""#), "{typo}");
        let bad = parse_resources("cpu=100m").unwrap_err();
        assert!(bad.starts_with("not a resources object"), "{bad}");
    }
}
