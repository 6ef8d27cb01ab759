//! The work behind the API's requests, with no IO: a posted body split into its changes
//! and grouped into frames, what reading a document would cost, the document as JSON
//! (now or at given heads), and its history.
//!
//! Every function here is bounded by its inputs and the limits passed in: the server
//! checks a read's [`ReadCost`] against its budgets before it calls [`materialize`] or
//! [`history`].

use std::collections::HashMap;
use std::io::Write as _;

use automerge::{AutoCommit, ReadDoc};
use bytes::Bytes;
use meridian_protocol::{
    ActorId, MAX_CHANGE_LEN, MAX_CHANGES_PER_FRAME, MAX_FRAME_INFLATED, MAX_FRAME_LEN,
    MAX_FRAME_OPS, UserId,
};
use meridian_relay::engine::change::{ChangeCost, ChangeError, measure};

/// The magic bytes that open every Automerge chunk.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// Why a posted body or a read was refused before any of it reached the relay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// The body is not a sequence of Automerge change chunks.
    #[error("the body is not a sequence of Automerge changes: {0}")]
    NotChanges(String),
    /// The body holds no change.
    #[error("the body holds no change")]
    Empty,
    /// The body holds more changes than a request may.
    #[error("the body holds more than {0} changes")]
    TooManyChanges(usize),
    /// One change is refused on its own (too large, inflating too far, not a change).
    #[error("change {index} of the body: {error}")]
    Change {
        /// Its position in the body, from 0.
        index: usize,
        /// Why.
        error: ChangeError,
    },
    /// The body's changes together inflate, or carry operations, past the request's
    /// budget.
    #[error("the body's changes inflate to more than {0} bytes or carry too many operations")]
    Budget(usize),
    /// A head is not 64 hex digits.
    #[error("{0:?} is not a change hash (64 hex digits)")]
    Head(String),
    /// A head is not in the document.
    #[error("head {0} is not in this document")]
    UnknownHead(String),
    /// The document is over what one read may materialize.
    #[error(
        "the document is over what one read may materialize ({0}); read it with a client instead"
    )]
    TooLarge(String),
    /// Automerge refused the stored changes (never expected: the relay checked each).
    #[error("the document does not load: {0}")]
    Load(String),
}

/// Splits a body made of Automerge change chunks laid end to end (what `save` of single
/// changes concatenated gives) into its chunks, reading only each chunk's header. At most
/// `count_max` chunks; the chunks are checked one by one later ([`measure_all`]).
pub fn split_changes(body: &Bytes, count_max: usize) -> Result<Vec<Bytes>, ViewError> {
    let mut chunks = Vec::new();
    let mut at = 0usize;
    while at < body.len() {
        if chunks.len() == count_max {
            return Err(ViewError::TooManyChanges(count_max));
        }
        let rest = &body[at..];
        if rest.len() < 9 || rest[..4] != MAGIC {
            return Err(ViewError::NotChanges(format!(
                "no chunk header at byte {at}"
            )));
        }
        // Checksum (4 bytes) and type (1 byte), then the body's length as a ULEB128.
        let (len, len_bytes) = uleb(&rest[9..])
            .ok_or_else(|| ViewError::NotChanges(format!("bad chunk length at byte {at}")))?;
        let header = 9 + len_bytes;
        let total = usize::try_from(len)
            .ok()
            .and_then(|len| len.checked_add(header))
            .filter(|total| *total <= rest.len())
            .ok_or_else(|| {
                ViewError::NotChanges(format!("the chunk at byte {at} runs past the body"))
            })?;
        chunks.push(body.slice(at..at + total));
        at += total;
    }
    if chunks.is_empty() {
        return Err(ViewError::Empty);
    }
    Ok(chunks)
}

/// An unsigned LEB128 of at most 10 bytes: the value and how many bytes it took.
fn uleb(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f).checked_shl(7 * i as u32)?;
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Measures every change of a body (inflating each within the per-change limit) and
/// refuses the body when one is refused on its own or when they inflate to more than
/// `inflated_max` bytes together; returns each change's cost.
pub fn measure_all(changes: &[Bytes], inflated_max: usize) -> Result<Vec<ChangeCost>, ViewError> {
    let mut total = 0usize;
    let mut costs = Vec::with_capacity(changes.len());
    for (index, change) in changes.iter().enumerate() {
        if change.len() > MAX_CHANGE_LEN {
            return Err(ViewError::Change {
                index,
                error: ChangeError::TooLarge(change.len()),
            });
        }
        let cost = measure(change).map_err(|error| ViewError::Change { index, error })?;
        total = total.saturating_add(cost.inflated);
        if total > inflated_max {
            return Err(ViewError::Budget(inflated_max));
        }
        costs.push(cost);
    }
    Ok(costs)
}

/// Groups changes, in order, into what one `changes` frame may carry: its length, its
/// change count, and its budget of inflated bytes and operations. Returns the end index
/// of each group.
pub fn frames(changes: &[Bytes], costs: &[ChangeCost]) -> Vec<usize> {
    let mut ends = Vec::new();
    let (mut bytes, mut inflated, mut ops, mut count) = (0usize, 0usize, 0u64, 0usize);
    for (i, (change, cost)) in changes.iter().zip(costs).enumerate() {
        let work = cost.ops.max(cost.preds);
        // Room for the frame's other fields (type, document id, counts, lengths).
        let len = change.len() + 4;
        let full = count == MAX_CHANGES_PER_FRAME
            || bytes + len > MAX_FRAME_LEN - 1024
            || inflated + cost.inflated > MAX_FRAME_INFLATED
            || ops + work > MAX_FRAME_OPS;
        if count > 0 && full {
            ends.push(i);
            (bytes, inflated, ops, count) = (0, 0, 0, 0);
        }
        bytes += len;
        inflated += cost.inflated;
        ops += work;
        count += 1;
    }
    if count > 0 {
        ends.push(changes.len());
    }
    ends
}

/// What reading a document would cost: its stored bytes, and once measured, what they
/// inflate to and the operations they carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadCost {
    /// Changes.
    pub changes: usize,
    /// Bytes as stored.
    pub bytes: usize,
    /// Bytes once inflated.
    pub inflated: usize,
    /// Operations.
    pub ops: u64,
}

/// Bounds on what one read may materialize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Bytes as stored.
    pub bytes_max: usize,
    /// Bytes once inflated.
    pub inflated_max: usize,
    /// Operations.
    pub ops_max: u64,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            bytes_max: 64 << 20,
            inflated_max: 256 << 20,
            ops_max: 8_000_000,
        }
    }
}

/// Checks a document's stored changes against `limits`: first their stored size (free),
/// then, change by change, what they inflate to and the operations they carry, stopping
/// at the first bound passed.
pub fn check_read(changes: &[Bytes], limits: &ReadLimits) -> Result<ReadCost, ViewError> {
    let mut cost = ReadCost {
        changes: changes.len(),
        bytes: changes.iter().map(Bytes::len).sum(),
        ..ReadCost::default()
    };
    if cost.bytes > limits.bytes_max {
        return Err(ViewError::TooLarge(format!(
            "{} bytes stored, over {}",
            cost.bytes, limits.bytes_max
        )));
    }
    for change in changes {
        let one = measure(change).map_err(|error| ViewError::Load(error.to_string()))?;
        cost.inflated += one.inflated;
        cost.ops += one.ops;
        if cost.inflated > limits.inflated_max {
            return Err(ViewError::TooLarge(format!(
                "over {} bytes inflated",
                limits.inflated_max
            )));
        }
        if cost.ops > limits.ops_max {
            return Err(ViewError::TooLarge(format!(
                "over {} operations",
                limits.ops_max
            )));
        }
    }
    Ok(cost)
}

/// Heads written as hex, parsed.
pub fn parse_heads(list: &str) -> Result<Vec<automerge::ChangeHash>, ViewError> {
    list.split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| h.parse().map_err(|_| ViewError::Head(h.to_string())))
        .collect()
}

/// The document made of `changes` (in causal order) as JSON, now or at `at`: maps as
/// objects, lists as arrays, texts as strings, counters as numbers.
pub fn materialize(
    changes: &[Bytes],
    at: Option<&[automerge::ChangeHash]>,
) -> Result<serde_json::Value, ViewError> {
    let mut all = Vec::with_capacity(changes.iter().map(Bytes::len).sum());
    for change in changes {
        all.extend_from_slice(change);
    }
    let mut doc = AutoCommit::new();
    doc.load_incremental(&all)
        .map_err(|error| ViewError::Load(error.to_string()))?;
    let json = |doc: &AutoCommit| {
        serde_json::to_value(automerge::AutoSerde::from(doc))
            .map_err(|error| ViewError::Load(error.to_string()))
    };
    match at {
        None => json(&doc),
        Some(heads) => {
            if let Some(unknown) = heads.iter().find(|h| doc.get_change_by_hash(h).is_none()) {
                return Err(ViewError::UnknownHead(unknown.to_string()));
            }
            let past = doc
                .fork_at(heads)
                .map_err(|error| ViewError::Load(error.to_string()))?;
            json(&past)
        }
    }
}

/// One change of a document's history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HistoryEntry {
    /// The change's hash (hex).
    pub hash: String,
    /// Its actor (hex).
    pub actor: String,
    /// The user the relay bound that actor to (absent when the relay holds no binding,
    /// as for changes written before bindings were kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Its sequence number under that actor, from 1.
    pub seq: u64,
    /// Its own timestamp, seconds since the Unix epoch, from its author's clock (0 when
    /// the author set none).
    pub time: i64,
    /// Its commit message, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The changes it depends on (hex).
    pub deps: Vec<String>,
    /// The document's heads just after this change in this order: what `?at=` takes to
    /// read the document as it was then.
    pub heads: Vec<String>,
}

/// One change of a history as [`each_history_entry`] hands it out, borrowing what the
/// entries share.
pub struct EntryRef<'a> {
    /// The change's header.
    pub header: &'a meridian_relay::engine::change::ChangeHeader,
    /// Its actor, hex.
    pub actor: &'a str,
    /// The user the relay bound that actor to.
    pub user: Option<&'a str>,
    /// The document's heads just after it, sorted.
    pub heads: &'a [meridian_protocol::ChangeHash],
}

/// Hands every change in `changes` (causal order, as the relay keeps them) with its
/// author and the heads after it to `each`, from each change's header alone (no
/// operation is decoded, no document built).
pub fn each_history_entry(
    changes: &[Bytes],
    authors: &[(ActorId, UserId)],
    mut each: impl FnMut(EntryRef<'_>) -> Result<(), ViewError>,
) -> Result<(), ViewError> {
    let users: HashMap<&[u8], &UserId> = authors
        .iter()
        .map(|(actor, user)| (actor.as_bytes(), user))
        .collect();
    // Each actor's hex and user, made once.
    let mut actors: HashMap<Vec<u8>, (String, Option<String>)> = HashMap::new();
    let mut heads: Vec<meridian_protocol::ChangeHash> = Vec::new();
    for bytes in changes {
        let header = meridian_relay::engine::change::header(bytes)
            .map_err(|error| ViewError::Load(error.to_string()))?;
        heads.retain(|h| !header.deps.contains(h));
        let at = heads.binary_search(&header.hash).unwrap_or_else(|at| at);
        heads.insert(at, header.hash);
        let (actor, user) = actors.entry(header.actor.clone()).or_insert_with(|| {
            let user = users.get(header.actor.as_slice()).map(|u| u.to_string());
            (hex::encode(&header.actor), user)
        });
        each(EntryRef {
            header: &header,
            actor,
            user: user.as_deref(),
            heads: &heads,
        })?;
    }
    Ok(())
}

/// Every change in `changes` with its author and the heads after it, as entries.
pub fn history(
    changes: &[Bytes],
    authors: &[(ActorId, UserId)],
) -> Result<Vec<HistoryEntry>, ViewError> {
    let mut out = Vec::with_capacity(changes.len());
    each_history_entry(changes, authors, |entry| {
        out.push(HistoryEntry {
            hash: entry.header.hash.to_string(),
            actor: entry.actor.to_owned(),
            user: entry.user.map(str::to_owned),
            seq: entry.header.seq,
            time: entry.header.time,
            message: entry.header.message.clone(),
            deps: entry.header.deps.iter().map(ToString::to_string).collect(),
            heads: entry.heads.iter().map(ToString::to_string).collect(),
        });
        Ok(())
    })?;
    Ok(out)
}

/// The history answer's JSON (`doc`, `heads`, `durable_heads`, `changes` as
/// [`HistoryEntry`] serializes them), written straight from the change headers into one
/// buffer: no entry, hex string or JSON value is built on the way, which on a 100k-change
/// document is most of the answer's cost. An answer past `max_bytes` is refused
/// (`TooLarge`) as soon as it gets there: each entry lists the heads after it, so a
/// document of many concurrent changes (many heads) would otherwise answer with about
/// the square of its size.
pub fn history_json(
    doc: &str,
    heads: &[meridian_protocol::ChangeHash],
    durable_heads: &[meridian_protocol::ChangeHash],
    changes: &[Bytes],
    authors: &[(ActorId, UserId)],
    max_bytes: usize,
) -> Result<Vec<u8>, ViewError> {
    /// About what one entry takes, to size the buffer once.
    const ENTRY_BYTES: usize = 360;
    let sized = 256 + changes.len().saturating_mul(ENTRY_BYTES);
    let mut out = Vec::with_capacity(sized.min(max_bytes));
    out.extend_from_slice(b"{\"doc\":");
    json_string(&mut out, doc);
    out.extend_from_slice(b",\"heads\":");
    json_hashes(&mut out, heads);
    out.extend_from_slice(b",\"durable_heads\":");
    json_hashes(&mut out, durable_heads);
    out.extend_from_slice(b",\"changes\":[");
    let mut first = true;
    each_history_entry(changes, authors, |entry| {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"hash\":\"");
        json_hex(&mut out, &entry.header.hash.0);
        out.extend_from_slice(b"\",\"actor\":\"");
        out.extend_from_slice(entry.actor.as_bytes());
        out.push(b'"');
        if let Some(user) = entry.user {
            out.extend_from_slice(b",\"user\":");
            json_string(&mut out, user);
        }
        // Writing to a Vec cannot fail.
        let _ = write!(
            out,
            ",\"seq\":{},\"time\":{}",
            entry.header.seq, entry.header.time
        );
        if let Some(message) = &entry.header.message {
            out.extend_from_slice(b",\"message\":");
            json_string(&mut out, message);
        }
        out.extend_from_slice(b",\"deps\":");
        json_hashes(&mut out, &entry.header.deps);
        out.extend_from_slice(b",\"heads\":");
        json_hashes(&mut out, entry.heads);
        out.push(b'}');
        if out.len() > max_bytes {
            return Err(ViewError::TooLarge(format!(
                "its history's answer passes {max_bytes} bytes"
            )));
        }
        Ok(())
    })?;
    out.extend_from_slice(b"]}");
    Ok(out)
}

/// A JSON string (escaped as serde_json escapes it).
fn json_string(out: &mut Vec<u8>, text: &str) {
    // Writing to a Vec cannot fail; a str always serializes.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// Bytes as lowercase hex.
fn json_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)]);
        out.push(DIGITS[usize::from(byte & 0x0f)]);
    }
}

/// A JSON array of hashes as hex strings.
fn json_hashes(out: &mut Vec<u8>, hashes: &[meridian_protocol::ChangeHash]) {
    out.push(b'[');
    for (i, hash) in hashes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        json_hex(out, &hash.0);
        out.push(b'"');
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;

    fn two_changes() -> (AutoCommit, Vec<Bytes>) {
        let mut doc = AutoCommit::new();
        doc.put(automerge::ROOT, "title", "first").unwrap();
        doc.commit();
        doc.put(automerge::ROOT, "title", "second").unwrap();
        doc.commit();
        let changes = doc
            .get_changes(&[])
            .iter()
            .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
            .collect();
        (doc, changes)
    }

    fn concat(changes: &[Bytes]) -> Bytes {
        changes.iter().flat_map(|c| c.iter().copied()).collect()
    }

    #[test]
    fn a_body_splits_into_its_changes_and_nothing_else() {
        let (_, changes) = two_changes();
        let body = concat(&changes);
        assert_eq!(split_changes(&body, 10).unwrap(), changes);
        assert_eq!(split_changes(&body, 1), Err(ViewError::TooManyChanges(1)));
        assert_eq!(split_changes(&Bytes::new(), 10), Err(ViewError::Empty));
        // Cut short, trailing garbage, a length that points past the end.
        let short = body.slice(..body.len() - 1);
        assert!(matches!(
            split_changes(&short, 10),
            Err(ViewError::NotChanges(_))
        ));
        let mut trailing = body.to_vec();
        trailing.extend_from_slice(b"xyz");
        assert!(matches!(
            split_changes(&Bytes::from(trailing), 10),
            Err(ViewError::NotChanges(_))
        ));
        let mut huge = changes[0][..9].to_vec();
        huge.extend_from_slice(&[0xff; 10]);
        assert!(matches!(
            split_changes(&Bytes::from(huge), 10),
            Err(ViewError::NotChanges(_))
        ));
    }

    #[test]
    fn a_body_is_refused_whole_over_its_inflation_budget() {
        let (_, changes) = two_changes();
        let costs = measure_all(&changes, 1 << 20).unwrap();
        assert_eq!(costs.len(), 2);
        let total: usize = costs.iter().map(|c| c.inflated).sum();
        assert_eq!(
            measure_all(&changes, total - 1),
            Err(ViewError::Budget(total - 1))
        );
        let mut bad = changes[1].to_vec();
        bad[4] ^= 1;
        let refused = measure_all(&[changes[0].clone(), Bytes::from(bad)], 1 << 20);
        // Measuring reads sizes only; the checksum is the parser's (the relay's) check.
        assert!(refused.is_ok());
        let refused = measure_all(
            &[changes[0].clone(), Bytes::from_static(b"nonsense")],
            1 << 20,
        );
        assert!(matches!(refused, Err(ViewError::Change { index: 1, .. })));
    }

    #[test]
    fn frames_respect_the_frame_limits() {
        let change = Bytes::from(vec![0u8; 400 << 10]);
        let cost = ChangeCost {
            inflated: 400 << 10,
            ops: 1,
            preds: 0,
        };
        let changes = vec![change; 5];
        let ends = frames(&changes, &[cost; 5]);
        assert_eq!(ends, vec![2, 4, 5]);
        let heavy = ChangeCost {
            inflated: 10,
            ops: MAX_FRAME_OPS,
            preds: 0,
        };
        let small = vec![Bytes::from_static(b"x"); 3];
        assert_eq!(frames(&small, &[heavy; 3]), vec![1, 2, 3]);
        assert!(frames(&[], &[]).is_empty());
    }

    #[test]
    fn reads_are_checked_against_their_limits() {
        let (_, changes) = two_changes();
        let cost = check_read(&changes, &ReadLimits::default()).unwrap();
        assert_eq!(cost.changes, 2);
        assert_eq!(cost.ops, 2);
        let tight = ReadLimits {
            ops_max: 1,
            ..ReadLimits::default()
        };
        assert!(matches!(
            check_read(&changes, &tight),
            Err(ViewError::TooLarge(_))
        ));
        let tight = ReadLimits {
            bytes_max: 10,
            ..ReadLimits::default()
        };
        assert!(matches!(
            check_read(&changes, &tight),
            Err(ViewError::TooLarge(_))
        ));
    }

    #[test]
    fn materialize_now_and_at_past_heads() {
        let (mut doc, changes) = two_changes();
        let now = materialize(&changes, None).unwrap();
        assert_eq!(now, serde_json::json!({"title": "second"}));
        let first = doc.get_changes(&[])[0].hash();
        let then = materialize(&changes, Some(&[first])).unwrap();
        assert_eq!(then, serde_json::json!({"title": "first"}));
        let unknown: automerge::ChangeHash = automerge::ChangeHash([7; 32]);
        assert!(matches!(
            materialize(&changes, Some(&[unknown])),
            Err(ViewError::UnknownHead(_))
        ));
        assert_eq!(parse_heads(&format!("{first}, ")).unwrap(), vec![first]);
        assert!(matches!(parse_heads("zz"), Err(ViewError::Head(_))));
    }

    #[test]
    fn history_names_the_bound_user_and_the_heads_after_each_change() {
        let (mut doc, changes) = two_changes();
        let actor = ActorId::new(doc.get_actor().to_bytes()).unwrap();
        let alice = UserId::new("alice").unwrap();
        let entries = history(&changes, &[(actor, alice)]).unwrap();
        assert_eq!(entries.len(), 2);
        let hashes: Vec<String> = doc
            .get_changes(&[])
            .iter()
            .map(|c| c.hash().to_string())
            .collect();
        assert_eq!(entries[0].hash, hashes[0]);
        assert_eq!(entries[1].deps, vec![hashes[0].clone()]);
        assert_eq!(entries[1].heads, vec![hashes[1].clone()]);
        assert_eq!(entries[0].user.as_deref(), Some("alice"));
        assert_eq!(entries[1].seq, 2);
        let unbound = history(&changes, &[]).unwrap();
        assert_eq!(unbound[0].user, None);
    }

    /// The hand-written answer is the JSON the entries serialize to, escapes included.
    #[test]
    fn the_history_answer_is_the_entries_as_json() {
        let mut doc = AutoCommit::new();
        doc.put(automerge::ROOT, "a", 1).unwrap();
        doc.commit_with(
            automerge::transaction::CommitOptions::default()
                .with_message("quote \" and \\ and\nline")
                .with_time(1_764_979_200),
        );
        let mut other = doc.fork();
        other.put(automerge::ROOT, "b", 2).unwrap();
        other.commit();
        doc.put(automerge::ROOT, "c", 3).unwrap();
        doc.commit();
        doc.merge(&mut other).unwrap();
        let changes: Vec<Bytes> = doc
            .get_changes(&[])
            .iter()
            .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
            .collect();
        let actor = ActorId::new(doc.get_actor().to_bytes()).unwrap();
        let authors = vec![(actor, UserId::new("alice:1").unwrap())];
        let heads: Vec<meridian_protocol::ChangeHash> = doc
            .get_heads()
            .iter()
            .map(|h| meridian_protocol::ChangeHash(h.0))
            .collect();
        let written =
            history_json("notes/\"1\"", &heads, &[], &changes, &authors, 1 << 20).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&written).unwrap();
        let expected = serde_json::json!({
            "doc": "notes/\"1\"",
            "heads": heads.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "durable_heads": Vec::<String>::new(),
            "changes": history(&changes, &authors).unwrap(),
        });
        assert_eq!(parsed, expected);
        assert_eq!(parsed["changes"].as_array().unwrap().len(), 3);
        assert_eq!(parsed["changes"][2]["heads"].as_array().unwrap().len(), 2);
    }

    /// Each entry lists the heads after it: changes that are all concurrent make an
    /// answer of about the square of their number, refused once past its bound.
    #[test]
    fn a_history_answer_past_its_bound_is_refused() {
        let changes: Vec<Bytes> = (0..200)
            .map(|i| {
                let mut doc = AutoCommit::new();
                doc.put(automerge::ROOT, "k", i).unwrap();
                Bytes::copy_from_slice(doc.get_last_local_change().unwrap().raw_bytes())
            })
            .collect();
        let whole = history_json("d", &[], &[], &changes, &[], usize::MAX).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&whole).unwrap();
        assert_eq!(
            parsed["changes"][199]["heads"].as_array().unwrap().len(),
            200
        );
        // 200 × 201 / 2 hashes of 67 bytes each at least.
        assert!(whole.len() > 1_340_000, "{}", whole.len());
        assert!(matches!(
            history_json("d", &[], &[], &changes, &[], 1 << 20),
            Err(ViewError::TooLarge(_))
        ));
    }
}
