//! The writer task: owns the `RunWriter` on a blocking thread and receives batches of complete NDJSON
//! lines over a bounded channel, so network tasks never block on disk, files are appended (and counted
//! and hashed) in one place, and memory stays bounded. Both modes use it: search pages and bulk download
//! chunks alike.

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::output::{OutputError, RunWriter};

/// Batches the retrieval tasks send to the writer.
pub enum WriterMsg {
    /// `count` compact NDJSON lines of one resource type.
    Resources {
        resource_type: String,
        lines: Vec<u8>,
        count: u64,
    },
    /// OperationOutcome lines the server reported.
    Outcomes { lines: Vec<u8>, count: u64 },
    /// Deleted-resource entries of one type (bulk `deleted[]`).
    Deleted {
        resource_type: String,
        lines: Vec<u8>,
        count: u64,
    },
    /// One failed search (goes to `errors/failed-requests.ndjson`).
    Failure(serde_json::Value),
    /// A downloaded document in the staging folder's `attachments/` that the run links to.
    Attachment(std::path::PathBuf),
}

/// Batches in flight between the network tasks and the disk (about 4 MiB of bulk batches): enough to
/// smooth the writer's pauses (a part waiting for an upload slot), small enough that a writer slower
/// than the network holds little.
pub const CHANNEL_CAPACITY: usize = 16;

/// The writer thread: it gives the writer back, with the first write error if any.
pub type WriterTask = JoinHandle<(RunWriter, Result<(), OutputError>)>;

/// Starts the writer thread. Dropping every sender ends it; the handle gives the writer back with
/// the first write error, if any.
pub fn spawn(writer: RunWriter) -> (mpsc::Sender<WriterMsg>, WriterTask) {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    (tx, tokio::task::spawn_blocking(move || run(writer, rx)))
}

/// Writes until every sender is gone or a write fails; hands the writer back either way.
fn run(
    mut writer: RunWriter,
    mut rx: mpsc::Receiver<WriterMsg>,
) -> (RunWriter, Result<(), OutputError>) {
    while let Some(msg) = rx.blocking_recv() {
        let result = match msg {
            WriterMsg::Resources {
                resource_type,
                lines,
                count,
            } => writer.append(&resource_type, &lines, count),
            WriterMsg::Outcomes { lines, count } => writer.append_outcomes(&lines, count),
            WriterMsg::Deleted {
                resource_type,
                lines,
                count,
            } => writer.append_deleted(&resource_type, &lines, count),
            WriterMsg::Failure(record) => writer.append_failure(&record),
            WriterMsg::Attachment(path) => writer.publish_attachment(&path),
        };
        if let Err(e) = result {
            return (writer, Err(e));
        }
    }
    (writer, Ok(()))
}
