//! What a bulk export remembers between runs, in small JSON files:
//! - `bulk-status.json` in the run's staging folder: the status URL of an export that was kicked off,
//!   written before the first poll, so a killed run is resumed instead of kicked off again;
//! - `.bulk-cooldown.json` in the export's folder: when the server said the group was requested too
//!   recently, and when the next kick-off is allowed;
//! - `.last-success.json` in the export's folder: the `transactionTime` of the last successful run,
//!   the `_since` of `since: auto`.
//!
//! With `output.url` the working folder may not outlive the run (a pod's emptyDir), so each file is
//! also kept in the store under `<prefix>/<export>/.state/` and brought back when the folder lacks it.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::output::{read_json as read, write_json_atomic};
use crate::storage::runs::ExportRuns;

pub const PENDING_FILE: &str = "bulk-status.json";
const COOLDOWN_FILE: &str = ".bulk-cooldown.json";
const LAST_SUCCESS_FILE: &str = ".last-success.json";

/// An export the server is preparing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Pending {
    pub status_url: String,
    /// The kick-off request; a run resumes only an export of the same request.
    pub kickoff_url: String,
    pub kicked_off_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cooldown {
    /// The next kick-off is not sent before this instant.
    pub until: String,
    /// What the server said.
    pub message: String,
    pub kickoff_url: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastSuccess {
    pub transaction_time: String,
    pub run_id: String,
}

/// The status URL as kept in the store: with the id of the run it belongs to.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredPending {
    run_id: String,
    #[serde(flatten)]
    pending: Pending,
}

/// Names in the store's `.state/`.
const STORED_PENDING: &str = "bulk-status.json";
const STORED_COOLDOWN: &str = "bulk-cooldown.json";
const STORED_LAST_SUCCESS: &str = "last-success.json";

/// The export's state in the object store, when runs go to one.
pub struct Mirror<'a>(pub Option<&'a ExportRuns>);

impl Mirror<'_> {
    /// Brings back what the working folder `export_dir` lacks: the last success, the cool-down, and
    /// the status URL of an export being prepared (as the staging folder of its run, so that the
    /// run is resumed). A state object that is not valid is ignored with a warning.
    pub async fn restore(&self, export_dir: &Path) {
        let Some(runs) = self.0 else { return };
        if let Err(e) = crate::output::create_private_dir(export_dir) {
            tracing::warn!("cannot create {}: {e}", export_dir.display());
            return;
        }
        for (stored, local) in [
            (STORED_LAST_SUCCESS, LAST_SUCCESS_FILE),
            (STORED_COOLDOWN, COOLDOWN_FILE),
        ] {
            let path = export_dir.join(local);
            if path.exists() {
                continue;
            }
            if let Some(v) = fetch::<serde_json::Value>(runs, stored).await
                && let Err(e) = write_json_atomic(&path, &v)
            {
                tracing::warn!("cannot write {}: {e}", path.display());
            }
        }
        let has_local_marker = std::fs::read_dir(export_dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join(PENDING_FILE).exists());
        if has_local_marker {
            return;
        }
        let Some(p) = fetch::<StoredPending>(runs, STORED_PENDING).await else {
            return;
        };
        // The id becomes a folder name: only a run id is accepted.
        if !crate::storage::runs::is_run_id(&p.run_id) {
            tracing::warn!(
                "ignoring the stored bulk status: {:?} is not a run id",
                p.run_id
            );
            return;
        }
        let staging = export_dir.join(format!(".{}.partial", p.run_id));
        let restored = crate::output::create_private_dir(&staging)
            .and_then(|()| save_pending(&staging, &p.pending));
        match restored {
            Ok(()) => tracing::info!(
                "the status URL of the export kicked off at {} comes from the store",
                p.pending.kicked_off_at
            ),
            Err(e) => tracing::warn!(
                "cannot restore the bulk status in {}: {e}",
                staging.display()
            ),
        }
    }

    pub async fn save_pending(&self, run_id: &str, pending: &Pending) {
        let value = StoredPending {
            run_id: run_id.to_owned(),
            pending: pending.clone(),
        };
        self.put(STORED_PENDING, &value).await;
    }

    pub async fn forget_pending(&self) {
        self.remove(STORED_PENDING).await;
    }

    pub async fn save_cooldown(&self, c: &Cooldown) {
        self.put(STORED_COOLDOWN, c).await;
    }

    pub async fn forget_cooldown(&self) {
        self.remove(STORED_COOLDOWN).await;
    }

    pub async fn save_last_success(&self, s: &LastSuccess) {
        self.put(STORED_LAST_SUCCESS, s).await;
    }

    async fn put<T: Serialize>(&self, name: &str, value: &T) {
        let Some(runs) = self.0 else { return };
        let Ok(bytes) = serde_json::to_vec_pretty(value) else {
            return;
        };
        if let Err(e) = runs.write_state(name, bytes).await {
            tracing::warn!("cannot keep the export's state in the store: {e}");
        }
    }

    async fn remove(&self, name: &str) {
        let Some(runs) = self.0 else { return };
        if let Err(e) = runs.remove_state(name).await {
            tracing::warn!("cannot remove the export's state from the store: {e}");
        }
    }
}

async fn fetch<T: serde::de::DeserializeOwned>(runs: &ExportRuns, name: &str) -> Option<T> {
    match runs.read_state(name).await {
        Ok(Some(bytes)) => match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!("ignoring the stored {name}: not valid ({e})");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("cannot read the export's state from the store: {e}");
            None
        }
    }
}

pub fn read_pending(marker: &Path) -> Option<Pending> {
    read(marker)
}

pub fn save_pending(staging: &Path, pending: &Pending) -> io::Result<()> {
    write_json_atomic(&staging.join(PENDING_FILE), pending)
}

pub fn cooldown_path(export_dir: &Path) -> PathBuf {
    export_dir.join(COOLDOWN_FILE)
}

pub fn read_cooldown(export_dir: &Path) -> Option<Cooldown> {
    read(&cooldown_path(export_dir))
}

pub fn save_cooldown(export_dir: &Path, c: &Cooldown) -> io::Result<()> {
    write_json_atomic(&cooldown_path(export_dir), c)
}

pub fn read_last_success(export_dir: &Path) -> Option<LastSuccess> {
    read(&export_dir.join(LAST_SUCCESS_FILE))
}

pub fn save_last_success(export_dir: &Path, s: &LastSuccess) -> io::Result<()> {
    write_json_atomic(&export_dir.join(LAST_SUCCESS_FILE), s)
}
