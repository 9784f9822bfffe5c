//! The run folder: streaming NDJSON files, the manifest, the summary, and publishing a run atomically.
//!
//! Layout: `<dir>/<export>/<run-id>/` with one `<Type>.ndjson` per resource type,
//! `errors/`, `deleted/`, `attachments/`, `manifest.json` and `summary.json`. A run is written under `.<run-id>.partial/` and renamed
//! into place only when complete, then `latest` is pointed at it; a fatal failure renames it to
//! `.<run-id>.failed/` instead. Files are `0600`, folders `0700`. A lock file keeps two runs of one export
//! apart, which also makes it safe to sweep leftovers of killed runs. This module knows nothing about HTTP.

mod retention;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flate2::write::GzEncoder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Serialize;

use crate::storage::runs::ExportRuns;
use crate::storage::upload::{ObjectFile, UploadError, Uploader};

pub use retention::{remove_old_runs, sweep_leftovers};

/// Writes `value` as JSON to `path` atomically (a temporary file renamed over it), mode 0600: every
/// state file (bulk progress, cooldown, schedule) and summary.json. The folder must exist (a run
/// folder that is gone is an error, never silently made again).
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    text.push(b'\n');
    write_new_private_file(&tmp, &text)?;
    fs::rename(&tmp, path)
}

/// Reads a state file written by [`write_json_atomic`]: `None` when it is missing, and when it is not
/// valid (a warning says so; state is a hint, never a reason to stop).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!("ignoring {}: not valid ({e})", path.display());
            None
        }
    }
}

pub const ERRORS_DIR: &str = "errors";
pub const DELETED_DIR: &str = "deleted";
/// Downloaded documents, named by their SHA-256.
pub const ATTACHMENTS_DIR: &str = "attachments";
/// In a staging folder: the manifest's list of attachments while it is written (see
/// [`AttachmentsManifest`]).
pub const ATTACHMENTS_LIST: &str = ".attachments.manifest.ndjson";
/// In a staging folder: what the attachments phase knows of each document, while it runs.
pub const ATTACHMENTS_INDEX: &str = ".attachments.index";

/// Whether a file holds exported resources (not errors, not deletions).
pub fn is_data_file(f: &FileEntry) -> bool {
    !f.relative.starts_with(ERRORS_DIR) && !f.relative.starts_with(DELETED_DIR)
}
pub const OUTCOMES_FILE: &str = "OperationOutcome.ndjson";
pub const FAILURES_FILE: &str = "failed-requests.ndjson";
/// The run log (written by `fhir::runlog`), published with the run but not listed in the manifest.
pub const LOG_FILE: &str = "log.ndjson";
/// In a staging folder: the parts being uploaded, one per open object (see `storage::upload`).
const SPOOL_DIR: &str = ".spool";

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// A file or folder could not be created, written, synced or renamed (disk full, file too large,
    /// I/O error, permissions): the path and the operating system's error.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// A resource type that is not a FHIR type name reached the writer (a bug: callers check first).
    #[error("refusing to name a file after {0}")]
    InvalidType(String),
    #[error("cannot write {name}: {message}")]
    Serialize { name: String, message: String },
    #[error(
        "output folder {path}: another run of this export is in progress (it holds {lock}); wait for it or stop it"
    )]
    Busy { path: PathBuf, lock: PathBuf },
    /// An object could not be uploaded (after the store client's retries), or `latest.json` not written.
    #[error("{0}")]
    Upload(#[from] UploadError),
    #[error("{0}")]
    Store(#[from] crate::storage::runs::RunsError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` and its missing parents with mode 0700.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates a new file with mode 0600; fails if it exists.
pub fn write_new_private_file(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content)?;
    f.sync_all()
}

/// Creates (or empties) a file with mode 0600: scratch files of a run.
pub fn create_private_file_truncating(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

fn create_private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Where one file's bytes go.
enum Sink {
    Plain(BufWriter<File>),
    Gzip(GzEncoder<BufWriter<File>>),
    /// Counted and hashed by the upload itself.
    Object(ObjectFile),
}

/// One streamed NDJSON file with its running count, size and SHA-256.
struct NdjsonFile {
    relative: String,
    /// The full path (local, or the object's), named in errors.
    path: PathBuf,
    sink: Sink,
    count: u64,
    bytes: u64,
    sha: aws_lc_rs::digest::Context,
    /// Bytes appended since the disk was last asked to write the file's pages (local files).
    unwritten: u64,
}

/// A local file's pages are handed to the disk every this many bytes, while the run goes on, so that
/// the `fsync` before publishing has little left to wait for (it had 0.6 s per GiB on its own).
const WRITEBACK_BYTES: u64 = 16 * 1024 * 1024;

/// Starts writing `file`'s dirty pages to disk without waiting for them (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`); the `fsync` at the end still makes them durable. A failure is
/// harmless: the `fsync` does it all.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for as long as `file` is borrowed; the call reads no memory.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}

impl NdjsonFile {
    /// A local file in `dir`, gzip-compressed or not.
    fn create(dir: &Path, relative: String, gzip: bool) -> Result<Self, OutputError> {
        let path = dir.join(&relative);
        let file = create_private_file(&path).map_err(io_err(&path))?;
        let out = BufWriter::with_capacity(256 * 1024, file);
        let sink = if gzip {
            Sink::Gzip(GzEncoder::new(out, flate2::Compression::default()))
        } else {
            Sink::Plain(out)
        };
        Ok(Self::new(relative, path, sink))
    }

    fn new(relative: String, path: PathBuf, sink: Sink) -> Self {
        NdjsonFile {
            relative,
            path,
            sink,
            count: 0,
            bytes: 0,
            sha: aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
            unwritten: 0,
        }
    }

    /// `lines` holds `count` complete lines, each ending in `\n`.
    fn append(&mut self, lines: &[u8], count: u64) -> Result<(), OutputError> {
        match &mut self.sink {
            Sink::Plain(out) => out.write_all(lines).map_err(io_err(&self.path))?,
            Sink::Gzip(out) => out.write_all(lines).map_err(io_err(&self.path))?,
            Sink::Object(object) => return Ok(object.append(lines, count)?),
        }
        self.sha.update(lines);
        self.bytes += lines.len() as u64;
        self.count += count;
        self.unwritten += lines.len() as u64;
        if self.unwritten >= WRITEBACK_BYTES {
            self.unwritten = 0;
            // Only what is already compressed is handed on: flushing the encoder itself would end
            // a deflate block early.
            let file = match &mut self.sink {
                Sink::Plain(out) => out.flush().map(|()| out.get_ref()),
                Sink::Gzip(out) => out.get_mut().flush().map(|()| out.get_ref().get_ref()),
                Sink::Object(_) => return Ok(()),
            };
            start_writeback(file.map_err(io_err(&self.path))?);
        }
        Ok(())
    }

    /// Hands what is buffered to the operating system (local files).
    fn flush(&mut self) -> Result<(), OutputError> {
        match &mut self.sink {
            Sink::Plain(out) => out.flush().map_err(io_err(&self.path)),
            Sink::Gzip(out) => out.flush().map_err(io_err(&self.path)),
            Sink::Object(_) => Ok(()),
        }
    }

    /// Syncs a local file, completes an upload.
    fn close(self) -> Result<FileEntry, OutputError> {
        let path = self.path;
        let out = match self.sink {
            Sink::Object(object) => {
                let done = object.finish()?;
                return Ok(FileEntry {
                    relative: self.relative,
                    count: done.count,
                    bytes: done.bytes,
                    sha256: done.sha256,
                });
            }
            Sink::Plain(out) => out,
            Sink::Gzip(gz) => gz.finish().map_err(io_err(&path))?,
        };
        let file = out
            .into_inner()
            .map_err(|e| io_err(&path)(e.into_error()))?;
        file.sync_all().map_err(io_err(&path))?;
        Ok(FileEntry {
            relative: self.relative,
            count: self.count,
            bytes: self.bytes,
            sha256: crate::text::hex(self.sha.finish().as_ref()),
        })
    }
}

/// A closed output file as listed in the manifest.
#[derive(Clone, Debug, Serialize)]
pub struct FileEntry {
    #[serde(rename = "url")]
    pub relative: String,
    pub count: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// Bulk-Data-style manifest entries.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest<'a> {
    pub transaction_time: &'a str,
    pub request: &'a str,
    pub requires_access_token: bool,
    pub output: Vec<ManifestEntry>,
    pub error: Vec<ManifestEntry>,
    pub deleted: Vec<ManifestEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachments: Option<&'a AttachmentsManifest>,
}

/// The `attachments` section of `manifest.json`: the documents downloaded into `attachments/`. The list
/// of files is read from `files` (one JSON [`AttachmentFile`] per line) while `manifest.json` is
/// written, so a run with many documents does not hold the list in memory; `publish` removes it.
#[derive(Clone, Debug, Default)]
pub struct AttachmentsManifest {
    pub count: u64,
    pub bytes: u64,
    pub files: PathBuf,
}

impl Serialize for AttachmentsManifest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq, SerializeStruct};
        struct Lines<'a>(&'a Path);
        impl Serialize for Lines<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use std::io::BufRead;
                let f = File::open(self.0).map_err(S::Error::custom)?;
                let mut seq = s.serialize_seq(None)?;
                for line in io::BufReader::new(f).lines() {
                    let line = line.map_err(S::Error::custom)?;
                    let entry: Box<serde_json::value::RawValue> =
                        serde_json::from_str(&line).map_err(S::Error::custom)?;
                    seq.serialize_element(&entry)?;
                }
                seq.end()
            }
        }
        let mut st = s.serialize_struct("AttachmentsManifest", 3)?;
        st.serialize_field("count", &self.count)?;
        st.serialize_field("bytes", &self.bytes)?;
        st.serialize_field("files", &Lines(&self.files))?;
        st.end()
    }
}

/// One downloaded document.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentFile {
    /// Relative to the run folder: `attachments/<sha256>.<ext>`.
    pub url: String,
    pub content_type: String,
    pub bytes: u64,
    pub sha256: String,
    /// The attachment URLs (absolute) whose content this is.
    pub sources: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ManifestEntry {
    #[serde(rename = "type")]
    pub resource_type: String,
    #[serde(flatten)]
    pub file: FileEntry,
}

/// Writes one run. Not `Send`-shared: one task owns it and receives batches.
pub struct RunWriter {
    export_dir: PathBuf,
    run_id: String,
    partial: PathBuf,
    /// Data and deleted-resource files by relative path, with their resource type.
    files: BTreeMap<String, (String, NdjsonFile)>,
    outcomes: Option<NdjsonFile>,
    failures: Option<NdjsonFile>,
    /// `output.compression: gzip`: resource and deleted-resource files are `.ndjson.gz`.
    gzip: bool,
    /// Resource types written plain to the staging folder whatever the destination, because they
    /// are read back and rewritten (attachments) before they are published; see `detach`.
    staged: BTreeSet<String>,
    object: Option<ObjectRun>,
    observer: Option<Observer>,
    _lock: File,
}

/// Sees every batch of resources before it is written: `(resource type, lines)`.
pub type Observer = Box<dyn FnMut(&str, &[u8]) + Send>;

/// An object store that runs are streamed to, instead of a folder renamed into place.
pub struct ObjectDestination {
    pub store: Arc<dyn ObjectStore>,
    /// The prefix in the bucket (`<prefix>` of `<prefix>/<export>/<run-id>/`).
    pub prefix: ObjectPath,
    /// The location as a URL (`s3://bucket/prefix`), for the summary and messages.
    pub url: String,
    pub part_size: usize,
    /// Parts in flight at once across the run's files.
    pub concurrency: usize,
}

/// How a run is written, beyond its folder.
#[derive(Default)]
pub struct WriterOptions {
    pub gzip: bool,
    /// See `RunWriter::staged`.
    pub staged: Vec<String>,
    pub destination: Option<ObjectDestination>,
    pub observer: Option<Observer>,
}

/// A run on its way to an object store.
struct ObjectRun {
    uploader: Arc<Uploader>,
    runs: Arc<ExportRuns>,
    /// `<prefix>/<export>/<run-id>`.
    run: ObjectPath,
    /// The run as a URL, ending in `/`.
    url: String,
}

/// Where a run published to an object store is, and how to write its summary again (with the
/// e-mail's outcome).
#[derive(Clone)]
pub struct ObjectRunLink {
    /// The run as a URL (`s3://bucket/prefix/<export>/<run-id>/`).
    pub url: String,
    store: Arc<dyn ObjectStore>,
    summary: ObjectPath,
    runs: Arc<ExportRuns>,
}

impl std::fmt::Debug for ObjectRunLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl ObjectRunLink {
    /// Replaces the run's `summary.json`.
    pub async fn rewrite_summary<S: Serialize>(&self, summary: &S) -> Result<(), String> {
        let mut text = serde_json::to_vec_pretty(summary).map_err(|e| e.to_string())?;
        text.push(b'\n');
        self.store
            .put(&self.summary, text.into())
            .await
            .map(drop)
            .map_err(|e| format!("{}: {}", self.summary, crate::storage::describe(&e)))
    }

    /// Retention in the store: keeps the newest `keep` complete runs and `current`; removes the rest
    /// (older runs, and runs that failed or were killed). Returns the run ids removed.
    pub async fn remove_old_runs(&self, keep: usize, current: &str) -> Result<Vec<String>, String> {
        self.runs
            .remove_old_runs(keep, Some(current))
            .await
            .map_err(|e| e.to_string())
    }
}

/// `relative` (`errors/failed-requests.ndjson`) under `run`, one path segment per folder.
fn object_path(run: &ObjectPath, relative: &str) -> ObjectPath {
    relative
        .split('/')
        .fold(run.clone(), |p, part| p.join(part))
}

/// Which unfinished run `RunWriter::open` may resume: one whose staging folder holds the file `marker`
/// and for which `accept(path of the marker)` says yes. The marker and the entries named in `keep`
/// survive; the rest of the folder is cleared.
pub struct Resume<'a> {
    pub marker: &'a str,
    pub accept: &'a dyn Fn(&Path) -> bool,
    pub keep: &'a [&'a str],
}

/// Takes the export's lock (`<export>/.lock`), or says another run holds it.
fn lock_export(export_dir: &Path) -> Result<File, OutputError> {
    let lock_path = export_dir.join(".lock");
    let lock = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(OutputError::Busy {
            path: export_dir.to_owned(),
            lock: lock_path,
        }),
        Err(fs::TryLockError::Error(e)) => Err(OutputError::Io {
            path: lock_path,
            source: e,
        }),
    }
}

impl RunWriter {
    /// Locks `<output_dir>/<export>` and creates the partial run folder. `run_id` is the UTC start stamp;
    /// a suffix is added if a run with that id exists.
    pub fn create(output_dir: &Path, export: &str, run_id: &str) -> Result<RunWriter, OutputError> {
        Self::open(output_dir, export, run_id, None)
    }

    /// Like `create`, but first looks for the staging folder of an unfinished run that holds a file
    /// named `marker` for which `resumable` says yes; that run is resumed (same id, its other files
    /// removed, the marker kept). Every other leftover is swept.
    pub fn open(
        output_dir: &Path,
        export: &str,
        run_id: &str,
        resume: Option<Resume<'_>>,
    ) -> Result<RunWriter, OutputError> {
        let export_dir = output_dir.join(export);
        create_private_dir(&export_dir).map_err(io_err(&export_dir))?;
        let lock = lock_export(&export_dir)?;
        // We hold the lock, so every partial folder is a leftover of a run that was killed.
        let resumed = resume
            .as_ref()
            .and_then(|r| retention::find_resumable(&export_dir, r.marker, r.accept));
        let resumed = match resumed {
            // A failed run is resumed under its own id, as a partial run again.
            Some((id, dir)) if dir.extension().is_some_and(|e| e == "failed") => {
                let partial = export_dir.join(format!(".{id}.partial"));
                fs::rename(&dir, &partial).map_err(io_err(&dir))?;
                Some((id, partial))
            }
            other => other,
        };
        if let (Some((_, dir)), Some(r)) = (&resumed, &resume) {
            let keep: Vec<&str> = std::iter::once(r.marker)
                .chain(r.keep.iter().copied())
                .collect();
            retention::clear_except(dir, &keep).map_err(io_err(dir))?;
        }
        sweep_leftovers(&export_dir, resumed.as_ref().map(|(_, d)| d.as_path()));
        let (id, partial) = match resumed {
            Some(found) => found,
            None => {
                let mut id = run_id.to_owned();
                let mut n = 1;
                while export_dir.join(&id).exists()
                    || export_dir.join(format!(".{id}.failed")).exists()
                {
                    n += 1;
                    id = format!("{run_id}-{n}");
                }
                let partial = export_dir.join(format!(".{id}.partial"));
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&partial)
                    .map_err(io_err(&partial))?;
                (id, partial)
            }
        };
        create_private_dir(&partial.join(ERRORS_DIR)).map_err(io_err(&partial))?;
        Ok(RunWriter {
            export_dir,
            run_id: id,
            partial,
            files: BTreeMap::new(),
            outcomes: None,
            failures: None,
            gzip: false,
            staged: BTreeSet::new(),
            object: None,
            observer: None,
            _lock: lock,
        })
    }

    /// Sets how the run is written, before anything is. With a destination the uploads run on the
    /// current runtime, and parts are spooled to `<staging>/.spool/`.
    pub fn configure(&mut self, options: WriterOptions) -> Result<(), OutputError> {
        self.gzip = options.gzip;
        self.staged = options.staged.into_iter().collect();
        self.observer = options.observer;
        if let Some(d) = options.destination {
            let scratch = self.partial.join(SPOOL_DIR);
            create_private_dir(&scratch).map_err(io_err(&scratch))?;
            let uploader = Uploader::new(
                d.store.clone(),
                tokio::runtime::Handle::current(),
                d.part_size,
                d.concurrency,
                scratch,
            );
            let runs = ExportRuns::new(d.store, &d.prefix, self.export_name());
            self.object = Some(ObjectRun {
                uploader,
                run: runs.run_path(&self.run_id),
                url: format!("{}/{}/{}/", d.url, self.export_name(), self.run_id),
                runs: Arc::new(runs),
            });
        }
        Ok(())
    }

    fn export_name(&self) -> &str {
        self.export_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }

    /// Stops showing batches to the observer set by `configure`.
    pub fn take_observer(&mut self) -> Option<Observer> {
        self.observer.take()
    }

    /// The run in its object store, when it goes to one.
    pub fn object_link(&self) -> Option<ObjectRunLink> {
        self.object.as_ref().map(|o| ObjectRunLink {
            url: o.url.clone(),
            store: o.uploader.store().clone(),
            summary: o.run.clone().join("summary.json"),
            runs: o.runs.clone(),
        })
    }

    /// Where the run will be once published: its folder, or its URL in the object store.
    pub fn final_place(&self) -> String {
        match &self.object {
            Some(o) => o.url.clone(),
            None => self.final_dir().display().to_string(),
        }
    }

    /// The export's folder (`<output>/<export>`), where state between runs is kept.
    pub fn export_dir(&self) -> &Path {
        &self.export_dir
    }

    /// The staging folder of this run (`.<run-id>.partial`).
    pub fn staging_dir(&self) -> &Path {
        &self.partial
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The folder the run will have once published.
    pub fn final_dir(&self) -> PathBuf {
        self.export_dir.join(&self.run_id)
    }

    /// Appends `count` NDJSON lines of `resource_type` to `<Type>.ndjson`.
    pub fn append(
        &mut self,
        resource_type: &str,
        lines: &[u8],
        count: u64,
    ) -> Result<(), OutputError> {
        if let Some(observe) = &mut self.observer {
            observe(resource_type, lines);
        }
        self.append_typed("", resource_type, lines, count)
    }

    /// Appends `count` lines of the server's deleted-resource entries of `resource_type` (bulk mode)
    /// to `deleted/<Type>.ndjson`.
    pub fn append_deleted(
        &mut self,
        resource_type: &str,
        lines: &[u8],
        count: u64,
    ) -> Result<(), OutputError> {
        self.append_typed("deleted/", resource_type, lines, count)
    }

    fn append_typed(
        &mut self,
        folder: &str,
        resource_type: &str,
        lines: &[u8],
        count: u64,
    ) -> Result<(), OutputError> {
        if !crate::trust::is_resource_type(resource_type) {
            return Err(OutputError::InvalidType(crate::trust::describe_type(
                resource_type,
            )));
        }
        let staged = folder.is_empty() && self.staged.contains(resource_type);
        let gz = if self.gzip && !staged { ".gz" } else { "" };
        let relative = format!("{folder}{resource_type}.ndjson{gz}");
        let file = match self.files.entry(relative) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let f = Self::new_file(
                    &self.partial,
                    self.object.as_ref().filter(|_| !staged),
                    e.key().clone(),
                    !gz.is_empty(),
                )?;
                e.insert((resource_type.to_owned(), f))
            }
        };
        file.1.append(lines, count)
    }

    /// A new file of the run: an object, or a local file in the staging folder.
    fn new_file(
        partial: &Path,
        object: Option<&ObjectRun>,
        relative: String,
        gzip: bool,
    ) -> Result<NdjsonFile, OutputError> {
        match object {
            Some(o) => {
                let path = object_path(&o.run, &relative);
                let f = o.uploader.create(path.clone(), gzip)?;
                Ok(NdjsonFile::new(
                    relative,
                    PathBuf::from(path.as_ref()),
                    Sink::Object(f),
                ))
            }
            None => {
                if let Some(dir) = partial.join(&relative).parent() {
                    create_private_dir(dir).map_err(io_err(dir))?;
                }
                NdjsonFile::create(partial, relative, gzip)
            }
        }
    }

    /// A downloaded document in `<staging>/attachments/` that the run links to. Locally it is where
    /// it belongs; with an object store it is uploaded to `<run>/attachments/` and removed.
    pub fn publish_attachment(&mut self, path: &Path) -> Result<(), OutputError> {
        let (Some(o), Some(name)) = (&self.object, path.file_name().and_then(|n| n.to_str()))
        else {
            return Ok(());
        };
        if !path.starts_with(self.partial.join(ATTACHMENTS_DIR)) {
            return Err(OutputError::Io {
                path: path.to_owned(),
                source: io::Error::other("not a document of this run's attachments/ folder"),
            });
        }
        o.uploader.put_file(
            path,
            object_path(&o.run, &format!("{ATTACHMENTS_DIR}/{name}")),
        )?;
        fs::remove_file(path).map_err(io_err(path))
    }

    /// Flushes every open file to the operating system (not to the disk), so that they can be read
    /// while the run goes on.
    pub fn flush(&mut self) -> Result<(), OutputError> {
        let open = self
            .files
            .values_mut()
            .map(|(_, f)| f)
            .chain(self.outcomes.as_mut())
            .chain(self.failures.as_mut());
        for f in open {
            f.flush()?;
        }
        Ok(())
    }

    /// Takes `<Type>.ndjson` (a staged type, see `WriterOptions::staged`) out of the run to be
    /// rewritten: closes it and renames it to `.<Type>.original.ndjson` in the staging folder, whose
    /// path is returned (`None` if the run has no such file). Appending to the type afterwards starts
    /// a new file at the run's destination; the caller removes the original when done.
    pub fn detach(&mut self, resource_type: &str) -> Result<Option<PathBuf>, OutputError> {
        let was_staged = self.staged.remove(resource_type);
        let relative = format!("{resource_type}.ndjson");
        if !was_staged && (self.gzip || self.object.is_some()) {
            return Err(OutputError::Serialize {
                name: relative,
                message: "it was not kept in the staging folder to be rewritten".into(),
            });
        }
        let Some((_, file)) = self.files.remove(&relative) else {
            return Ok(None);
        };
        let from = file.path.clone();
        file.close()?;
        let to = self
            .partial
            .join(format!(".{resource_type}.original.ndjson"));
        fs::rename(&from, &to).map_err(io_err(&to))?;
        Ok(Some(to))
    }

    /// Appends OperationOutcome lines the server reported (search outcome entries).
    pub fn append_outcomes(&mut self, lines: &[u8], count: u64) -> Result<(), OutputError> {
        let mut slot = self.outcomes.take();
        let result = self.append_to(&mut slot, OUTCOMES_FILE, lines, count);
        self.outcomes = slot;
        result
    }

    /// Appends one failed request record (JSON, one line).
    pub fn append_failure(&mut self, record: &serde_json::Value) -> Result<(), OutputError> {
        // A `Value` always serialises.
        let mut line = serde_json::to_vec(record).map_err(|e| OutputError::Serialize {
            name: FAILURES_FILE.into(),
            message: e.to_string(),
        })?;
        line.push(b'\n');
        let mut slot = self.failures.take();
        let result = self.append_to(&mut slot, FAILURES_FILE, &line, 1);
        self.failures = slot;
        result
    }

    fn append_to(
        &self,
        slot: &mut Option<NdjsonFile>,
        name: &str,
        lines: &[u8],
        count: u64,
    ) -> Result<(), OutputError> {
        if slot.is_none() {
            let relative = format!("{ERRORS_DIR}/{name}");
            *slot = Some(Self::new_file(
                &self.partial,
                self.object.as_ref(),
                relative,
                false,
            )?);
        }
        match slot.as_mut() {
            Some(f) => f.append(lines, count),
            None => Ok(()),
        }
    }

    /// Flushes, syncs and closes every data and error file; returns them as the manifest lists them.
    pub fn close_files(&mut self) -> Result<Vec<(String, FileEntry)>, OutputError> {
        let mut entries = Vec::new();
        for (_, (t, f)) in std::mem::take(&mut self.files) {
            entries.push((t, f.close()?));
        }
        for (t, slot) in [
            ("OperationOutcome", self.outcomes.take()),
            ("FailedRequest", self.failures.take()),
        ] {
            if let Some(f) = slot {
                entries.push((t.to_owned(), f.close()?));
            }
        }
        Ok(entries)
    }

    /// Where a failed run's files end up.
    pub fn failed_dir(&self) -> PathBuf {
        self.export_dir.join(format!(".{}.failed", self.run_id))
    }

    /// Writes `manifest.json` (for the closed `files`) and `summary.json`, renames the folder into
    /// place and points `latest` at it. Returns the published folder. With an object store: uploads
    /// the attachments, `summary.json`, then `manifest.json`, then points `<export>/latest.json` at
    /// the run, and removes the staging folder; returns the export's working folder. Blocks: call it
    /// from a blocking thread.
    pub fn publish<S: Serialize>(
        self,
        transaction_time: &str,
        request: &str,
        files: &[(String, FileEntry)],
        attachments: Option<&AttachmentsManifest>,
        summary: &S,
    ) -> Result<PathBuf, OutputError> {
        let entry = |(resource_type, file): &(String, FileEntry)| ManifestEntry {
            resource_type: resource_type.clone(),
            file: file.clone(),
        };
        let under =
            |dir: &'static str| move |(_, f): &&(String, FileEntry)| f.relative.starts_with(dir);
        let manifest = Manifest {
            transaction_time,
            request,
            requires_access_token: false,
            output: files
                .iter()
                .filter(|f| is_data_file(&f.1))
                .map(entry)
                .collect(),
            error: files.iter().filter(under(ERRORS_DIR)).map(entry).collect(),
            deleted: files.iter().filter(under(DELETED_DIR)).map(entry).collect(),
            attachments,
        };
        if let Some(o) = &self.object {
            return self.publish_objects(o, &manifest, attachments, summary);
        }
        self.write_json("manifest.json", &manifest)?;
        if let Some(a) = attachments {
            fs::remove_file(&a.files).map_err(io_err(&a.files))?;
        }
        self.write_json("summary.json", summary)?;
        let final_dir = self.final_dir();
        fs::rename(&self.partial, &final_dir).map_err(io_err(&final_dir))?;
        sync_dir(&self.export_dir);
        point_latest(&self.export_dir, &self.run_id).map_err(io_err(&self.export_dir))?;
        Ok(final_dir)
    }

    /// The object-store half of `publish`.
    fn publish_objects<S: Serialize>(
        &self,
        o: &ObjectRun,
        manifest: &Manifest<'_>,
        attachments: Option<&AttachmentsManifest>,
        summary: &S,
    ) -> Result<PathBuf, OutputError> {
        let documents = self.partial.join(ATTACHMENTS_DIR);
        for entry in fs::read_dir(&documents).into_iter().flatten() {
            let entry = entry.map_err(io_err(&documents))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            o.uploader.put_file(
                &path,
                object_path(&o.run, &format!("{ATTACHMENTS_DIR}/{name}")),
            )?;
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
        self.upload_log(o)?;
        self.write_json("summary.json", summary)?;
        o.uploader.put_file(
            &self.partial.join("summary.json"),
            o.run.clone().join("summary.json"),
        )?;
        self.write_json("manifest.json", manifest)?;
        if let Some(a) = attachments {
            fs::remove_file(&a.files).map_err(io_err(&a.files))?;
        }
        o.uploader.put_file(
            &self.partial.join("manifest.json"),
            o.run.clone().join(crate::storage::runs::MANIFEST),
        )?;
        o.uploader
            .handle()
            .block_on(o.runs.point_latest(&self.run_id))?;
        fs::remove_dir_all(&self.partial).map_err(io_err(&self.partial))?;
        Ok(self.export_dir.clone())
    }

    /// Ends a run that failed: writes `summary.json` and renames the folder to `failed_dir()` so
    /// nothing mistakes it for a complete run. Returns that folder. With `discard_data` (the run
    /// failed because the disk could not take its files) the resource files and attachments are
    /// removed first, so that the space is free for the summary and the next run; `errors/` is kept.
    /// With an object store the summary is uploaded too (the run's objects have no manifest, so
    /// nothing reads them as a run; retention removes them). Blocks: call it from a blocking thread.
    pub fn abandon<S: Serialize>(
        mut self,
        summary: &S,
        discard_data: bool,
    ) -> Result<PathBuf, OutputError> {
        if discard_data {
            self.discard_data();
        }
        self.write_json("summary.json", summary)?;
        if let Some(o) = &self.object {
            let _ = fs::remove_dir_all(self.partial.join(SPOOL_DIR));
            if let Err(e) = self.upload_log(o) {
                tracing::warn!("the failed run's log stays in the working folder: {e}");
            }
            let uploaded = o.uploader.put_file(
                &self.partial.join("summary.json"),
                o.run.clone().join("summary.json"),
            );
            if let Err(e) = uploaded {
                tracing::warn!("the failed run's summary stays in the working folder: {e}");
            }
        }
        let failed = self.failed_dir();
        fs::rename(&self.partial, &failed).map_err(io_err(&failed))?;
        Ok(failed)
    }

    /// Uploads the run log (`log.ndjson` in the staging folder), if the run has one.
    fn upload_log(&self, o: &ObjectRun) -> Result<(), OutputError> {
        let log = self.partial.join(LOG_FILE);
        if log.exists() {
            o.uploader.put_file(&log, o.run.clone().join(LOG_FILE))?;
        }
        Ok(())
    }

    /// Closes (without syncing) and removes every resource and deleted-resource file; uploads are
    /// given up.
    fn discard_data(&mut self) {
        for (relative, (_, file)) in std::mem::take(&mut self.files) {
            if matches!(file.sink, Sink::Object(_)) {
                continue;
            }
            let path = self.partial.join(&relative);
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
        let _ = fs::remove_dir(self.partial.join(DELETED_DIR));
        // Files set aside by `detach` while their resources were being rewritten, and the list of
        // attachments for the manifest.
        for entry in fs::read_dir(&self.partial).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if (name.ends_with(".original.ndjson") || name == ATTACHMENTS_LIST)
                && let Err(e) = fs::remove_file(entry.path())
            {
                tracing::warn!("cannot remove {}: {e}", entry.path().display());
            }
        }
        for dir in [ATTACHMENTS_DIR, ATTACHMENTS_INDEX] {
            let dir = self.partial.join(dir);
            if dir.exists()
                && let Err(e) = fs::remove_dir_all(&dir)
            {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
    }

    /// Writes `<staging>/<name>` as pretty JSON, streamed (the manifest's attachment list can be long).
    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), OutputError> {
        let path = self.partial.join(name);
        let file = create_private_file(&path).map_err(io_err(&path))?;
        let mut out = BufWriter::new(file);
        serde_json::to_writer_pretty(&mut out, value).map_err(|e| match e.io_error_kind() {
            Some(kind) => OutputError::Io {
                path: path.clone(),
                source: io::Error::new(kind, e.to_string()),
            },
            None => OutputError::Serialize {
                name: name.into(),
                message: e.to_string(),
            },
        })?;
        out.write_all(b"\n").map_err(io_err(&path))?;
        let file = out
            .into_inner()
            .map_err(|e| io_err(&path)(e.into_error()))?;
        file.sync_all().map_err(io_err(&path))
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Atomically points `<export_dir>/latest` at `run_id` (a relative symlink).
fn point_latest(export_dir: &Path, run_id: &str) -> io::Result<()> {
    let tmp = export_dir.join(".latest.tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(run_id, &tmp)?;
    fs::rename(&tmp, export_dir.join("latest"))
}
