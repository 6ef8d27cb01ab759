//! Raw writers for the `large-doc` scenario: they send pre-built changes (the editing
//! trace's keystrokes) straight over each relay's wire protocol, without applying them
//! to a document of their own, so that the relay and not the generator sets the pace.
//! (A full client applies every keystroke to its materialized copy first: 16.8 ms per
//! keystroke on a 100k-change document, which is Automerge's cost, not the relay's.)
//!
//! Both writers keep at most `window` changes unacknowledged (ours: `applied`; the
//! naive relay: its heads in the sync message it answers with) and stop sending once
//! `budget` has passed; the run ends when everything sent is acknowledged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use automerge::sync::{self, BloomFilter, Have, MessageVersion};
use bytes::Bytes;
use meridian_protocol::{ChangeHash, ClientToRelay, DocId, FrameDecoder, RelayToClient};
use tokio::sync::watch;

use crate::naive::{NaiveError, encode_frame, read_frame, write_frame};

/// What a raw writer achieved.
#[derive(Debug, Clone, Copy)]
pub struct RawRun {
    /// Changes sent and acknowledged.
    pub changes: usize,
    /// From the first send to the last acknowledgement.
    pub elapsed: Duration,
}

/// What a raw writer sends.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    /// The document (it must already hold the history the changes build on).
    pub doc: &'a str,
    /// Encoded changes, in order.
    pub changes: &'a [Bytes],
    /// Changes per frame (ours) or per sync message (naive).
    pub batch: usize,
    /// Changes sent and not yet acknowledged, at most.
    pub window: usize,
    /// Stop sending after this long.
    pub budget: Duration,
}

/// How long to wait for an acknowledgement before giving up.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// Acknowledged changes so far, or why the reader stopped.
type Acks = watch::Receiver<(usize, Option<String>)>;

/// Sends `frames` (each with its change count) keeping at most `window` changes
/// unacknowledged, until `budget` has passed; then waits for every acknowledgement.
async fn pipeline(
    send: &mut quinn::SendStream,
    frames: Vec<(Bytes, usize)>,
    window: usize,
    budget: Duration,
    mut acks: Acks,
) -> Result<RawRun, String> {
    let started = Instant::now();
    let mut sent = 0usize;
    for (frame, count) in frames {
        if started.elapsed() >= budget {
            break;
        }
        wait_acks(&mut acks, |acked| {
            sent.saturating_sub(acked) + count <= window.max(count)
        })
        .await?;
        send.write_all(&frame).await.map_err(|e| e.to_string())?;
        sent += count;
    }
    wait_acks(&mut acks, |acked| acked >= sent).await?;
    Ok(RawRun {
        changes: sent,
        elapsed: started.elapsed(),
    })
}

/// Waits until `ready(acknowledged)` holds, failing if the reader stopped or no new
/// acknowledgement arrived for [`ACK_TIMEOUT`] (a slow relay that still makes progress
/// is waited for).
async fn wait_acks(acks: &mut Acks, ready: impl Fn(usize) -> bool) -> Result<(), String> {
    loop {
        let (acked, failed) = acks.borrow_and_update().clone();
        if let Some(reason) = failed {
            return Err(reason);
        }
        if ready(acked) {
            return Ok(());
        }
        tokio::time::timeout(ACK_TIMEOUT, acks.changed())
            .await
            .map_err(|_| "no acknowledgement for a minute".to_owned())?
            .map_err(|_| "the reader stopped".to_owned())?;
    }
}

/// Reads one relay message from a stream.
pub(crate) async fn next_message(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<RelayToClient>, String> {
    loop {
        if let Some(frame) = decoder.next_frame().map_err(|e| e.to_string())? {
            return RelayToClient::decode(&frame)
                .map(Some)
                .map_err(|e| e.to_string());
        }
        match recv.read_chunk(64 << 10, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) => return Ok(None),
            Err(error) => return Err(error.to_string()),
        }
    }
}

/// Meridian: `hello`, `subscribe` to `doc` with `heads` (the writer has the document up
/// to there), then `changes` frames of `batch` changes each.
pub async fn ours(
    endpoint: &quinn::Endpoint,
    config: &meridian_client::ClientConfig,
    heads: Vec<ChangeHash>,
    work: Workload<'_>,
) -> Result<RawRun, String> {
    let addr: SocketAddr = tokio::net::lookup_host(&config.endpoint)
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let connection = endpoint
        .connect(addr, &config.server_name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let result = async {
        let (mut control, mut control_recv) =
            connection.open_bi().await.map_err(|e| e.to_string())?;
        let hello = ClientToRelay::Hello {
            token: config.token.clone(),
            client: "loadgen-raw".into(),
        };
        control
            .write_all(&hello.to_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut control_decoder = FrameDecoder::new();
        match next_message(&mut control_recv, &mut control_decoder).await? {
            Some(RelayToClient::Welcome { .. }) => {}
            other => return Err(format!("expected welcome, got {other:?}")),
        }
        let doc = DocId::new(work.doc).map_err(|e| e.to_string())?;
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        let subscribe = ClientToRelay::Subscribe {
            doc: doc.clone(),
            heads,
            snapshot: true,
        };
        send.write_all(&subscribe.to_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut decoder = FrameDecoder::new();
        loop {
            match next_message(&mut recv, &mut decoder).await? {
                Some(RelayToClient::Synced { .. }) => break,
                Some(RelayToClient::Error { code, message, .. }) => {
                    return Err(format!("{code:?}: {message}"));
                }
                Some(_) => {}
                None => return Err("stream ended before synced".into()),
            }
        }
        let frames = work
            .changes
            .chunks(work.batch.max(1))
            .map(|chunk| {
                let frame = ClientToRelay::Changes {
                    doc: doc.clone(),
                    changes: chunk.to_vec(),
                };
                (frame.to_bytes(), chunk.len())
            })
            .collect();
        let (acked, acks) = watch::channel((0usize, None));
        let reader = tokio::spawn(async move {
            loop {
                match next_message(&mut recv, &mut decoder).await {
                    Ok(Some(RelayToClient::Applied { changes, .. })) => {
                        acked.send_modify(|a| a.0 += changes.len());
                    }
                    Ok(Some(RelayToClient::Error { code, message, .. })) => {
                        acked.send_modify(|a| a.1 = Some(format!("{code:?}: {message}")));
                        return;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        acked.send_modify(|a| a.1 = Some("stream ended".into()));
                        return;
                    }
                    Err(error) => {
                        acked.send_modify(|a| a.1 = Some(error));
                        return;
                    }
                }
            }
        });
        let run = pipeline(&mut send, frames, work.window, work.budget, acks).await;
        reader.abort();
        let _ = control.finish();
        run
    }
    .await;
    connection.close(0u32.into(), b"done");
    result
}

/// The naive relay: sync messages that carry `batch` changes each, with the heads and
/// the `have` a syncing peer would send (last sync at the previous heads, a Bloom filter
/// of the new changes), so that the relay answers with its heads and nothing else.
pub async fn naive(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    heads: Vec<automerge::ChangeHash>,
    work: Workload<'_>,
) -> Result<RawRun, String> {
    let connection = endpoint
        .connect(addr, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let result = async {
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, work.doc.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        // Encode every message up front (the generator's work, not timed).
        let mut last_sync = heads;
        let mut frames = Vec::new();
        let mut done_at: HashMap<automerge::ChangeHash, usize> = HashMap::new();
        let mut total = 0;
        for chunk in work.changes.chunks(work.batch.max(1)) {
            let hashes = chunk
                .iter()
                .map(|bytes| {
                    automerge::Change::try_from(&bytes[..])
                        .map(|c| c.hash())
                        .map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<_>, _>>()?;
            let Some(&last) = hashes.last() else {
                continue;
            };
            let message = sync::Message {
                heads: vec![last],
                need: vec![],
                have: vec![Have {
                    last_sync: std::mem::replace(&mut last_sync, vec![last]),
                    bloom: BloomFilter::from_hashes(hashes.iter()),
                }],
                changes: chunk.iter().map(|c| c.to_vec()).collect::<Vec<_>>().into(),
                flags: None,
                version: MessageVersion::V1,
            };
            let frame = encode_frame(&message.encode()).map_err(|e| e.to_string())?;
            total += chunk.len();
            done_at.insert(last, total);
            frames.push((Bytes::from(frame), chunk.len()));
        }
        let (acked, acks) = watch::channel((0usize, None));
        let reader = tokio::spawn(async move {
            loop {
                let message = match read_frame(&mut recv).await {
                    Ok(Some(frame)) => sync::Message::decode(&frame)
                        .map_err(|e| NaiveError::Automerge(e.to_string())),
                    Ok(None) => Err(NaiveError::Automerge("stream ended".into())),
                    Err(error) => Err(error),
                };
                match message {
                    Ok(message) => {
                        if let Some(&count) = message.heads.first().and_then(|h| done_at.get(h)) {
                            acked.send_modify(|a| a.0 = a.0.max(count));
                        }
                    }
                    Err(error) => {
                        acked.send_modify(|a| a.1 = Some(error.to_string()));
                        return;
                    }
                }
            }
        });
        let run = pipeline(&mut send, frames, work.window, work.budget, acks).await;
        reader.abort();
        run
    }
    .await;
    connection.close(0u32.into(), b"done");
    result
}
