//! What the phase knows about every document, on disk so that memory stays flat however many there
//! are (see `export::disk_table`), in the staging folder's `.attachments.index/`:
//! - `documents`: per (URL, content type), keyed by 128 bits of their SHA-256, what became of it: stored
//!   (digests, size, content type, extension, whether a resource links it), failed, or skipped;
//! - `files`: per stored file (its SHA-256), whether a resource links it or has it inlined, and the
//!   other URLs with the same content (rare), chained in `strings`;
//! - `strings`: content types (the first few interned) and those extra URLs.
//!
//! The manifest's list of files goes to a file as documents are first linked.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::fetch::extension;
use super::store::{Key, Stored};
use crate::export::disk_table::{DiskTable, ScratchDir, Spill};
use crate::output::{ATTACHMENTS_DIR, ATTACHMENTS_INDEX, AttachmentFile};

/// Content types kept in memory for reuse; a server that sends more distinct ones than this has
/// each further one written once per document.
const INTERNED_TYPES: usize = 32;

/// A key, hashed: 128 bits of SHA-256 over the URL and the content type.
fn key_id(key: &Key) -> [u8; 16] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(key.url.as_bytes());
    ctx.update(b"\n");
    ctx.update(key.content_type.as_bytes());
    let d = ctx.finish();
    d.as_ref()[..16].try_into().expect("16 bytes")
}

/// Where a string is in `strings`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Text {
    offset: u64,
    len: u32,
}

/// A stored document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Doc {
    pub sha256: [u8; 32],
    sha1: [u8; 20],
    pub size: u64,
    content_type: Text,
    /// The file name's extension, NUL-padded.
    ext: [u8; 8],
}

impl Doc {
    fn ext(&self) -> &str {
        let len = self.ext.iter().position(|&b| b == 0).unwrap_or(8);
        std::str::from_utf8(&self.ext[..len]).unwrap_or("bin")
    }
}

/// What became of a (URL, content type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Downloaded; `linked` once a resource links it as a file.
    Stored { doc: Doc, linked: bool },
    /// Not downloaded; recorded once.
    Failed,
    /// Left alone by `contentTypes`.
    Skipped,
}

/// An entry's bytes in `documents`: tag, linked, SHA-256, SHA-1, size, content type, extension.
const ENTRY: usize = 1 + 1 + 32 + 20 + 8 + 8 + 4 + 8;

impl Entry {
    fn encode(&self) -> [u8; ENTRY] {
        let mut v = [0u8; ENTRY];
        match self {
            Entry::Stored { doc, linked } => {
                v[0] = 1;
                v[1] = u8::from(*linked);
                v[2..34].copy_from_slice(&doc.sha256);
                v[34..54].copy_from_slice(&doc.sha1);
                v[54..62].copy_from_slice(&doc.size.to_le_bytes());
                v[62..70].copy_from_slice(&doc.content_type.offset.to_le_bytes());
                v[70..74].copy_from_slice(&doc.content_type.len.to_le_bytes());
                v[74..82].copy_from_slice(&doc.ext);
            }
            Entry::Failed => v[0] = 2,
            Entry::Skipped => v[0] = 3,
        }
        v
    }

    fn decode(v: &[u8; ENTRY]) -> io::Result<Entry> {
        let u64_at = |at: usize| u64::from_le_bytes(v[at..at + 8].try_into().expect("8 bytes"));
        match v[0] {
            1 => Ok(Entry::Stored {
                linked: v[1] != 0,
                doc: Doc {
                    sha256: v[2..34].try_into().expect("32 bytes"),
                    sha1: v[34..54].try_into().expect("20 bytes"),
                    size: u64_at(54),
                    content_type: Text {
                        offset: u64_at(62),
                        len: u32::from_le_bytes(v[70..74].try_into().expect("4 bytes")),
                    },
                    ext: v[74..82].try_into().expect("8 bytes"),
                },
            }),
            2 => Ok(Entry::Failed),
            3 => Ok(Entry::Skipped),
            _ => Err(io::Error::other("the attachment index is damaged")),
        }
    }
}

/// What the run did with a stored file: flags, and the chain of its extra sources in `strings`.
#[derive(Default)]
struct FileState {
    linked: bool,
    inlined: bool,
    first_source: u64,
    last_source: u64,
}

const FILE_STATE: usize = 1 + 8 + 8;

impl FileState {
    fn encode(&self) -> [u8; FILE_STATE] {
        let mut v = [0u8; FILE_STATE];
        v[0] = u8::from(self.linked) | u8::from(self.inlined) << 1;
        v[1..9].copy_from_slice(&self.first_source.to_le_bytes());
        v[9..17].copy_from_slice(&self.last_source.to_le_bytes());
        v
    }

    fn decode(v: &[u8; FILE_STATE]) -> FileState {
        FileState {
            linked: v[0] & 1 != 0,
            inlined: v[0] & 2 != 0,
            first_source: u64::from_le_bytes(v[1..9].try_into().expect("8 bytes")),
            last_source: u64::from_le_bytes(v[9..17].try_into().expect("8 bytes")),
        }
    }
}

/// An extra source in `strings`: the next one's offset (0: none), the length, the URL.
const SOURCE_HEAD: usize = 8 + 4;

pub struct Index {
    documents: DiskTable<16, ENTRY>,
    files: DiskTable<32, FILE_STATE>,
    strings: Spill,
    /// The first `INTERNED_TYPES` content types.
    types: Vec<(Box<str>, Text)>,
    linked: u64,
    linked_bytes: u64,
    inlined: u64,
    extra_sources: u64,
    /// The manifest's `files`, one JSON line per linked file (see `manifest_lines`).
    lines: BufWriter<File>,
    lines_path: PathBuf,
    /// Last, so that the tables are closed before their folder is removed.
    dir: ScratchDir,
}

impl Index {
    /// An empty index in `<staging>/.attachments.index/` (a killed run's is replaced), whose manifest
    /// lines go to `lines_path(staging)`.
    pub fn new(staging: &Path) -> io::Result<Index> {
        let dir = ScratchDir::create(&staging.join(ATTACHMENTS_INDEX))?;
        let lines_path = lines_path(staging);
        let file = crate::output::create_private_file_truncating(&lines_path)?;
        Ok(Index {
            documents: DiskTable::create(&dir.path().join("documents"))?,
            files: DiskTable::create(&dir.path().join("files"))?,
            strings: Spill::create(&dir.path().join("strings"))?,
            types: Vec::new(),
            linked: 0,
            linked_bytes: 0,
            inlined: 0,
            extra_sources: 0,
            lines: BufWriter::new(file),
            lines_path,
            dir,
        })
    }

    /// The index's folder (for errors).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn get(&mut self, key: &Key) -> io::Result<Option<Entry>> {
        self.documents
            .get(&key_id(key))?
            .map(|v| Entry::decode(&v))
            .transpose()
    }

    pub fn contains(&mut self, key: &Key) -> io::Result<bool> {
        Ok(self.documents.get(&key_id(key))?.is_some())
    }

    pub fn set(&mut self, key: &Key, entry: Entry) -> io::Result<()> {
        self.documents
            .insert(&key_id(key), &entry.encode())
            .map(drop)
    }

    /// Remembers a stored document; `None` if the record is not one this store writes.
    pub fn doc(&mut self, s: &Stored) -> io::Result<Option<Doc>> {
        let mut sha256 = [0u8; 32];
        let mut sha1 = [0u8; 20];
        let digests = decode_hex(&s.sha256, &mut sha256).and_then(|()| {
            let raw = BASE64.decode(&s.sha1).ok()?;
            (raw.len() == 20).then(|| sha1.copy_from_slice(&raw))
        });
        if digests.is_none() {
            return Ok(None);
        }
        let mut ext = [0u8; 8];
        let name = extension(&s.content_type).as_bytes();
        ext[..name.len()].copy_from_slice(name);
        Ok(Some(Doc {
            sha256,
            sha1,
            size: s.size,
            content_type: self.intern(&s.content_type)?,
            ext,
        }))
    }

    fn intern(&mut self, content_type: &str) -> io::Result<Text> {
        if let Some((_, text)) = self.types.iter().find(|(t, _)| **t == *content_type) {
            return Ok(*text);
        }
        let text = Text {
            len: u32::try_from(content_type.len()).map_err(io::Error::other)?,
            offset: self.strings.push(content_type.as_bytes())?,
        };
        if self.types.len() < INTERNED_TYPES {
            self.types.push((content_type.into(), text));
        }
        Ok(text)
    }

    fn content_type(&self, d: &Doc) -> io::Result<String> {
        if let Some((t, _)) = self.types.iter().find(|(_, t)| *t == d.content_type) {
            return Ok(t.to_string());
        }
        let bytes = self
            .strings
            .read(d.content_type.offset, d.content_type.len as usize)?;
        String::from_utf8(bytes).map_err(io::Error::other)
    }

    /// The file name in `attachments/`.
    pub fn file(d: &Doc) -> String {
        format!("{}.{}", crate::text::hex(&d.sha256), d.ext())
    }

    /// FHIR's `Attachment.hash`: base64 of the SHA-1.
    pub fn sha1(d: &Doc) -> String {
        BASE64.encode(d.sha1)
    }

    fn file_state(&mut self, sha256: &[u8; 32]) -> io::Result<FileState> {
        Ok(self
            .files
            .get(sha256)?
            .map(|v| FileState::decode(&v))
            .unwrap_or_default())
    }

    /// Notes that a resource links `key`'s document as a file (`source` is the URL it came from).
    /// True when this is the first link to the file: it now belongs to the run.
    pub fn link(&mut self, key: &Key, doc: &Doc, source: &str) -> io::Result<bool> {
        if let Some(Entry::Stored { doc, linked }) = self.get(key)? {
            if linked {
                return Ok(false);
            }
            self.set(key, Entry::Stored { doc, linked: true })?;
        }
        let mut state = self.file_state(&doc.sha256)?;
        if state.linked {
            // Another URL with this content came first: this one joins its sources.
            let mut record = Vec::with_capacity(SOURCE_HEAD + source.len());
            record.extend_from_slice(&0u64.to_le_bytes());
            record.extend_from_slice(
                &u32::try_from(source.len())
                    .map_err(io::Error::other)?
                    .to_le_bytes(),
            );
            record.extend_from_slice(source.as_bytes());
            let at = self.strings.push(&record)?;
            if state.last_source == 0 {
                state.first_source = at;
            } else {
                self.strings.patch(state.last_source, &at.to_le_bytes())?;
            }
            state.last_source = at;
            self.files.insert(&doc.sha256, &state.encode())?;
            self.extra_sources += 1;
            return Ok(false);
        }
        state.linked = true;
        self.files.insert(&doc.sha256, &state.encode())?;
        self.linked += 1;
        self.linked_bytes += doc.size;
        let entry = AttachmentFile {
            url: format!("{ATTACHMENTS_DIR}/{}", Index::file(doc)),
            content_type: self.content_type(doc)?,
            bytes: doc.size,
            sha256: crate::text::hex(&doc.sha256),
            sources: vec![source.to_owned()],
        };
        let mut line = serde_json::to_vec(&entry).map_err(io::Error::other)?;
        line.push(b'\n');
        self.lines.write_all(&line).map(|()| true)
    }

    /// Notes that a resource has `doc` inlined as `data`.
    pub fn inline(&mut self, doc: &Doc) -> io::Result<()> {
        let mut state = self.file_state(&doc.sha256)?;
        if !state.inlined {
            state.inlined = true;
            self.files.insert(&doc.sha256, &state.encode())?;
            self.inlined += 1;
        }
        Ok(())
    }

    /// Whether `name` (in `attachments/`) is a file a resource links to.
    pub fn is_linked_file(&mut self, name: &str) -> io::Result<bool> {
        let mut sha = [0u8; 32];
        match name
            .split_once('.')
            .and_then(|(hex, _)| decode_hex(hex, &mut sha))
        {
            Some(()) => Ok(self.file_state(&sha)?.linked),
            None => Ok(false),
        }
    }

    /// (files linked, their bytes, documents inlined).
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.linked, self.linked_bytes, self.inlined)
    }

    /// The extra sources of a file, in the order they were linked.
    fn extra_sources_of(&mut self, sha256: &[u8; 32]) -> io::Result<Vec<String>> {
        let mut at = self.file_state(sha256)?.first_source;
        let mut out = Vec::new();
        while at != 0 {
            let head = self.strings.read(at, SOURCE_HEAD)?;
            let next = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
            let url = self.strings.read(at + SOURCE_HEAD as u64, len)?;
            out.push(String::from_utf8(url).map_err(io::Error::other)?);
            if next != 0 && next <= at {
                return Err(io::Error::other("the attachment index is damaged"));
            }
            at = next;
        }
        Ok(out)
    }

    /// Closes the manifest lines (the extra sources merged in) and returns their file. Each line
    /// is read back on its own: the memory held is one file's sources.
    pub fn manifest_lines(mut self) -> io::Result<PathBuf> {
        self.lines.flush()?;
        self.lines.get_ref().sync_all()?;
        if self.extra_sources == 0 {
            return Ok(self.lines_path.clone());
        }
        let merged = self.lines_path.with_extension("merged");
        let mut out = BufWriter::new(crate::output::create_private_file_truncating(&merged)?);
        for line in BufReader::new(File::open(&self.lines_path)?).lines() {
            let mut entry: AttachmentFile =
                serde_json::from_str(&line?).map_err(io::Error::other)?;
            let mut sha = [0u8; 32];
            if decode_hex(&entry.sha256, &mut sha).is_some() {
                entry.sources.extend(self.extra_sources_of(&sha)?);
            }
            serde_json::to_writer(&mut out, &entry).map_err(io::Error::other)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        out.get_ref().sync_all()?;
        fs::rename(&merged, &self.lines_path)?;
        Ok(self.lines_path.clone())
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
        let mut index = Index::new(dir.path()).unwrap();
        let key = |u: &str| Key {
            url: u.into(),
            content_type: "text/html".into(),
        };
        let (a, b) = (
            index.doc(&stored(1, 10)).unwrap().unwrap(),
            index.doc(&stored(2, 20)).unwrap().unwrap(),
        );
        for (k, d) in [("https://h/Binary/a", a), ("https://h/Binary/b", b)] {
            index
                .set(
                    &key(k),
                    Entry::Stored {
                        doc: d,
                        linked: false,
                    },
                )
                .unwrap();
        }
        assert!(index.contains(&key("https://h/Binary/a")).unwrap());
        assert!(!index.contains(&key("https://h/Binary/c")).unwrap());
        assert!(
            index
                .link(&key("https://h/Binary/a"), &a, "Binary/a")
                .unwrap()
        );
        assert!(
            !index
                .link(&key("https://h/Binary/a"), &a, "Binary/a")
                .unwrap()
        );
        assert!(
            index
                .link(&key("https://h/Binary/b"), &b, "Binary/b")
                .unwrap()
        );
        // Other URLs with the same content as `a`.
        for more in ["a2", "a3"] {
            index
                .set(
                    &key(&format!("https://h/Binary/{more}")),
                    Entry::Stored {
                        doc: a,
                        linked: false,
                    },
                )
                .unwrap();
            let linked = index
                .link(
                    &key(&format!("https://h/Binary/{more}")),
                    &a,
                    &format!("Binary/{more}"),
                )
                .unwrap();
            assert!(!linked, "the file is the run's already");
        }
        index.inline(&b).unwrap();
        index.inline(&b).unwrap();
        assert_eq!(index.counts(), (2, 30, 1));
        assert!(index.is_linked_file(&Index::file(&a)).unwrap());
        assert!(
            !index
                .is_linked_file(&format!("{}.html", "03".repeat(32)))
                .unwrap()
        );
        assert!(!index.is_linked_file("nothex.html").unwrap());
        let index_dir = dir.path().join(ATTACHMENTS_INDEX);
        assert!(index_dir.is_dir());
        let lines = std::fs::read_to_string(index.manifest_lines().unwrap()).unwrap();
        assert!(
            !index_dir.exists(),
            "the index is removed once the lines are written"
        );
        let entries: Vec<AttachmentFile> = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].sources, ["Binary/a", "Binary/a2", "Binary/a3"]);
        assert_eq!(entries[1].sources, ["Binary/b"]);
        assert_eq!(
            entries[1].url,
            format!("attachments/{}.html", "02".repeat(32))
        );
    }

    #[test]
    fn many_content_types_are_kept_on_disk_not_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::new(dir.path()).unwrap();
        let mut docs = Vec::new();
        for i in 0..100u8 {
            let mut s = stored(i, 1);
            s.content_type = format!("application/x-type-{i}");
            docs.push(index.doc(&s).unwrap().unwrap());
        }
        assert_eq!(index.types.len(), INTERNED_TYPES);
        for (i, d) in docs.iter().enumerate() {
            assert_eq!(
                index.content_type(d).unwrap(),
                format!("application/x-type-{i}")
            );
            assert!(Index::file(d).ends_with(".bin"));
        }
    }

    #[test]
    fn a_state_survives_the_round_trip_through_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = Index::new(dir.path()).unwrap();
        let doc = index.doc(&stored(7, 1 << 40)).unwrap().unwrap();
        let entries = [
            Entry::Stored { doc, linked: true },
            Entry::Stored { doc, linked: false },
            Entry::Failed,
            Entry::Skipped,
        ];
        for (i, e) in entries.iter().enumerate() {
            let k = Key {
                url: format!("https://h/{i}"),
                content_type: String::new(),
            };
            index.set(&k, *e).unwrap();
            assert_eq!(index.get(&k).unwrap(), Some(*e));
        }
        assert_eq!(Index::sha1(&doc), BASE64.encode([7u8; 20]));
    }
}
