//! openraft's own storage test suite, run against our RocksDB log store and state machine.

use chorus_proto::storage::ClusterIdentity;
use chorus_raft::{DbOptions, NodeDb, ShardLogStore, ShardStateMachine, StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct RocksStoreBuilder;

impl StoreBuilder<TypeConfig, ShardLogStore, ShardStateMachine, tempfile::TempDir> for RocksStoreBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, ShardLogStore, ShardStateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let identity = ClusterIdentity { cluster_id: "suite".into(), node_id: 0, shard_count: 8, format_version: 0 };
        let db = NodeDb::open(dir.path(), identity, &DbOptions::default()).expect("open db");
        // A shard in the middle of the key space, so that the neighbours' ranges are exercised.
        // The suite purges entries no state machine has applied or snapshotted, which a node's
        // log store (linked to its snapshots) defers: the suite gets an unlinked one. The link
        // is tested in install_crash.rs and crash_recovery.rs.
        let log = ShardLogStore::new(db.clone(), 5);
        let sm = ShardStateMachine::open(db, 5).expect("open shard");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(RocksStoreBuilder).expect("openraft storage suite");
}
