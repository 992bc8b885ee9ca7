//! Leader election on a `coordination.k8s.io` Lease (crate `kube-lease-manager`), so that of
//! several operator replicas exactly one reconciles and writes. A replica that loses the
//! Lease stops at once (the process exits and is restarted as a standby), never racing the
//! new leader; on SIGTERM the leader releases the Lease so a standby takes over without
//! waiting for it to expire.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::{sync::watch, task::JoinHandle};

/// How the Lease is held.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// A leader that has not renewed for this long may be replaced.
    pub duration: Duration,
    /// The leader renews this long before its Lease would expire.
    pub grace: Duration,
}

pub struct Leadership {
    /// True while this replica holds the Lease.
    pub is_leader: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

/// Starts competing for the Lease (created if absent).
pub async fn start(client: Client, s: &LeaseSettings) -> Result<Leadership, LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, &s.name)
        .with_namespace(&s.namespace)
        .with_identity(&s.identity)
        .with_duration(s.duration.as_secs().max(2))
        .with_grace(s.grace.as_secs().max(1))
        .with_field_manager(format!("airouter-operator-{}", s.identity))
        .build()
        .await?;
    let (is_leader, task) = manager.watch().await;
    Ok(Leadership { is_leader, task })
}

impl Leadership {
    /// Gives the Lease up (when held) and stops competing.
    pub async fn release(self) {
        drop(self.is_leader);
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(Ok(_))) => tracing::info!("leader Lease released"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "cannot release the leader Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election task failed"),
            Err(_) => tracing::warn!("releasing the leader Lease timed out"),
        }
    }
}
