//! A state machine over a fresh database, fed entries one command at a time: what the unit
//! tests of the state machine's modules share.

use std::sync::Arc;

use chorus_proto::storage::{ClusterIdentity, Command, Op, op};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload};
use rocksdb::{Direction, IteratorMode, ReadOptions};

use super::{CURRENT_RULES, HistoryPage, HistoryQuery, ShardStateMachine, append_op, create_room_op};
use crate::db::{DbOptions, NodeDb};
use crate::error::CommandError;
use crate::keys;
use crate::types::{Entry, LogId, OpOutcome, ShardId, TypeConfig};

pub struct Fixture {
    pub _dir: tempfile::TempDir,
    pub db: Arc<NodeDb>,
    pub sm: ShardStateMachine,
    pub next_index: u64,
    pub shard: ShardId,
}

pub const SHARD: ShardId = 1;

pub type KeyValue = (Box<[u8]>, Box<[u8]>);

pub fn open_db(dir: &std::path::Path) -> Arc<NodeDb> {
    let identity = ClusterIdentity { cluster_id: "test".into(), node_id: 1, shard_count: 4, format_version: 0 };
    NodeDb::open(dir, identity, &DbOptions::default()).unwrap()
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::of(SHARD)
    }

    /// The meta group's state machine.
    pub fn meta() -> Fixture {
        Fixture::of(keys::META_SHARD)
    }

    pub fn of(shard: ShardId) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path());
        let sm = ShardStateMachine::open(db.clone(), shard).unwrap();
        Fixture { _dir: dir, db, sm, next_index: 1, shard }
    }

    pub fn entry(&mut self, payload: EntryPayload<TypeConfig>) -> Entry {
        let index = self.next_index;
        self.next_index += 1;
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload }
    }

    pub async fn apply_cmd(&mut self, ts_ms: u64, ops: Vec<op::Kind>) -> Vec<Result<OpOutcome, CommandError>> {
        self.apply_rules(ts_ms, ops, CURRENT_RULES).await
    }

    /// One op alone in an entry; its result.
    pub async fn apply_one(&mut self, ts_ms: u64, op: op::Kind) -> Result<OpOutcome, CommandError> {
        let mut results = self.apply_cmd(ts_ms, vec![op]).await;
        assert_eq!(results.len(), 1);
        results.pop().unwrap()
    }

    pub async fn apply_rules(
        &mut self,
        ts_ms: u64,
        ops: Vec<op::Kind>,
        rules: u32,
    ) -> Vec<Result<OpOutcome, CommandError>> {
        let cmd =
            Command { ts_ms, ops: ops.into_iter().map(|k| Op { kind: Some(k) }).collect(), rules, notify_after_ms: 0 };
        let entry = self.entry(EntryPayload::Normal(cmd.into()));
        let mut responses = self.sm.apply([entry]).await.unwrap();
        assert_eq!(responses.len(), 1);
        responses.pop().unwrap().results
    }

    pub async fn create(&mut self, room: &str) {
        let r = self.apply_cmd(1_000, vec![create_room_op(room, "alice")]).await;
        assert!(matches!(r[0], Ok(OpOutcome::RoomCreated { .. })), "{r:?}");
    }

    pub async fn send(
        &mut self,
        room: &str,
        client: &str,
        client_seq: u64,
        body: &str,
    ) -> Result<OpOutcome, CommandError> {
        let mut r =
            self.apply_cmd(2_000, vec![append_op(room, "alice", client.as_bytes(), client_seq, body.to_owned())]).await;
        r.pop().unwrap()
    }

    /// Every state-machine key and value of the shard, for "nothing was written" checks.
    pub fn sm_contents(&self) -> Vec<KeyValue> {
        let cf = self.db.cf_sm().unwrap();
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(keys::shard_end(self.shard).to_vec());
        let start = keys::shard_prefix(self.shard);
        self.db
            .rocks()
            .iterator_cf_opt(cf, opts, IteratorMode::From(&start, Direction::Forward))
            .map(|r| r.unwrap())
            .collect()
    }

    pub fn history(&self, room: &str, query: HistoryQuery) -> HistoryPage {
        self.sm.reader().history(room, query, "alice").unwrap()
    }
}

/// The code of a refusal; panics on a success.
pub fn refused(result: Result<OpOutcome, CommandError>) -> &'static str {
    match result {
        Err(e) => e.code(),
        Ok(ok) => panic!("expected a refusal, got {ok:?}"),
    }
}
