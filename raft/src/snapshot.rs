//! Snapshots of one shard's state machine: built from a consistent RocksDB snapshot, kept as a
//! file under the data dir, streamed in chunks by openraft, and installed atomically.
//!
//! File format (all integers big-endian):
//!
//! ```text
//! "CHORUSS1"                                  magic, 8 bytes
//! u32 len · SnapshotHeader                    shard, snapshot id, last log id, membership
//! { u32 key_len · u32 value_len · key · value }*   the shard's sm records; keys are relative
//!                                             (without the shard · generation prefix)
//! u32 0xFFFFFFFF · u32 len · SnapshotTrailer  record count and CRC-32 of everything before it
//! ```
//!
//! Invariants:
//! - A snapshot is consistent: data, last-applied and membership come from one RocksDB snapshot.
//! - Memory is bounded on both sides: records are streamed through fixed-size buffers, and an
//!   install writes bounded batches (never the whole shard in one batch or in memory).
//! - Install is atomic: records go into a fresh state-machine generation; one final batch
//!   switches the active generation and writes last-applied and membership. A crash before that
//!   batch leaves the old state untouched (the half-written generation is removed at open).
//! - Building is background work: a thread of its own at a lower CPU priority, one build at a
//!   time per node, the file synced every MiB as it is written (so the log's fsyncs never queue
//!   behind a whole snapshot), and the build stops once its shard closes. When to build is the
//!   pacer's call (`snapshot_pacing`).
//! - Snapshot files are written to a temporary name, fsynced and renamed; a file that does not
//!   end in a valid trailer is never used. A file ahead of the durable state machine (an install
//!   cut short between its rename and its switch) is discarded at open, and a built snapshot's
//!   state is synced before its rename: the current snapshot never covers state this node
//!   lacks, and the log store never purges past it (see `log_store`).

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chorus_proto::storage::{SnapshotHeader, SnapshotTrailer};
use openraft::RaftSnapshotBuilder;
use prost::Message;
use rocksdb::{IteratorMode, ReadOptions, WriteBatch};

use crate::codec;
use crate::db::NodeDb;
use crate::error::StoreError;
use crate::keys::{self, SM_PREFIX_LEN, SmKeys, StateKey};
use crate::snapshot_pacing::SnapshotPacer;
use crate::state_machine::ShardView;
use crate::types::{LogId, ShardId, Snapshot, SnapshotMeta, StorageError, StoredMembership};

const MAGIC: &[u8; 8] = b"CHORUSS1";
const FORMAT_VERSION: u32 = 1;
const END_MARKER: u32 = u32::MAX;
const MAX_HEADER_BYTES: u32 = 1 << 20;
const MAX_KEY_BYTES: u32 = 64 * 1024;
const MAX_VALUE_BYTES: u32 = 32 << 20;
/// An install writes to RocksDB in batches of about this size.
const INSTALL_BATCH_BYTES: usize = 4 << 20;
const IO_BUFFER_BYTES: usize = 256 * 1024;
/// A snapshot file being written is synced every this many bytes (see [`PacedFile`]).
const SYNC_EVERY_BYTES: usize = 1 << 20;

/// The snapshot files of one shard, and which one is current.
pub struct SnapshotStore {
    dir: PathBuf,
    current: Mutex<Option<SnapshotFile>>,
    /// What a purge waiting for an install watches (see `ShardLogStore::purge`).
    progress: tokio::sync::watch::Sender<SnapshotProgress>,
    /// When the next snapshot is due (see `snapshot_pacing`).
    pacer: SnapshotPacer,
}

/// What a purge past the current snapshot waits on (see `ShardLogStore::purge`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SnapshotProgress {
    /// The index of the current snapshot.
    pub current: Option<u64>,
    /// The index of the newest snapshot whose install failed.
    pub failed_install: Option<u64>,
    /// A snapshot is being received or installed (from the first chunk to the end of its
    /// install): only then can the current snapshot move past what is purged.
    pub receiving: bool,
    /// The state machine is gone (its task ended): no install will come.
    pub closed: bool,
}

#[derive(Clone)]
struct SnapshotFile {
    path: PathBuf,
    meta: SnapshotMeta,
}

impl SnapshotStore {
    /// Opens the shard's snapshot dir: removes temporary files, and snapshots ahead of the
    /// state machine's durable `applied` index (an install cut short before its switch), keeps
    /// the newest remaining complete snapshot and deletes the others.
    pub(crate) fn open(dir: PathBuf, shard: ShardId, applied: Option<u64>) -> Result<SnapshotStore, StoreError> {
        fs::create_dir_all(&dir).map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
        let mut found: Vec<SnapshotFile> = Vec::new();
        let entries = fs::read_dir(&dir).map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
        for entry in entries {
            let path = entry.map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?.path();
            let is_snapshot = path.extension().is_some_and(|ext| ext == "snap");
            if !is_snapshot {
                remove_file_logged(&path);
                continue;
            }
            match verify_file(&path, shard) {
                Ok(meta) if meta.last_log_id.map(|id| id.index) > applied => {
                    tracing::info!(shard, path = %path.display(), %meta, ?applied,
                        "removing a snapshot ahead of the state machine (its install was cut short)");
                    remove_file_logged(&path);
                }
                Ok(meta) => found.push(SnapshotFile { path, meta }),
                Err(e) => {
                    tracing::warn!(shard, path = %path.display(), error = %e, "removing unusable snapshot file");
                    remove_file_logged(&path);
                }
            }
        }
        found.sort_by_key(|f| f.meta.last_log_id);
        let current = found.pop();
        for stale in found {
            remove_file_logged(&stale.path);
        }
        let progress = SnapshotProgress {
            current: current.as_ref().and_then(|f| f.meta.last_log_id).map(|id| id.index),
            ..SnapshotProgress::default()
        };
        let (progress, _) = tokio::sync::watch::channel(progress);
        Ok(SnapshotStore { dir, current: Mutex::new(current), progress, pacer: SnapshotPacer::new() })
    }

    /// When this shard's next snapshot is due.
    pub(crate) fn pacer(&self) -> &SnapshotPacer {
        &self.pacer
    }

    /// The size of the current snapshot's file (0 when there is none or it cannot be read).
    pub(crate) fn current_bytes(&self) -> u64 {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().and_then(|f| fs::metadata(&f.path).ok()).map_or(0, |m| m.len())
    }

    /// Follows the current snapshot's index and the installs under way.
    pub(crate) fn progress(&self) -> tokio::sync::watch::Receiver<SnapshotProgress> {
        self.progress.subscribe()
    }

    /// The state machine using this store is gone.
    pub(crate) fn close(&self) {
        self.progress.send_modify(|p| p.closed = true);
    }

    /// The index of the current snapshot, if any.
    pub(crate) fn current_index(&self) -> Option<u64> {
        self.progress.borrow().current
    }

    /// The current snapshot, opened for reading.
    pub(crate) async fn current(&self) -> Result<Option<Snapshot>, StoreError> {
        // Opened under the lock: a newer snapshot deletes the file it replaces under the same
        // lock, and an open file stays readable after that.
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let Some(file) = current.as_ref() else {
            return Ok(None);
        };
        let data = File::open(&file.path)
            .map_err(|e| StoreError::io(format!("opening snapshot {}", file.path.display()), e))?;
        let meta = file.meta.clone();
        drop(current);
        Ok(Some(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(data)) }))
    }

    /// Makes `path` (a complete, fsynced snapshot file) the current snapshot, unless a newer one
    /// already is; deletes the one it replaces.
    fn set_current(&self, path: PathBuf, meta: SnapshotMeta) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let newer = current.as_ref().is_none_or(|c| meta.last_log_id >= c.meta.last_log_id);
        if !newer {
            drop(current);
            remove_file_logged(&path);
            return;
        }
        let index = meta.last_log_id.map(|id| id.index);
        // A reader that opened the old file keeps reading it after the unlink.
        if let Some(old) = current.replace(SnapshotFile { path: path.clone(), meta })
            && old.path != path
        {
            remove_file_logged(&old.path);
        }
        drop(current);
        self.progress.send_modify(|p| p.current = p.current.max(index));
    }

    /// A new empty file for a snapshot being received from the leader.
    pub(crate) fn begin_receiving(&self) -> Result<tokio::fs::File, StoreError> {
        let path = self.dir.join(format!("recv-{:016x}.tmp", rand::random::<u64>()));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| StoreError::io(format!("creating {}", path.display()), e))?;
        self.progress.send_modify(|p| p.receiving = true);
        Ok(tokio::fs::File::from_std(file))
    }

    fn remove_received(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with("recv-") && name.ends_with(".tmp") {
                remove_file_logged(&path);
            }
        }
    }

    fn new_paths(&self, last_log_id: Option<&LogId>) -> (PathBuf, PathBuf) {
        let (term, index) = last_log_id.map(|id| (id.leader_id.term, id.index)).unwrap_or_default();
        let name = format!("snap-{index:020}-{term:020}-{:016x}", rand::random::<u64>());
        (self.dir.join(format!("{name}.tmp")), self.dir.join(format!("{name}.snap")))
    }
}

fn remove_file_logged(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not remove file");
    }
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("syncing directory {}", dir.display()), e))
}

/// Builds snapshots of one shard for openraft. Building runs on a blocking thread and reads a
/// RocksDB snapshot, so it never blocks apply or heartbeats.
pub struct ShardSnapshotBuilder {
    db: Arc<NodeDb>,
    shard: ShardId,
    store: Arc<SnapshotStore>,
}

impl ShardSnapshotBuilder {
    pub(crate) fn new(db: Arc<NodeDb>, shard: ShardId, store: Arc<SnapshotStore>) -> Self {
        ShardSnapshotBuilder { db, shard, store }
    }
}

impl RaftSnapshotBuilder<crate::types::TypeConfig> for ShardSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (db, shard, store) = (self.db.clone(), self.shard, self.store.clone());
        let build_store = store.clone();
        let built = in_background(format!("chorus-snap-{shard}"), move || build(&db, shard, &build_store))
            .await
            .map_err(|e| {
                // `build` did not run to its end, so it could not tell the pacer.
                store.pacer().build_failed();
                StoreError::io("snapshot build thread", e)
            })
            .and_then(|r| r);
        let (data, meta) = built.map_err(|e| openraft::StorageIOError::write_snapshot(None, &e))?;
        Ok(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(data)) })
    }
}

/// The nice value of snapshot builds: under contention they get about a tenth of the CPU
/// that request handling gets (CFS weights 110 against 1024). A build is background work (it
/// only lets the log be purged), but it scans the whole shard: at ~600,000 records it takes a
/// core for 0.5-1 s, and at normal priority it made appends on a busy node wait.
const BUILD_NICE: i32 = 10;
/// A build checks every this many records whether its shard has closed.
const CLOSE_CHECK_RECORDS: u64 = 4096;

/// Runs `work` on a thread of its own at nice [`BUILD_NICE`] (Linux: the nice value is per
/// thread) and waits for its result. The thread ends with `work`; builds stop early once their
/// store is closed (see [`build`]).
async fn in_background<T: Send + 'static>(name: String, work: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name(name).spawn(move || {
        lower_priority();
        let _ = done.send(work());
    })?;
    result.await.map_err(|_| io::Error::other("the snapshot thread panicked"))
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // SAFETY: setpriority takes no pointers; on Linux, PRIO_PROCESS with who = 0 names the
    // calling thread. A failure leaves the priority as it was.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, BUILD_NICE) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "could not lower the snapshot thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

/// Counts and checksums everything written through it.
struct ChecksumWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for ChecksumWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A file being written that is synced every [`SYNC_EVERY_BYTES`]. A snapshot file is
/// hundreds of MiB; synced once at its end, all of it would queue on the disk in front of the
/// log's fsyncs, and every shard's appends on this node would wait. Measured here with `dd`
/// writing 140 MiB: a concurrent 200-byte fdatasync waited up to 102 ms behind one sync at
/// the end, at most 5.4 ms when the file was synced every MiB; the copy took as long.
struct PacedFile {
    file: File,
    unsynced: usize,
}

impl PacedFile {
    fn new(file: File) -> PacedFile {
        PacedFile { file, unsynced: 0 }
    }

    /// Syncs the rest, data and metadata, and returns the file.
    fn sync_all(self) -> io::Result<File> {
        self.file.sync_all()?;
        Ok(self.file)
    }
}

impl Write for PacedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n;
        if self.unsynced >= SYNC_EVERY_BYTES {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Builds a snapshot file of `shard` from a consistent RocksDB snapshot, makes it current and
/// tells the pacer what it covers; waits while another build of this node runs. Returns the file
/// opened for reading, and its metadata. It is opened before it becomes current: from then on a
/// newer snapshot (an install running meanwhile) may replace and delete it.
pub fn build(db: &NodeDb, shard: ShardId, store: &SnapshotStore) -> Result<(File, SnapshotMeta), StoreError> {
    let _slot = db.snapshot_build_slot();
    if store.progress.borrow().closed {
        store.pacer.build_failed();
        return Err(shard_closing());
    }
    let mark = store.pacer.build_started();
    let built = build_file(db, shard, store);
    match &built {
        Ok((file, _)) => store.pacer.built(mark, file.metadata().map_or(0, |m| m.len())),
        Err(_) => store.pacer.build_failed(),
    }
    built
}

/// Why a build stopped: its shard is shutting down.
fn shard_closing() -> StoreError {
    StoreError::io("building a snapshot", io::Error::other("the shard is closing"))
}

fn build_file(db: &NodeDb, shard: ShardId, store: &SnapshotStore) -> Result<(File, SnapshotMeta), StoreError> {
    let started = std::time::Instant::now();
    let rocks = db.rocks();
    let snap = rocks.snapshot();
    let state_cf = db.cf_state()?;
    let read_state = |kind| snap.get_pinned_cf(state_cf, keys::state_key(shard, kind));
    let last_log_id = match read_state(StateKey::Applied)? {
        Some(b) => Some(codec::decode_log_id(&b).map_err(|e| StoreError::corrupt("applied record", e))?),
        None => None,
    };
    let last_membership = match read_state(StateKey::Membership)? {
        Some(b) => codec::decode_stored_membership(&b).map_err(|e| StoreError::corrupt("membership record", e))?,
        None => StoredMembership::default(),
    };
    let generation = match read_state(StateKey::SmGeneration)? {
        Some(b) => keys::decode_u32(&b).ok_or_else(|| StoreError::corrupt("generation record", "not 4 bytes"))?,
        None => 0,
    };
    let snapshot_id = format!(
        "{}-{}-{:x}",
        last_log_id.map(|id| id.leader_id.term).unwrap_or(0),
        last_log_id.map(|id| id.index).unwrap_or(0),
        rand::random::<u32>()
    );
    let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id };

    let (tmp_path, final_path) = store.new_paths(last_log_id.as_ref());
    let file = File::create(&tmp_path).map_err(|e| StoreError::io(format!("creating {}", tmp_path.display()), e))?;
    let io_err = |e| StoreError::io(format!("writing snapshot {}", tmp_path.display()), e);
    let mut out = ChecksumWriter {
        inner: BufWriter::with_capacity(IO_BUFFER_BYTES, PacedFile::new(file)),
        crc: crc32fast::Hasher::new(),
    };
    let header = SnapshotHeader {
        format_version: FORMAT_VERSION,
        shard,
        snapshot_id: meta.snapshot_id.clone(),
        last_log_id: codec::opt_log_id_to_pb(meta.last_log_id.as_ref()),
        last_membership: Some(codec::stored_membership_to_pb(&meta.last_membership)),
    };
    out.write_all(MAGIC).map_err(io_err)?;
    write_frame(&mut out, &header.encode_to_vec()).map_err(io_err)?;

    let keys = SmKeys::new(shard, generation);
    let (start, end) = keys.range();
    let mut opts = ReadOptions::default();
    opts.set_snapshot(&snap);
    opts.set_iterate_upper_bound(end);
    // A one-off scan of the whole shard should not evict the hot blocks.
    opts.fill_cache(false);
    let iter = rocks.iterator_cf_opt(db.cf_sm()?, opts, IteratorMode::From(&start, rocksdb::Direction::Forward));
    let mut records = 0u64;
    for item in iter {
        let (key, value) = item?;
        let relative = &key[SM_PREFIX_LEN..];
        out.write_all(&(relative.len() as u32).to_be_bytes()).map_err(io_err)?;
        out.write_all(&(value.len() as u32).to_be_bytes()).map_err(io_err)?;
        out.write_all(relative).map_err(io_err)?;
        out.write_all(&value).map_err(io_err)?;
        records += 1;
        if records.is_multiple_of(CLOSE_CHECK_RECORDS) && store.progress.borrow().closed {
            drop(out);
            remove_file_logged(&tmp_path);
            return Err(shard_closing());
        }
    }
    drop(snap);
    let trailer = SnapshotTrailer { record_count: records, crc32: out.crc.clone().finalize() };
    let mut inner = out.inner;
    inner.write_all(&END_MARKER.to_be_bytes()).map_err(io_err)?;
    write_frame(&mut inner, &trailer.encode_to_vec()).map_err(io_err)?;
    let file = inner.into_inner().map_err(|e| io_err(e.into_error()))?;
    drop(file.sync_all().map_err(io_err)?);
    // The applied state it holds must survive a power failure before the snapshot can stand
    // for it (a snapshot ahead of the state machine is a state openraft refuses to start from).
    db.sync_wal()?;
    fs::rename(&tmp_path, &final_path).map_err(|e| StoreError::io(format!("renaming {}", tmp_path.display()), e))?;
    fsync_dir(&store.dir)?;
    tracing::info!(shard, %meta, records, elapsed_ms = started.elapsed().as_millis() as u64, "built snapshot");
    let data =
        File::open(&final_path).map_err(|e| StoreError::io(format!("opening snapshot {}", final_path.display()), e))?;
    store.set_current(final_path, meta.clone());
    Ok((data, meta))
}

fn write_frame(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    out.write_all(&(bytes.len() as u32).to_be_bytes())?;
    out.write_all(bytes)
}

/// Reads a snapshot stream, checking every length against its bound.
struct SnapshotReader<R: Read> {
    inner: R,
    crc: crc32fast::Hasher,
}

/// One step of reading a snapshot's body.
enum Item {
    Record { key: Vec<u8>, value: Vec<u8> },
    End(SnapshotTrailer),
}

impl<R: Read> SnapshotReader<R> {
    fn new(inner: R) -> Self {
        SnapshotReader { inner, crc: crc32fast::Hasher::new() }
    }

    fn read_exact(&mut self, buf: &mut [u8], checksum: bool) -> Result<(), StoreError> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                StoreError::corrupt("snapshot", "truncated")
            } else {
                StoreError::io("reading snapshot", e)
            }
        })?;
        if checksum {
            self.crc.update(buf);
        }
        Ok(())
    }

    fn read_u32(&mut self, checksum: bool) -> Result<u32, StoreError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, checksum)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_vec(&mut self, len: u32, checksum: bool) -> Result<Vec<u8>, StoreError> {
        let mut v = vec![0u8; len as usize];
        self.read_exact(&mut v, checksum)?;
        Ok(v)
    }

    fn header(&mut self) -> Result<SnapshotHeader, StoreError> {
        let mut magic = [0u8; 8];
        self.read_exact(&mut magic, true)?;
        if &magic != MAGIC {
            return Err(StoreError::corrupt("snapshot", "not a Chorus snapshot (bad magic)"));
        }
        let len = self.read_u32(true)?;
        if len > MAX_HEADER_BYTES {
            return Err(StoreError::corrupt("snapshot", format!("header of {len} bytes")));
        }
        let bytes = self.read_vec(len, true)?;
        let header = SnapshotHeader::decode(bytes.as_slice()).map_err(|e| StoreError::corrupt("snapshot header", e))?;
        if header.format_version != FORMAT_VERSION {
            return Err(StoreError::corrupt("snapshot", format!("unknown format version {}", header.format_version)));
        }
        Ok(header)
    }

    fn next(&mut self) -> Result<Item, StoreError> {
        // The length word is only checksummed once we know it is not the end marker.
        let key_len = self.read_u32(false)?;
        if key_len == END_MARKER {
            let len = self.read_u32(false)?;
            if len > MAX_HEADER_BYTES {
                return Err(StoreError::corrupt("snapshot", format!("trailer of {len} bytes")));
            }
            let bytes = self.read_vec(len, false)?;
            let trailer =
                SnapshotTrailer::decode(bytes.as_slice()).map_err(|e| StoreError::corrupt("snapshot trailer", e))?;
            return Ok(Item::End(trailer));
        }
        self.crc.update(&key_len.to_be_bytes());
        let value_len = self.read_u32(true)?;
        if key_len == 0 || key_len > MAX_KEY_BYTES || value_len > MAX_VALUE_BYTES {
            return Err(StoreError::corrupt("snapshot", format!("record of {key_len}+{value_len} bytes")));
        }
        let key = self.read_vec(key_len, true)?;
        keys::check_relative_sm_key(&key).map_err(|e| StoreError::corrupt("snapshot record", e))?;
        let value = self.read_vec(value_len, true)?;
        Ok(Item::Record { key, value })
    }

    /// Checks the trailer against what was read, and that nothing follows it. Returns the
    /// underlying reader.
    fn finish(mut self, trailer: &SnapshotTrailer, records: u64) -> Result<R, StoreError> {
        let crc = self.crc.clone().finalize();
        if trailer.record_count != records || trailer.crc32 != crc {
            return Err(StoreError::corrupt(
                "snapshot",
                format!(
                    "trailer says {} records with CRC {:08x}, read {records} with CRC {crc:08x}",
                    trailer.record_count, trailer.crc32
                ),
            ));
        }
        let mut extra = [0u8; 1];
        match self.inner.read(&mut extra) {
            Ok(0) => Ok(self.inner),
            Ok(_) => Err(StoreError::corrupt("snapshot", "data after the trailer")),
            Err(e) => Err(StoreError::io("reading snapshot", e)),
        }
    }
}

fn meta_from_header(header: &SnapshotHeader) -> Result<SnapshotMeta, StoreError> {
    let membership =
        header.last_membership.as_ref().ok_or_else(|| StoreError::corrupt("snapshot header", "no membership"))?;
    Ok(SnapshotMeta {
        last_log_id: header.last_log_id.as_ref().map(codec::log_id_from_pb),
        last_membership: codec::stored_membership_from_pb(membership)
            .map_err(|e| StoreError::corrupt("snapshot header", e))?,
        snapshot_id: header.snapshot_id.clone(),
    })
}

/// Reads a whole snapshot file, checking its structure and checksum; returns its metadata.
fn verify_file(path: &Path, shard: ShardId) -> Result<SnapshotMeta, StoreError> {
    let file = File::open(path).map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
    let mut reader = SnapshotReader::new(BufReader::with_capacity(IO_BUFFER_BYTES, file));
    let header = reader.header()?;
    if header.shard != shard {
        return Err(StoreError::corrupt("snapshot", format!("belongs to shard {}, not {shard}", header.shard)));
    }
    let mut records = 0;
    loop {
        match reader.next()? {
            Item::Record { .. } => records += 1,
            Item::End(trailer) => {
                reader.finish(&trailer, records)?;
                return meta_from_header(&header);
            }
        }
    }
}

/// Copies everything read through it into a writer: the installed snapshot becomes the
/// shard's current snapshot file without a second pass.
struct TeeReader<R: Read, W: Write> {
    inner: R,
    copy: W,
}

impl<R: Read, W: Write> Read for TeeReader<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Installs a received snapshot as the shard's state (see the module invariants).
pub(crate) async fn install(
    view: &Arc<ShardView>,
    store: &Arc<SnapshotStore>,
    meta: &SnapshotMeta,
    data: tokio::fs::File,
) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let data = data.into_std().await;
    let (view2, store2, meta2) = (view.clone(), store.clone(), meta.clone());
    let installed = tokio::task::spawn_blocking(move || install_blocking(&view2, &store2, &meta2, data))
        .await
        .map_err(|e| StoreError::io("snapshot install task", io::Error::other(e.to_string())))
        .and_then(|r| r);
    let (records, path) = match installed {
        Ok(done) => done,
        Err(e) => {
            let index = meta.last_log_id.map(|id| id.index);
            store.progress.send_modify(|p| {
                p.failed_install = p.failed_install.max(index);
                p.receiving = false;
            });
            return Err(e);
        }
    };
    let snapshot_bytes = fs::metadata(&path).map_or(0, |m| m.len());
    store.set_current(path, meta.clone());
    store.pacer.installed(snapshot_bytes);
    store.progress.send_modify(|p| p.receiving = false);
    store.remove_received();
    tracing::info!(shard = view.shard, %meta, records, elapsed_ms = started.elapsed().as_millis() as u64, "installed snapshot");
    Ok(())
}

fn install_blocking(
    view: &ShardView,
    store: &SnapshotStore,
    meta: &SnapshotMeta,
    mut data: File,
) -> Result<(u64, PathBuf), StoreError> {
    use std::io::Seek;
    let shard = view.shard;
    data.seek(io::SeekFrom::Start(0)).map_err(|e| StoreError::io("rewinding received snapshot", e))?;
    let paths = store.new_paths(meta.last_log_id.as_ref());
    let copy = File::create(&paths.0).map_err(|e| StoreError::io(format!("creating {}", paths.0.display()), e))?;
    let copy = BufWriter::with_capacity(IO_BUFFER_BYTES, PacedFile::new(copy));
    let result = install_records(view, store, meta, data, copy, &paths);
    match result {
        Ok(records) => Ok((records, paths.1)),
        Err(e) => {
            // The renamed file (if it got that far) stays: if the switch did reach the disk it
            // is the snapshot of the state, and if not, it is ahead of the state machine and
            // discarded at the next open.
            remove_file_logged(&paths.0);
            tracing::warn!(shard, error = %e, "snapshot install failed; the shard keeps its previous state");
            Err(e)
        }
    }
}

/// Streams the records into the next generation while copying the file to `paths.0`, renames
/// the copy to `paths.1`, then switches generations in one synced batch. The file is in place
/// before the switch; one that is ahead of the state machine after a crash is discarded at open
/// (see [`SnapshotStore::open`]), so the current snapshot never covers state this node lacks.
fn install_records(
    view: &ShardView,
    store: &SnapshotStore,
    meta: &SnapshotMeta,
    data: File,
    copy: BufWriter<PacedFile>,
    paths: &(PathBuf, PathBuf),
) -> Result<u64, StoreError> {
    let (copy_path, final_path) = (&paths.0, &paths.1);
    let shard = view.shard;
    let db = &view.db;
    let old_generation = *view.read_generation();
    let new_generation = old_generation.wrapping_add(1);
    let new_keys = SmKeys::new(shard, new_generation);
    let sm = db.cf_sm()?;

    let tee = TeeReader { inner: BufReader::with_capacity(IO_BUFFER_BYTES, data), copy };
    let mut reader = SnapshotReader::new(tee);
    let header = reader.header()?;
    if header.shard != shard {
        return Err(StoreError::corrupt("snapshot", format!("belongs to shard {}, not {shard}", header.shard)));
    }
    let header_meta = meta_from_header(&header)?;
    if header_meta.last_log_id != meta.last_log_id || header_meta.last_membership != meta.last_membership {
        return Err(StoreError::corrupt(
            "snapshot",
            format!("file holds {header_meta}, but the leader announced {meta}"),
        ));
    }

    // Leftovers of an earlier interrupted install in the target generation.
    let (new_start, new_end) = new_keys.range();
    let mut batch = WriteBatch::default();
    batch.delete_range_cf(sm, &new_start, &new_end);
    let mut batch_bytes = 0usize;
    let mut records = 0u64;
    let trailer = loop {
        match reader.next()? {
            Item::Record { key, value } => {
                batch_bytes += key.len() + value.len() + 16;
                batch.put_cf(sm, new_keys.absolute(&key), value);
                records += 1;
                if batch_bytes >= INSTALL_BATCH_BYTES {
                    db.write(std::mem::take(&mut batch))?;
                    batch_bytes = 0;
                }
            }
            Item::End(trailer) => break trailer,
        }
    };
    let mut tee = reader.finish(&trailer, records)?;
    db.write(std::mem::take(&mut batch))?;
    tee.copy.flush().map_err(|e| StoreError::io(format!("writing {}", copy_path.display()), e))?;
    let copy_file = tee.copy.into_inner().map_err(|e| StoreError::io("writing snapshot copy", e.into_error()))?;
    drop(copy_file.sync_all().map_err(|e| StoreError::io(format!("syncing {}", copy_path.display()), e))?);
    fs::rename(copy_path, final_path).map_err(|e| StoreError::io(format!("renaming {}", copy_path.display()), e))?;
    fsync_dir(&store.dir)?;

    // The switch: one batch makes the new generation, last-applied and membership current and
    // drops the old generation.
    let state = db.cf_state()?;
    let mut switch = WriteBatch::default();
    switch.put_cf(state, keys::state_key(shard, StateKey::SmGeneration), keys::encode_u32(new_generation));
    match &meta.last_log_id {
        Some(id) => {
            switch.put_cf(state, keys::state_key(shard, StateKey::Applied), codec::log_id_to_pb(id).encode_to_vec())
        }
        None => switch.delete_cf(state, keys::state_key(shard, StateKey::Applied)),
    }
    switch.put_cf(
        state,
        keys::state_key(shard, StateKey::Membership),
        codec::stored_membership_to_pb(&meta.last_membership).encode_to_vec(),
    );
    let (old_start, old_end) = SmKeys::new(shard, old_generation).range();
    switch.delete_range_cf(sm, old_start, old_end);
    let mut generation = view.generation.write().unwrap_or_else(|p| p.into_inner());
    db.write(switch)?;
    *generation = new_generation;
    drop(generation);
    // Durable before openraft (and a purge waiting for this install) relies on it.
    db.sync_wal()?;
    Ok(records)
}

/// Removes every state-machine key of `shard` outside `generation`: what an install that
/// crashed before its switch left behind.
pub(crate) fn remove_other_generations(db: &NodeDb, shard: ShardId, generation: u32) -> Result<(), StoreError> {
    let sm = db.cf_sm()?;
    let shard_start = keys::shard_prefix(shard).to_vec();
    let shard_end = keys::shard_end(shard).to_vec();
    let (active_start, active_end) = SmKeys::new(shard, generation).range();
    let mut batch = WriteBatch::default();
    for (start, end) in [(shard_start, active_start), (active_end, shard_end)] {
        if start < end && range_has_keys(db, &start, &end)? {
            tracing::info!(shard, "removing state left by an interrupted snapshot install");
            batch.delete_range_cf(sm, start, end);
        }
    }
    if !batch.is_empty() {
        db.write(batch)?;
    }
    Ok(())
}

fn range_has_keys(db: &NodeDb, start: &[u8], end: &[u8]) -> Result<bool, StoreError> {
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(end.to_vec());
    let mut iter =
        db.rocks().iterator_cf_opt(db.cf_sm()?, opts, IteratorMode::From(start, rocksdb::Direction::Forward));
    Ok(iter.next().transpose()?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_file_syncs_every_mib_and_keeps_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paced");
        let mut paced = PacedFile::new(File::create(&path).unwrap());
        let chunk = vec![7u8; 300 * 1024];
        for _ in 0..10 {
            paced.write_all(&chunk).unwrap();
            assert!(paced.unsynced < SYNC_EVERY_BYTES, "{} bytes written since the last sync", paced.unsynced);
        }
        drop(paced.sync_all().unwrap());
        assert_eq!(fs::read(&path).unwrap().len(), 10 * chunk.len());
    }

    #[test]
    fn a_built_snapshot_stays_readable_when_a_newer_one_replaces_it_at_once() {
        use chorus_proto::storage::ClusterIdentity;
        use openraft::CommittedLeaderId;
        let dir = tempfile::tempdir().unwrap();
        let identity = ClusterIdentity { cluster_id: "test".into(), node_id: 1, shard_count: 4, format_version: 0 };
        let db = NodeDb::open(dir.path(), identity, &crate::db::DbOptions::default()).unwrap();
        let store = SnapshotStore::open(db.snapshot_dir(1), 1, None).unwrap();
        let (mut built, meta) = build(&db, 1, &store).unwrap();
        let built_path = store.current.lock().unwrap().as_ref().unwrap().path.clone();

        // An install finishing meanwhile makes a newer snapshot current, deleting this one
        // before the builder's caller has read it.
        let newer_path = store.dir.join("newer.snap");
        fs::copy(&built_path, &newer_path).unwrap();
        let newer = SnapshotMeta { last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 100)), ..meta.clone() };
        store.set_current(newer_path.clone(), newer);
        assert!(!built_path.exists());

        let mut bytes = Vec::new();
        built.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes, fs::read(&newer_path).unwrap(), "the built snapshot, read after its file was replaced");
    }

    #[test]
    fn a_node_builds_one_snapshot_at_a_time() {
        use chorus_proto::storage::ClusterIdentity;
        let dir = tempfile::tempdir().unwrap();
        let identity = ClusterIdentity { cluster_id: "test".into(), node_id: 1, shard_count: 4, format_version: 0 };
        let db = NodeDb::open(dir.path(), identity, &crate::db::DbOptions::default()).unwrap();
        let store = Arc::new(SnapshotStore::open(db.snapshot_dir(2), 2, None).unwrap());

        // Another shard's build holds the slot: this one waits for it to end.
        let running = db.snapshot_build_slot();
        let (done_tx, done) = std::sync::mpsc::channel();
        let waiting = std::thread::spawn({
            let (db, store) = (db.clone(), store.clone());
            move || {
                let built = build(&db, 2, &store).map(|(_, meta)| meta);
                let _ = done_tx.send(());
                built
            }
        });
        assert!(done.recv_timeout(std::time::Duration::from_millis(300)).is_err(), "built beside another build");
        assert!(store.current_index().is_none() && store.current_bytes() == 0);
        drop(running);
        done.recv_timeout(std::time::Duration::from_secs(10)).expect("built once the slot was free");
        waiting.join().unwrap().unwrap();
        assert!(store.current_bytes() > 0, "the built snapshot is current");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn builds_run_at_a_lower_priority_than_requests() {
        // SAFETY: getpriority takes no pointers; who = 0 is the calling thread.
        let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let ours = nice();
        let theirs = in_background("test-build".into(), nice).await.unwrap();
        assert!(theirs >= BUILD_NICE.max(ours), "the background thread runs at nice {theirs}, this one at {ours}");
        assert_eq!(nice(), ours, "the caller's priority is unchanged");
    }
}
