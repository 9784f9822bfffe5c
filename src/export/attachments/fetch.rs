//! Downloading one document into the store: the token only where the plan allows it, `Accept` set
//! to the attachment's content type, raw content streamed to disk (hashed on the way, cut off at
//! `maxBytes`), and a FHIR `Binary` resource decoded when that is what the server sends instead.

use std::collections::BTreeMap;

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::store::{Store, Stored};
use crate::fhir::{FetchError, FhirClient};
use crate::http::body::{self, BodyError};

/// Why a document was not stored.
#[derive(Debug, thiserror::Error)]
pub enum FetchFailure {
    #[error("{0}")]
    Fetch(FetchError),
    #[error("the document is larger than attachments.maxBytes ({max} bytes; 48 MiB when the server sends it as a FHIR Binary resource){}", size.map(|s| format!(": {s} bytes")).unwrap_or_default())]
    TooLarge { max: u64, size: Option<u64> },
    #[error("the server answered with a FHIR resource that is not a Binary with data")]
    NotBinary,
    #[error("writing the document failed: {}: {source}", path.display())]
    Disk {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl FetchFailure {
    pub fn status(&self) -> Option<u16> {
        match self {
            FetchFailure::Fetch(e) => e.status(),
            _ => None,
        }
    }

    /// The failure for the run log: without the server's free text or local paths.
    fn brief(&self) -> String {
        match self {
            FetchFailure::Fetch(e) => e.brief(),
            FetchFailure::Disk { source, .. } => format!("writing the document failed: {source}"),
            other => other.to_string(),
        }
    }
}

/// A document that was not stored: why, and the server's correlation headers of the answer that
/// failed (to cite to its support).
#[derive(Debug)]
pub struct Failed {
    pub why: FetchFailure,
    pub correlation: BTreeMap<String, String>,
}

impl From<FetchFailure> for Failed {
    fn from(why: FetchFailure) -> Self {
        let correlation = match &why {
            FetchFailure::Fetch(e) => e.correlation(),
            _ => BTreeMap::new(),
        };
        Failed { why, correlation }
    }
}

fn disk(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> FetchFailure + '_ {
    move |source| FetchFailure::Disk {
        path: path.to_owned(),
        source,
    }
}

/// One download: where, whether the token goes along, and what to ask for.
pub struct Request<'a> {
    pub url: &'a str,
    /// The origins the token may go to for this URL (empty: never).
    pub token_origins: &'a [String],
    /// The attachment's content type, if it gives one.
    pub content_type: Option<&'a str>,
    pub max_bytes: u64,
}

fn bare(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Whether `t` is a bare `type/subtype` that can go into an `Accept` header as it is.
fn is_media_type(t: &str) -> bool {
    let token = |x: &str| {
        !x.is_empty()
            && x.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    t.split_once('/').is_some_and(|(a, b)| token(a) && token(b))
}

/// The largest document read from a FHIR `Binary` resource: its base64 text is read whole, so a server
/// that sends big documents that way (instead of raw, as `Accept` asks) is refused beyond this.
pub const MAX_BINARY_RESOURCE_BYTES: u64 = 48 * 1024 * 1024;

fn is_json(content_type: &str) -> bool {
    matches!(
        bare(content_type).as_str(),
        "application/fhir+json" | "application/json" | "application/json+fhir"
    )
}

/// The file extension for a content type.
pub fn extension(content_type: &str) -> &'static str {
    match bare(content_type).as_str() {
        "text/html" => "html",
        "text/rtf" | "application/rtf" => "rtf",
        "text/plain" => "txt",
        "application/pdf" => "pdf",
        "image/jpeg" => "jpg",
        "image/png" => "png",
        "image/tiff" => "tif",
        "image/gif" => "gif",
        "application/xml" | "text/xml" => "xml",
        "application/json" | "application/fhir+json" => "json",
        "application/dicom" => "dcm",
        _ => "bin",
    }
}

/// The running digests and size of a document being stored.
struct Digests {
    sha256: digest::Context,
    sha1: digest::Context,
    size: u64,
}

impl Digests {
    fn new() -> Self {
        Digests {
            sha256: digest::Context::new(&digest::SHA256),
            sha1: digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY),
            size: 0,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        self.sha256.update(bytes);
        self.sha1.update(bytes);
        self.size += bytes.len() as u64;
    }

    fn finish(self, content_type: String) -> Stored {
        let sha256 = crate::text::hex(self.sha256.finish().as_ref());
        Stored {
            file: format!("{sha256}.{}", extension(&content_type)),
            content_type,
            size: self.size,
            sha256,
            sha1: BASE64.encode(self.sha1.finish().as_ref()),
        }
    }
}

/// Downloads `req` into `store`. A body cut short by the network is fetched again (up to the
/// client's attempts); everything else that goes wrong is returned.
pub async fn download(
    client: &FhirClient,
    store: &Store,
    req: &Request<'_>,
) -> Result<Stored, Failed> {
    let attempts = client.retry_policy().max_attempts;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let temp = store.temp_path();
        let result = download_once(client, store, req, &temp, attempt < attempts).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        match result {
            Err(Failed {
                why: FetchFailure::Fetch(FetchError::Transport(why)),
                ..
            }) if attempt < attempts => {
                client.pause(attempt, None, &why).await;
            }
            other => return other,
        }
    }
}

async fn download_once(
    client: &FhirClient,
    store: &Store,
    req: &Request<'_>,
    temp: &std::path::Path,
    retry_cut_body: bool,
) -> Result<Stored, Failed> {
    if !req.token_origins.is_empty() {
        client.pace().await;
    }
    let accept = req
        .content_type
        .map(bare)
        .filter(|t| is_media_type(t))
        .unwrap_or_else(|| "*/*".into());
    let (resp, logged) = client
        .open_download(
            crate::fhir::runlog::EventKind::Attachment,
            req.url,
            req.token_origins,
            &accept,
            None,
        )
        .await
        .map_err(FetchFailure::Fetch)?;
    let mut read = 0;
    let result = store_body(resp, store, req, temp, &mut read).await;
    let correlation = logged.correlation();
    match &result {
        Ok(_) => logged.finish(read, None),
        Err(e @ FetchFailure::Fetch(FetchError::Transport(_))) if retry_cut_body => {
            logged.finish_retried(read, e.brief())
        }
        Err(e) => logged.finish(read, Some(e.brief())),
    }
    result.map_err(|why| Failed { why, correlation })
}

/// Stores the body of `resp` (raw, or the `data` of a FHIR Binary) under `temp`, then in `store`;
/// counts the body bytes read in `read`.
async fn store_body(
    resp: reqwest::Response,
    store: &Store,
    req: &Request<'_>,
    temp: &std::path::Path,
    read: &mut u64,
) -> Result<Stored, FetchFailure> {
    if let Some(n) = resp.content_length().filter(|n| *n > req.max_bytes) {
        return Err(FetchFailure::TooLarge {
            max: req.max_bytes,
            size: Some(n),
        });
    }
    let served = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(bare);
    let wanted_json = req.content_type.is_some_and(is_json);
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temp)
        .await
        .map_err(disk(temp))?;
    let mut digests = Digests::new();
    if served.as_deref().is_some_and(is_json) && !wanted_json {
        // A FHIR Binary: its base64 `data` is the document. Base64 is 4/3 of the content.
        let max = req.max_bytes.min(MAX_BINARY_RESOURCE_BYTES);
        let limit = max * 4 / 3 + 64 * 1024;
        let text = body::read_limited(resp, limit as usize)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge { .. } => FetchFailure::TooLarge { max, size: None },
                BodyError::Transport(t) => FetchFailure::Fetch(FetchError::Transport(t)),
            })?;
        *read = text.len() as u64;
        let (content_type, bytes) = decode_binary(&text)?;
        drop(text);
        if bytes.len() as u64 > max {
            return Err(FetchFailure::TooLarge {
                max,
                size: Some(bytes.len() as u64),
            });
        }
        digests.update(&bytes);
        file.write_all(&bytes).await.map_err(disk(temp))?;
        let content_type = req
            .content_type
            .map(bare)
            .or(content_type.map(|c| bare(&c)))
            .unwrap_or_else(|| "application/octet-stream".into());
        return finish(file, digests, content_type, store, temp).await;
    }
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            FetchFailure::Fetch(FetchError::Transport(crate::http::describe_transport(&e)))
        })?;
        *read += chunk.len() as u64;
        if digests.size + chunk.len() as u64 > req.max_bytes {
            return Err(FetchFailure::TooLarge {
                max: req.max_bytes,
                size: None,
            });
        }
        digests.update(&chunk);
        file.write_all(&chunk).await.map_err(disk(temp))?;
    }
    let content_type = req
        .content_type
        .map(bare)
        .or(served)
        .unwrap_or_else(|| "application/octet-stream".into());
    finish(file, digests, content_type, store, temp).await
}

async fn finish(
    mut file: tokio::fs::File,
    digests: Digests,
    content_type: String,
    store: &Store,
    temp: &std::path::Path,
) -> Result<Stored, FetchFailure> {
    file.flush().await.map_err(disk(temp))?;
    file.sync_all().await.map_err(disk(temp))?;
    drop(file);
    let stored = digests.finish(content_type);
    store.commit(temp, &stored).map_err(disk(temp))?;
    Ok(stored)
}

/// The content type and decoded `data` of a FHIR Binary resource.
fn decode_binary(text: &[u8]) -> Result<(Option<String>, Vec<u8>), FetchFailure> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Binary {
        resource_type: String,
        content_type: Option<String>,
        data: Option<String>,
    }
    let b: Binary = serde_json::from_slice(text).map_err(|_| FetchFailure::NotBinary)?;
    if b.resource_type != "Binary" {
        return Err(FetchFailure::NotBinary);
    }
    let data = b.data.ok_or(FetchFailure::NotBinary)?;
    let bytes = BASE64
        .decode(data.trim())
        .map_err(|_| FetchFailure::NotBinary)?;
    Ok((b.content_type, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_and_binary_decoding() {
        assert_eq!(extension("text/html; charset=utf-8"), "html");
        assert_eq!(extension("TEXT/RTF"), "rtf");
        assert_eq!(extension("application/x-unknown"), "bin");
        assert!(is_media_type("application/fhir+json"));
        assert!(!is_media_type("text/html\r\nX-Evil: 1"));
        assert!(!is_media_type("text"));
        let (ct, bytes) = decode_binary(
            br#"{"resourceType":"Binary","contentType":"text/plain","data":"aGVsbG8="}"#,
        )
        .unwrap();
        assert_eq!(
            (ct.as_deref(), bytes.as_slice()),
            (Some("text/plain"), &b"hello"[..])
        );
        for bad in [
            &br#"{"resourceType":"Patient","data":"aGVsbG8="}"#[..],
            br#"{"resourceType":"Binary"}"#,
            br#"{"resourceType":"Binary","data":"@@@"}"#,
            b"<html>",
        ] {
            assert!(matches!(decode_binary(bad), Err(FetchFailure::NotBinary)));
        }
    }

    #[test]
    fn digests_name_the_file_by_content() {
        let mut d = Digests::new();
        d.update(b"hello");
        let s = d.finish("text/plain".into());
        assert_eq!(
            s.file,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824.txt"
        );
        // FHIR's Attachment.hash: base64 of the SHA-1.
        assert_eq!(s.sha1, "qvTGHdzF6KLavt4PO0gs2a6pQ00=");
        assert_eq!(s.size, 5);
    }
}
