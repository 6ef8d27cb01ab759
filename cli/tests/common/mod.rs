//! Helpers shared by the binary's end-to-end tests.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use meridian_client::{ChangeHash, Client, ClientConfig, DocEvent, DocHandle};

/// The `meridian` binary under test.
pub fn meridian() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
}

/// The `listen` address of a `meridian dev` node's `section` (`api`, `gateway`,
/// `metrics`), read from its config in `dir` (one cell, or `--cells`).
pub fn node_listen(dir: &Path, node: usize, section: &str) -> std::net::SocketAddr {
    let text = std::fs::read_to_string(dir.join(format!("cell/node-{node}.toml")))
        .or_else(|_| std::fs::read_to_string(dir.join(format!("node-{node}.toml"))))
        .expect("node config");
    let file: toml::Value = toml::from_str(&text).expect("node toml");
    file[section]["listen"]
        .as_str()
        .unwrap_or_else(|| panic!("dev nodes have a [{section}] section"))
        .parse()
        .expect("address")
}

/// The token in `meridian dev`'s `client.toml` in `dir`.
pub fn dev_token(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("client.toml")).expect("client.toml");
    let file: toml::Value = toml::from_str(&text).expect("client toml");
    file["token"].as_str().expect("token").to_string()
}

/// Kills the child if a test fails before stopping it.
pub struct Guard(pub Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `meridian dev --nodes N` on `dir` and waits for its "is running" line; its
/// later output goes to the test's stderr, prefixed `dev:`.
pub fn start_dev(dir: &Path, nodes: usize) -> Guard {
    start_dev_with(dir, &["--nodes", &nodes.to_string()])
}

/// Starts `meridian dev` with extra arguments (see [`start_dev`]).
pub fn start_dev_with(dir: &Path, args: &[&str]) -> Guard {
    let mut child = meridian()
        .arg("dev")
        .args(args)
        .arg("--data-dir")
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
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("dev: {line}");
        }
    });
    Guard(Some(child))
}

/// Sends `signal` (`-KILL`, `-TERM`) to a process this test started.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// Polls `check` every 100 ms until it holds.
pub async fn wait_for<F: std::future::Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clients editing documents, with every change they made and every error they saw.
pub struct Workload {
    pub clients: Vec<Client>,
    /// `handles[client][doc]`.
    pub handles: Vec<Vec<DocHandle>>,
    /// Every change made, per document.
    pub made: Vec<HashSet<ChangeHash>>,
    errors: Arc<Mutex<Vec<String>>>,
    counter: u64,
    docs: usize,
}

impl Workload {
    /// Connects one client per config and opens `docs` documents in each.
    pub async fn start(configs: Vec<ClientConfig>, docs: usize) -> Workload {
        let doc_count = docs;
        let mut clients = Vec::new();
        let mut handles = Vec::new();
        let errors = Arc::new(Mutex::new(Vec::new()));
        for (c, config) in configs.into_iter().enumerate() {
            let client = Client::connect(config).await.expect("connect");
            let mut docs = Vec::new();
            for d in 0..doc_count {
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
            made: vec![HashSet::new(); doc_count],
            errors,
            counter: 0,
            docs: doc_count,
        }
    }

    /// Makes `count` edits spread over clients and documents, `pause` apart.
    pub async fn edit(&mut self, count: usize, pause: Duration) {
        for _ in 0..count {
            self.counter += 1;
            let n = self.counter as usize;
            let (c, d) = (n % self.clients.len(), (n * 7) % self.docs);
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
    pub async fn converge(&self, timeout: Duration) {
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
            let converged = (0..self.docs).all(|d| {
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

    pub fn take_errors(&self) -> Vec<String> {
        std::mem::take(&mut *self.errors.lock().expect("errors"))
    }
}
