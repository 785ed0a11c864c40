//! The node's one RocksDB: opening it with its column families, the node's cluster identity,
//! and writes (plain, or durable through the group-commit syncer).
//!
//! Data dir layout: `<data_dir>/db/` is RocksDB; `<data_dir>/snapshots/shard-<id>/` holds the
//! snapshot files of each shard.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chorus_proto::storage::ClusterIdentity;
use prost::Message;
use rocksdb::{BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, WriteBatch};

use crate::error::StoreError;
use crate::io_threads::{self, IoThread};
use crate::keys::{self, CF_LOG, CF_SM, CF_STATE, COLUMN_FAMILIES, NODE_IDENTITY_KEY};
use crate::types::ShardId;
use crate::wal_sync::{SyncStats, WalSyncer};

/// Version of the data layout described in `keys.rs`. Bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

/// Within a column family, keys that share their first `prefix` bytes mostly arrive in
/// ascending order (one shard's log indexes; one room's messages or dedup records, see
/// `keys.rs`). RocksDB then keeps, per prefix, where the last insert into the memtable went and
/// starts the next one there, instead of searching the skiplist from its top: fewer cache
/// misses on the hottest write path. Keys shorter than `prefix` are inserted as usual.
///
/// The options come back as a copy made by RocksDB: the base's table factory (and its block
/// cache) carries over, but anything whose lifetime rust-rocksdb tracks on the Rust side (a
/// comparator, compaction filter or logger) would not; set such things after this call.
fn with_insert_hints(mut options: rocksdb::Options, prefix: usize) -> Result<rocksdb::Options, StoreError> {
    let setting = format!("memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.{prefix}");
    options.get_options_from_string(&setting).map_err(|e| StoreError::Config(format!("{setting}: {e}")))
}

/// RocksDB tuning. The defaults suit a node with a few hundred shards and bound its memory:
/// memtables to `write_buffer_bytes` in all, blocks to `block_cache_bytes`.
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub block_cache_bytes: usize,
    /// Total memtable memory across column families.
    pub write_buffer_bytes: usize,
    pub max_background_jobs: i32,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions { block_cache_bytes: 64 << 20, write_buffer_bytes: 128 << 20, max_background_jobs: 2 }
    }
}

/// One node's RocksDB, shared by all of its shards.
pub struct NodeDb {
    // Declared before `db` so that every thread is joined before the database closes.
    log_thread: IoThread,
    apply_threads: Vec<IoThread>,
    syncer: WalSyncer,
    db: Arc<rocksdb::DB>,
    data_dir: PathBuf,
    identity: ClusterIdentity,
    /// Held by the snapshot build that runs; see [`NodeDb::snapshot_build_slot`].
    snapshot_builds: std::sync::Mutex<()>,
}

impl NodeDb {
    /// Opens (or creates) the node's database under `data_dir`.
    ///
    /// A new data dir is stamped with `identity`; an existing one must carry the same cluster id,
    /// node id and shard count, so a node never joins a cluster with another cluster's data.
    pub fn open(data_dir: &Path, identity: ClusterIdentity, options: &DbOptions) -> Result<Arc<NodeDb>, StoreError> {
        if identity.shard_count == 0 || identity.shard_count > keys::MAX_SHARD_ID {
            return Err(StoreError::Config(format!("shard count must be at least 1, got {}", identity.shard_count)));
        }
        std::fs::create_dir_all(data_dir.join("snapshots"))
            .map_err(|e| StoreError::io(format!("creating data dir {}", data_dir.display()), e))?;

        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let mut db_opts = rocksdb::Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(options.max_background_jobs);
        // Point-in-time recovery: after a crash, replay the WAL up to the first torn record.
        db_opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        db_opts.set_db_write_buffer_size(options.write_buffer_bytes);
        // The sm column family flushes rarely; cap the WAL so it cannot grow without bound.
        db_opts.set_max_total_wal_size(256 << 20);
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_log_file_size(16 << 20);
        // A writer waiting for its write group's leader spins (sched_yield) for up to 100 µs
        // before it sleeps; with every core busy, the spinning takes the CPU from the threads it
        // waits for. And a group's memtable inserts are made by one thread, so that each keeps
        // its prefix's insert hint (see `with_insert_hints`; concurrent inserts ignore hints).
        db_opts.set_enable_write_thread_adaptive_yield(false);
        db_opts.set_allow_concurrent_memtable_write(false);
        // Compactions yield the CPU to requests, as snapshot builds do: on this project's 2-core
        // bench machine a compaction took ~5 of the 30 core-seconds of a 15 s window and acks'
        // p99 went from 13-37 ms to 74-373 ms (docs/BENCHMARKS.md). Flushes (the high-priority
        // pool) keep their priority, so memtables never wait; compactions run at nice 19 and
        // catch up whenever a core is free (they kept L0 empty through 90 s of saturation), and
        // RocksDB's L0 slowdown would hold writes back if they ever fell far behind.
        let mut env = rocksdb::Env::new()?;
        env.lower_thread_pool_cpu_priority();
        db_opts.set_env(&env);

        let cf_opts = |bloom: bool, compression: DBCompressionType| {
            let mut block = BlockBasedOptions::default();
            block.set_block_cache(&cache);
            if bloom {
                block.set_bloom_filter(10.0, false);
            }
            let mut o = rocksdb::Options::default();
            o.set_block_based_table_factory(&block);
            o.set_compression_type(compression);
            o.set_write_buffer_size((options.write_buffer_bytes / 4).max(1 << 20));
            o
        };
        let mut cfs = Vec::new();
        for name in COLUMN_FAMILIES {
            let opts = match name {
                CF_LOG => with_insert_hints(cf_opts(false, DBCompressionType::Lz4), keys::LOG_HINT_PREFIX)?,
                CF_STATE => cf_opts(true, DBCompressionType::None),
                _ => with_insert_hints(cf_opts(true, DBCompressionType::Lz4), keys::SM_HINT_PREFIX)?,
            };
            cfs.push(ColumnFamilyDescriptor::new(name, opts));
        }
        let db_path = data_dir.join("db");
        let db = rocksdb::DB::open_cf_descriptors(&db_opts, &db_path, cfs)?;
        let db = Arc::new(db);
        let syncer = WalSyncer::start(db.clone()).map_err(|e| StoreError::io("starting the WAL sync thread", e))?;
        let start =
            |name: String| IoThread::start(name.clone()).map_err(|e| StoreError::io(format!("starting {name}"), e));
        let log_thread = start("chorus-log".into())?;
        let apply_threads = (0..io_threads::apply_thread_count())
            .map(|i| start(format!("chorus-apply-{i}")))
            .collect::<Result<_, _>>()?;
        let node_db = NodeDb {
            log_thread,
            apply_threads,
            syncer,
            db,
            data_dir: data_dir.to_path_buf(),
            identity,
            snapshot_builds: std::sync::Mutex::new(()),
        };
        node_db.check_identity()?;
        Ok(Arc::new(node_db))
    }

    fn check_identity(&self) -> Result<(), StoreError> {
        match self.db.get_pinned(NODE_IDENTITY_KEY)? {
            Some(bytes) => {
                let found = ClusterIdentity::decode(bytes.as_ref())
                    .map_err(|e| StoreError::corrupt("node identity record", e))?;
                let expected = &self.identity;
                if found.format_version != FORMAT_VERSION {
                    return Err(StoreError::Config(format!(
                        "data dir {} has data format {}, this chorusd reads format {FORMAT_VERSION}",
                        self.data_dir.display(),
                        found.format_version
                    )));
                }
                if found.cluster_id != expected.cluster_id
                    || found.node_id != expected.node_id
                    || found.shard_count != expected.shard_count
                {
                    return Err(StoreError::IdentityMismatch {
                        path: self.data_dir.clone(),
                        found: describe_identity(&found),
                        expected: describe_identity(expected),
                    });
                }
                Ok(())
            }
            None => {
                let mut stamped = self.identity.clone();
                stamped.format_version = FORMAT_VERSION;
                let mut opts = rocksdb::WriteOptions::default();
                opts.set_sync(true);
                self.db.put_opt(NODE_IDENTITY_KEY, stamped.encode_to_vec(), &opts)?;
                Ok(())
            }
        }
    }

    pub fn identity(&self) -> &ClusterIdentity {
        &self.identity
    }

    /// Taken by a snapshot build for its whole run, so that a node builds one snapshot at a
    /// time. Shards fed alike (rooms hash evenly over them) come due together, and a build scans
    /// and writes the whole shard: side by side, a node's builds took the disk and both cores
    /// from requests at once. One after another, the same work is spread out. Blocks: call it
    /// from a build's own thread.
    pub(crate) fn snapshot_build_slot(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded value is (): a build that panicked leaves nothing half-done in it.
        self.snapshot_builds.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where the snapshot files of `shard` live.
    pub fn snapshot_dir(&self, shard: ShardId) -> PathBuf {
        self.data_dir.join("snapshots").join(format!("shard-{shard}"))
    }

    pub fn rocks(&self) -> &rocksdb::DB {
        &self.db
    }

    pub(crate) fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| StoreError::corrupt("database", format!("column family {name} is missing")))
    }

    pub(crate) fn cf_log(&self) -> Result<&ColumnFamily, StoreError> {
        self.cf(CF_LOG)
    }

    pub(crate) fn cf_state(&self) -> Result<&ColumnFamily, StoreError> {
        self.cf(CF_STATE)
    }

    pub(crate) fn cf_sm(&self) -> Result<&ColumnFamily, StoreError> {
        self.cf(CF_SM)
    }

    /// One of a shard's Raft state records (vote, last purged, last applied, membership),
    /// decoded; a record that does not decode is reported as corrupt.
    pub(crate) fn read_state<T>(
        &self,
        shard: ShardId,
        kind: keys::StateKey,
        decode: impl FnOnce(&[u8]) -> Result<T, crate::codec::DecodeError>,
    ) -> Result<Option<T>, StoreError> {
        self.read_state_at(None, shard, kind, decode)
    }

    /// [`NodeDb::read_state`], as of `snapshot` when given.
    pub(crate) fn read_state_at<T>(
        &self,
        snapshot: Option<&rocksdb::Snapshot<'_>>,
        shard: ShardId,
        kind: keys::StateKey,
        decode: impl FnOnce(&[u8]) -> Result<T, crate::codec::DecodeError>,
    ) -> Result<Option<T>, StoreError> {
        let (cf, key) = (self.cf_state()?, keys::state_key(shard, kind));
        let found = match snapshot {
            Some(snapshot) => snapshot.get_pinned_cf(cf, key)?,
            None => self.db.get_pinned_cf(cf, key)?,
        };
        match found {
            None => Ok(None),
            Some(bytes) => {
                decode(&bytes).map(Some).map_err(|e| StoreError::corrupt(format!("shard {shard} {kind:?} record"), e))
            }
        }
    }

    /// Writes a batch atomically on the calling thread; readable at once, durable at the next
    /// sync. For threads that may block (applies, snapshot installs, tools); async code uses
    /// [`NodeDb::write_log`].
    pub fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.db.write(batch)?;
        Ok(())
    }

    /// Writes a batch atomically on the node's log thread (see [`crate::io_threads`]);
    /// readable once this returns, durable at the next sync.
    pub async fn write_log(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let db = self.db.clone();
        self.log_thread.run(move || db.write(batch)).await??;
        Ok(())
    }

    /// Writes a batch atomically on the log thread and returns once it is durable (sharing the
    /// fsync with every other write waiting at the time).
    pub async fn write_durable(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.write_log(batch).await?;
        self.syncer.sync().await.map_err(|e| StoreError::io("syncing the WAL", e))
    }

    /// The thread that applies `shard`'s committed entries (always the same one).
    pub(crate) fn apply_thread(&self, shard: ShardId) -> &IoThread {
        &self.apply_threads[shard as usize % self.apply_threads.len()]
    }

    /// RocksDB's estimate of the bytes on disk of `shard`'s log entries `from..to`: flushed
    /// files only (not the memtable), compressed. Cheap: it reads file metadata, not entries.
    pub(crate) fn approximate_log_bytes(&self, shard: ShardId, from: u64, to: u64) -> Result<u64, StoreError> {
        let (start, end) = (keys::log_key(shard, from), keys::log_key(shard, to));
        let range = rocksdb::Range::new(&start, &end);
        Ok(self.rocks().get_approximate_sizes_cf(self.cf_log()?, &[range]).first().copied().unwrap_or(0))
    }

    /// Syncs the WAL now, on the calling thread (used at shutdown).
    pub fn sync_wal(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    pub fn syncer(&self) -> &WalSyncer {
        &self.syncer
    }

    pub fn sync_stats(&self) -> SyncStats {
        self.syncer.stats()
    }
}

fn describe_identity(identity: &ClusterIdentity) -> String {
    format!("cluster {:?} as node {} with {} shards", identity.cluster_id, identity.node_id, identity.shard_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn compactions_run_at_a_lower_priority_than_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let db = NodeDb::open(dir.path(), identity("c", 1, 1), &DbOptions::default()).unwrap();
        let sm = db.cf_sm().unwrap();
        for round in 0..3u32 {
            for i in 0..100u32 {
                db.rocks().put_cf(sm, format!("{round}-{i}"), [0u8; 64]).unwrap();
            }
            db.rocks().flush_cf(sm).unwrap();
        }
        // A manual compaction runs on the low-priority pool, whose threads lower their own
        // priority when they pick up work.
        db.rocks().compact_range_cf(sm, None::<&[u8]>, None::<&[u8]>);
        let nice_of = |prefix: &str| -> Vec<i32> {
            let mut found = Vec::new();
            for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
                let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
                if comm.trim_end().starts_with(prefix) {
                    let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                    // Field 19 of /proc/<tid>/stat is the nice value; fields start after "(comm) ".
                    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
                    found.push(fields[16].parse().unwrap());
                }
            }
            found
        };
        let (low, high) = (nice_of("rocksdb:low"), nice_of("rocksdb:high"));
        assert!(!low.is_empty() && low.iter().all(|&n| n == 19), "compaction threads at nice {low:?}");
        assert!(high.iter().all(|&n| n < 19), "flush threads at nice {high:?}");
    }

    #[test]
    fn the_log_and_state_machine_memtables_keep_insert_hints_per_prefix() {
        let dir = tempfile::tempdir().unwrap();
        drop(NodeDb::open(dir.path(), identity("c", 1, 1), &DbOptions::default()).unwrap());
        // RocksDB writes the options it runs with; find each column family's hint setting.
        let options = std::fs::read_dir(dir.path().join("db"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("OPTIONS-"))
            .max()
            .unwrap();
        let text = std::fs::read_to_string(options).unwrap();
        let mut hints = std::collections::BTreeMap::new();
        let mut cf = String::new();
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix("[CFOptions \"").and_then(|l| l.strip_suffix("\"]")) {
                cf = name.to_owned();
            } else if let Some(v) = line.strip_prefix("memtable_insert_with_hint_prefix_extractor=") {
                hints.insert(cf.clone(), v.to_owned());
            }
        }
        assert_eq!(hints.get(CF_LOG).map(String::as_str), Some("rocksdb.FixedPrefix.4"));
        assert_eq!(hints.get(CF_SM).map(String::as_str), Some("rocksdb.FixedPrefix.17"));
        assert_eq!(hints.get(CF_STATE).map(String::as_str), Some("nullptr"));
        // Concurrent inserts would ignore the hints.
        assert!(text.lines().any(|l| l.trim() == "allow_concurrent_memtable_write=false"));
        assert!(text.lines().any(|l| l.trim() == "enable_write_thread_adaptive_yield=false"));
    }

    fn identity(cluster: &str, node: u64, shards: u32) -> ClusterIdentity {
        ClusterIdentity { cluster_id: cluster.into(), node_id: node, shard_count: shards, format_version: 0 }
    }

    #[test]
    fn a_data_dir_remembers_its_cluster() {
        let dir = tempfile::tempdir().unwrap();
        drop(NodeDb::open(dir.path(), identity("c1", 1, 16), &DbOptions::default()).unwrap());
        // Same identity: reopens.
        drop(NodeDb::open(dir.path(), identity("c1", 1, 16), &DbOptions::default()).unwrap());
        for wrong in [identity("c2", 1, 16), identity("c1", 2, 16), identity("c1", 1, 8)] {
            let err = NodeDb::open(dir.path(), wrong, &DbOptions::default()).err().unwrap();
            assert!(matches!(err, StoreError::IdentityMismatch { .. }), "{err}");
            assert!(err.to_string().contains("cluster \"c1\" as node 1 with 16 shards"), "{err}");
        }
    }

    #[test]
    fn zero_shards_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            NodeDb::open(dir.path(), identity("c", 1, 0), &DbOptions::default()),
            Err(StoreError::Config(_))
        ));
    }

    #[tokio::test]
    async fn durable_writes_are_counted_by_the_syncer() {
        let dir = tempfile::tempdir().unwrap();
        let db = NodeDb::open(dir.path(), identity("c", 1, 1), &DbOptions::default()).unwrap();
        let before = db.sync_stats();
        let mut batch = WriteBatch::default();
        batch.put(b"k", b"v");
        db.write_durable(batch).await.unwrap();
        let after = db.sync_stats();
        assert_eq!(after.synced_writes - before.synced_writes, 1);
        assert!(after.syncs > before.syncs);
    }

    /// Log writes wait on the write thread, not on the task: on a single-threaded runtime an
    /// inline write would finish within the first poll, every time.
    #[tokio::test(flavor = "current_thread")]
    async fn log_writes_leave_the_async_thread_free() {
        use std::task::Poll;
        let dir = tempfile::tempdir().unwrap();
        let db = NodeDb::open(dir.path(), identity("c", 1, 1), &DbOptions::default()).unwrap();
        let big_batch = |round: u32| {
            let mut batch = WriteBatch::default();
            for i in 0..4_000u32 {
                batch.put([round.to_be_bytes(), i.to_be_bytes()].concat(), [7u8; 512]);
            }
            batch
        };
        let mut pending = 0;
        for round in 0..3 {
            let mut write = std::pin::pin!(db.write_log(big_batch(round)));
            match futures::poll!(write.as_mut()) {
                Poll::Ready(written) => written.unwrap(),
                Poll::Pending => {
                    pending += 1;
                    write.await.unwrap();
                }
            }
            let mut durable = std::pin::pin!(db.write_durable(big_batch(round + 10)));
            match futures::poll!(durable.as_mut()) {
                Poll::Ready(written) => written.unwrap(),
                Poll::Pending => {
                    pending += 1;
                    durable.await.unwrap();
                }
            }
        }
        assert!(pending > 0, "every log write completed inside its first poll: it ran on the async thread");
        assert!(db.rocks().get([2u32.to_be_bytes(), 3_999u32.to_be_bytes()].concat()).unwrap().is_some());
    }
}
