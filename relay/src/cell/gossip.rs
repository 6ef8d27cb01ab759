//! The gossip task: one UDP socket driving a [`Membership`], publishing the cell's view.

use std::time::{Duration, Instant};

use meridian_protocol::NodeAddr;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

use super::{MemberView, Membership, MembershipStats};

/// The largest datagram read.
const DATAGRAM_MAX: usize = 2048;

/// What the gossip task publishes.
#[derive(Debug, Clone, Default)]
pub struct CellView {
    /// Live members (alive or suspect), this node included unless it left.
    pub live: Vec<NodeAddr>,
    /// The same, each with its generation.
    pub live_members: Vec<(NodeAddr, u64)>,
    /// Every known member with its state.
    pub members: Vec<MemberView>,
    /// Counters.
    pub stats: MembershipStats,
    /// True once this node found another member, or has none configured to find.
    pub joined: bool,
}

enum Command {
    Leave(oneshot::Sender<()>),
}

/// A running gossip task.
#[derive(Debug)]
pub struct Gossip {
    view: watch::Receiver<CellView>,
    commands: mpsc::Sender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl Gossip {
    /// Starts driving `membership` on `socket` and joins the cell.
    pub fn spawn(socket: UdpSocket, mut membership: Membership) -> Gossip {
        membership.join(Instant::now());
        let (view_tx, view_rx) = watch::channel(view_of(&membership));
        let (commands_tx, commands_rx) = mpsc::channel(4);
        let task = tokio::spawn(run(socket, membership, view_tx, commands_rx));
        Gossip {
            view: view_rx,
            commands: commands_tx,
            task,
        }
    }

    /// The cell as this node sees it now.
    pub fn view(&self) -> watch::Receiver<CellView> {
        self.view.clone()
    }

    /// Leaves the cell: tells the members (waits at most `deadline` for the packets to
    /// go out), and stops counting this node as live.
    pub async fn leave(&self, deadline: Duration) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.commands.send(Command::Leave(done_tx)).await.is_ok() {
            let _ = tokio::time::timeout(deadline, done_rx).await;
        }
    }
}

impl Drop for Gossip {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn view_of(membership: &Membership) -> CellView {
    CellView {
        live: membership.live(),
        live_members: membership.live_members(),
        members: membership.members(),
        stats: membership.stats().clone(),
        joined: membership.connected() || membership.alone_by_config(),
    }
}

async fn run(
    socket: UdpSocket,
    mut membership: Membership,
    view: watch::Sender<CellView>,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut buf = vec![0u8; DATAGRAM_MAX];
    let mut published = Instant::now();
    let mut joined_at_latest = Instant::now() + join_grace(&membership);
    // Counters and the join grace period change while nothing arrives: publish anyway.
    let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let timer = membership.poll_timeout();
        tokio::select! {
            _ = tick.tick() => {}
            received = socket.recv_from(&mut buf) => match received {
                Ok((len, _from)) => membership.handle_packet(Instant::now(), &buf[..len]),
                Err(error) => {
                    // ICMP errors from a dead peer surface here on some platforms.
                    tracing::trace!(%error, "gossip recv");
                }
            },
            _ = sleep_until(timer) => membership.handle_timeout(Instant::now()),
            command = commands.recv() => match command {
                Some(Command::Leave(done)) => {
                    membership.leave(Instant::now());
                    send_all(&socket, &mut membership).await;
                    view.send_replace(view_of(&membership));
                    let _ = done.send(());
                    continue;
                }
                None => return,
            },
        }
        send_all(&socket, &mut membership).await;
        let now = Instant::now();
        let changed = membership.take_live_changed();
        if changed || now.duration_since(published) >= PUBLISH_INTERVAL {
            published = now;
            let mut next = view_of(&membership);
            // A node whose seeds never answer serves alone after a grace period rather
            // than never becoming ready (the first node of a new cell).
            if now >= joined_at_latest {
                next.joined = true;
                joined_at_latest = now;
            }
            view.send_replace(next);
        }
    }
}

fn join_grace(membership: &Membership) -> Duration {
    if membership.alone_by_config() {
        Duration::ZERO
    } else {
        JOIN_GRACE
    }
}

/// The cell view is published at least this often (counters change while nothing
/// arrives), and at once when the live members change.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);
/// How long a node whose seeds never answer waits before it serves alone.
const JOIN_GRACE: Duration = Duration::from_secs(3);

async fn send_all(socket: &UdpSocket, membership: &mut Membership) {
    while let Some((to, packet)) = membership.poll_transmit() {
        if let Err(error) = socket.send_to(&packet, to).await {
            tracing::trace!(%error, %to, "gossip send");
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
