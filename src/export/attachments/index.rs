//! What the phase knows about every document, kept small: a run with hundreds of thousands of notes
//! holds one entry of about 100 bytes per (URL, content type) — a 128-bit hash of the key, the
//! document's digests, size and an interned content type — and one 32-byte digest per linked file.
//! The manifest's list of files goes to a file as documents are first linked, not into memory.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::fetch::extension;
use super::store::{Key, Stored};
use crate::output::{ATTACHMENTS_DIR, AttachmentFile};

/// A key, hashed: 128 bits of SHA-256 over the URL and the content type.
type KeyId = u128;

fn key_id(key: &Key) -> KeyId {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(key.url.as_bytes());
    ctx.update(b"\n");
    ctx.update(key.content_type.as_bytes());
    let d = ctx.finish();
    let mut first = [0u8; 16];
    first.copy_from_slice(&d.as_ref()[..16]);
    u128::from_le_bytes(first)
}

/// A stored document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Doc {
    pub sha256: [u8; 32],
    sha1: [u8; 20],
    pub size: u64,
    content_type: u32,
}

/// What became of a (URL, content type).
#[derive(Clone, Copy, Debug)]
pub enum Entry {
    /// Downloaded; `linked` once a resource links it as a file.
    Stored { doc: Doc, linked: bool },
    /// Not downloaded; recorded once.
    Failed,
    /// Left alone by `contentTypes`.
    Skipped,
}

pub struct Index {
    entries: HashMap<KeyId, Entry>,
    content_types: Vec<Box<str>>,
    /// Files a resource links to.
    linked: HashSet<[u8; 32]>,
    linked_bytes: u64,
    /// Files put into resources as `data`.
    inlined: HashSet<[u8; 32]>,
    /// The manifest's `files`, one JSON line per linked file (see `manifest_lines`).
    lines: BufWriter<File>,
    lines_path: PathBuf,
    /// Sources of files whose content another URL brought first (rare), merged in at the end.
    more_sources: HashMap<[u8; 32], Vec<String>>,
}

impl Index {
    /// An empty index whose manifest lines go to `lines_path`.
    pub fn new(lines_path: PathBuf) -> io::Result<Index> {
        let file = crate::output::create_private_file_truncating(&lines_path)?;
        Ok(Index {
            entries: HashMap::new(),
            content_types: Vec::new(),
            linked: HashSet::new(),
            linked_bytes: 0,
            inlined: HashSet::new(),
            lines: BufWriter::new(file),
            lines_path,
            more_sources: HashMap::new(),
        })
    }

    pub fn get(&self, key: &Key) -> Option<Entry> {
        self.entries.get(&key_id(key)).copied()
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.entries.contains_key(&key_id(key))
    }

    pub fn set(&mut self, key: &Key, entry: Entry) {
        self.entries.insert(key_id(key), entry);
    }

    /// Remembers a stored document; `None` if the record is not one this store writes.
    pub fn doc(&mut self, s: &Stored) -> Option<Doc> {
        let mut sha256 = [0u8; 32];
        let mut sha1 = [0u8; 20];
        decode_hex(&s.sha256, &mut sha256)?;
        let raw = BASE64.decode(&s.sha1).ok()?;
        (raw.len() == 20).then(|| sha1.copy_from_slice(&raw))?;
        let content_type = match self
            .content_types
            .iter()
            .position(|c| **c == *s.content_type)
        {
            Some(i) => i,
            None => {
                self.content_types.push(s.content_type.as_str().into());
                self.content_types.len() - 1
            }
        } as u32;
        Some(Doc {
            sha256,
            sha1,
            size: s.size,
            content_type,
        })
    }

    pub fn content_type(&self, d: &Doc) -> &str {
        &self.content_types[d.content_type as usize]
    }

    /// The file name in `attachments/`.
    pub fn file(&self, d: &Doc) -> String {
        format!(
            "{}.{}",
            crate::text::hex(&d.sha256),
            extension(self.content_type(d))
        )
    }

    /// FHIR's `Attachment.hash`: base64 of the SHA-1.
    pub fn sha1(d: &Doc) -> String {
        BASE64.encode(d.sha1)
    }

    /// Notes that a resource links `key`'s document as a file (`source` is the URL it came from).
    /// True when this is the first link to the file: it now belongs to the run.
    pub fn link(&mut self, key: &Key, doc: &Doc, source: &str) -> io::Result<bool> {
        let id = key_id(key);
        if let Some(Entry::Stored { linked, .. }) = self.entries.get_mut(&id) {
            if *linked {
                return Ok(false);
            }
            *linked = true;
        }
        if !self.linked.insert(doc.sha256) {
            self.more_sources
                .entry(doc.sha256)
                .or_default()
                .push(source.to_owned());
            return Ok(false);
        }
        self.linked_bytes += doc.size;
        let entry = AttachmentFile {
            url: format!("{ATTACHMENTS_DIR}/{}", self.file(doc)),
            content_type: self.content_type(doc).to_owned(),
            bytes: doc.size,
            sha256: crate::text::hex(&doc.sha256),
            sources: vec![source.to_owned()],
        };
        let mut line = serde_json::to_vec(&entry).map_err(io::Error::other)?;
        line.push(b'\n');
        self.lines.write_all(&line).map(|()| true)
    }

    pub fn inline(&mut self, doc: &Doc) {
        self.inlined.insert(doc.sha256);
    }

    /// Whether `name` (in `attachments/`) is a file a resource links to.
    pub fn is_linked_file(&self, name: &str) -> bool {
        let mut sha = [0u8; 32];
        name.split_once('.')
            .and_then(|(hex, _)| decode_hex(hex, &mut sha))
            .is_some_and(|()| self.linked.contains(&sha))
    }

    /// (files linked, their bytes, documents inlined).
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.linked.len() as u64,
            self.linked_bytes,
            self.inlined.len() as u64,
        )
    }

    /// Closes the manifest lines (the extra sources merged in) and returns their file.
    pub fn manifest_lines(mut self) -> io::Result<PathBuf> {
        self.lines.flush()?;
        self.lines.get_ref().sync_all()?;
        drop(self.lines);
        if self.more_sources.is_empty() {
            return Ok(self.lines_path);
        }
        let merged = self.lines_path.with_extension("merged");
        let mut out = BufWriter::new(crate::output::create_private_file_truncating(&merged)?);
        for line in BufReader::new(File::open(&self.lines_path)?).lines() {
            let mut entry: AttachmentFile =
                serde_json::from_str(&line?).map_err(io::Error::other)?;
            let mut sha = [0u8; 32];
            if decode_hex(&entry.sha256, &mut sha).is_some()
                && let Some(more) = self.more_sources.remove(&sha)
            {
                entry.sources.extend(more);
            }
            serde_json::to_writer(&mut out, &entry).map_err(io::Error::other)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        out.get_ref().sync_all()?;
        std::fs::rename(&merged, &self.lines_path)?;
        Ok(self.lines_path)
    }
}

fn decode_hex(hex: &str, out: &mut [u8]) -> Option<()> {
    if hex.len() != out.len() * 2 {
        return None;
    }
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(())
}

/// The path of the manifest lines in a staging folder.
pub fn lines_path(staging: &Path) -> PathBuf {
    staging.join(crate::output::ATTACHMENTS_LIST)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(byte: u8, size: u64) -> Stored {
        Stored {
            file: String::new(),
            content_type: "text/html".into(),
            size,
            sha256: crate::text::hex(&[byte; 32]),
            sha1: BASE64.encode([byte; 20]),
        }
    }

    #[test]
    fn one_manifest_entry_per_file_with_every_source() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::new(lines_path(dir.path())).unwrap();
        let key = |u: &str| Key {
            url: u.into(),
            content_type: "text/html".into(),
        };
        let (a, b) = (
            index.doc(&stored(1, 10)).unwrap(),
            index.doc(&stored(2, 20)).unwrap(),
        );
        for (k, d) in [("https://h/Binary/a", a), ("https://h/Binary/b", b)] {
            index.set(
                &key(k),
                Entry::Stored {
                    doc: d,
                    linked: false,
                },
            );
        }
        assert!(index.contains(&key("https://h/Binary/a")));
        assert!(!index.contains(&key("https://h/Binary/c")));
        index
            .link(&key("https://h/Binary/a"), &a, "Binary/a")
            .unwrap();
        index
            .link(&key("https://h/Binary/a"), &a, "Binary/a")
            .unwrap();
        index
            .link(&key("https://h/Binary/b"), &b, "Binary/b")
            .unwrap();
        // Another URL with the same content as `a`.
        index.set(
            &key("https://h/Binary/a2"),
            Entry::Stored {
                doc: a,
                linked: false,
            },
        );
        index
            .link(&key("https://h/Binary/a2"), &a, "Binary/a2")
            .unwrap();
        assert_eq!(index.counts(), (2, 30, 0));
        assert!(index.is_linked_file(&index.file(&a)));
        assert!(!index.is_linked_file("nothex.html"));
        let lines = std::fs::read_to_string(index.manifest_lines().unwrap()).unwrap();
        let entries: Vec<AttachmentFile> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].sources, ["Binary/a", "Binary/a2"]);
        assert_eq!(entries[1].sources, ["Binary/b"]);
        assert_eq!(
            entries[1].url,
            format!("attachments/{}.html", "02".repeat(32))
        );
    }
}
