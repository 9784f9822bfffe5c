//! Downloading one bulk file into a part file: streamed (memory stays flat whatever the size), gzip decoded
//! on the fly by the HTTP client, every line checked as JSON whose `resourceType` is the expected one, and
//! counted and hashed on the way. A dropped connection restarts the file cleanly, or resumes it with
//! `Range` when the server sent an uncompressed body that it says it can serve in ranges.

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use futures::StreamExt;
use reqwest::StatusCode;

use super::manifest::Download;
use crate::fhir::FhirClient;
use crate::fhir::bundle::{ResourceHead, json_error_kind};
use crate::output::Part;

/// The longest NDJSON line accepted (one resource).
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// A part file being written.
struct PartWriter {
    out: BufWriter<File>,
    count: u64,
    bytes: u64,
    sha: aws_lc_rs::digest::Context,
}

impl PartWriter {
    fn create(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        Ok(PartWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            count: 0,
            bytes: 0,
            sha: new_sha(),
        })
    }

    /// Starts the file over (after a dropped connection without range support).
    fn reset(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        let file = self.out.get_mut();
        file.set_len(0)?;
        file.rewind()?;
        self.count = 0;
        self.bytes = 0;
        self.sha = new_sha();
        Ok(())
    }

    fn line(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.out.write_all(line)?;
        self.out.write_all(b"\n")?;
        self.sha.update(line);
        self.sha.update(b"\n");
        self.count += 1;
        self.bytes += line.len() as u64 + 1;
        Ok(())
    }

    fn finish(self, path: &Path) -> std::io::Result<Part> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let sha256 = self
            .sha
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Part {
            path: path.to_owned(),
            count: self.count,
            bytes: self.bytes,
            sha256,
        })
    }
}

fn new_sha() -> aws_lc_rs::digest::Context {
    aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256)
}

/// How a download ended.
pub struct Downloaded {
    pub part: Part,
    /// The body's byte count as received (after gzip decoding).
    pub received: u64,
}

/// Why a file failed; the message names the file's type and what went wrong (no content).
#[derive(Debug)]
pub struct DownloadError {
    pub message: String,
    pub fatal: bool,
}

/// Downloads `d` into `part_path`, retrying dropped connections up to the client's attempts.
pub async fn download(
    client: &FhirClient,
    d: &Download,
    part_path: &Path,
) -> Result<Downloaded, DownloadError> {
    let io = |e: std::io::Error| DownloadError {
        message: format!("writing {}: {e}", part_path.display()),
        fatal: true,
    };
    let line_type = d.kind.line_type(&d.file.resource_type).to_owned();
    let mut out = PartWriter::create(part_path).map_err(io)?;
    let max_attempts = client.retry_policy().max_attempts;
    let mut attempt = 0u32;
    // Where the next request starts in the server's byte stream, when resuming with Range.
    let mut resume_from: Option<u64> = None;
    let mut received_total = 0u64;
    loop {
        attempt += 1;
        let resp = client
            .open_download(&d.file.url, &d.token_origins, resume_from)
            .await
            .map_err(|e| DownloadError {
                message: e.to_string(),
                fatal: e.is_fatal(),
            })?;
        let start = match (resume_from, content_range_start(&resp)) {
            (Some(from), Some(start))
                if resp.status() == StatusCode::PARTIAL_CONTENT && start == from =>
            {
                from
            }
            (Some(_), _) => {
                // The server sent the whole file again: start over.
                out.reset().map_err(io)?;
                0
            }
            (None, _) => 0,
        };
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
        let mut stream = resp.bytes_stream();
        let mut carry: Vec<u8> = Vec::new();
        // Bytes of this response up to the end of the last complete line written.
        let mut complete = 0u64;
        let mut line_no = out.count;
        let failure = loop {
            match stream.next().await {
                None => break None,
                Some(Err(e)) => break Some(crate::fhir::describe_transport(&e)),
                Some(Ok(chunk)) => {
                    received_total += chunk.len() as u64;
                    carry.extend_from_slice(&chunk);
                    let Some(last_nl) = carry.iter().rposition(|&b| b == b'\n') else {
                        if carry.len() > MAX_LINE_BYTES {
                            return Err(DownloadError {
                                message: format!("a line is longer than {MAX_LINE_BYTES} bytes"),
                                fatal: false,
                            });
                        }
                        continue;
                    };
                    for line in carry[..last_nl].split(|&b| b == b'\n') {
                        line_no += 1;
                        write_checked(&mut out, line, &line_type, line_no)?;
                    }
                    complete += last_nl as u64 + 1;
                    carry.drain(..=last_nl);
                }
            }
        };
        match failure {
            None => {
                if !carry.is_empty() {
                    // A last line without its newline.
                    write_checked(&mut out, &carry, &line_type, line_no + 1)?;
                }
                let part = out.finish(part_path).map_err(io)?;
                return Ok(Downloaded {
                    part,
                    received: received_total,
                });
            }
            Some(why) if attempt < max_attempts => {
                if rangeable {
                    resume_from = Some(start + complete);
                } else {
                    resume_from = None;
                    out.reset().map_err(io)?;
                }
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
                    message: format!("{why} (after {attempt} attempts)"),
                    fatal: false,
                });
            }
        }
    }
}

/// Checks one NDJSON line and writes it. Blank lines are skipped.
fn write_checked(
    out: &mut PartWriter,
    line: &[u8],
    line_type: &str,
    line_no: u64,
) -> Result<(), DownloadError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let bad = |what: String| DownloadError {
        message: format!("line {line_no}: {what}"),
        fatal: false,
    };
    let head: ResourceHead<'_> = serde_json::from_slice(line).map_err(|e| {
        bad(format!(
            "not a FHIR resource in JSON ({})",
            json_error_kind(&e)
        ))
    })?;
    if head.resource_type != line_type {
        return Err(bad(format!(
            "resourceType is {}, expected {line_type}",
            head.resource_type
        )));
    }
    out.line(line).map_err(|e| DownloadError {
        message: format!("writing the download: {e}"),
        fatal: true,
    })
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
