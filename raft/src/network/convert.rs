//! Conversions between openraft's RPC types and the peer protocol (`chorus_proto::peer`).
//! Decoding checks every required field: a malformed message is an error, never a panic.

use chorus_proto::peer as pb;

use crate::codec::{self, DecodeError};
use crate::types::{ShardId, SnapshotMeta, TypeConfig, Vote};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};

fn vote_from(v: Option<&chorus_proto::storage::Vote>, field: &'static str) -> Result<Vote, DecodeError> {
    v.map(codec::vote_from_pb).ok_or(DecodeError::Missing(field))
}

pub fn append_request_to_pb(shard: ShardId, rpc: &AppendEntriesRequest<TypeConfig>) -> pb::AppendEntriesRequest {
    pb::AppendEntriesRequest {
        shard,
        vote: Some(codec::vote_to_pb(&rpc.vote)),
        prev_log_id: codec::opt_log_id_to_pb(rpc.prev_log_id.as_ref()),
        entries: rpc.entries.iter().map(codec::entry_to_pb).collect(),
        leader_commit: codec::opt_log_id_to_pb(rpc.leader_commit.as_ref()),
    }
}

pub fn append_request_from_pb(req: pb::AppendEntriesRequest) -> Result<AppendEntriesRequest<TypeConfig>, DecodeError> {
    Ok(AppendEntriesRequest {
        vote: vote_from(req.vote.as_ref(), "AppendEntriesRequest.vote")?,
        prev_log_id: req.prev_log_id.as_ref().map(codec::log_id_from_pb),
        entries: req.entries.into_iter().map(codec::entry_from_received_pb).collect::<Result<_, _>>()?,
        leader_commit: req.leader_commit.as_ref().map(codec::log_id_from_pb),
    })
}

pub fn append_response_to_pb(resp: &AppendEntriesResponse<u64>) -> pb::AppendEntriesReply {
    use pb::append_entries_reply::Result as R;
    let result = match resp {
        AppendEntriesResponse::Success => R::Success(pb::Empty {}),
        AppendEntriesResponse::PartialSuccess(matching) => {
            R::PartialSuccess(pb::PartialSuccess { matching: codec::opt_log_id_to_pb(matching.as_ref()) })
        }
        AppendEntriesResponse::Conflict => R::Conflict(pb::Empty {}),
        AppendEntriesResponse::HigherVote(v) => R::HigherVote(codec::vote_to_pb(v)),
    };
    pb::AppendEntriesReply { result: Some(result) }
}

pub fn vote_request_to_pb(shard: ShardId, rpc: &VoteRequest<u64>) -> pb::VoteRequest {
    pb::VoteRequest {
        shard,
        vote: Some(codec::vote_to_pb(&rpc.vote)),
        last_log_id: codec::opt_log_id_to_pb(rpc.last_log_id.as_ref()),
    }
}

pub fn vote_request_from_pb(req: &pb::VoteRequest) -> Result<VoteRequest<u64>, DecodeError> {
    Ok(VoteRequest {
        vote: vote_from(req.vote.as_ref(), "VoteRequest.vote")?,
        last_log_id: req.last_log_id.as_ref().map(codec::log_id_from_pb),
    })
}

pub fn vote_response_to_pb(resp: &VoteResponse<u64>) -> pb::VoteResponse {
    pb::VoteResponse {
        vote: Some(codec::vote_to_pb(&resp.vote)),
        vote_granted: resp.vote_granted,
        last_log_id: codec::opt_log_id_to_pb(resp.last_log_id.as_ref()),
    }
}

pub fn vote_response_from_pb(resp: &pb::VoteResponse) -> Result<VoteResponse<u64>, DecodeError> {
    Ok(VoteResponse {
        vote: vote_from(resp.vote.as_ref(), "VoteResponse.vote")?,
        vote_granted: resp.vote_granted,
        last_log_id: resp.last_log_id.as_ref().map(codec::log_id_from_pb),
    })
}

pub fn snapshot_meta_to_pb(meta: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: codec::opt_log_id_to_pb(meta.last_log_id.as_ref()),
        last_membership: Some(codec::stored_membership_to_pb(&meta.last_membership)),
        snapshot_id: meta.snapshot_id.clone(),
    }
}

pub fn snapshot_meta_from_pb(meta: &pb::SnapshotMeta) -> Result<SnapshotMeta, DecodeError> {
    let membership = meta.last_membership.as_ref().ok_or(DecodeError::Missing("SnapshotMeta.last_membership"))?;
    Ok(SnapshotMeta {
        last_log_id: meta.last_log_id.as_ref().map(codec::log_id_from_pb),
        last_membership: codec::stored_membership_from_pb(membership)?,
        snapshot_id: meta.snapshot_id.clone(),
    })
}

pub fn install_request_to_pb(shard: ShardId, rpc: InstallSnapshotRequest<TypeConfig>) -> pb::InstallSnapshotRequest {
    pb::InstallSnapshotRequest {
        shard,
        vote: Some(codec::vote_to_pb(&rpc.vote)),
        meta: Some(snapshot_meta_to_pb(&rpc.meta)),
        offset: rpc.offset,
        data: rpc.data.into(),
        done: rpc.done,
    }
}

pub fn install_request_from_pb(
    req: pb::InstallSnapshotRequest,
) -> Result<InstallSnapshotRequest<TypeConfig>, DecodeError> {
    let meta = req.meta.as_ref().ok_or(DecodeError::Missing("InstallSnapshotRequest.meta"))?;
    Ok(InstallSnapshotRequest {
        vote: vote_from(req.vote.as_ref(), "InstallSnapshotRequest.vote")?,
        meta: snapshot_meta_from_pb(meta)?,
        offset: req.offset,
        data: req.data.to_vec(),
        done: req.done,
    })
}

pub fn install_response_to_pb(resp: &InstallSnapshotResponse<u64>) -> pb::InstallSnapshotReply {
    pb::InstallSnapshotReply { result: Some(pb::install_snapshot_reply::Result::Vote(codec::vote_to_pb(&resp.vote))) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Entry, LogId};
    use openraft::{CommittedLeaderId, EntryPayload};

    #[test]
    fn append_requests_round_trip() {
        let log_id = |i| LogId::new(CommittedLeaderId::new(3, 2), i);
        let rpc = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 2),
            prev_log_id: Some(log_id(4)),
            entries: vec![Entry { log_id: log_id(5), payload: EntryPayload::Blank }],
            leader_commit: Some(log_id(4)),
        };
        let pb = append_request_to_pb(7, &rpc);
        assert_eq!(pb.shard, 7);
        let back = append_request_from_pb(pb).unwrap();
        assert_eq!(
            (back.vote, back.prev_log_id, back.entries, back.leader_commit),
            (rpc.vote, rpc.prev_log_id, rpc.entries, rpc.leader_commit)
        );
    }

    #[test]
    fn missing_fields_are_errors() {
        assert!(append_request_from_pb(pb::AppendEntriesRequest::default()).is_err());
        assert!(vote_request_from_pb(&pb::VoteRequest::default()).is_err());
        assert!(install_request_from_pb(pb::InstallSnapshotRequest::default()).is_err());
    }
}
