//! One object written as the data arrives: appended bytes are (optionally gzip-compressed and)
//! handed to a multipart upload in parts of `part_size`, with at most `concurrency` parts in flight,
//! so memory stays near `part_size × concurrency` whatever the object's size. The SHA-256 and the
//! size of what was appended are kept for the manifest. An object whose upload fails or is dropped
//! half-way is aborted: it never becomes visible.

use std::io::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use object_store::ObjectStore;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use tokio::io::AsyncWriteExt;

/// The smallest part S3 accepts (but the last).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

/// Why an upload failed.
#[derive(Debug, thiserror::Error)]
#[error("uploading {path}: {message}")]
pub struct UploadError {
    pub path: String,
    pub message: String,
}

/// What a finished object holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uploaded {
    pub path: ObjectPath,
    /// Lines appended (as counted by the caller).
    pub count: u64,
    /// Bytes appended (before compression).
    pub bytes: u64,
    /// Bytes stored (after compression).
    pub stored_bytes: u64,
    /// SHA-256 of what was appended (before compression), lowercase hex.
    pub sha256: String,
}

pub struct ObjectFile {
    path: ObjectPath,
    out: BufWriter,
    gzip: Option<GzEncoder<Vec<u8>>>,
    sha: aws_lc_rs::digest::Context,
    count: u64,
    bytes: u64,
    stored: u64,
}

impl ObjectFile {
    /// Starts `path` in `store`. `part_size` is raised to `MIN_PART_SIZE`.
    pub fn create(
        store: Arc<dyn ObjectStore>,
        path: ObjectPath,
        part_size: usize,
        concurrency: usize,
        gzip: bool,
    ) -> ObjectFile {
        let out = BufWriter::with_capacity(store, path.clone(), part_size.max(MIN_PART_SIZE))
            .with_max_concurrency(concurrency.max(1));
        ObjectFile {
            path,
            out,
            gzip: gzip.then(|| GzEncoder::new(Vec::new(), Compression::default())),
            sha: aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
            count: 0,
            bytes: 0,
            stored: 0,
        }
    }

    fn error(&self, message: String) -> UploadError {
        UploadError {
            path: self.path.to_string(),
            message,
        }
    }

    /// Appends `bytes` holding `count` lines.
    pub async fn append(&mut self, bytes: &[u8], count: u64) -> Result<(), UploadError> {
        self.sha.update(bytes);
        self.bytes += bytes.len() as u64;
        self.count += count;
        let chunk = match &mut self.gzip {
            Some(gz) => {
                gz.write_all(bytes).map_err(|e| UploadError {
                    path: self.path.to_string(),
                    message: e.to_string(),
                })?;
                // Hand over what the encoder has produced so far.
                std::mem::take(gz.get_mut())
            }
            None => bytes.to_vec(),
        };
        self.put(chunk).await
    }

    async fn put(&mut self, chunk: Vec<u8>) -> Result<(), UploadError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.stored += chunk.len() as u64;
        let result = self.out.put(Bytes::from(chunk)).await;
        result.map_err(|e| self.error(super::describe(&e)))
    }

    /// Completes the upload: the object becomes visible, whole.
    pub async fn finish(mut self) -> Result<Uploaded, UploadError> {
        if let Some(gz) = self.gzip.take() {
            let rest = gz.finish().map_err(|e| self.error(e.to_string()))?;
            self.put(rest).await?;
        }
        if let Err(e) = self.out.shutdown().await {
            let _ = self.out.abort().await;
            return Err(self.error(e.to_string()));
        }
        Ok(Uploaded {
            path: self.path,
            count: self.count,
            bytes: self.bytes,
            stored_bytes: self.stored,
            sha256: crate::text::hex(self.sha.finish().as_ref()),
        })
    }

    /// Gives the upload up: nothing becomes visible (the store drops the parts).
    pub async fn abort(mut self) {
        if let Err(e) = self.out.abort().await {
            tracing::warn!("aborting the upload of {}: {e}", self.path);
        }
    }
}
