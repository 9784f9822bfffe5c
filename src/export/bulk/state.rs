//! What a bulk export remembers between runs, in small JSON files:
//! - `bulk-status.json` in the run's staging folder: the status URL of an export that was kicked off,
//!   written before the first poll, so a killed run is resumed instead of kicked off again;
//! - `.bulk-cooldown.json` in the export's folder: when the server said the group was requested too
//!   recently, and when the next kick-off is allowed;
//! - `.last-success.json` in the export's folder: the `transactionTime` of the last successful run,
//!   the `_since` of `since: auto`.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::output::{read_json as read, write_json_atomic};

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
