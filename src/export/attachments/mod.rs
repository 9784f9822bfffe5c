//! Attachments: the documents that resources point at (a note's HTML and RTF, a scanned PDF), downloaded
//! once each into `attachments/` and linked from the resources as written.
//!
//! After retrieval, each resource file of a type in `attachments.resources` is read back line by line
//! (the original set aside by the writer), a chunk at a time: the chunk's attachments that are not
//! stored yet are downloaded concurrently (`fetch`, into the `store`), then each resource is rewritten
//! (`edit`) and written again. A stored attachment gets `url` = `attachments/<sha256>.<ext>` with the
//! original URL kept in an extension; a small one gets `data` instead; `size` and `hash` are set when
//! absent and checked when present. A failure is recorded and leaves the attachment as it was.

pub mod edit;
pub mod fetch;
pub mod index;
pub mod store;

use std::io::BufRead;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;

use self::edit::{AttachmentView, Step};
use self::fetch::{Failed, FetchFailure, Request};
use self::index::{Doc, Entry, Index};
use self::store::{Key, Store};
use super::StepError;
use super::writer::WriterMsg;
use crate::fhir::bundle::{self, push_compact_line};
use crate::fhir::raw::RawObject;
use crate::fhir::{FetchError, FhirClient};
use crate::output::{ATTACHMENTS_DIR, ATTACHMENTS_INDEX, AttachmentsManifest};
use crate::plan::AttachmentPlan;
use crate::summary::AttachmentStats;

/// The extension that keeps an attachment's original URL once `url` points at the file.
pub const ORIGINAL_URL_EXTENSION: &str =
    "https://fhirexport.dev/fhir/StructureDefinition/original-url";

/// Resources rewritten per chunk: the chunk's new documents download concurrently.
const CHUNK_LINES: usize = 256;

/// What the phase did.
#[derive(Debug, Default)]
pub struct Attached {
    pub stats: AttachmentStats,
    pub manifest: AttachmentsManifest,
}

pub struct Phase<'a> {
    plan: &'a AttachmentPlan,
    client: &'a FhirClient,
    /// The FHIR base with a trailing slash, for relative URLs.
    base: url::Url,
    token_origins: Vec<String>,
    concurrency: usize,
    store: Store,
    index: Index,
    /// The manifest's list of files being written (see `index`).
    lines_path: PathBuf,
    /// Documents the store had from an interrupted run.
    resumed: u64,
    /// Files first linked by the chunk being rewritten.
    linked_now: Vec<PathBuf>,
    stats: AttachmentStats,
    tx: &'a mpsc::Sender<WriterMsg>,
}

/// One resource read back, with what its attachments need.
struct Line {
    text: String,
    resource_type: String,
    id: Option<String>,
    found: Vec<AttachmentView>,
}

impl<'a> Phase<'a> {
    /// Opens the store in `staging` (finding what an interrupted run downloaded).
    pub fn open(
        plan: &'a AttachmentPlan,
        client: &'a FhirClient,
        fhir_base: &str,
        concurrency: usize,
        staging: &Path,
        tx: &'a mpsc::Sender<WriterMsg>,
    ) -> Result<Phase<'a>, StepError> {
        let io = |source| StepError::Io {
            path: staging.join(ATTACHMENTS_DIR),
            source,
        };
        let index_io = |source| StepError::Io {
            path: staging.join(ATTACHMENTS_INDEX),
            source,
        };
        let mut index = Index::new(staging).map_err(index_io)?;
        let mut resumed = 0;
        let mut remembered = Ok(());
        let store = Store::open(staging, &mut |key, stored| {
            if remembered.is_ok() {
                remembered = index.doc(&stored).and_then(|doc| match doc {
                    Some(doc) => {
                        resumed += 1;
                        index.set(&key, Entry::Stored { doc, linked: false })
                    }
                    None => Ok(()),
                });
            }
        })
        .map_err(io)?;
        remembered.map_err(index_io)?;
        let base = url::Url::parse(&format!("{}/", fhir_base.trim_end_matches('/')))
            .map_err(|_| StepError::Fetch(FetchError::InvalidUrl))?;
        let mut token_origins = vec![client.origin()];
        token_origins.extend(plan.token_origins.iter().cloned());
        if resumed > 0 {
            tracing::info!(
                "{resumed} attachments were downloaded by the interrupted run; they are not downloaded again"
            );
        }
        Ok(Phase {
            plan,
            client,
            base,
            token_origins,
            concurrency: concurrency.max(1),
            store,
            index,
            lines_path: index::lines_path(staging),
            resumed,
            linked_now: Vec::new(),
            stats: AttachmentStats::default(),
            tx,
        })
    }

    /// Rewrites the resources of `original` (a file the writer set aside) into `resource_type`'s
    /// new file, downloading their attachments.
    pub async fn process_file(
        &mut self,
        resource_type: &str,
        original: &Path,
    ) -> Result<(), StepError> {
        let Some(path) = edit::path_of(resource_type) else {
            return Ok(());
        };
        tracing::info!("downloading the attachments of the {resource_type} resources");
        let failed_before = self.stats.failed;
        let (chunks_tx, mut chunks) = mpsc::channel::<std::io::Result<Vec<Vec<u8>>>>(2);
        let file = original.to_owned();
        let reader = tokio::task::spawn_blocking(move || read_chunks(&file, &chunks_tx));
        while let Some(chunk) = chunks.recv().await {
            let chunk = chunk.map_err(|source| StepError::Io {
                path: original.to_owned(),
                source,
            })?;
            self.process_chunk(resource_type, &path, chunk).await?;
        }
        let _ = reader.await;
        let (files, bytes, _) = self.index.counts();
        tracing::info!(
            files,
            bytes,
            failed = self.stats.failed - failed_before,
            "attachments of the {resource_type} resources done"
        );
        Ok(())
    }

    async fn process_chunk(
        &mut self,
        resource_type: &str,
        path: &[Step],
        chunk: Vec<Vec<u8>>,
    ) -> Result<(), StepError> {
        let lines: Vec<Line> = chunk
            .into_iter()
            .map(|bytes| {
                // The writer wrote these lines from validated JSON: they are UTF-8.
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let head = serde_json::from_str::<&serde_json::value::RawValue>(&text)
                    .ok()
                    .and_then(|raw| {
                        bundle::head(raw)
                            .ok()
                            .map(|h| (h.resource_type.into_owned(), h.id.map(|i| i.into_owned())))
                    });
                let (resource_type, id) = head.unwrap_or_else(|| (resource_type.to_owned(), None));
                let found = edit::find(&text, path);
                Line {
                    text,
                    resource_type,
                    id,
                    found,
                }
            })
            .collect();
        self.download_new(&lines).await?;
        let mut out = Vec::new();
        let mut count = 0;
        for line in &lines {
            let rewritten = self.rewrite(line, path).await?;
            let text = rewritten.as_ref().map(|r| r.get()).unwrap_or(&line.text);
            push_compact_line(text.as_bytes(), &mut out);
            count += 1;
        }
        if count > 0 {
            self.tx
                .send(WriterMsg::Resources {
                    resource_type: resource_type.to_owned(),
                    lines: out,
                    count,
                })
                .await
                .map_err(|_| StepError::WriterGone)?;
        }
        // The files those resources link to are the run's now: the writer publishes them (to an
        // object store, where they do not wait for the end of the run).
        for path in std::mem::take(&mut self.linked_now) {
            self.tx
                .send(WriterMsg::Attachment(path))
                .await
                .map_err(|_| StepError::WriterGone)?;
        }
        Ok(())
    }

    /// The key of an attachment, or why it is left alone.
    fn key_of(&self, a: &AttachmentView) -> Option<Key> {
        if a.has_data {
            return None;
        }
        let url = a.url.as_deref()?;
        let absolute = self.base.join(url).ok()?;
        if !matches!(absolute.scheme(), "http" | "https") {
            return None;
        }
        Some(Key {
            url: absolute.to_string(),
            content_type: a
                .content_type
                .as_deref()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        })
    }

    /// Downloads the chunk's attachments that have no state yet, at most `concurrency` at once.
    async fn download_new(&mut self, lines: &[Line]) -> Result<(), StepError> {
        let mut wanted: Vec<(Key, &Line, &AttachmentView)> = Vec::new();
        for line in lines {
            for a in &line.found {
                let Some(key) = self.key_of(a) else { continue };
                if wanted.iter().any(|(k, _, _)| *k == key)
                    || self.index.contains(&key).map_err(|e| self.index_error(e))?
                {
                    continue;
                }
                if !self.plan.wants(a.content_type.as_deref()) {
                    self.stats.skipped += 1;
                    self.index
                        .set(&key, Entry::Skipped)
                        .map_err(|e| self.index_error(e))?;
                    continue;
                }
                wanted.push((key, line, a));
            }
        }
        let mut refused = Vec::new();
        let mut allowed = Vec::new();
        for (key, line, a) in wanted {
            match self.token_rule(&key.url) {
                Ok(origins) => allowed.push((key, line, a, origins)),
                Err(why) => refused.push((key, line, a, why)),
            }
        }
        for (key, line, a, why) in refused {
            self.fail(&key, line, a, Failure::plain(why)).await?;
        }
        let client = self.client;
        let store = &self.store;
        let max_bytes = self.plan.max_bytes;
        let mut results = futures::stream::iter(allowed.iter().enumerate().map(
            |(i, (key, _, a, origins))| async move {
                let req = Request {
                    url: &key.url,
                    token_origins: origins,
                    content_type: a.content_type.as_deref(),
                    max_bytes,
                };
                (i, fetch::download(client, store, &req).await)
            },
        ))
        .buffer_unordered(self.concurrency);
        let mut outcomes: Vec<Option<_>> = (0..allowed.len()).map(|_| None).collect();
        while let Some((i, r)) = results.next().await {
            outcomes[i] = Some(r);
        }
        drop(results);
        for ((key, line, a, _), outcome) in allowed.iter().zip(outcomes.into_iter().flatten()) {
            match outcome {
                Ok(stored) => {
                    self.store
                        .record(key, &stored)
                        .map_err(|source| StepError::Io {
                            path: self.store.dir().to_owned(),
                            source,
                        })?;
                    // The store wrote it: its digests are well-formed.
                    if let Some(doc) = self.index.doc(&stored).map_err(|e| self.index_error(e))? {
                        self.index
                            .set(key, Entry::Stored { doc, linked: false })
                            .map_err(|e| self.index_error(e))?;
                    }
                }
                Err(Failed {
                    why: FetchFailure::Fetch(e),
                    ..
                }) if e.is_fatal() => return Err(StepError::Fetch(e)),
                Err(Failed {
                    why: FetchFailure::Disk { path, source },
                    ..
                }) => {
                    return Err(StepError::Io { path, source });
                }
                Err(Failed { why, correlation }) => {
                    let failure = Failure {
                        status: why.status(),
                        correlation,
                        message: why.to_string(),
                    };
                    self.fail(key, line, a, failure).await?;
                }
            }
        }
        Ok(())
    }

    /// A failure to read or write the index.
    fn index_error(&self, source: std::io::Error) -> StepError {
        StepError::Io {
            path: self.index.dir().to_owned(),
            source,
        }
    }

    /// The origins the token may go to for `url`, or why it is not downloaded at all.
    fn token_rule(&self, url: &str) -> Result<Vec<String>, String> {
        let parsed =
            url::Url::parse(url).map_err(|_| "the attachment URL is not valid".to_owned())?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("the attachment URL carries credentials; it was not downloaded".into());
        }
        crate::trust::check_transport(&parsed, self.plan.allow_insecure_http)
            .map_err(|e| format!("the attachment was not downloaded: {e}"))?;
        let origin = parsed.origin().ascii_serialization();
        if self.token_origins.contains(&origin) {
            return Ok(self.token_origins.clone());
        }
        if self.plan.file_origins.contains(&origin) {
            return Ok(Vec::new());
        }
        Err(format!(
            "the attachment is on {origin}, which is neither the FHIR server nor listed in attachments.fileHosts; \
             add it to attachments.fileHosts to download it without the access token (or to tokenHosts if it is part of the FHIR server)"
        ))
    }

    /// Records a failed attachment (once per key) and remembers it.
    async fn fail(
        &mut self,
        key: &Key,
        line: &Line,
        a: &AttachmentView,
        failure: Failure,
    ) -> Result<(), StepError> {
        self.stats.failed += 1;
        self.index
            .set(key, Entry::Failed)
            .map_err(|e| self.index_error(e))?;
        self.record_failure(line, a, failure).await
    }

    async fn record_failure(
        &self,
        line: &Line,
        a: &AttachmentView,
        failure: Failure,
    ) -> Result<(), StepError> {
        let record = json!({
            "kind": "attachment",
            "resourceType": line.resource_type,
            "id": line.id,
            "url": a.url,
            "contentType": a.content_type,
            "status": failure.status,
            "correlation": failure.correlation,
            "message": failure.message,
        });
        self.tx
            .send(WriterMsg::Failure(record))
            .await
            .map_err(|_| StepError::WriterGone)
    }

    /// The resource with its stored attachments linked or inlined; `None` if nothing changed.
    async fn rewrite(
        &mut self,
        line: &Line,
        path: &[Step],
    ) -> Result<Option<Box<serde_json::value::RawValue>>, StepError> {
        // Decide per attachment first (checks, reads of small files), then edit in one pass.
        let mut edits: Vec<Option<Edit>> = Vec::with_capacity(line.found.len());
        for a in &line.found {
            let Some(key) = self.key_of(a) else {
                edits.push(None);
                continue;
            };
            let Some(Entry::Stored { doc, .. }) =
                self.index.get(&key).map_err(|e| self.index_error(e))?
            else {
                edits.push(None);
                continue;
            };
            if let Some(why) = mismatch(a, &doc) {
                self.stats.failed += 1;
                self.record_failure(line, a, Failure::plain(why)).await?;
                edits.push(None);
                continue;
            }
            let original = a.url.clone().unwrap_or_default();
            let file = Index::file(&doc);
            let hash = Index::sha1(&doc);
            if doc.size < self.plan.inline_smaller_than {
                let bytes = self.store.read(&file).map_err(|source| StepError::Io {
                    path: self.store.dir().join(&file),
                    source,
                })?;
                self.index.inline(&doc).map_err(|e| self.index_error(e))?;
                edits.push(Some(Edit::Inline {
                    data: BASE64.encode(bytes),
                    size: doc.size,
                    hash,
                }));
            } else {
                let first = self
                    .index
                    .link(&key, &doc, &key.url)
                    .map_err(|e| self.index_error(e))?;
                if first {
                    self.linked_now.push(self.store.dir().join(&file));
                }
                edits.push(Some(Edit::Link {
                    original,
                    file,
                    size: doc.size,
                    hash,
                }));
            }
        }
        if edits.iter().all(Option::is_none) {
            return Ok(None);
        }
        let mut i = 0;
        Ok(edit::rewrite(&line.text, path, &mut |att| {
            let e = edits.get(i).and_then(Option::as_ref);
            i += 1;
            match e {
                Some(e) => {
                    e.apply(att);
                    true
                }
                None => false,
            }
        }))
    }

    /// Counts, the manifest section, and the store cleaned: documents no resource links to (only
    /// inlined, or refused for a wrong declared size or hash) are removed.
    pub fn finish(self) -> Result<Attached, StepError> {
        let Phase {
            store,
            mut index,
            resumed,
            mut stats,
            lines_path,
            ..
        } = self;
        let dir = store.dir().to_owned();
        store
            .finish(&mut |name| index.is_linked_file(name))
            .map_err(|source| StepError::Io { path: dir, source })?;
        (stats.files, stats.bytes, stats.inlined) = index.counts();
        stats.reused = resumed;
        let files = index.manifest_lines().map_err(|source| StepError::Io {
            path: lines_path,
            source,
        })?;
        Ok(Attached {
            manifest: AttachmentsManifest {
                count: stats.files,
                bytes: stats.bytes,
                files,
            },
            stats,
        })
    }
}

/// What to do to one attachment.
enum Edit {
    Link {
        original: String,
        file: String,
        size: u64,
        hash: String,
    },
    Inline {
        data: String,
        size: u64,
        hash: String,
    },
}

impl Edit {
    fn apply(&self, a: &mut RawObject) {
        let (size, hash) = match self {
            Edit::Link {
                original,
                file,
                size,
                hash,
            } => {
                a.set_value("url", &format!("{ATTACHMENTS_DIR}/{file}"));
                let mut extensions: Vec<Box<serde_json::value::RawValue>> =
                    a.get_as("extension").unwrap_or_default();
                extensions.push(crate::fhir::raw::to_raw(&json!({
                    "url": ORIGINAL_URL_EXTENSION,
                    "valueUrl": original,
                })));
                a.set_value("extension", &extensions);
                (size, hash)
            }
            Edit::Inline { data, size, hash } => {
                a.set_value("data", data);
                (size, hash)
            }
        };
        if a.get("size").is_none() {
            a.set_value("size", size);
        }
        if a.get("hash").is_none() {
            a.set_value("hash", hash);
        }
    }
}

/// Why a stored document does not match what the attachment declares, if it does not.
fn mismatch(a: &AttachmentView, doc: &Doc) -> Option<String> {
    if let Some(size) = a.size.filter(|s| *s != doc.size) {
        return Some(format!(
            "the attachment declares {size} bytes but the server sent {}; the document was not kept",
            doc.size
        ));
    }
    if a.hash
        .as_deref()
        .is_some_and(|h| h.trim() != Index::sha1(doc))
    {
        return Some(
            "the attachment's declared SHA-1 hash does not match the document the server sent; the document was not kept"
                .into(),
        );
    }
    None
}

/// Reads `file` in chunks of complete lines and sends them until the receiver is gone.
fn read_chunks(file: &Path, tx: &mpsc::Sender<std::io::Result<Vec<Vec<u8>>>>) {
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) => {
            let _ = tx.blocking_send(Err(e));
            return;
        }
    };
    let mut reader = std::io::BufReader::with_capacity(256 * 1024, f);
    let mut chunk = Vec::with_capacity(CHUNK_LINES);
    loop {
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                if !line.is_empty() {
                    chunk.push(line);
                }
                if chunk.len() == CHUNK_LINES
                    && tx
                        .blocking_send(Ok(std::mem::replace(
                            &mut chunk,
                            Vec::with_capacity(CHUNK_LINES),
                        )))
                        .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(Ok(chunk));
    }
}

/// A failed attachment as `errors/failed-requests.ndjson` records it.
struct Failure {
    status: Option<u16>,
    /// The server's correlation headers of the answer that failed.
    correlation: std::collections::BTreeMap<String, String>,
    message: String,
}

impl Failure {
    /// A failure decided here, without a request.
    fn plain(message: String) -> Self {
        Failure {
            status: None,
            correlation: Default::default(),
            message,
        }
    }
}
