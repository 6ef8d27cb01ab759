//! The node's admin endpoint (`meridian_process::http`, re-exported), and what tools and
//! tests ask of a node's `/cell` view.

use std::net::SocketAddr;

pub use meridian_process::http::*;

/// `node`'s state (its newest generation) as the node serving `/cell` at `admin` sees
/// it; `None` if that node does not answer or does not know it.
pub async fn member_state(admin: SocketAddr, node: &str) -> Option<crate::cell::MemberState> {
    let (_, body) = get(admin, "/cell").await.ok()?;
    #[derive(serde::Deserialize)]
    struct View {
        members: Vec<crate::cell::MemberView>,
    }
    let view: View = serde_json::from_str(&body).ok()?;
    view.members
        .into_iter()
        .filter(|m| m.node == node)
        .max_by_key(|m| m.generation)
        .map(|m| m.state)
}
