//! Scratch tables on disk, for what a run must remember about each of an unbounded number of things
//! (every attachment URL, every document file) while the process's memory stays flat.
//!
//! [`DiskTable`] is a hash map with fixed-size keys and values in one file: open addressing over
//! 4 KiB pages, probing page by page, doubled (rewritten into a new file) when three quarters full.
//! [`Spill`] is an append-only file of byte strings read back by offset. Both keep one page in memory;
//! the rest is in the file, that is in the kernel's page cache, which is not the process's memory
//! and gives way under pressure. They are scratch: created empty, never synced, removed when dropped,
//! and rebuilt by a run that resumes.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const PAGE: usize = 4096;
/// Pages of a new table: small runs keep small files.
const FIRST_PAGES: u64 = 1;
/// Pages read at once while doubling.
const GROW_READ_PAGES: usize = 16;

/// A scratch file: read and written at offsets, private to the user, removed on drop.
struct Scratch {
    path: PathBuf,
    file: File,
}

impl Scratch {
    fn create(path: &Path) -> io::Result<Scratch> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        Ok(Scratch {
            path: path.to_owned(),
            file,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // An empty path: the file was renamed over by its successor (see `DiskTable::grow`).
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A folder of scratch files, removed with what is in it when dropped (a killed run's is replaced).
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn create(path: &Path) -> io::Result<ScratchDir> {
        match fs::remove_dir_all(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        crate::output::create_private_dir(path)?;
        Ok(ScratchDir(path.to_owned()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A map from `K`-byte keys to `V`-byte values, in a file. Keys must be uniformly distributed (they
/// are digests): their first eight bytes place them. Entries are never removed.
pub struct DiskTable<const K: usize, const V: usize> {
    scratch: Scratch,
    /// A power of two.
    pages: u64,
    len: u64,
    /// The page last read (write-through), and which one it is.
    page: Box<[u8; PAGE]>,
    cached: Option<u64>,
}

/// Where a key is, or where it would go.
struct Slot {
    page: u64,
    index: usize,
    found: bool,
}

impl<const K: usize, const V: usize> DiskTable<K, V> {
    /// A slot: an occupied flag, the key, the value.
    const SLOT: usize = 1 + K + V;
    const PER_PAGE: usize = PAGE / Self::SLOT;
    const FITS: () = assert!(K >= 8 && Self::PER_PAGE >= 2);

    /// An empty table in a new file at `path` (an existing file there is truncated).
    pub fn create(path: &Path) -> io::Result<Self> {
        Self::with_pages(path, FIRST_PAGES)
    }

    fn with_pages(path: &Path, pages: u64) -> io::Result<Self> {
        let () = Self::FITS;
        let scratch = Scratch::create(path)?;
        scratch.file.set_len(pages * PAGE as u64)?;
        Ok(DiskTable {
            scratch,
            pages,
            len: 0,
            page: Box::new([0; PAGE]),
            cached: None,
        })
    }

    /// Entries in the table.
    pub fn entries(&self) -> u64 {
        self.len
    }

    pub fn get(&mut self, key: &[u8; K]) -> io::Result<Option<[u8; V]>> {
        let slot = self.find(key)?;
        Ok(slot.found.then(|| {
            let at = slot.index * Self::SLOT + 1 + K;
            self.page[at..at + V].try_into().expect("V bytes")
        }))
    }

    /// Sets `key`'s value; true if the key is new.
    pub fn insert(&mut self, key: &[u8; K], value: &[u8; V]) -> io::Result<bool> {
        let slot = self.find(key)?;
        let at = slot.index * Self::SLOT;
        if slot.found {
            self.write(slot.page, at + 1 + K, value)?;
            return Ok(false);
        }
        let mut bytes = [0u8; PAGE];
        bytes[0] = 1;
        bytes[1..1 + K].copy_from_slice(key);
        bytes[1 + K..Self::SLOT].copy_from_slice(value);
        self.write(slot.page, at, &bytes[..Self::SLOT])?;
        self.len += 1;
        if self.len * 4 > self.pages * Self::PER_PAGE as u64 * 3 {
            self.grow()?;
        }
        Ok(true)
    }

    /// The slot of `key`: its home page, then the next ones, until the key or a free slot.
    fn find(&mut self, key: &[u8; K]) -> io::Result<Slot> {
        let home = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
        let mut page = home & (self.pages - 1);
        loop {
            self.read(page)?;
            for index in 0..Self::PER_PAGE {
                let slot = &self.page[index * Self::SLOT..(index + 1) * Self::SLOT];
                if slot[0] == 0 || slot[1..1 + K] == key[..] {
                    return Ok(Slot {
                        page,
                        index,
                        found: slot[0] != 0,
                    });
                }
            }
            // A full page: the key, if anywhere, is further on (the table is never full).
            page = (page + 1) & (self.pages - 1);
        }
    }

    fn read(&mut self, page: u64) -> io::Result<()> {
        if self.cached != Some(page) {
            self.cached = None;
            self.scratch
                .file
                .read_exact_at(&mut self.page[..], page * PAGE as u64)?;
            self.cached = Some(page);
        }
        Ok(())
    }

    fn write(&mut self, page: u64, at: usize, bytes: &[u8]) -> io::Result<()> {
        self.scratch
            .file
            .write_all_at(bytes, page * PAGE as u64 + at as u64)?;
        if self.cached == Some(page) {
            self.page[at..at + bytes.len()].copy_from_slice(bytes);
        }
        Ok(())
    }

    /// Moves every entry into a table of twice the pages, which takes this one's place.
    fn grow(&mut self) -> io::Result<()> {
        let path = self.scratch.path.clone();
        let mut bigger = Self::with_pages(&path.with_extension("grow"), self.pages * 2)?;
        let mut pages = vec![0u8; PAGE * GROW_READ_PAGES];
        let total = self.pages * PAGE as u64;
        let mut offset = 0;
        while offset < total {
            let n = (pages.len() as u64).min(total - offset) as usize;
            self.scratch.file.read_exact_at(&mut pages[..n], offset)?;
            for page in pages[..n].chunks_exact(PAGE) {
                for slot in page[..Self::PER_PAGE * Self::SLOT].chunks_exact(Self::SLOT) {
                    if slot[0] != 0 {
                        let key = slot[1..1 + K].try_into().expect("K bytes");
                        let value = slot[1 + K..].try_into().expect("V bytes");
                        bigger.insert(key, value)?;
                    }
                }
            }
            offset += n as u64;
        }
        fs::rename(&bigger.scratch.path, &path)?;
        bigger.scratch.path = path;
        let mut old = std::mem::replace(self, bigger);
        old.scratch.path = PathBuf::new();
        Ok(())
    }
}

/// Byte strings appended to a file and read back by offset (offsets start at 1: 0 means none).
pub struct Spill {
    scratch: Scratch,
    end: u64,
}

impl Spill {
    pub fn create(path: &Path) -> io::Result<Spill> {
        let scratch = Scratch::create(path)?;
        scratch.file.write_all_at(b"\0", 0)?;
        Ok(Spill { scratch, end: 1 })
    }

    /// Appends `bytes`; returns their offset.
    pub fn push(&mut self, bytes: &[u8]) -> io::Result<u64> {
        let at = self.end;
        self.scratch.file.write_all_at(bytes, at)?;
        self.end += bytes.len() as u64;
        Ok(at)
    }

    /// Overwrites bytes pushed before.
    pub fn patch(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if offset == 0 || offset + bytes.len() as u64 > self.end {
            return Err(io::Error::other("a patch outside the spill file"));
        }
        self.scratch.file.write_all_at(bytes, offset)
    }

    pub fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if offset == 0 || offset + len as u64 > self.end {
            return Err(io::Error::other("a read outside the spill file"));
        }
        let mut out = vec![0; len];
        self.scratch.file.read_exact_at(&mut out, offset)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn key(i: u64) -> [u8; 16] {
        // Digest-like keys: the mixing spreads them over the pages as a hash would.
        let mixed = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ i;
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&mixed.to_le_bytes());
        k[8..].copy_from_slice(&i.to_le_bytes());
        k
    }

    #[test]
    fn a_table_answers_as_a_hash_map_does_through_its_growth() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table");
        let mut table = DiskTable::<16, 83>::create(&path).unwrap();
        let mut model = HashMap::new();
        for i in 0..20_000u64 {
            let value = [(i % 251) as u8; 83];
            assert_eq!(
                table.insert(&key(i), &value).unwrap(),
                model.insert(i, value).is_none()
            );
            if i % 7 == 0 {
                // Overwrites keep the entry count.
                let value = [(i % 13) as u8; 83];
                assert!(!table.insert(&key(i / 2), &value).unwrap());
                model.insert(i / 2, value);
            }
        }
        assert_eq!(table.entries(), model.len() as u64);
        for i in 0..25_000u64 {
            assert_eq!(table.get(&key(i)).unwrap(), model.get(&i).copied(), "{i}");
        }
        // Grown from one page: the file is a few times the entries' size, not more.
        let size = fs::metadata(&path).unwrap().len();
        assert!(size <= 20_000 * 100 * 4, "{size}");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no file of a doubling is left");
        drop(table);
        assert!(!path.exists(), "the scratch file is removed with the table");
    }

    #[test]
    fn keys_that_share_a_home_page_spill_to_the_next_pages() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = DiskTable::<32, 1>::create(&dir.path().join("t")).unwrap();
        // All with the same first eight bytes: one home page, probing onwards.
        let same = |i: u8| {
            let mut k = [0u8; 32];
            k[31] = i;
            k
        };
        for i in 0..=255u8 {
            assert!(table.insert(&same(i), &[i]).unwrap());
        }
        for i in 0..=255u8 {
            assert_eq!(table.get(&same(i)).unwrap(), Some([i]));
        }
        let mut absent = same(0);
        absent[30] = 1;
        assert_eq!(table.get(&absent).unwrap(), None);
    }

    #[test]
    fn spilled_bytes_read_back_and_reads_outside_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut spill = Spill::create(&dir.path().join("s")).unwrap();
        let a = spill.push(b"text/html").unwrap();
        let b = spill.push(b"https://h/Binary/1").unwrap();
        spill.patch(a, b"TEXT").unwrap();
        assert_eq!(spill.read(a, 9).unwrap(), b"TEXT/html");
        assert_eq!(spill.read(b, 18).unwrap(), b"https://h/Binary/1");
        assert!(spill.read(b, 19).is_err());
        assert!(spill.read(0, 1).is_err());
        assert!(spill.patch(b + 10, b"123456789").is_err());
    }
}
