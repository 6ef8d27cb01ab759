//! Crash safety against DynamoDB + S3 (moto_server from scripts/test): a relay process is
//! killed with SIGKILL at random points while clients write; after each restart every
//! change that was acknowledged Durable is in DynamoDB and is served to a fresh client.
//! Every other cycle the relay's data directory is deleted before the restart.
//!
//! Cycles: 20 by default; `MERIDIAN_CRASH_CYCLES=1000` for the soak (see README).

use std::collections::HashSet;
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use meridian_client::{Client, ClientConfig};
use meridian_protocol::token::{self, Capability, DocScope, Rights, TenantSigningKey};
use meridian_protocol::{ChangeHash, DocId, TenantId, UserId};
use meridian_relay::engine::DocKey;
use meridian_relay::store::{AwsConfig, AwsStore, DurableStore};

const DOCS: usize = 3;

struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto() -> String {
    std::env::var("MERIDIAN_MOTO_ENDPOINT")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "this test needs a DynamoDB/S3 API: run scripts/test, or \
             `source scripts/moto && moto_install && moto_start MERIDIAN_MOTO_ENDPOINT`"
            )
        })
}

/// A free UDP port below the kernel's ephemeral range. The relay keeps its port across
/// its lives, and while it is down each of the test's connect attempts binds an ephemeral
/// port: one of them could otherwise take the relay's, which would then fail to start.
fn free_udp_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let start = 10_000 + (std::process::id() % 10_000) as u16;
    (start..low)
        .chain(10_000..start.min(low))
        .find(|&port| UdpSocket::bind(("127.0.0.1", port)).is_ok())
        .unwrap_or_else(|| {
            UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
}

/// A small deterministic generator (the seed is printed so a failure can be replayed).
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// Starts the relay, its output going to `log`.
fn start_relay(config: &Path, log: &Path) -> Relay {
    let out = std::fs::File::create(log).expect("relay log");
    let err = out.try_clone().expect("relay log");
    let child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["relay", "--config"])
        .arg(config)
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn relay");
    Relay(child)
}

async fn connect(config: &ClientConfig, relay: &mut Relay, log: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(config.clone()).await {
            Ok(client) => return client,
            Err(error) => {
                if Instant::now() >= deadline {
                    let exited = relay.0.try_wait();
                    let log = std::fs::read_to_string(log).unwrap_or_default();
                    let from = (log.len().saturating_sub(4000)..log.len())
                        .find(|&i| log.is_char_boundary(i))
                        .unwrap_or(log.len());
                    let tail = &log[from..];
                    panic!(
                        "relay did not come up: {error}; exited: {exited:?}; its log ends:\n{tail}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_nothing_acknowledged_durable() {
    meridian_relay::tls::install_crypto_provider();
    let cycles: usize = std::env::var("MERIDIAN_CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("MERIDIAN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
                | 1
        });
    eprintln!("crash test: {cycles} cycles, seed {seed} (replay with MERIDIAN_CRASH_SEED={seed})");
    let mut rng = Rng(seed);

    let dir = tempfile::tempdir().unwrap();
    let pki = meridian_relay::tls::dev_pki(&dir.path().join("tls")).unwrap();
    let key = TenantSigningKey::from_seed([5; 32]).unwrap();
    let tag = format!("{}-{}", std::process::id(), seed % 100_000);
    let mut aws = AwsConfig::new("eu", "us-east-1");
    aws.table = format!("crash-changes-{tag}");
    aws.bucket = format!("crash-snapshots-{tag}");
    aws.endpoint = Some(moto());
    let store = AwsStore::connect(aws.clone()).await;
    store.ensure_resources().await.unwrap();

    let port = free_udp_port();
    let data_dir = dir.path().join("node");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"n1\"\ncell = \"eu-a\"\njurisdiction = \"eu\"\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\
             [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
             [durable]\nkind = \"dynamodb\"\nregion = \"us-east-1\"\ntable = \"{}\"\nbucket = \"{}\"\nendpoint = \"{}\"\n\
             [limits]\nsnapshot_every_changes = 40\n\
             [[tenants]]\nid = \"acme\"\npublic_keys = [\"{}\"]\n",
            data_dir.display(),
            pki.node_cert.display(),
            pki.node_key.display(),
            aws.table,
            aws.bucket,
            moto(),
            key.public_key().unwrap().to_paserk().unwrap(),
        ),
    )
    .unwrap();
    let capability = Capability {
        tenant: TenantId::new("acme").unwrap(),
        user: UserId::new("writer").unwrap(),
        docs: DocScope::Prefix(String::new()),
        rights: Rights::ALL,
        id: "crash-writer".into(),
        issued_at: (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64),
        expires_at: (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64)
            + 12 * 3600,
        audience: "eu".into(),
    };
    let mut client_config = ClientConfig::new(
        format!("127.0.0.1:{port}"),
        std::fs::read(&pki.ca_cert).unwrap(),
        token::mint(&capability, &key).unwrap(),
    );
    client_config.reconnect_initial = Duration::from_millis(20);
    client_config.connect_timeout = Duration::from_secs(2);

    let mut acknowledged: Vec<HashSet<ChangeHash>> = vec![HashSet::new(); DOCS];
    for cycle in 0..cycles {
        let log = dir.path().join(format!("relay-{cycle}.log"));
        let mut relay = start_relay(&config, &log);
        let client = connect(&client_config, &mut relay, &log).await;
        let mut handles = Vec::new();
        for d in 0..DOCS {
            handles.push(client.open(&format!("doc-{d}")).await.unwrap());
        }
        for handle in &handles {
            tokio::time::timeout(Duration::from_secs(30), handle.wait_synced())
                .await
                .expect("synced")
                .unwrap();
        }
        // Everything acknowledged so far is served after the restart.
        for (d, handle) in handles.iter().enumerate() {
            for hash in &acknowledged[d] {
                assert!(
                    handle.contains(hash),
                    "cycle {cycle} (seed {seed}): durable change {hash} of doc-{d} not served after restart"
                );
            }
        }
        // Write until a random moment, then SIGKILL the relay.
        let kill_at = Instant::now() + Duration::from_millis(50 + rng.next(600));
        let mut written: Vec<Vec<ChangeHash>> = vec![Vec::new(); DOCS];
        let mut i = 0u64;
        while Instant::now() < kill_at {
            let d = (i as usize) % DOCS;
            handles[d]
                .change(|doc| {
                    doc.put(
                        automerge::ROOT,
                        format!("k{}", i % 7),
                        format!("c{cycle}-{i}"),
                    )
                    .unwrap()
                })
                .unwrap();
            written[d].push(handles[d].heads()[0]);
            i += 1;
            if i.is_multiple_of(5) {
                for (d, handle) in handles.iter().enumerate() {
                    if tokio::time::timeout(Duration::from_millis(5), handle.wait_durable())
                        .await
                        .is_ok_and(|r| r.is_ok())
                    {
                        acknowledged[d].extend(written[d].drain(..));
                    }
                }
            } else {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let mut relay = relay;
        relay.0.kill().unwrap();
        relay.0.wait().unwrap();
        drop(relay);
        client.close().await;
        if cycle % 2 == 1 {
            std::fs::remove_dir_all(&data_dir).unwrap();
        }
        // Every acknowledged change is in DynamoDB (or inside a snapshot in S3).
        for (d, acked) in acknowledged.iter().enumerate() {
            let key = DocKey {
                tenant: TenantId::new("acme").unwrap(),
                doc: DocId::new(format!("doc-{d}")).unwrap(),
            };
            let stored = store.load(&key).await.unwrap();
            let mut present: HashSet<ChangeHash> = stored.changes.iter().map(|c| c.hash).collect();
            if let Some(snapshot) = stored.snapshot {
                let mut doc = automerge::AutoCommit::load(&snapshot.bytes).unwrap();
                present.extend(doc.get_changes(&[]).iter().map(|c| ChangeHash(c.hash().0)));
            }
            let lost: Vec<_> = acked.difference(&present).collect();
            assert!(
                lost.is_empty(),
                "cycle {cycle} (seed {seed}): {} durable changes of doc-{d} not in the durable tier",
                lost.len()
            );
        }
    }
    let total: usize = acknowledged.iter().map(HashSet::len).sum();
    eprintln!("crash test: {cycles} cycles, {total} durable-acknowledged changes, none lost");
    assert!(
        total > 0,
        "the test acknowledged nothing: it tested nothing"
    );
}
