//! The run's `attachments/` folder: documents stored once each under the SHA-256 of their content
//! (`<sha256>.<ext>`), and a journal (`.journal.ndjson`) that maps each downloaded URL and content
//! type to its file, so a run that resumes does not download what it has. Files are written to a
//! temporary name, synced and renamed, so a file under its final name is always complete.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::output::{ATTACHMENTS_DIR, create_private_dir};

const JOURNAL: &str = ".journal.ndjson";

/// What is downloaded: the absolute URL and the content type asked for (Epic serves one Binary as
/// HTML or RTF, depending on `Accept`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Key {
    pub url: String,
    pub content_type: String,
}

/// A document in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stored {
    /// File name in `attachments/`: `<sha256>.<ext>`.
    pub file: String,
    /// The content type it was stored as (the attachment's, else the server's).
    pub content_type: String,
    pub size: u64,
    pub sha256: String,
    /// Base64 of the SHA-1, as FHIR's `Attachment.hash`.
    pub sha1: String,
}

#[derive(Serialize, Deserialize)]
struct JournalLine {
    key: Key,
    stored: Stored,
}

pub struct Store {
    dir: PathBuf,
    journal: File,
    next_temp: AtomicU64,
}

/// Whether `name` is one of the store's file names (the journal is ours, but it is read back).
fn is_store_name(name: &str) -> bool {
    name.split_once('.').is_some_and(|(sha, ext)| {
        sha.len() == 64
            && sha.bytes().all(|b| b.is_ascii_hexdigit())
            && (1..=8).contains(&ext.len())
            && ext.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

impl Store {
    /// Opens (creating) `<staging>/attachments/` and hands `found` what an interrupted run of the same
    /// export stored: entries whose file is there with the recorded size.
    pub fn open(staging: &Path, found: &mut dyn FnMut(Key, Stored)) -> io::Result<Store> {
        let dir = staging.join(ATTACHMENTS_DIR);
        create_private_dir(&dir)?;
        // Downloads a killed run left half-way.
        for entry in fs::read_dir(&dir)?.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(".download-")
            {
                fs::remove_file(entry.path())?;
            }
        }
        let journal_path = dir.join(JOURNAL);
        if let Ok(f) = File::open(&journal_path) {
            for line in BufReader::new(f).lines() {
                let Ok(Ok(entry)) = line.map(|l| serde_json::from_str::<JournalLine>(&l)) else {
                    continue;
                };
                let complete = is_store_name(&entry.stored.file)
                    && fs::metadata(dir.join(&entry.stored.file))
                        .is_ok_and(|m| m.is_file() && m.len() == entry.stored.size);
                if complete {
                    found(entry.key, entry.stored);
                }
            }
        }
        let journal = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&journal_path)?;
        Ok(Store {
            dir,
            journal,
            next_temp: AtomicU64::new(0),
        })
    }

    /// The store's folder (`<staging>/attachments`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh temporary path in the store for one download.
    pub fn temp_path(&self) -> PathBuf {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!(".download-{n}.tmp"))
    }

    /// Moves a complete (synced) temporary file under its final name; identical content stored
    /// before is kept and the temporary file removed.
    pub fn commit(&self, temp: &Path, stored: &Stored) -> io::Result<()> {
        let target = self.dir.join(&stored.file);
        if target.exists() {
            fs::remove_file(temp)
        } else {
            fs::rename(temp, target)
        }
    }

    /// Notes in the journal that `key` is stored.
    pub fn record(&mut self, key: &Key, stored: &Stored) -> io::Result<()> {
        let mut line = serde_json::to_vec(&JournalLine {
            key: key.clone(),
            stored: stored.clone(),
        })
        .map_err(io::Error::other)?;
        line.push(b'\n');
        self.journal.write_all(&line)
    }

    /// The content of a stored file (for inlining small ones).
    pub fn read(&self, file: &str) -> io::Result<Vec<u8>> {
        fs::read(self.dir.join(file))
    }

    /// Removes the journal and every file but `keep` (documents only inlined, or refused for a wrong
    /// declared size or hash), once the resources are written.
    pub fn finish(self, keep: &mut dyn FnMut(&str) -> io::Result<bool>) -> io::Result<()> {
        drop(self.journal);
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let kept = match name.to_str() {
                Some(name) => keep(name)?,
                None => false,
            };
            if !kept {
                fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// Removes the folder if nothing is in it.
    pub fn remove_if_empty(staging: &Path) {
        let _ = fs::remove_dir(staging.join(ATTACHMENTS_DIR));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn stored(file: &str, size: u64) -> Stored {
        Stored {
            file: file.into(),
            content_type: "text/html".into(),
            size,
            sha256: file[..64].into(),
            sha1: String::new(),
        }
    }

    #[test]
    fn a_reopened_store_knows_only_complete_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut found = HashMap::new();
        let mut store = Store::open(dir.path(), &mut |k, s| {
            found.insert(k, s);
        })
        .unwrap();
        assert!(found.is_empty());
        let a = format!("{}.html", "a".repeat(64));
        let b = format!("{}.html", "b".repeat(64));
        for (name, size) in [(&a, 3), (&b, 5)] {
            let tmp = store.temp_path();
            fs::write(&tmp, vec![b'x'; 3]).unwrap();
            store.commit(&tmp, &stored(name, size)).unwrap();
        }
        let key = |u: &str| Key {
            url: u.into(),
            content_type: "text/html".into(),
        };
        store
            .record(&key("https://h/Binary/a"), &stored(&a, 3))
            .unwrap();
        // Recorded with a size the file does not have: downloaded again.
        store
            .record(&key("https://h/Binary/b"), &stored(&b, 5))
            .unwrap();
        // A download the run was killed in.
        fs::write(store.temp_path(), b"half").unwrap();
        drop(store);
        let mut found = HashMap::new();
        let store = Store::open(dir.path(), &mut |k, s| {
            found.insert(k, s);
        })
        .unwrap();
        fs::write(store.temp_path(), b"the same name again").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[&key("https://h/Binary/a")].file, a);
        store.finish(&mut |name| Ok(name == a)).unwrap();
        let left: Vec<_> = fs::read_dir(dir.path().join(ATTACHMENTS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [a]);
    }
}
