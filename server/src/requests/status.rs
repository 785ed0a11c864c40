//! ClusterStatus: nodes, and each shard's replicas, leader, term, commit and applied indexes.

use chorus_proto::client::ClusterStatusReply;

use crate::node::Node;

pub async fn handle(node: &Node) -> ClusterStatusReply {
    crate::status::cluster_status(node).await
}
