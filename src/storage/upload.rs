//! Objects written as the data arrives, from a blocking thread (the run's writer). Appended bytes are
//! (optionally gzip-compressed and) spooled to a scratch file of at most about one part; each full part
//! is read back and handed to a multipart upload. Parts in flight are bounded across every object of
//! the [`Uploader`], and a part is read into memory only once it may go, so memory stays near
//! `part_size × concurrency` however many objects are open and however large they grow; scratch space
//! is at most one part per open object. Small objects go up in one request. The SHA-256 and the size
//! of what was appended are kept for the manifest. An object whose upload fails or is given up never
//! becomes visible. Requests are retried with backoff by the store client (`object_store`'s retry
//! policy: 5xx answers, timeouts and broken connections, with exponential backoff up to 10 times).

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::Compression;
use flate2::write::GzEncoder;
use object_store::path::Path as ObjectPath;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// The smallest part S3 and Cloud Storage accept (but the last).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// `output.partSize` when not set.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;

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

/// The store of one run, with the scratch folder and the bound on parts in flight that its objects
/// share.
pub struct Uploader {
    store: Arc<dyn ObjectStore>,
    handle: Handle,
    part_size: usize,
    in_flight: Arc<Semaphore>,
    scratch: PathBuf,
    next_spool: AtomicU64,
}

impl Uploader {
    /// `part_size` is raised to [`MIN_PART_SIZE`]; `scratch` must exist (spool files are made there).
    /// `handle` is the runtime the uploads run on; the methods block, so they are called from a
    /// blocking thread, never from an async task.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        handle: Handle,
        part_size: usize,
        concurrency: usize,
        scratch: PathBuf,
    ) -> Arc<Uploader> {
        let concurrency = concurrency.max(1);
        Arc::new(Uploader {
            store,
            handle,
            part_size: part_size.max(MIN_PART_SIZE),
            in_flight: Arc::new(Semaphore::new(concurrency)),
            scratch,
            next_spool: AtomicU64::new(0),
        })
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The runtime the uploads run on.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Starts the object `path`; nothing is visible until [`ObjectFile::finish`].
    pub fn create(
        self: &Arc<Self>,
        path: ObjectPath,
        gzip: bool,
    ) -> Result<ObjectFile, UploadError> {
        let n = self.next_spool.fetch_add(1, Ordering::Relaxed);
        let spool_path = self.scratch.join(format!(".spool-{n}"));
        use std::os::unix::fs::OpenOptionsExt;
        let spool = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&spool_path)
            .map_err(|e| UploadError {
                path: path.to_string(),
                message: format!(
                    "cannot create the scratch file {}: {e}",
                    spool_path.display()
                ),
            })?;
        Ok(ObjectFile {
            uploader: self.clone(),
            path,
            spool,
            spool_path,
            spooled: 0,
            upload: None,
            parts: Vec::new(),
            gzip: gzip.then(|| GzEncoder::new(Vec::new(), Compression::default())),
            sha: aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
            count: 0,
            bytes: 0,
            stored: 0,
        })
    }

    /// Uploads the local file `local` as `path`, streamed like any object.
    pub fn put_file(
        self: &Arc<Self>,
        local: &Path,
        path: ObjectPath,
    ) -> Result<Uploaded, UploadError> {
        let mut f = self.create(path, false)?;
        let mut file =
            File::open(local).map_err(|e| f.error(format!("{}: {e}", local.display())))?;
        let mut chunk = vec![0; 1024 * 1024];
        loop {
            match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => f.append(&chunk[..n], 0)?,
                Err(e) => {
                    let message = format!("{}: {e}", local.display());
                    f.abort();
                    return Err(UploadError {
                        path: local.display().to_string(),
                        message,
                    });
                }
            }
        }
        f.finish()
    }
}

/// One object being written. Dropping it unfinished gives the upload up.
pub struct ObjectFile {
    uploader: Arc<Uploader>,
    path: ObjectPath,
    spool: File,
    spool_path: PathBuf,
    spooled: usize,
    /// Started with the first full part; a small object is put in one request instead.
    upload: Option<Box<dyn MultipartUpload>>,
    parts: Vec<JoinHandle<object_store::Result<()>>>,
    gzip: Option<GzEncoder<Vec<u8>>>,
    sha: aws_lc_rs::digest::Context,
    count: u64,
    bytes: u64,
    stored: u64,
}

impl ObjectFile {
    fn error(&self, message: String) -> UploadError {
        UploadError {
            path: self.path.to_string(),
            message,
        }
    }

    pub fn path(&self) -> &ObjectPath {
        &self.path
    }

    /// Appends `bytes` holding `count` lines; sends a part when one is full.
    pub fn append(&mut self, bytes: &[u8], count: u64) -> Result<(), UploadError> {
        self.sha.update(bytes);
        self.bytes += bytes.len() as u64;
        self.count += count;
        match &mut self.gzip {
            Some(gz) => {
                gz.write_all(bytes).map_err(|e| UploadError {
                    path: self.path.to_string(),
                    message: e.to_string(),
                })?;
                // What the encoder has produced so far.
                let out = std::mem::take(gz.get_mut());
                self.spool_bytes(&out)?;
            }
            None => self.spool_bytes(bytes)?,
        }
        if self.spooled >= self.uploader.part_size {
            self.send_part()?;
        }
        Ok(())
    }

    fn spool_bytes(&mut self, bytes: &[u8]) -> Result<(), UploadError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.spool
            .write_all(bytes)
            .map_err(|e| self.scratch_error(e))?;
        self.spooled += bytes.len();
        self.stored += bytes.len() as u64;
        Ok(())
    }

    fn scratch_error(&self, e: std::io::Error) -> UploadError {
        self.error(format!("scratch file {}: {e}", self.spool_path.display()))
    }

    /// The spooled bytes, read once a part may be sent; the spool is emptied.
    fn take_spool(&mut self) -> Result<PutPayload, UploadError> {
        let mut data = Vec::with_capacity(self.spooled);
        let read = self
            .spool
            .seek(std::io::SeekFrom::Start(0))
            .and_then(|_| (&self.spool).read_to_end(&mut data))
            .and_then(|_| self.spool.set_len(0))
            .and_then(|()| self.spool.seek(std::io::SeekFrom::Start(0)).map(drop));
        read.map_err(|e| self.scratch_error(e))?;
        self.spooled = 0;
        Ok(PutPayload::from(data))
    }

    /// Uploads the spool as the next part (starting the multipart upload with the first).
    fn send_part(&mut self) -> Result<(), UploadError> {
        self.check_parts()?;
        let handle = self.uploader.handle.clone();
        if self.upload.is_none() {
            let started = handle.block_on(self.uploader.store.put_multipart(&self.path));
            self.upload = Some(started.map_err(|e| self.error(super::describe(&e)))?);
        }
        let permit = handle
            .block_on(self.uploader.in_flight.clone().acquire_owned())
            .map_err(|e| self.error(e.to_string()))?;
        let payload = self.take_spool()?;
        let Some(upload) = self.upload.as_mut() else {
            return Err(self.error("the upload was not started".into()));
        };
        let part = upload.put_part(payload);
        self.parts.push(handle.spawn(async move {
            let result = part.await;
            drop(permit);
            result
        }));
        Ok(())
    }

    /// Fails early if a part sent before has failed (after the store client's retries).
    fn check_parts(&mut self) -> Result<(), UploadError> {
        let (done, pending): (Vec<_>, Vec<_>) = self.parts.drain(..).partition(|p| p.is_finished());
        self.parts = pending;
        for part in done {
            self.join(part)?;
        }
        Ok(())
    }

    fn join(&self, part: JoinHandle<object_store::Result<()>>) -> Result<(), UploadError> {
        match self.uploader.handle.block_on(part) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.error(super::describe(&e))),
            Err(e) => Err(self.error(format!("the part upload task failed: {e}"))),
        }
    }

    /// Completes the object: it becomes visible, whole. On failure nothing becomes visible.
    pub fn finish(mut self) -> Result<Uploaded, UploadError> {
        match self.complete() {
            Ok(()) => Ok(Uploaded {
                path: self.path.clone(),
                count: self.count,
                bytes: self.bytes,
                stored_bytes: self.stored,
                sha256: crate::text::hex(self.sha.clone().finish().as_ref()),
            }),
            Err(e) => {
                self.give_up();
                Err(e)
            }
        }
    }

    fn complete(&mut self) -> Result<(), UploadError> {
        if let Some(gz) = self.gzip.take() {
            let rest = gz.finish().map_err(|e| self.error(e.to_string()))?;
            self.spool_bytes(&rest)?;
        }
        let handle = self.uploader.handle.clone();
        if self.upload.is_none() {
            let _permit = handle
                .block_on(self.uploader.in_flight.clone().acquire_owned())
                .map_err(|e| self.error(e.to_string()))?;
            let payload = self.take_spool()?;
            handle
                .block_on(self.uploader.store.put(&self.path, payload))
                .map_err(|e| self.error(super::describe(&e)))?;
        } else {
            if self.spooled > 0 {
                self.send_part()?;
            }
            for part in std::mem::take(&mut self.parts) {
                self.join(part)?;
            }
            if let Some(upload) = self.upload.as_mut() {
                handle
                    .block_on(upload.complete())
                    .map_err(|e| super::describe(&e))
                    .map_err(|m| UploadError {
                        path: self.path.to_string(),
                        message: m,
                    })?;
            }
            self.upload = None;
        }
        let _ = std::fs::remove_file(&self.spool_path);
        Ok(())
    }

    /// Gives the upload up: nothing becomes visible (the store drops the parts).
    pub fn abort(mut self) {
        self.give_up();
    }

    fn give_up(&mut self) {
        for part in self.parts.drain(..) {
            part.abort();
        }
        if let Some(mut upload) = self.upload.take() {
            let path = self.path.clone();
            let aborting = async move {
                if let Err(e) = upload.abort().await {
                    tracing::warn!("giving up the upload of {path}: {e}");
                }
            };
            // Dropped on an async task (a run that is cancelled), it cannot wait.
            self.uploader.handle.spawn(aborting);
        }
        let _ = std::fs::remove_file(&self.spool_path);
    }
}

impl Drop for ObjectFile {
    fn drop(&mut self) {
        self.give_up();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn lines(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n {
            out.extend_from_slice(
                format!("{{\"resourceType\":\"Observation\",\"id\":\"o{i}\",\"valueQuantity\":{{\"value\":{i}.50}}}}\n").as_bytes(),
            );
        }
        out
    }

    fn read(u: &Uploader, path: &ObjectPath) -> Option<Vec<u8>> {
        u.handle.block_on(async {
            let got = u.store.get(path).await.ok()?;
            Some(got.bytes().await.unwrap().to_vec())
        })
    }

    /// Runs `body` on a blocking thread with an uploader over an in-memory store.
    async fn with_uploader(body: impl FnOnce(Arc<Uploader>) + Send + 'static) {
        let scratch = tempfile::tempdir().unwrap();
        let u = Uploader::new(
            Arc::new(InMemory::new()),
            Handle::current(),
            MIN_PART_SIZE,
            2,
            scratch.path().to_owned(),
        );
        tokio::task::spawn_blocking(move || body(u)).await.unwrap();
        let left: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().collect();
        assert!(left.is_empty(), "scratch files left: {left:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_object_goes_up_in_parts_and_comes_back_whole() {
        with_uploader(|u| {
            let path = ObjectPath::from("exports/nightly/run/Observation.ndjson");
            let data = lines(200_000); // about 14 MiB: three parts of 5 MiB
            let mut f = u.create(path.clone(), false).unwrap();
            for chunk in data.chunks(256 * 1024) {
                f.append(chunk, 0).unwrap();
            }
            assert!(
                read(&u, &path).is_none(),
                "not visible before it is finished"
            );
            let done = f.finish().unwrap();
            assert!(data.len() > 2 * MIN_PART_SIZE);
            assert_eq!(read(&u, &path).unwrap(), data);
            assert_eq!(done.bytes, data.len() as u64);
            assert_eq!(done.stored_bytes, data.len() as u64);
            let sha = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &data);
            assert_eq!(done.sha256, crate::text::hex(sha.as_ref()));
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gzip_stores_less_and_hashes_what_was_appended() {
        with_uploader(|u| {
            let path = ObjectPath::from("run/Observation.ndjson.gz");
            let data = lines(50_000);
            let mut f = u.create(path.clone(), true).unwrap();
            for chunk in data.chunks(100_000) {
                f.append(chunk, 1).unwrap();
            }
            let done = f.finish().unwrap();
            let stored = read(&u, &path).unwrap();
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
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_aborted_or_dropped_upload_leaves_nothing() {
        with_uploader(|u| {
            let data = lines(120_000);
            for abort in [true, false] {
                let path = ObjectPath::from(format!("run/{abort}.ndjson"));
                let mut f = u.create(path.clone(), false).unwrap();
                f.append(&data, 0).unwrap();
                if abort {
                    f.abort();
                } else {
                    drop(f);
                }
                assert!(read(&u, &path).is_none());
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_object_and_a_local_file_go_up_whole() {
        with_uploader(|u| {
            let f = u
                .create(ObjectPath::from("run/empty.ndjson"), false)
                .unwrap();
            assert_eq!(f.finish().unwrap().bytes, 0);
            assert_eq!(
                read(&u, &ObjectPath::from("run/empty.ndjson")).unwrap(),
                b""
            );
            let local = u.scratch.join("manifest.json");
            let data = lines(90_000);
            std::fs::write(&local, &data).unwrap();
            let done = u
                .put_file(&local, ObjectPath::from("run/manifest.json"))
                .unwrap();
            std::fs::remove_file(&local).unwrap();
            assert_eq!(done.bytes, data.len() as u64);
            assert_eq!(
                read(&u, &ObjectPath::from("run/manifest.json")).unwrap(),
                data
            );
        })
        .await;
    }

    /// A store whose multipart uploads refuse every part after the first `parts_ok` (as a store does
    /// once its retries are spent), everything else as in memory.
    #[derive(Debug)]
    struct RefusingParts {
        inner: InMemory,
        parts_ok: usize,
    }

    impl std::fmt::Display for RefusingParts {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("RefusingParts")
        }
    }

    #[derive(Debug)]
    struct Refusing {
        inner: Box<dyn MultipartUpload>,
        left: usize,
    }

    #[async_trait::async_trait]
    impl MultipartUpload for Refusing {
        fn put_part(&mut self, data: PutPayload) -> object_store::UploadPart {
            if self.left == 0 {
                return Box::pin(async {
                    Err(object_store::Error::Generic {
                        store: "test",
                        source: "503 Slow Down (after 10 retries)".into(),
                    })
                });
            }
            self.left -= 1;
            self.inner.put_part(data)
        }
        async fn complete(&mut self) -> object_store::Result<object_store::PutResult> {
            self.inner.complete().await
        }
        async fn abort(&mut self) -> object_store::Result<()> {
            self.inner.abort().await
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for RefusingParts {
        async fn put_opts(
            &self,
            location: &ObjectPath,
            payload: PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &ObjectPath,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            let inner = self.inner.put_multipart_opts(location, opts).await?;
            Ok(Box::new(Refusing {
                inner,
                left: self.parts_ok,
            }))
        }
        async fn get_opts(
            &self,
            location: &ObjectPath,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<ObjectPath>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectPath>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &ObjectPath,
            to: &ObjectPath,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_part_the_store_refuses_fails_the_object_and_nothing_is_visible() {
        let scratch = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(RefusingParts {
            inner: InMemory::new(),
            parts_ok: 1,
        });
        let u = Uploader::new(
            store,
            Handle::current(),
            MIN_PART_SIZE,
            2,
            scratch.path().to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            let path = ObjectPath::from("run/Observation.ndjson");
            let data = lines(200_000); // three parts: the second is refused
            let mut f = u.create(path.clone(), false).unwrap();
            let mut failed = None;
            for chunk in data.chunks(256 * 1024) {
                if let Err(e) = f.append(chunk, 0) {
                    failed = Some(e);
                    break;
                }
            }
            let e = match failed {
                Some(e) => {
                    drop(f);
                    e
                }
                None => f.finish().unwrap_err(),
            };
            assert!(e.to_string().contains("run/Observation.ndjson"), "{e}");
            assert!(e.to_string().contains("Slow Down"), "{e}");
            assert!(read(&u, &path).is_none(), "nothing is visible");
        })
        .await
        .unwrap();
        let left: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().collect();
        assert!(left.is_empty(), "scratch files left: {left:?}");
    }
}
