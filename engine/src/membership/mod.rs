//! A cell: the relay nodes of one region, their SWIM membership and who owns which
//! document.
//!
//! - [`packet`]: HMAC-SHA256 sealing of gossip packets under the cell's key and id.
//! - [`swim`]: foca behind a sans-IO `handle_*`/`poll_*` wrapper with one ordered timer
//!   scheduler.
//! - [`ownership`]: rendezvous hashing of (tenant, doc) over the live members.
//!
//! The relay's gossip task (`meridian_relay::cell::gossip`) drives a [`Membership`] over
//! a UDP socket.

pub mod ownership;
pub mod packet;
pub mod swim;

pub use ownership::owner;
pub use packet::{PacketError, PacketSealer, SealerError};
pub use swim::{Member, MemberState, MemberView, Membership, MembershipConfig, MembershipStats};

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use super::*;

    const KEY: &[u8] = b"cell key for the membership tests";

    fn node(i: u16, generation: u64) -> Member {
        Member {
            node: format!("n{i}"),
            gossip: SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
            client: format!("127.0.0.1:{}", 8000 + i),
            generation,
        }
    }

    /// Runs `nodes` over a lossless in-memory network for `duration` of virtual time.
    fn run(nodes: &mut [Option<Membership>], start: Instant, duration: Duration) -> Instant {
        let mut now = start;
        let end = start + duration;
        let mut wire: VecDeque<(SocketAddr, bytes::Bytes)> = VecDeque::new();
        while now < end {
            for m in nodes.iter_mut().flatten() {
                m.handle_timeout(now);
                while let Some(packet) = m.poll_transmit() {
                    wire.push_back(packet);
                }
            }
            while let Some((to, packet)) = wire.pop_front() {
                if let Some(m) = nodes.iter_mut().flatten().find(|m| m.me().gossip == to) {
                    m.handle_packet(now, &packet);
                    while let Some(packet) = m.poll_transmit() {
                        wire.push_back(packet);
                    }
                }
            }
            now += Duration::from_millis(10);
        }
        now
    }

    fn membership(i: u16, generation: u64, n: u16, now: Instant) -> Membership {
        let seeds = (0..n).map(|j| node(j, 0).gossip).collect();
        let mut m = Membership::new(
            node(i, generation),
            PacketSealer::new("cell-a", KEY).unwrap(),
            MembershipConfig::default(),
            seeds,
            u64::from(i) + generation,
        );
        m.join(now);
        m
    }

    #[test]
    fn a_cell_forms_detects_a_crash_and_takes_the_restarted_node_back() {
        let start = Instant::now();
        let mut nodes: Vec<Option<Membership>> =
            (0..4).map(|i| Some(membership(i, 1, 4, start))).collect();
        let now = run(&mut nodes, start, Duration::from_secs(5));
        for m in nodes.iter().flatten() {
            assert_eq!(m.live().len(), 4, "{:?}", m.members());
        }
        // Crash node 3: the others declare it down.
        nodes[3] = None;
        let now = run(&mut nodes, now, Duration::from_secs(8));
        for m in nodes.iter().flatten() {
            assert_eq!(m.live().len(), 3, "{:?}", m.members());
            assert!(m.stats().downs >= 1);
        }
        // Restart it under a new generation: it rejoins and is live everywhere.
        nodes[3] = Some(membership(3, 2, 4, now));
        run(&mut nodes, now, Duration::from_secs(8));
        for m in nodes.iter().flatten() {
            let live = m.live();
            assert_eq!(live.len(), 4, "{:?}", m.members());
        }
    }

    #[test]
    fn graceful_leave_is_seen_at_once_and_forged_packets_are_counted() {
        let start = Instant::now();
        let mut nodes: Vec<Option<Membership>> =
            (0..3).map(|i| Some(membership(i, 1, 3, start))).collect();
        let now = run(&mut nodes, start, Duration::from_secs(3));
        if let Some(m) = nodes[2].as_mut() {
            m.leave(now);
            assert!(m.live().iter().all(|n| n.node.as_str() != "n2"));
            assert_eq!(
                m.poll_timeout(),
                None,
                "a node that left has nothing to wait for"
            );
        }
        // Deliver the leave quickly: well before suspicion could have done it.
        let now = run(&mut nodes, now, Duration::from_millis(200));
        for m in nodes[..2].iter().flatten() {
            assert_eq!(m.live().len(), 2, "{:?}", m.members());
        }
        // A forged packet (right cell, wrong key) and another cell's packet change nothing.
        let forged = PacketSealer::new("cell-a", b"not the key of this cell at all")
            .unwrap()
            .seal(b"anything");
        let foreign = PacketSealer::new("cell-b", KEY).unwrap().seal(b"anything");
        let m = nodes[0].as_mut().unwrap();
        let before = m.live();
        m.handle_packet(now, &forged);
        m.handle_packet(now, &foreign);
        m.handle_packet(now, b"garbage");
        assert_eq!(m.live(), before);
        assert_eq!(m.stats().dropped_bad_tag, 1);
        assert_eq!(m.stats().dropped_wrong_cell, 1);
        assert_eq!(m.stats().dropped_malformed, 1);
    }
}
