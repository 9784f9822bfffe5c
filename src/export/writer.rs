//! The writer task: owns the `RunWriter` on a blocking thread and receives page-sized batches over a
//! bounded channel, so network tasks never block on disk and memory stays bounded.

use tokio::sync::mpsc;

use crate::output::{OutputError, RunWriter};

/// Batches the search tasks send to the writer.
pub enum WriterMsg {
    /// `count` compacted NDJSON lines of one resource type.
    Resources {
        resource_type: String,
        lines: Vec<u8>,
        count: u64,
    },
    /// OperationOutcome lines the server reported.
    Outcomes { lines: Vec<u8>, count: u64 },
    /// One failed search (goes to `errors/failed-requests.ndjson`).
    Failure(serde_json::Value),
}

/// Batches in flight between the network tasks and the disk.
pub const CHANNEL_CAPACITY: usize = 64;

/// Writes until every sender is gone or a write fails; hands the writer back either way.
pub fn run(
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
            WriterMsg::Failure(record) => writer.append_failure(&record),
        };
        if let Err(e) = result {
            return (writer, Err(e));
        }
    }
    (writer, Ok(()))
}
