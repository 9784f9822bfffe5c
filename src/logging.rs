//! Log setup: plain text or JSON lines on stderr, filtered by `RUST_LOG` (default `info`), and
//! optionally also to a log file rotated daily (`--log-file`; the original tool's `backend_epic.log`
//! for an INI config). At the default level our logs carry counts and messages, never patient ids or
//! resource content.

use std::path::{Path, PathBuf};

use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Why the log file cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    #[error("--log-file {0}: not a file name")]
    NotAFile(String),
    #[error("--log-file {path}: cannot create {dir}: {source}")]
    Folder {
        path: String,
        dir: String,
        source: std::io::Error,
    },
    #[error("--log-file {path}: {source}")]
    Open {
        path: String,
        source: tracing_appender::rolling::InitError,
    },
}

/// A daily-rotated log file: `PATH` becomes `PATH.YYYY-MM-DD` (UTC), one file a day.
fn appender(path: &Path) -> Result<RollingFileAppender, LogFileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| LogFileError::NotAFile(path.display().to_string()))?;
    // The folder is made 0700 and the files 0600 (the process' umask is 077, see `cli`): a log may
    // name the export's folders and servers, and is kept like the runs.
    crate::output::create_private_dir(&dir).map_err(|source| LogFileError::Folder {
        path: path.display().to_string(),
        dir: dir.display().to_string(),
        source,
    })?;
    RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix(name.to_string_lossy())
        .build(&dir)
        .map_err(|source| LogFileError::Open {
            path: path.display().to_string(),
            source,
        })
}

/// Installs the global subscriber (a second call is a no-op, for tests). With `file`, every line
/// also goes to that daily-rotated file, without terminal colours.
pub fn init(format: LogFormat, file: Option<&Path>) -> Result<(), LogFileError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let writer = match file {
        Some(path) => BoxMakeWriter::new(std::io::stderr.and(appender(path)?)),
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(file.is_none())
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}
