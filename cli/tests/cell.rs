//! A cell of real relay processes on 127.0.0.1 (`meridian dev --nodes 4`), clients
//! editing many documents: `kill -9` of a node, its restart under the same identity, a
//! graceful leave, and forged gossip packets.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use meridian_client::{ChangeHash, Client, ClientConfig, DocEvent, DocHandle};

const NODES: usize = 4;
const CLIENTS: usize = 3;
const DOCS: usize = 16;

/// Kills the child if a test fails before stopping it.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn meridian() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
}

fn start_dev(dir: &Path, nodes: usize) -> Guard {
    let mut child = meridian()
        .args(["dev", "--nodes", &nodes.to_string(), "--data-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn meridian dev");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines.next().expect("dev printed its banner").expect("line");
        if line.contains("is running") {
            break;
        }
    }
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("dev: {line}");
        }
    });
    Guard(Some(child))
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

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

/// `(status, body)` of a GET on a node's admin endpoint; `None` if it does not answer.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// `node`'s state as the node at `admin` sees it (the newest generation).
fn state_seen(admin: SocketAddr, node: &str) -> Option<String> {
    let (_, body) = http_get(admin, "/cell")?;
    let view: serde_json::Value = serde_json::from_str(&body).ok()?;
    view["members"]
        .as_array()?
        .iter()
        .filter(|m| m["node"] == node)
        .max_by_key(|m| m["generation"].as_u64().unwrap_or(0))
        .and_then(|m| m["state"].as_str().map(str::to_owned))
}

/// The sum of a metric's samples whose line starts with `prefix` (name and labels).
fn metric(admin: SocketAddr, prefix: &str) -> f64 {
    let Some((_, body)) = http_get(admin, "/metrics") else {
        return 0.0;
    };
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// Clients editing documents, with every change they made and every error they saw.
struct Workload {
    clients: Vec<Client>,
    /// `handles[client][doc]`.
    handles: Vec<Vec<DocHandle>>,
    /// Every change made, per document.
    made: Vec<HashSet<ChangeHash>>,
    errors: Arc<Mutex<Vec<String>>>,
    counter: u64,
}

impl Workload {
    async fn start(dir: &Path) -> Workload {
        let mut clients = Vec::new();
        let mut handles = Vec::new();
        let errors = Arc::new(Mutex::new(Vec::new()));
        for c in 0..CLIENTS {
            let client = Client::connect(client_config(dir, c))
                .await
                .expect("connect");
            let mut docs = Vec::new();
            for d in 0..DOCS {
                let handle = client.open(&format!("doc-{d}")).await.expect("open");
                let mut events = handle.updates();
                let errors = errors.clone();
                tokio::spawn(async move {
                    while let Ok(event) = events.recv().await {
                        if let DocEvent::Error { code, message } = event {
                            errors
                                .lock()
                                .expect("errors")
                                .push(format!("client {c} doc {d}: {code} {message}"));
                        }
                    }
                });
                docs.push(handle);
            }
            clients.push(client);
            handles.push(docs);
        }
        Workload {
            clients,
            handles,
            made: vec![HashSet::new(); DOCS],
            errors,
            counter: 0,
        }
    }

    /// Makes `count` edits spread over clients and documents, `pause` apart.
    async fn edit(&mut self, count: usize, pause: Duration) {
        for _ in 0..count {
            self.counter += 1;
            let n = self.counter as usize;
            let (c, d) = (n % CLIENTS, (n * 7) % DOCS);
            let (_, hashes) = self.handles[c][d]
                .change_with_hashes(|doc| {
                    doc.put(automerge::ROOT, format!("client-{c}"), n as i64)
                        .expect("put");
                })
                .expect("change");
            self.made[d].extend(hashes);
            tokio::time::sleep(pause).await;
        }
    }

    /// Waits until every change is Durable and every client holds every change made,
    /// with identical heads per document.
    async fn converge(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for (c, docs) in self.handles.iter().enumerate() {
            for (d, handle) in docs.iter().enumerate() {
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::timeout(left, handle.wait_durable())
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "client {c} doc {d}: changes not durable in time ({:?})",
                            handle.status()
                        )
                    })
                    .expect("wait durable");
            }
        }
        loop {
            let converged = (0..DOCS).all(|d| {
                let heads: Vec<_> = self
                    .handles
                    .iter()
                    .map(|h| {
                        let mut heads = h[d].heads();
                        heads.sort();
                        heads
                    })
                    .collect();
                heads.windows(2).all(|w| w[0] == w[1])
                    && self
                        .handles
                        .iter()
                        .all(|h| self.made[d].iter().all(|x| h[d].contains(x)))
            });
            if converged {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "clients did not converge in time"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn take_errors(&self) -> Vec<String> {
        std::mem::take(&mut *self.errors.lock().expect("errors"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_survives_kill_9_restart_graceful_leave_and_forged_gossip() {
    meridian_relay::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut dev = start_dev(dir, NODES);
    let admins: Vec<SocketAddr> = (1..=NODES).map(|i| admin(dir, i)).collect();

    let mut work = Workload::start(dir).await;
    work.edit(120, Duration::from_millis(2)).await;
    work.converge(Duration::from_secs(60)).await;
    // Each document is loaded by its owner only, and the owners are spread over the
    // nodes: clients followed `moved` to reach them.
    let hot: Vec<f64> = admins
        .iter()
        .map(|a| metric(*a, "meridian_hot_documents"))
        .collect();
    assert_eq!(hot.iter().sum::<f64>() as usize, DOCS, "{hot:?}");
    assert!(hot.iter().all(|h| *h > 0.0), "{hot:?}");
    assert!(
        admins
            .iter()
            .map(|a| metric(*a, "meridian_moved_total"))
            .sum::<f64>()
            > 0.0
    );
    assert!(work.take_errors().is_empty());

    // kill -9 node 2 while clients keep writing.
    let killed = Instant::now();
    signal(pid(dir, 2), "-KILL");
    work.edit(120, Duration::from_millis(10)).await;
    for i in [1, 3, 4] {
        wait_for(
            &format!("node {i} to mark dev-2 down"),
            Duration::from_secs(30),
            || state_seen(admins[i - 1], "dev-2").as_deref() == Some("down"),
        )
        .await;
    }
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
    let moves_before: f64 = [1, 3, 4]
        .iter()
        .map(|i| metric(admins[i - 1], "meridian_ownership_moves_total"))
        .sum();
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
    for i in [1, 3, 4] {
        wait_for(
            &format!("node {i} to see dev-2 alive again"),
            Duration::from_secs(30),
            || state_seen(admins[i - 1], "dev-2").as_deref() == Some("alive"),
        )
        .await;
    }
    wait_for("dev-2 ready", Duration::from_secs(30), || {
        http_get(admins[1], "/readyz").is_some_and(|(s, _)| s == 200)
    })
    .await;
    work.edit(120, Duration::from_millis(5)).await;
    work.converge(Duration::from_secs(60)).await;
    let moves_after: f64 = [1, 3, 4]
        .iter()
        .map(|i| metric(admins[i - 1], "meridian_ownership_moves_total"))
        .sum();
    assert!(
        moves_after > moves_before,
        "documents moved back to the restarted node"
    );
    wait_for(
        "the restarted node to serve documents",
        Duration::from_secs(10),
        || metric(admins[1], "meridian_hot_documents") > 0.0,
    )
    .await;

    // A graceful leave of node 3: ownership moves with no client error besides `moved`.
    work.take_errors();
    signal(pid(dir, 3), "-TERM");
    work.edit(120, Duration::from_millis(10)).await;
    for i in [1, 2, 4] {
        wait_for(
            &format!("node {i} to see dev-3 leave"),
            Duration::from_secs(30),
            || state_seen(admins[i - 1], "dev-3").as_deref() == Some("down"),
        )
        .await;
    }
    work.converge(Duration::from_secs(60)).await;
    let errors = work.take_errors();
    assert!(
        errors.is_empty(),
        "client errors during a graceful leave: {errors:?}"
    );

    // Forged and wrong-cell gossip packets change nothing and are counted.
    let target = gossip(dir, 1);
    let before = state_seen(admins[0], "dev-4");
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
        || {
            metric(
                admins[0],
                "meridian_gossip_packets_dropped_total{reason=\"bad_tag\"}",
            ) >= 3.0
                && metric(
                    admins[0],
                    "meridian_gossip_packets_dropped_total{reason=\"wrong_cell\"}",
                ) >= 3.0
        },
    )
    .await;
    assert_eq!(state_seen(admins[0], "dev-4"), before);
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
