//! One file's unsynced changes: the bytes written and the size set since its last fsync,
//! overlaid on what the backing file holds (its synced content).
//!
//! Invariants: extents never overlap and never reach past `size`; `visible_synced <=
//! synced_size`, and the backing file is exactly `synced_size` bytes long while this exists
//! (only an fsync, which consumes it, writes to the backing file). `held` is the number of bytes
//! in `extents`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// A file's state since its last sync. The file as readers see it is, byte by byte: the newest
/// write covering the byte; else the backing file's byte if it lies before `visible_synced`;
/// else zero (up to `size`).
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// The backing file's length when the first unsynced change was made.
    synced_size: u64,
    /// Backing bytes at and past this offset were cut off by a truncate since the sync.
    visible_synced: u64,
    /// The file's length as readers see it.
    size: u64,
    /// Bytes written since the sync, by offset.
    extents: BTreeMap<u64, Vec<u8>>,
    held: u64,
    /// The newest write, whole (as far as it is not truncated away): what a torn cut tears.
    last_write: Option<(u64, Vec<u8>)>,
}

impl Pending {
    pub(crate) fn new(synced_size: u64) -> Pending {
        Pending {
            synced_size,
            visible_synced: synced_size,
            size: synced_size,
            extents: BTreeMap::new(),
            held: 0,
            last_write: None,
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of written data held in memory.
    pub(crate) fn held(&self) -> u64 {
        self.held
    }

    pub(crate) fn last_write(&self) -> Option<(u64, &[u8])> {
        self.last_write.as_ref().map(|(offset, data)| (*offset, data.as_slice()))
    }

    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        // Extents sort by offset and do not overlap: walking back from the last one that starts
        // before `end`, the first that ends at or before `offset` ends the overlap.
        let overlapped: Vec<u64> = self
            .extents
            .range(..end)
            .rev()
            .take_while(|(start, bytes)| **start + bytes.len() as u64 > offset)
            .map(|(start, _)| *start)
            .collect();
        for start in overlapped {
            let Some(mut old) = self.extents.remove(&start) else { continue };
            self.held -= old.len() as u64;
            let old_end = start + old.len() as u64;
            if old_end > end {
                let tail = old[(end - start) as usize..].to_vec();
                self.held += tail.len() as u64;
                self.extents.insert(end, tail);
            }
            if start < offset {
                old.truncate((offset - start) as usize);
                self.held += old.len() as u64;
                self.extents.insert(start, old);
            }
        }
        // Appends (the common case: logs) grow the extent they follow.
        match self.extents.range_mut(..offset).next_back() {
            Some((start, prev)) if *start + prev.len() as u64 == offset => prev.extend_from_slice(data),
            _ => {
                self.extents.insert(offset, data.to_vec());
            }
        }
        self.held += data.len() as u64;
        self.size = self.size.max(end);
        self.last_write = Some((offset, data.to_vec()));
    }

    /// Sets the size: shrinking cuts off written bytes and hides the backing file's tail;
    /// growing adds zeros.
    pub(crate) fn set_size(&mut self, size: u64) {
        self.visible_synced = self.visible_synced.min(size);
        let beyond: Vec<u64> = self.extents.range(size..).map(|(start, _)| *start).collect();
        for start in beyond {
            if let Some(bytes) = self.extents.remove(&start) {
                self.held -= bytes.len() as u64;
            }
        }
        if let Some((start, bytes)) = self.extents.range_mut(..size).next_back()
            && *start + bytes.len() as u64 > size
        {
            let keep = (size - *start) as usize;
            self.held -= (bytes.len() - keep) as u64;
            bytes.truncate(keep);
        }
        self.size = size;
        if let Some((offset, data)) = &mut self.last_write {
            if *offset >= size {
                self.last_write = None;
            } else {
                data.truncate(data.len().min((size - *offset) as usize));
            }
        }
    }

    /// Reads up to `len` bytes at `offset`; `synced` is the backing file.
    pub(crate) fn read(&self, synced: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let len = (len as u64).min(self.size - offset) as usize;
        let end = offset + len as u64;
        let mut buf = vec![0u8; len];
        let synced_end = end.min(self.visible_synced);
        if offset < synced_end {
            read_at_most(synced, &mut buf[..(synced_end - offset) as usize], offset)?;
        }
        let first = self.extents.range(..=offset).next_back().map(|(start, _)| *start).unwrap_or(offset);
        for (&start, bytes) in self.extents.range(first..end) {
            let from = start.max(offset);
            let to = (start + bytes.len() as u64).min(end);
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&bytes[(from - start) as usize..(to - start) as usize]);
            }
        }
        Ok(buf)
    }

    /// Writes every change to the backing file (the caller then syncs it).
    pub(crate) fn write_to(&self, synced: &File) -> io::Result<()> {
        if self.visible_synced < self.synced_size {
            synced.set_len(self.visible_synced)?;
        }
        let mut written_end = self.visible_synced;
        for (&start, bytes) in &self.extents {
            synced.write_all_at(bytes, start)?;
            written_end = written_end.max(start + bytes.len() as u64);
        }
        if written_end != self.size {
            synced.set_len(self.size)?;
        }
        Ok(())
    }
}

/// Fills `buf` from `offset` up to the end of the file; what lies past the end stays as it is.
pub(crate) fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        SetSize(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..300, proptest::collection::vec(any::<u8>(), 0..80)).prop_map(|(o, d)| Op::Write(o, d)),
            1 => (0u64..320).prop_map(Op::SetSize),
        ]
    }

    /// The file as a plain byte vector, for comparison.
    fn model(base: &[u8], ops: &[Op]) -> Vec<u8> {
        let mut file = base.to_vec();
        for op in ops {
            match op {
                Op::Write(_, data) if data.is_empty() => {}
                Op::Write(offset, data) => {
                    let end = *offset as usize + data.len();
                    if file.len() < end {
                        file.resize(end, 0);
                    }
                    file[*offset as usize..end].copy_from_slice(data);
                }
                Op::SetSize(size) => file.resize(*size as usize, 0),
            }
        }
        file
    }

    proptest! {
        #[test]
        fn reads_and_the_synced_file_match_a_plain_byte_vector(
            base in proptest::collection::vec(any::<u8>(), 0..200),
            ops in proptest::collection::vec(op(), 0..30),
            read_at in 0u64..320,
            read_len in 0usize..400,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            std::fs::write(&path, &base).unwrap();
            let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let mut pending = Pending::new(base.len() as u64);
            for op in &ops {
                match op {
                    Op::Write(offset, data) => pending.write(*offset, data),
                    Op::SetSize(size) => pending.set_size(*size),
                }
            }
            let expected = model(&base, &ops);
            prop_assert_eq!(pending.size(), expected.len() as u64);
            prop_assert_eq!(pending.read(&file, 0, 1000).unwrap(), expected.clone());
            let from = (read_at as usize).min(expected.len());
            let to = (from + read_len).min(expected.len());
            prop_assert_eq!(pending.read(&file, read_at, read_len).unwrap(), expected[from..to].to_vec());
            let held: usize = pending.extents.values().map(Vec::len).sum();
            prop_assert_eq!(pending.held(), held as u64);
            // The backing file is untouched until the sync.
            prop_assert_eq!(std::fs::read(&path).unwrap(), base);
            pending.write_to(&file).unwrap();
            prop_assert_eq!(std::fs::read(&path).unwrap(), expected);
        }
    }

    #[test]
    fn appends_grow_one_extent_and_the_last_write_is_kept_whole() {
        let mut pending = Pending::new(0);
        pending.write(0, b"abc");
        pending.write(3, b"def");
        assert_eq!(pending.extents.len(), 1);
        assert_eq!(pending.last_write(), Some((3, &b"def"[..])));
        pending.set_size(4);
        assert_eq!(pending.last_write(), Some((3, &b"d"[..])));
        pending.set_size(2);
        assert_eq!(pending.last_write(), None);
    }
}
