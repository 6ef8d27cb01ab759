//! `api-bench`: what the HTTP API's reads of a large document cost, from a relay node in
//! this process whose local durable store holds one document of `--changes` changes
//! (one text insert each, one author).
//!
//!   api-bench --changes 100000
//!
//! Times, in order: the first `GET /v1/docs/{id}/history` (the relay loads the document
//! cold), the same again (the relay holds it), and `GET /v1/docs/{id}` (materialized).
//! Prints one JSON line with each in milliseconds and the answers' sizes.
//!
//!   api-bench --changes 100000 --moto http://127.0.0.1:PORT
//!
//! puts the document in DynamoDB + S3 (a moto_server, fresh table and bucket) instead,
//! so that the cold row is the relay's load from that durable tier.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use clap::Parser;
use meridian_protocol::{ChangeHash, DocId, TenantId, UserId};
use meridian_relay::engine::{DocKey, StoredChange};
use meridian_relay::store::{DurableStore, LocalDirStore};
use meridian_testkit::{Dev, TENANT, http};

#[derive(Parser)]
struct Args {
    /// Changes in the document.
    #[arg(long, default_value_t = 100_000)]
    changes: usize,
    /// A moto_server's URL: the durable tier is DynamoDB + S3 there.
    #[arg(long)]
    moto: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dev = Dev::new();
    let (store, aws): (Box<dyn DurableStore>, _) = match &args.moto {
        Some(endpoint) => {
            let mut config =
                meridian_testkit::moto::unique_config(endpoint, meridian_testkit::JURISDICTION);
            // moto answers a query by scanning the whole table in Python: seconds, not
            // milliseconds, over a 100k-item table.
            config.attempt_timeout = std::time::Duration::from_secs(300);
            let store = meridian_relay::store::AwsStore::connect(config.clone()).await;
            store.ensure_resources().await?;
            (Box::new(store), Some(config))
        }
        None => (
            Box::new(LocalDirStore::open(dev.dir.path().join("durable"))?),
            None,
        ),
    };
    let key = DocKey {
        tenant: TenantId::new(TENANT)?,
        doc: DocId::new("big")?,
    };
    let mut doc = automerge::AutoCommit::new();
    let text = automerge::transaction::Transactable::put_object(
        &mut doc,
        automerge::ROOT,
        "text",
        automerge::ObjType::Text,
    )?;
    doc.commit();
    let user = UserId::new("writer")?;
    let mut batch = Vec::new();
    let mut written = 0;
    for i in 0..args.changes {
        if i > 0 {
            automerge::transaction::Transactable::splice_text(&mut doc, &text, i - 1, 0, "x")?;
            doc.commit();
        }
        let change = doc.get_last_local_change().context("a change")?.clone();
        batch.push((
            key.clone(),
            StoredChange {
                hash: ChangeHash(change.hash().0),
                bytes: Bytes::copy_from_slice(change.raw_bytes()),
                user: user.clone(),
            },
        ));
        if batch.len() == 5000 || i + 1 == args.changes {
            store.write_changes(&batch).await?;
            written += batch.len();
            batch.clear();
        }
    }
    let relay = match aws {
        Some(aws) => {
            let mut config = dev.config("127.0.0.1:0".parse()?);
            config.durable = meridian_relay::DurableConfig::Aws(aws);
            meridian_relay::start(config).await?
        }
        None => dev.start().await,
    };
    let mut api_config = meridian_api::ApiConfig::default();
    if args.moto.is_some() {
        // The cold load from moto takes far longer than the default wait for the relay.
        api_config.relay_timeout = std::time::Duration::from_secs(600);
        api_config.web.request_timeout = std::time::Duration::from_secs(600);
    }
    let api = meridian_api::start(api_config, relay.session_port()).await?;
    let token = dev.token("bench");
    let addr = api.local_addr();

    // moto's cold load takes minutes over 100k items (see `--moto`).
    let wait = std::time::Duration::from_secs(if args.moto.is_some() { 900 } else { 60 });
    let timed = |path: &'static str| {
        let token = token.clone();
        async move {
            let started = Instant::now();
            let answer = http::get_within(addr, path, &token, wait).await;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            ensure!(answer.status == 200, "{path}: {}", answer.status);
            Ok::<_, anyhow::Error>((ms, answer))
        }
    };
    let (cold_ms, history) = timed("/v1/docs/big/history").await?;
    let entries = history.json()["changes"].as_array().map_or(0, Vec::len);
    ensure!(
        entries == written,
        "history lists {entries} of {written} changes"
    );
    let (warm_ms, _) = timed("/v1/docs/big/history").await?;
    let (doc_ms, document) = timed("/v1/docs/big").await?;
    let text_len = document.json()["content"]["text"]
        .as_str()
        .map_or(0, str::len);
    ensure!(
        text_len + 1 == written,
        "the text has {text_len} characters"
    );
    println!(
        "{}",
        serde_json::json!({
            "changes": written,
            "history_cold_ms": cold_ms.round(),
            "history_warm_ms": warm_ms.round(),
            "history_bytes": history.body.len(),
            "doc_ms": doc_ms.round(),
            "durable": if args.moto.is_some() { "moto" } else { "local" },
        })
    );
    Ok(())
}
