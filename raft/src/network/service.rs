//! The receiving side of the Raft RPCs: decode, hand to the local shard's Raft, encode the
//! answer. The node's gRPC service calls these after it has found the shard.

use chorus_proto::peer as pb;
use openraft::error::{InstallSnapshotError, RaftError};

use super::convert;
use crate::types::ChorusRaft;

fn failure(message: impl Into<String>) -> pb::RemoteFailure {
    pb::RemoteFailure { message: message.into() }
}

pub async fn append_entries(raft: &ChorusRaft, request: pb::AppendEntriesRequest) -> pb::AppendEntriesReply {
    use pb::append_entries_reply::Result as R;
    let rpc = match convert::append_request_from_pb(request) {
        Ok(rpc) => rpc,
        Err(e) => {
            return pb::AppendEntriesReply { result: Some(R::Failure(failure(format!("malformed request: {e}")))) };
        }
    };
    match raft.append_entries(rpc).await {
        Ok(resp) => convert::append_response_to_pb(&resp),
        Err(e) => pb::AppendEntriesReply { result: Some(R::Failure(failure(e.to_string()))) },
    }
}

pub async fn vote(raft: &ChorusRaft, request: pb::VoteRequest) -> pb::VoteReply {
    use pb::vote_reply::Result as R;
    let rpc = match convert::vote_request_from_pb(&request) {
        Ok(rpc) => rpc,
        Err(e) => return pb::VoteReply { result: Some(R::Failure(failure(format!("malformed request: {e}")))) },
    };
    match raft.vote(rpc).await {
        Ok(resp) => pb::VoteReply { result: Some(R::Response(convert::vote_response_to_pb(&resp))) },
        Err(e) => pb::VoteReply { result: Some(R::Failure(failure(e.to_string()))) },
    }
}

pub async fn install_snapshot(raft: &ChorusRaft, request: pb::InstallSnapshotRequest) -> pb::InstallSnapshotReply {
    use pb::install_snapshot_reply::Result as R;
    let rpc = match convert::install_request_from_pb(request) {
        Ok(rpc) => rpc,
        Err(e) => {
            return pb::InstallSnapshotReply { result: Some(R::Failure(failure(format!("malformed request: {e}")))) };
        }
    };
    match raft.install_snapshot(rpc).await {
        Ok(resp) => convert::install_response_to_pb(&resp),
        Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m))) => pb::InstallSnapshotReply {
            result: Some(R::Mismatch(pb::SnapshotMismatch {
                expect_id: m.expect.id.to_string(),
                expect_offset: m.expect.offset,
                got_id: m.got.id.to_string(),
                got_offset: m.got.offset,
            })),
        },
        Err(e) => pb::InstallSnapshotReply { result: Some(R::Failure(failure(e.to_string()))) },
    }
}
