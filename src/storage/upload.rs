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
        // A failed completion leaves nothing visible (the writer cannot be aborted once shut down).
        if let Err(e) = self.out.shutdown().await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;
    use std::io::Read as _;

    fn lines(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            out.extend_from_slice(
                format!("{{\"resourceType\":\"Observation\",\"id\":\"o{i}\",\"valueQuantity\":{{\"value\":{i}.50}}}}\n").as_bytes(),
            );
        }
        out
    }

    async fn read(store: &Arc<dyn ObjectStore>, path: &ObjectPath) -> Option<Vec<u8>> {
        let got = store.get(path).await.ok()?;
        Some(got.bytes().await.unwrap().to_vec())
    }

    #[tokio::test]
    async fn a_large_object_goes_up_in_parts_and_comes_back_whole() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let path = ObjectPath::from("exports/nightly/run/Observation.ndjson");
        let data = lines(200_000); // about 14 MiB: three parts of 5 MiB
        let mut f = ObjectFile::create(store.clone(), path.clone(), MIN_PART_SIZE, 2, false);
        for chunk in data.chunks(256 * 1024) {
            f.append(chunk, 0).await.unwrap();
        }
        assert!(
            read(&store, &path).await.is_none(),
            "not visible before it is finished"
        );
        let done = f.finish().await.unwrap();
        assert!(data.len() > 2 * MIN_PART_SIZE);
        assert_eq!(read(&store, &path).await.unwrap(), data);
        assert_eq!(done.bytes, data.len() as u64);
        assert_eq!(done.stored_bytes, data.len() as u64);
        let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &data);
        assert_eq!(done.sha256, crate::text::hex(sha.as_ref()));
    }

    #[tokio::test]
    async fn gzip_stores_less_and_hashes_what_was_appended() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let path = ObjectPath::from("run/Observation.ndjson.gz");
        let data = lines(50_000);
        let mut f = ObjectFile::create(store.clone(), path.clone(), MIN_PART_SIZE, 2, true);
        for chunk in data.chunks(100_000) {
            f.append(chunk, 1).await.unwrap();
        }
        let done = f.finish().await.unwrap();
        let stored = read(&store, &path).await.unwrap();
        assert_eq!(done.stored_bytes, stored.len() as u64);
        assert!(
            stored.len() < data.len() / 4,
            "{} of {}",
            stored.len(),
            data.len()
        );
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(stored.as_slice())
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, data);
        let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &data);
        assert_eq!(done.sha256, crate::text::hex(sha.as_ref()));
        assert_eq!(done.count, data.chunks(100_000).count() as u64);
    }

    #[tokio::test]
    async fn an_aborted_or_dropped_upload_leaves_nothing() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let data = lines(120_000);
        for abort in [true, false] {
            let path = ObjectPath::from(format!("run/{abort}.ndjson"));
            let mut f = ObjectFile::create(store.clone(), path.clone(), MIN_PART_SIZE, 2, false);
            f.append(&data, 0).await.unwrap();
            if abort {
                f.abort().await;
            } else {
                drop(f);
            }
            assert!(read(&store, &path).await.is_none());
        }
    }
}
