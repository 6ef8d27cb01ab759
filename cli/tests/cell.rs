//! A cell of real relay processes on 127.0.0.1 (`meridian dev --nodes 4`), clients
//! editing many documents: `kill -9` of a node, its restart under the same identity, a
//! graceful leave, and forged gossip packets.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use meridian_client::ClientConfig;
use meridian_relay::cell::MemberState;

use common::{Guard, Workload, meridian, signal, start_dev, wait_for};

const NODES: usize = 4;
const CLIENTS: usize = 3;
const DOCS: usize = 16;

fn node_toml(dir: &Path, i: usize) -> toml::Value {
    let text = std::fs::read_to_string(dir.join(format!("node-{i}.toml"))).expect("node config");
    toml::from_str(&text).expect("node toml")
}

fn admin(dir: &Path, i: usize) -> SocketAddr {
    node_toml(dir, i)["metrics"]["listen"]
        .as_str()
        .expect("metrics.listen")
        .parse()
        .expect("addr")
}

fn gossip(dir: &Path, i: usize) -> SocketAddr {
    node_toml(dir, i)["cell"]["gossip_listen"]
        .as_str()
        .expect("cell.gossip_listen")
        .parse()
        .expect("addr")
}

fn pid(dir: &Path, i: usize) -> u32 {
    std::fs::read_to_string(dir.join(format!("node-{i}.pid")))
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

/// `node`'s state as the node at `admin` sees it (the newest generation).
async fn state_seen(admin: SocketAddr, node: &str) -> Option<&'static str> {
    meridian_relay::http::member_state(admin, node)
        .await
        .map(MemberState::as_str)
}

/// Waits (30 s at most) until every node in `observers` (1-based) sees `node` in `state`.
async fn wait_seen(admins: &[SocketAddr], observers: &[usize], node: &str, state: &'static str) {
    for &i in observers {
        let admin = admins[i - 1];
        wait_for(
            &format!("node {i} to see {node} {state}"),
            Duration::from_secs(30),
            || async move { state_seen(admin, node).await == Some(state) },
        )
        .await;
    }
}

async fn metric(admin: SocketAddr, prefix: &str) -> f64 {
    meridian_relay::http::metric_sum(admin, prefix).await
}

async fn ready(admin: SocketAddr) -> bool {
    meridian_relay::http::get(admin, "/readyz")
        .await
        .is_ok_and(|(status, _)| status == 200)
}

fn client_config(dir: &Path, first: usize) -> ClientConfig {
    let text = std::fs::read_to_string(dir.join("client.toml")).expect("client.toml");
    let file: toml::Value = toml::from_str(&text).expect("client toml");
    let nodes: Vec<String> = file["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["endpoint"].as_str().expect("endpoint").to_owned())
        .collect();
    assert_eq!(nodes.len(), NODES, "client.toml lists every node");
    let ca = std::fs::read(PathBuf::from(file["ca_cert"].as_str().expect("ca"))).expect("ca");
    let mut config = ClientConfig::new(
        nodes[first % nodes.len()].clone(),
        ca,
        file["token"].as_str().expect("token"),
    );
    config.nodes = nodes;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_survives_kill_9_restart_graceful_leave_and_forged_gossip() {
    meridian_relay::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut dev = start_dev(dir, NODES);
    let admins: Vec<SocketAddr> = (1..=NODES).map(|i| admin(dir, i)).collect();

    let mut work =
        Workload::start((0..CLIENTS).map(|c| client_config(dir, c)).collect(), DOCS).await;
    work.edit(120, Duration::from_millis(2)).await;
    work.converge(Duration::from_secs(60)).await;
    // Each document is loaded by its owner only, and the owners are spread over the
    // nodes: clients followed `moved` to reach them.
    let mut hot = Vec::new();
    for a in &admins {
        hot.push(metric(*a, "meridian_hot_documents").await);
    }
    assert_eq!(hot.iter().sum::<f64>() as usize, DOCS, "{hot:?}");
    assert!(hot.iter().all(|h| *h > 0.0), "{hot:?}");
    let mut moved = 0.0;
    for a in &admins {
        moved += metric(*a, "meridian_moved_total").await;
    }
    assert!(moved > 0.0, "clients were told moved");
    assert!(work.take_errors().is_empty());

    // kill -9 node 2 while clients keep writing.
    let killed = Instant::now();
    signal(pid(dir, 2), "-KILL");
    work.edit(120, Duration::from_millis(10)).await;
    wait_seen(&admins, &[1, 3, 4], "dev-2", "down").await;
    eprintln!(
        "kill -9: every survivor marked dev-2 down after {:?}",
        killed.elapsed()
    );
    work.converge(Duration::from_secs(60)).await;
    eprintln!(
        "kill -9: clients converged {:?} after the kill",
        killed.elapsed()
    );

    // Restart node 2 with the same identity: it rejoins and wins its documents back.
    let mut moves_before = 0.0;
    for i in [1, 3, 4] {
        moves_before += metric(admins[i - 1], "meridian_ownership_moves_total").await;
    }
    let mut restarted = Guard(Some(
        meridian()
            .args(["relay", "--config"])
            .arg(dir.join("node-2.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart node 2"),
    ));
    wait_seen(&admins, &[1, 3, 4], "dev-2", "alive").await;
    let node2 = admins[1];
    wait_for("dev-2 ready", Duration::from_secs(30), || ready(node2)).await;
    work.edit(120, Duration::from_millis(5)).await;
    work.converge(Duration::from_secs(60)).await;
    let mut moves_after = 0.0;
    for i in [1, 3, 4] {
        moves_after += metric(admins[i - 1], "meridian_ownership_moves_total").await;
    }
    assert!(
        moves_after > moves_before,
        "documents moved back to the restarted node"
    );
    wait_for(
        "the restarted node to serve documents",
        Duration::from_secs(10),
        || async move { metric(node2, "meridian_hot_documents").await > 0.0 },
    )
    .await;

    // A graceful leave of node 3: ownership moves with no client error besides `moved`.
    work.take_errors();
    signal(pid(dir, 3), "-TERM");
    work.edit(120, Duration::from_millis(10)).await;
    wait_seen(&admins, &[1, 2, 4], "dev-3", "down").await;
    work.converge(Duration::from_secs(60)).await;
    let errors = work.take_errors();
    assert!(
        errors.is_empty(),
        "client errors during a graceful leave: {errors:?}"
    );

    // Forged and wrong-cell gossip packets change nothing and are counted.
    let target = gossip(dir, 1);
    let node1 = admins[0];
    let before = state_seen(node1, "dev-4").await;
    let socket = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let forged =
        meridian_relay::cell::PacketSealer::new("dev", b"not the dev cell's key, 32 bytes")
            .expect("sealer")
            .seal(b"a forged membership update");
    let key = std::fs::read_to_string(dir.join("cell.key")).expect("cell key");
    let foreign = meridian_relay::cell::PacketSealer::new(
        "other-cell",
        &hex::decode(key.trim()).expect("hex"),
    )
    .expect("sealer")
    .seal(b"another cell's update");
    for _ in 0..3 {
        socket.send_to(&forged, target).expect("send");
        socket.send_to(&foreign, target).expect("send");
    }
    wait_for(
        "the forged packets to be counted",
        Duration::from_secs(10),
        || async move {
            metric(
                node1,
                "meridian_gossip_packets_dropped_total{reason=\"bad_tag\"}",
            )
            .await
                >= 3.0
                && metric(
                    node1,
                    "meridian_gossip_packets_dropped_total{reason=\"wrong_cell\"}",
                )
                .await
                    >= 3.0
        },
    )
    .await;
    assert_eq!(state_seen(node1, "dev-4").await, before);
    work.edit(30, Duration::from_millis(2)).await;
    work.converge(Duration::from_secs(60)).await;

    for client in &work.clients {
        client.close().await;
    }
    if let Some(child) = restarted.0.as_mut() {
        signal(child.id(), "-TERM");
        let _ = child.wait();
    }
    if let Some(child) = dev.0.as_mut() {
        signal(child.id(), "-TERM");
        let status = child.wait().expect("wait dev");
        assert!(status.success(), "meridian dev exited with {status}");
    }
}
