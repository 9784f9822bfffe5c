//! Downloading one bulk file: streamed (memory stays flat whatever the size), gzip decoded on the fly by
//! the HTTP client, every line checked as one JSON object whose `resourceType` is the expected one
//! (`fhir::ndjson`), and handed to the writer task in batches of complete lines (files of one type are
//! joined there, in whatever order their lines arrive).
//!
//! A dropped connection resumes with `Range` when the server sent an uncompressed body it can serve in
//! ranges; otherwise the file is fetched again and the lines already written are skipped after checking
//! that they are the same (their 128-bit XXH3 hash must match: this guards against a server that changed
//! the file, not an attacker, and costs a tenth of SHA-256, which took a fifth of the download's CPU), so
//! nothing is written twice or lost.

use std::collections::BTreeMap;

use futures::StreamExt;
use reqwest::StatusCode;
use tokio::sync::mpsc;
use xxhash_rust::xxh3::Xxh3;

use super::manifest::{Download, Kind};
use crate::export::writer::WriterMsg;
use crate::fhir::FhirClient;

/// The longest NDJSON line accepted (one resource).
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;
/// Lines are handed to the writer in batches of about this size.
const BATCH_BYTES: usize = 256 * 1024;

/// Why a file failed; the message names what went wrong (never content, never the server's free
/// text, which only `detail` carries, for the run folder).
#[derive(Debug)]
pub struct DownloadError {
    pub message: String,
    /// With the server's own words where there are any (for `errors/failed-requests.ndjson`).
    pub detail: String,
    /// The run cannot go on (authentication, the writer stopped).
    pub fatal: bool,
    /// The server's correlation headers of the answer that failed, to cite to its support.
    pub correlation: BTreeMap<String, String>,
}

impl DownloadError {
    fn file(message: String) -> Self {
        DownloadError {
            detail: message.clone(),
            message,
            fatal: false,
            correlation: BTreeMap::new(),
        }
    }
}

/// The lines of one file taken so far and their hash (to recognise them when the file is fetched
/// again), and how many of a refetched file's lines are still to be skipped.
struct Lines {
    line_type: String,
    taken: u64,
    hash: Xxh3,
    skip: u64,
    skipped: Xxh3,
}

impl Lines {
    /// Starts a response: after a refetch from the start, the lines already taken are skipped.
    fn restart(&mut self, from_start: bool) {
        self.skip = if from_start { self.taken } else { 0 };
        self.skipped = Xxh3::new();
    }

    fn line(&mut self, line: &[u8], batch: &mut Batch<'_>) -> Result<(), DownloadError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        if self.skip > 0 {
            check_line(line, &self.line_type, self.taken - self.skip + 1)?;
            self.skipped.update(line);
            self.skipped.update(b"\n");
            self.skip -= 1;
            if self.skip == 0 && self.skipped.digest128() != self.hash.digest128() {
                return Err(DownloadError::file(
                    "the server sent different content when the file was fetched again".into(),
                ));
            }
            return Ok(());
        }
        check_line(line, &self.line_type, self.taken + 1)?;
        self.hash.update(line);
        self.hash.update(b"\n");
        self.taken += 1;
        batch.lines.extend_from_slice(line);
        batch.lines.push(b'\n');
        batch.count += 1;
        Ok(())
    }
}

/// Lines being collected for the writer.
struct Batch<'a> {
    d: &'a Download,
    tx: &'a mpsc::Sender<WriterMsg>,
    lines: Vec<u8>,
    count: u64,
}

impl Batch<'_> {
    async fn flush(&mut self) -> Result<(), DownloadError> {
        if self.count == 0 {
            return Ok(());
        }
        let lines = std::mem::replace(&mut self.lines, Vec::with_capacity(BATCH_BYTES + 64 * 1024));
        let count = std::mem::take(&mut self.count);
        let resource_type = self.d.file.resource_type.clone();
        let msg = match self.d.kind {
            Kind::Output => WriterMsg::Resources {
                resource_type,
                lines,
                count,
            },
            Kind::Error => WriterMsg::Outcomes { lines, count },
            Kind::Deleted => WriterMsg::Deleted {
                resource_type,
                lines,
                count,
            },
        };
        self.tx.send(msg).await.map_err(|_| DownloadError {
            fatal: true,
            ..DownloadError::file("the output writer stopped".into())
        })
    }
}

/// Downloads `d`, sending its lines to the writer. Returns the number of lines (records) in the file and
/// the bytes received after decoding.
pub async fn download(
    client: &FhirClient,
    d: &Download,
    tx: &mpsc::Sender<WriterMsg>,
) -> Result<(u64, u64), DownloadError> {
    let max_attempts = client.retry_policy().max_attempts;
    let mut lines = Lines {
        line_type: d.kind.line_type(&d.file.resource_type).to_owned(),
        taken: 0,
        hash: Xxh3::new(),
        skip: 0,
        skipped: Xxh3::new(),
    };
    let mut batch = Batch {
        d,
        tx,
        lines: Vec::with_capacity(BATCH_BYTES + 64 * 1024),
        count: 0,
    };
    let mut attempt = 0u32;
    // Where the next request starts in the server's byte stream, when resuming with Range.
    let mut resume_from: Option<u64> = None;
    let mut received = 0u64;
    loop {
        attempt += 1;
        let (resp, logged) = client
            .open_download(
                crate::fhir::runlog::EventKind::Download,
                &d.file.url,
                &d.token_origins,
                "application/fhir+ndjson",
                resume_from,
            )
            .await
            .map_err(|e| DownloadError {
                message: e.brief(),
                detail: e.to_string(),
                fatal: e.is_fatal(),
                correlation: e.correlation(),
            })?;
        let resumed_at = match resume_from {
            Some(from)
                if resp.status() == StatusCode::PARTIAL_CONTENT
                    && content_range_start(&resp) == Some(from) =>
            {
                Some(from)
            }
            _ => None,
        };
        lines.restart(resumed_at.is_none());
        let start = resumed_at.unwrap_or(0);
        // Resuming by byte offset is only sound on an uncompressed body of known length.
        let rangeable = resp
            .headers()
            .get(reqwest::header::ACCEPT_RANGES)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"bytes"))
            && resp.content_length().is_some()
            && resp
                .headers()
                .get(reqwest::header::CONTENT_ENCODING)
                .is_none();
        // Bytes of this response, and of them up to the end of the last complete line handled.
        let mut body = 0u64;
        let mut complete = 0u64;
        let read = read_body(resp, &mut lines, &mut batch, &mut body, &mut complete).await;
        received += body;
        let correlation = logged.correlation();
        match &read {
            Ok(None) => logged.finish(body, None),
            Ok(Some(why)) if attempt < max_attempts => logged.finish_retried(body, why.clone()),
            Ok(Some(why)) => logged.finish(body, Some(why.clone())),
            Err(e) => logged.finish(body, Some(e.message.clone())),
        }
        let failure = match read {
            Ok(failure) => failure,
            Err(e) => return Err(DownloadError { correlation, ..e }),
        };
        match failure {
            None => return Ok((lines.taken, received)),
            Some(why) if attempt < max_attempts => {
                batch.flush().await?;
                // Resume by offset only if this response got past the lines being skipped.
                resume_from = (rangeable && lines.skip == 0).then_some(start + complete);
                tracing::warn!(
                    resource_type = %d.file.resource_type,
                    attempt,
                    resume = resume_from.is_some(),
                    "a download was cut short ({why}); retrying"
                );
                client.pause(attempt, None, &why).await;
            }
            Some(why) => {
                return Err(DownloadError {
                    correlation,
                    ..DownloadError::file(format!("{why} (after {attempt} attempts)"))
                });
            }
        }
    }
}

/// Reads one response's body into `lines` and `batch`, counting its bytes in `body` and, of them, those
/// up to the end of the last complete line in `complete`. `Ok(Some(why))` when the connection broke
/// (worth another request); `Ok(None)` when the whole file has been read and handed on.
async fn read_body(
    resp: reqwest::Response,
    lines: &mut Lines,
    batch: &mut Batch<'_>,
    body: &mut u64,
    complete: &mut u64,
) -> Result<Option<String>, DownloadError> {
    let mut stream = resp.bytes_stream();
    let mut carry: Vec<u8> = Vec::new();
    loop {
        match stream.next().await {
            None => break,
            Some(Err(e)) => return Ok(Some(crate::http::describe_transport(&e))),
            Some(Ok(chunk)) => {
                *body += chunk.len() as u64;
                // Complete lines straight from the chunk; only a line split across chunks is copied.
                let Some(last_nl) = memchr::memrchr(b'\n', &chunk) else {
                    carry.extend_from_slice(&chunk);
                    if carry.len() > MAX_LINE_BYTES {
                        return Err(DownloadError::file(format!(
                            "a line is longer than {MAX_LINE_BYTES} bytes"
                        )));
                    }
                    continue;
                };
                let (head, tail) = chunk.split_at(last_nl + 1);
                let mut start = 0;
                for nl in memchr::memchr_iter(b'\n', head) {
                    let line = &head[start..nl];
                    start = nl + 1;
                    if carry.is_empty() {
                        lines.line(line, batch)?;
                    } else {
                        carry.extend_from_slice(line);
                        lines.line(&carry, batch)?;
                        carry.clear();
                    }
                }
                carry.extend_from_slice(tail);
                *complete = *body - carry.len() as u64;
                if batch.lines.len() >= BATCH_BYTES {
                    batch.flush().await?;
                }
            }
        }
    }
    if !carry.is_empty() {
        // A last line without its newline.
        lines.line(&carry, batch)?;
    }
    if lines.skip > 0 {
        return Err(DownloadError::file(
            "the server sent fewer lines when the file was fetched again".into(),
        ));
    }
    batch.flush().await?;
    Ok(None)
}

/// Checks that one NDJSON line is a JSON resource of the expected type.
fn check_line(line: &[u8], line_type: &str, line_no: u64) -> Result<(), DownloadError> {
    let head = crate::fhir::ndjson::check_line(line).map_err(|e| {
        DownloadError::file(format!("line {line_no}: not a FHIR resource in JSON ({e})"))
    })?;
    if head.resource_type != line_type {
        return Err(DownloadError::file(format!(
            "line {line_no}: resourceType is {}, expected {line_type}",
            crate::trust::describe_type(&head.resource_type)
        )));
    }
    Ok(())
}

/// The first byte position of a `Content-Range: bytes N-M/T` answer.
fn content_range_start(resp: &reqwest::Response) -> Option<u64> {
    let v = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    v.strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}
