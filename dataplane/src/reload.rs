//! The config file as a source of changes: SIGHUP and file-system events both re-read it and
//! go through [`App::reload_file`] (validate everything, then one swap).
//!
//! The directory is watched rather than the file, because Kubernetes updates a mounted Secret
//! by swapping a `..data` symlink: the file's own inode never changes, but its directory sees
//! the swap. Events are debounced; only a change of the file's content is applied, and an
//! unchanged document (same hash) is a no-op. SIGHUP always re-applies the file.
//!
//! Access events are ignored (but for the close of a write): inotify reports opening a file
//! as an event of its directory, so reacting to them would make every re-read of the file
//! trigger the next one.

use std::{sync::Arc, time::Duration};

use notify::{
    event::{AccessKind, AccessMode},
    EventKind, RecursiveMode, Watcher,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::app::App;

/// Events closer together than this are one change (editors write in several steps).
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Whether an event in the config directory can have changed what the config path reads:
/// anything but an access, except the close of a file opened for writing (the end of an
/// in-place write).
fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Starts the SIGHUP handler and the file watcher. The returned watcher must be kept alive.
pub fn spawn(app: Arc<App>) -> Option<notify::RecommendedWatcher> {
    let path = app.config_path.clone()?;
    {
        let app = app.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                warn!("cannot listen for SIGHUP; reload by file change or the admin API");
                return;
            };
            while hup.recv().await.is_some() {
                info!("SIGHUP: re-reading the config file");
                let _ = app.reload_file("sighup");
            }
        });
    }
    let dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                p
            }
        })?
        .to_path_buf();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = match notify::recommended_watcher(
        move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| may_change_content(&e.kind)) {
                let _ = tx.send(());
            }
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch the config file; reload with SIGHUP or the admin API");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        warn!(error = %e, dir = %dir.display(), "cannot watch the config directory; reload with SIGHUP or the admin API");
        return None;
    }
    // Only a change of the file's own content re-applies it: an event for another file in
    // the directory must not revert a config pushed through the admin API since.
    let mut last_text = std::fs::read_to_string(&path).ok();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            let text = std::fs::read_to_string(&path).ok();
            if text.is_none() || text == last_text {
                continue;
            }
            debug!("config file content changed");
            last_text = text;
            if let Ok(applied) = app.reload_file("file") {
                if applied.changed {
                    info!(hash = %applied.hash, "config file change applied");
                }
            }
        }
    });
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode};

    use super::*;

    #[test]
    fn accesses_are_not_changes() {
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Any),
        ] {
            assert!(!may_change_content(&kind), "{kind:?}");
        }
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
            EventKind::Other,
        ] {
            assert!(may_change_content(&kind), "{kind:?}");
        }
    }
}
