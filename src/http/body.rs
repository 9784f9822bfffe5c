//! Reading response bodies with a bound: nothing a server sends is read into memory without a cap.
//!
//! Each kind of answer has its own limit: token, discovery and JWK Set answers are small documents, a
//! search page or a single resource can be large, a Bulk Data manifest lists files. Error bodies are
//! only ever read as a short prefix (what is needed to find an OperationOutcome or an OAuth error), so
//! a server answering every request with a huge error costs at most that prefix per request in flight.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;

/// Token, smart-configuration, CapabilityStatement and JWK Set answers.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// One search page or one resource read (the longest NDJSON line of a bulk file has the same bound).
pub const MAX_PAGE_BYTES: usize = 64 * 1024 * 1024;
/// A Bulk Data completion manifest (about 80,000 file entries).
pub const MAX_MANIFEST_BYTES: usize = 16 * 1024 * 1024;
/// The prefix of an error answer that is read (the rest is discarded unread).
pub const ERROR_PREFIX_BYTES: usize = 64 * 1024;

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the response is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("{0}")]
    Transport(String),
}

/// Reads the whole body if it is at most `limit` bytes; a larger one (announced or actual) is an
/// error, found without reading more than `limit` bytes.
pub async fn read_limited(resp: reqwest::Response, limit: usize) -> Result<Bytes, BodyError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let hint = resp.content_length().unwrap_or(16 * 1024).min(8 << 20) as usize;
    let mut buf = BytesMut::with_capacity(hint.min(limit));
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::Transport(crate::http::describe_transport(&e)))?;
        if buf.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Reads at most the first `limit` bytes of an (error) body and drops the connection's rest. A body
/// cut short by the network gives what arrived.
pub async fn read_prefix(resp: reqwest::Response, limit: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(limit.min(16 * 1024));
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = limit - buf.len();
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= limit {
            break;
        }
    }
    buf.freeze()
}

/// What kind of JSON error this is, in a few words (never quoting the content).
pub fn json_error_kind(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "invalid JSON",
        serde_json::error::Category::Data => "unexpected structure",
        serde_json::error::Category::Eof => "truncated JSON",
    }
}
