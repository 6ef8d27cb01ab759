//! Document ownership: rendezvous (highest random weight) hashing of (tenant, doc) over
//! the live members of the cell. Every node computes the same owner from the same member
//! set; when a member joins or leaves, only the documents it wins or loses move.

use meridian_protocol::NodeAddr;

use crate::DocKey;

/// A stable 64-bit hash (FNV-1a over length-prefixed fields, then a splitmix64
/// finalizer). Stable across builds and platforms, unlike `std`'s `DefaultHasher`, so
/// that every node of a cell, whatever its version, agrees on owners.
fn weight(node: &str, key: &DocKey) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for field in [
        node.as_bytes(),
        key.tenant.as_str().as_bytes(),
        key.doc.as_str().as_bytes(),
    ] {
        for byte in (field.len() as u32).to_le_bytes().iter().chain(field) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The owner of `key` among `members` (ties, which need a 64-bit collision, go to the
/// greater node id). `None` when there are no members.
pub fn owner<'a>(members: &'a [NodeAddr], key: &DocKey) -> Option<&'a NodeAddr> {
    members.iter().max_by(|a, b| {
        weight(a.node.as_str(), key)
            .cmp(&weight(b.node.as_str(), key))
            .then_with(|| a.node.as_str().cmp(b.node.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_protocol::{DocId, NodeId, TenantId};

    fn member(i: usize) -> NodeAddr {
        NodeAddr {
            node: NodeId::new(format!("node-{i}")).unwrap(),
            addr: format!("127.0.0.1:{}", 7000 + i),
        }
    }

    fn key(i: usize) -> DocKey {
        DocKey {
            tenant: TenantId::new("acme").unwrap(),
            doc: DocId::new(format!("doc-{i}")).unwrap(),
        }
    }

    #[test]
    fn owners_spread_and_only_the_lost_members_documents_move() {
        let five: Vec<NodeAddr> = (0..5).map(member).collect();
        let mut counts = [0usize; 5];
        for d in 0..10_000 {
            let o = owner(&five, &key(d)).unwrap();
            counts[five.iter().position(|m| m == o).unwrap()] += 1;
        }
        for c in counts {
            assert!((1500..2500).contains(&c), "unbalanced: {counts:?}");
        }
        // Member 2 leaves: only its documents move, and they spread over the others.
        let four: Vec<NodeAddr> = five.iter().filter(|m| **m != five[2]).cloned().collect();
        for d in 0..10_000 {
            let before = owner(&five, &key(d)).unwrap();
            let after = owner(&four, &key(d)).unwrap();
            if *before != five[2] {
                assert_eq!(before, after);
            }
        }
        // Order of the member list does not matter.
        let mut shuffled = five.clone();
        shuffled.reverse();
        for d in 0..1000 {
            assert_eq!(owner(&five, &key(d)), owner(&shuffled, &key(d)));
        }
        assert!(owner(&[], &key(0)).is_none());
    }
}
