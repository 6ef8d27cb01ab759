//! What the feed's tests share: webhook receivers on 127.0.0.1 that fail, time out and
//! answer 500 on purpose, the webhook a test configures, the causal-order check, and a
//! stored change made from an Automerge document.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use meridian_feed::Webhook;
use meridian_feed::target::Reach;
use meridian_protocol::{ChangeHash, TenantId, UserId};
use meridian_relay::engine::StoredChange;

/// What a receiver does with each request, in order; after the script, `then`.
#[derive(Clone, Copy, Debug)]
pub enum Act {
    Ok,
    Fail,
    Hang,
}

/// A receiver's state: what it saw, its script, what it does after the script.
type ReceiverState = (Arc<Mutex<Seen>>, Arc<Vec<Act>>, Act);

#[derive(Default)]
pub struct Seen {
    pub bodies: Vec<(HeaderMap, Bytes)>,
    pub requests: usize,
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    _task: tokio::task::JoinHandle<()>,
}

pub async fn receiver(script: Vec<Act>, then: Act) -> Receiver {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let state = (seen.clone(), Arc::new(script), then);
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State((seen, script, then)): axum::extract::State<
                    ReceiverState,
                >,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    let act = {
                        let mut seen = seen.lock().unwrap();
                        let act = script.get(seen.requests).copied().unwrap_or(then);
                        seen.requests += 1;
                        if matches!(act, Act::Ok) {
                            seen.bodies.push((headers, body));
                        }
                        act
                    };
                    match act {
                        Act::Ok => StatusCode::NO_CONTENT,
                        Act::Fail => StatusCode::INTERNAL_SERVER_ERROR,
                        Act::Hang => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            StatusCode::OK
                        }
                    }
                },
            ),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Receiver {
        addr,
        seen,
        _task: task,
    }
}

impl Receiver {
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Every change delivered so far, as `(doc, change JSON)`, in arrival order.
    pub fn changes(&self) -> Vec<(String, serde_json::Value)> {
        let seen = self.seen.lock().unwrap();
        seen.bodies
            .iter()
            .flat_map(|(_, body)| {
                let body: serde_json::Value = serde_json::from_slice(body).unwrap();
                let doc = body["doc"].as_str().unwrap().to_string();
                body["changes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| (doc.clone(), c.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub async fn wait_for(&self, count: usize) {
        tokio::time::timeout(Duration::from_secs(60), async {
            while self.changes().len() < count {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{count} changes delivered; got {}", self.changes().len()));
    }
}

pub fn webhook(tenant: &str, url: String) -> Webhook {
    Webhook {
        tenant: TenantId::new(tenant).unwrap(),
        url,
        secrets: vec![b"new-secret".to_vec(), b"old-secret".to_vec()],
        allowed_hosts: Vec::new(),
        reach: Reach {
            loopback: true,
            private: false,
        },
    }
}

/// Each document's delivered changes come after their dependencies.
pub fn assert_causal(changes: &[(String, serde_json::Value)]) {
    let mut seen: HashMap<&str, HashSet<&str>> = HashMap::new();
    let all: HashSet<&str> = changes
        .iter()
        .map(|(_, c)| c["hash"].as_str().unwrap())
        .collect();
    for (doc, change) in changes {
        let done = seen.entry(doc.as_str()).or_default();
        for dep in change["deps"].as_array().unwrap() {
            let dep = dep.as_str().unwrap();
            assert!(
                done.contains(dep) || !all.contains(dep),
                "{doc}: {} came before its dependency {dep}",
                change["hash"]
            );
        }
        done.insert(change["hash"].as_str().unwrap());
    }
}
pub fn stored(doc: &mut automerge::AutoCommit) -> StoredChange {
    let change = doc.get_last_local_change().unwrap().clone();
    StoredChange {
        hash: ChangeHash(change.hash().0),
        bytes: Bytes::copy_from_slice(change.raw_bytes()),
        user: UserId::new("writer").unwrap(),
    }
}
