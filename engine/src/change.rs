//! Parsing and checking one change on its own, without a document.
//!
//! A change is measured before Automerge parses it: a compressed chunk is inflated with a
//! bound ([`MAX_CHANGE_INFLATED`]) and its operations are counted from the run-length
//! encoded action column without expanding it ([`MAX_CHANGE_OPS`]). A change whose bytes
//! say "a billion operations" in a few bytes, or whose 5 KB inflate to 5 MB, is refused
//! as `too_large` before any of that work is done. A frame's changes share one budget
//! ([`FrameBudget`]) on top of the per-change limits.

use std::io::Read;

use bytes::Bytes;
use meridian_protocol::{
    ActorId, ChangeHash, ErrorCode, MAX_CHANGE_INFLATED, MAX_CHANGE_LEN, MAX_CHANGE_OPS,
    MAX_FRAME_INFLATED, MAX_FRAME_OPS,
};

/// The four magic bytes that open every Automerge chunk.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// Chunk types (the byte after the checksum).
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED_CHANGE: u8 = 2;
/// Column specifications (id << 4 | type, the deflate bit masked out) of the two columns
/// that decide how much work parsing is: the action column (one entry per operation)
/// and the predecessor group column (how many predecessors each operation names).
const ACTION_COLUMN: u32 = (4 << 4) | 2;
const PRED_GROUP_COLUMN: u32 = 7 << 4;
const DEFLATE_BIT: u32 = 0b1000;

/// A change that parsed and whose header checksum matches its hash.
#[derive(Debug, Clone)]
pub struct ParsedChange {
    /// The hash Automerge computes over the change.
    pub hash: ChangeHash,
    /// The author's actor id.
    pub actor: ActorId,
    /// The change's sequence number for its actor, from 1.
    pub seq: u64,
    /// The changes it depends on.
    pub deps: Vec<ChangeHash>,
    /// The bytes as received.
    pub bytes: Bytes,
}

/// Why a change was refused. Caused by the sender; nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// Larger than [`MAX_CHANGE_LEN`].
    #[error("change of {0} bytes is larger than the limit")]
    TooLarge(usize),
    /// Its compressed chunk inflates to more than [`MAX_CHANGE_INFLATED`] bytes.
    #[error("change inflates to more than {MAX_CHANGE_INFLATED} bytes")]
    Inflated,
    /// It carries more than [`MAX_CHANGE_OPS`] operations (or names more predecessors).
    #[error("change carries {0} operations or predecessors, more than {MAX_CHANGE_OPS}")]
    TooManyOps(u64),
    /// The changes before it in the same frame used up the frame's budget of inflated
    /// bytes ([`MAX_FRAME_INFLATED`]) or operations ([`MAX_FRAME_OPS`]); answered
    /// `overloaded`: send it again in another frame.
    #[error("the frame's budget of inflated bytes or operations is used up")]
    FrameBudget,
    /// Not an Automerge change chunk.
    #[error("not an Automerge change: {0}")]
    Parse(String),
    /// The checksum in the chunk header does not match the hash of the content: the
    /// bytes were altered after the change was made.
    #[error("checksum mismatch: change {0} was corrupted")]
    Checksum(ChangeHash),
    /// The actor id is empty or too long.
    #[error("invalid actor id")]
    Actor,
}

impl ChangeError {
    /// The error code the sender is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ChangeError::TooLarge(_) | ChangeError::Inflated | ChangeError::TooManyOps(_) => {
                ErrorCode::TooLarge
            }
            // The change itself may be fine: sent again (after the ones before it in the
            // frame were taken), it fits. `overloaded` tells the SDK to resend.
            ChangeError::FrameBudget => ErrorCode::Overloaded,
            ChangeError::Parse(_) | ChangeError::Checksum(_) | ChangeError::Actor => {
                ErrorCode::InvalidChange
            }
        }
    }
}

/// What parsing a change costs, measured from its bytes without expanding anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChangeCost {
    /// Bytes once inflated (the chunk's own length when it is not compressed).
    pub inflated: usize,
    /// Operations it carries.
    pub ops: u64,
    /// Predecessors its operations name, in all.
    pub preds: u64,
}

/// Parses one change and verifies its header checksum (Automerge's parser alone accepts a
/// change with a flipped body byte, under a different hash). The change is measured
/// first and refused over the per-change limits. `bytes` is kept as given.
pub fn parse_change(bytes: Bytes) -> Result<ParsedChange, ChangeError> {
    let cost = measure(&bytes)?;
    check_cost(&cost)?;
    parse_measured(bytes)
}

/// The parse-work budget of one `changes` frame: its changes together may inflate to at
/// most [`MAX_FRAME_INFLATED`] bytes and carry at most [`MAX_FRAME_OPS`] operations.
#[derive(Debug, Clone)]
pub struct FrameBudget {
    inflated_left: usize,
    ops_left: u64,
}

impl Default for FrameBudget {
    fn default() -> Self {
        FrameBudget {
            inflated_left: MAX_FRAME_INFLATED,
            ops_left: MAX_FRAME_OPS,
        }
    }
}

impl FrameBudget {
    /// Parses one change of the frame within the per-change limits and what is left of
    /// the frame's budget. The result owns a copy of the change's bytes, so that it never
    /// keeps the rest of the frame alive.
    ///
    /// The work a refused change cost (what was inflated to find it too large, the bytes
    /// read to find it malformed) is charged too, so that a frame of refusals costs no
    /// more than a frame of accepted changes; once the budget is spent, the frame's
    /// remaining changes are refused without being looked at.
    pub fn parse(&mut self, bytes: &Bytes) -> Result<ParsedChange, ChangeError> {
        if self.inflated_left == 0 || self.ops_left == 0 {
            return Err(ChangeError::FrameBudget);
        }
        let inflate_max = self.inflated_left.min(MAX_CHANGE_INFLATED);
        let cost = match measure_within(bytes, inflate_max) {
            Ok(cost) => cost,
            Err(ChangeError::Inflated) => {
                self.inflated_left -= inflate_max;
                return Err(if inflate_max < MAX_CHANGE_INFLATED {
                    ChangeError::FrameBudget
                } else {
                    ChangeError::Inflated
                });
            }
            Err(error) => {
                self.inflated_left = self.inflated_left.saturating_sub(bytes.len());
                return Err(error);
            }
        };
        self.inflated_left -= cost.inflated;
        check_cost(&cost)?;
        let work = cost.ops.max(cost.preds);
        if work > self.ops_left {
            return Err(ChangeError::FrameBudget);
        }
        self.ops_left -= work;
        parse_measured(Bytes::copy_from_slice(bytes))
    }
}

impl FrameBudget {
    /// Inflated bytes this frame's changes cost so far (refused ones included).
    pub fn inflated(&self) -> usize {
        MAX_FRAME_INFLATED - self.inflated_left
    }
}

/// Parses every change of one frame within one [`FrameBudget`]; each result owns its bytes.
pub fn parse_frame(changes: &[Bytes]) -> Vec<Result<ParsedChange, ChangeError>> {
    let mut budget = FrameBudget::default();
    changes.iter().map(|bytes| budget.parse(bytes)).collect()
}

fn check_cost(cost: &ChangeCost) -> Result<(), ChangeError> {
    if cost.inflated > MAX_CHANGE_INFLATED {
        return Err(ChangeError::Inflated);
    }
    let work = cost.ops.max(cost.preds);
    if work > MAX_CHANGE_OPS {
        return Err(ChangeError::TooManyOps(work));
    }
    Ok(())
}

fn parse_measured(bytes: Bytes) -> Result<ParsedChange, ChangeError> {
    let change = automerge::Change::try_from(&bytes[..])
        .map_err(|error| ChangeError::Parse(error.to_string()))?;
    let hash = ChangeHash(change.hash().0);
    if bytes[4..8] != hash.0[..4] {
        return Err(ChangeError::Checksum(hash));
    }
    let actor = ActorId::new(change.actor_id().to_bytes()).map_err(|_| ChangeError::Actor)?;
    let deps = change.deps().iter().map(|dep| ChangeHash(dep.0)).collect();
    Ok(ParsedChange {
        hash,
        actor,
        seq: change.seq(),
        deps,
        bytes,
    })
}

/// A change's header, read without decoding its operations: what a history lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeHeader {
    /// The hash Automerge computes over the change (SHA-256 of the uncompressed chunk).
    pub hash: ChangeHash,
    /// The changes it depends on.
    pub deps: Vec<ChangeHash>,
    /// The author's actor id.
    pub actor: Vec<u8>,
    /// Its sequence number for its actor, from 1.
    pub seq: u64,
    /// Its own timestamp (its author's clock; 0: none).
    pub time: i64,
    /// Its commit message (`None` when empty).
    pub message: Option<String>,
}

/// Reads a change's header and computes its hash, inflating a compressed chunk within
/// [`MAX_CHANGE_INFLATED`] but decoding none of its operations: for listing stored
/// changes (which passed [`parse_change`] when they arrived) cheaply.
pub fn header(bytes: &[u8]) -> Result<ChangeHeader, ChangeError> {
    use sha2::Digest;
    let (body, compressed) = chunk_body(bytes, MAX_CHANGE_INFLATED)?;
    let hash = if compressed {
        // The hash is over the uncompressed chunk: type, length, body.
        let mut digest = sha2::Sha256::new();
        digest.update([CHUNK_CHANGE]);
        let mut len = body.len() as u64;
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                digest.update([byte]);
                break;
            }
            digest.update([byte | 0x80]);
        }
        digest.update(&body);
        digest.finalize()
    } else {
        sha2::Sha256::digest(&bytes[8..])
    };
    let mut r = Cursor::new(&body);
    let deps = read_deps(&mut r)?;
    let actor_len = usize::try_from(r.uleb()?).unwrap_or(usize::MAX);
    let actor = r.take(actor_len)?.to_vec();
    let seq = r.uleb()?;
    r.uleb()?; // start op
    let time = r.sleb()?;
    let message_len = usize::try_from(r.uleb()?).unwrap_or(usize::MAX);
    let message = std::str::from_utf8(r.take(message_len)?)
        .map_err(|_| ChangeError::Parse("commit message is not UTF-8".into()))?;
    let mut out = [0u8; 32];
    out.copy_from_slice(&hash);
    Ok(ChangeHeader {
        hash: ChangeHash(out),
        deps,
        actor,
        seq,
        time,
        message: (!message.is_empty()).then(|| message.to_string()),
    })
}

/// The dependency list at the start of a change chunk's body.
fn read_deps(r: &mut Cursor<'_>) -> Result<Vec<ChangeHash>, ChangeError> {
    let count = r.uleb()?;
    let mut deps = Vec::new();
    for _ in 0..count {
        let dep: [u8; 32] = r
            .take(32)?
            .try_into()
            .map_err(|_| ChangeError::Parse("truncated change".into()))?;
        deps.push(ChangeHash(dep));
    }
    Ok(deps)
}

/// A change's actor and sequence number, read from its header without hashing it or
/// decoding its operations: to pass over loaded changes a graph's base covers cheaply.
pub fn actor_seq(bytes: &[u8]) -> Result<(ActorId, u64), ChangeError> {
    let (body, _) = chunk_body(bytes, MAX_CHANGE_INFLATED)?;
    let mut r = Cursor::new(&body);
    read_deps(&mut r)?;
    let actor_len = usize::try_from(r.uleb()?).unwrap_or(usize::MAX);
    let actor =
        ActorId::new(r.take(actor_len)?).map_err(|_| ChangeError::Parse("bad actor id".into()))?;
    Ok((actor, r.uleb()?))
}

/// Reads only a change's dependencies, without hashing it or decoding its operations:
/// for changes the graph already holds (they passed [`parse_change`] when they arrived),
/// whose hash, actor and sequence number it knows.
pub fn deps(bytes: &[u8]) -> Result<Vec<ChangeHash>, ChangeError> {
    let (body, _) = chunk_body(bytes, MAX_CHANGE_INFLATED)?;
    let mut r = Cursor::new(&body);
    let deps = read_deps(&mut r)?;
    Ok(deps)
}

/// Measures a change chunk: its inflated size (inflating at most one byte past the
/// limit) and its operation and predecessor counts (read from the run-length encoding
/// without expanding runs). Work and memory are bounded by the limits, whatever the
/// bytes claim.
pub fn measure(bytes: &[u8]) -> Result<ChangeCost, ChangeError> {
    measure_within(bytes, MAX_CHANGE_INFLATED)
}

/// [`measure`], inflating at most `inflate_max` bytes (one more, to tell "over").
/// A change chunk's body after its header checks (size, magic, length), inflated when
/// compressed (at most one byte past `inflate_max`, to tell "over"), and whether it was.
fn chunk_body(
    bytes: &[u8],
    inflate_max: usize,
) -> Result<(std::borrow::Cow<'_, [u8]>, bool), ChangeError> {
    if bytes.len() > MAX_CHANGE_LEN {
        return Err(ChangeError::TooLarge(bytes.len()));
    }
    if bytes.len() < 8 || bytes[..4] != MAGIC {
        return Err(ChangeError::Parse("missing magic bytes".into()));
    }
    let mut header = Cursor::new(&bytes[8..]);
    let chunk_type = header.u8()?;
    let len = header.uleb()?;
    let data = header.rest();
    if len != data.len() as u64 {
        return Err(ChangeError::Parse(
            "chunk length does not match its bytes".into(),
        ));
    }
    match chunk_type {
        CHUNK_CHANGE => Ok((std::borrow::Cow::Borrowed(data), false)),
        CHUNK_COMPRESSED_CHANGE => {
            let mut out = Vec::new();
            flate2::read::DeflateDecoder::new(data)
                .take(inflate_max as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|_| ChangeError::Parse("compressed change does not inflate".into()))?;
            if out.len() > inflate_max {
                return Err(ChangeError::Inflated);
            }
            Ok((std::borrow::Cow::Owned(out), true))
        }
        _ => Err(ChangeError::Parse("not a change chunk".into())),
    }
}

fn measure_within(bytes: &[u8], inflate_max: usize) -> Result<ChangeCost, ChangeError> {
    let (body, _) = chunk_body(bytes, inflate_max)?;
    if body.len() > inflate_max {
        return Err(ChangeError::Inflated);
    }
    let (ops, preds) = count_ops(&body)?;
    Ok(ChangeCost {
        inflated: body.len(),
        ops,
        preds,
    })
}

/// Reads a change body's header and column layout and counts its operations (entries of
/// the action column) and predecessors (the sum of the predecessor group column).
fn count_ops(body: &[u8]) -> Result<(u64, u64), ChangeError> {
    let mut r = Cursor::new(body);
    let deps = r.uleb()?;
    r.skip_items(deps, 32)?;
    let actor_len = r.uleb()?;
    r.skip_items(actor_len, 1)?;
    r.uleb()?; // seq
    r.uleb()?; // start op
    r.uleb()?; // time (signed; only skipped)
    let message_len = r.uleb()?;
    r.skip_items(message_len, 1)?;
    let other_actors = r.uleb()?;
    for _ in 0..other_actors {
        let len = r.uleb()?;
        r.skip_items(len, 1)?;
    }
    let columns = r.uleb()?;
    let mut layout = Vec::new();
    for _ in 0..columns {
        let spec = r.uleb()?;
        let len = r.uleb()?;
        layout.push((spec, len));
    }
    let mut data = r.rest();
    let (mut ops, mut preds) = (0u64, 0u64);
    for (spec, len) in layout {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > data.len() {
            return Err(ChangeError::Parse(
                "column lengths exceed the change".into(),
            ));
        }
        let (column, rest) = data.split_at(len);
        data = rest;
        match u32::try_from(spec).map(|spec| spec & !DEFLATE_BIT) {
            Ok(ACTION_COLUMN) => ops = rle_entries(column)?.0,
            Ok(PRED_GROUP_COLUMN) => preds = rle_entries(column)?.1,
            _ => {}
        }
    }
    Ok((ops, preds))
}

/// Counts the entries of a run-length encoded column of unsigned integers and sums their
/// values, without expanding runs: a run is a positive signed count and one value, a
/// literal run a negative count and that many values, a null run a zero and a count.
fn rle_entries(column: &[u8]) -> Result<(u64, u64), ChangeError> {
    let mut r = Cursor::new(column);
    let (mut entries, mut sum) = (0u64, 0u64);
    while !r.is_empty() {
        let count = r.sleb()?;
        if count > 0 {
            let value = r.uleb()?;
            entries = entries.saturating_add(count as u64);
            sum = sum.saturating_add((count as u64).saturating_mul(value));
        } else if count < 0 {
            for _ in 0..count.unsigned_abs() {
                sum = sum.saturating_add(r.uleb()?);
                entries = entries.saturating_add(1);
            }
        } else {
            entries = entries.saturating_add(r.uleb()?);
        }
    }
    Ok((entries, sum))
}

/// A change chunk whose action column is one run of `ops` entries: a few bytes that
/// claim `ops` operations (and whose checksum is wrong, which only a full parse finds).
/// What a hostile client sends to make a relay that counts nothing parse for minutes;
/// for tests and the load generator's hostile scenario.
pub fn operation_bomb(ops: u64) -> Bytes {
    fn uleb(out: &mut Vec<u8>, mut value: u64) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    // A positive run length in signed LEB128: the last byte's sign bit must be clear.
    let mut column = Vec::new();
    uleb(&mut column, ops);
    if (ops >> (7 * (column.len() - 1))) & 0x40 != 0 {
        let last = column.len() - 1;
        column[last] |= 0x80;
        column.push(0);
    }
    uleb(&mut column, 1); // the run's value: action 1
    let mut body = vec![0]; // no deps
    body.extend([1, 0xab]); // a one-byte actor
    body.extend([1, 1, 0, 0, 0]); // seq, start op, time, message, other actors
    body.push(1); // one column
    uleb(&mut body, u64::from(ACTION_COLUMN));
    uleb(&mut body, column.len() as u64);
    body.extend(&column);
    let mut chunk = MAGIC.to_vec();
    chunk.extend([0, 0, 0, 0, CHUNK_CHANGE]);
    uleb(&mut chunk, body.len() as u64);
    chunk.extend(body);
    Bytes::from(chunk)
}

/// A bounds-checked reader of LEB128 fields.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes }
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn rest(self) -> &'a [u8] {
        self.bytes
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ChangeError> {
        if n > self.bytes.len() {
            return Err(Self::truncated());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn truncated() -> ChangeError {
        ChangeError::Parse("truncated change".into())
    }

    fn u8(&mut self) -> Result<u8, ChangeError> {
        let (&first, rest) = self.bytes.split_first().ok_or_else(Self::truncated)?;
        self.bytes = rest;
        Ok(first)
    }

    fn uleb(&mut self) -> Result<u64, ChangeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ChangeError::Parse("LEB128 number too long".into()))
    }

    fn sleb(&mut self) -> Result<i64, ChangeError> {
        let mut value = 0i64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            value |= i64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                if shift + 7 < 64 && byte & 0x40 != 0 {
                    value |= -1i64 << (shift + 7);
                }
                return Ok(value);
            }
        }
        Err(ChangeError::Parse("LEB128 number too long".into()))
    }

    /// Skips `count` items of `size` bytes each.
    fn skip_items(&mut self, count: u64, size: usize) -> Result<(), ChangeError> {
        let len = usize::try_from(count)
            .ok()
            .and_then(|count| count.checked_mul(size))
            .filter(|len| *len <= self.bytes.len())
            .ok_or_else(Self::truncated)?;
        self.bytes = &self.bytes[len..];
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;

    #[test]
    fn a_header_read_alone_agrees_with_automerge_compressed_or_not() {
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, "a", 1).unwrap();
        doc.commit_with(
            automerge::transaction::CommitOptions::default()
                .with_message("first")
                .with_time(1_764_979_200),
        );
        doc.put(automerge::ROOT, "b", "x".repeat(5000)).unwrap();
        doc.commit_with(automerge::transaction::CommitOptions::default().with_time(-5));
        for mut change in doc.get_changes(&[]) {
            for bytes in [change.raw_bytes().to_vec(), change.bytes().to_vec()] {
                let header = header(&bytes).unwrap();
                assert_eq!(header.hash, ChangeHash(change.hash().0));
                assert_eq!(header.actor, change.actor_id().to_bytes());
                assert_eq!(header.seq, change.seq());
                assert_eq!(header.time, change.timestamp());
                assert_eq!(header.message.as_deref(), change.message());
                let deps: Vec<ChangeHash> = change.deps().iter().map(|d| ChangeHash(d.0)).collect();
                assert_eq!(header.deps, deps);
            }
        }
        // The big one compresses: both forms were read.
        let mut big = doc.get_last_local_change().unwrap().clone();
        assert_eq!(big.bytes()[8], CHUNK_COMPRESSED_CHANGE);
        assert!(header(b"nonsense").is_err());
        let mut cut = big.bytes().to_vec();
        cut.truncate(cut.len() - 3);
        assert!(header(&cut).is_err());
    }

    fn one_change() -> Bytes {
        let mut doc = automerge::AutoCommit::new();
        doc.put(
            automerge::ROOT,
            "title",
            "hello world, a change long enough",
        )
        .unwrap();
        Bytes::copy_from_slice(doc.get_last_local_change().unwrap().raw_bytes())
    }

    #[test]
    fn accepts_a_real_change() {
        let parsed = parse_change(one_change()).unwrap();
        assert_eq!(parsed.seq, 1);
        assert!(parsed.deps.is_empty());
    }

    #[test]
    fn refuses_a_flipped_body_byte() {
        let mut bytes = one_change().to_vec();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x01;
        match parse_change(Bytes::from(bytes)) {
            Err(ChangeError::Checksum(_)) | Err(ChangeError::Parse(_)) => {}
            other => panic!("corruption accepted: {other:?}"),
        }
    }

    /// A text of `len` characters in one change, and the change that deletes them all.
    fn insert_and_delete(len: usize) -> (automerge::Change, automerge::Change) {
        let mut doc = automerge::AutoCommit::new();
        let text = doc
            .put_object(automerge::ROOT, "text", automerge::ObjType::Text)
            .unwrap();
        doc.splice_text(&text, 0, 0, &"a".repeat(len)).unwrap();
        let insert = doc.get_last_local_change().unwrap().clone();
        doc.splice_text(&text, 0, len as isize, "").unwrap();
        let delete = doc.get_last_local_change().unwrap().clone();
        (insert, delete)
    }

    #[test]
    fn counts_operations_as_automerge_does() {
        let (mut insert, mut delete) = insert_and_delete(3000);
        let mut many = automerge::AutoCommit::new();
        for i in 0..200 {
            many.put(automerge::ROOT, format!("k{}", i % 7), i).unwrap();
        }
        let mut puts = many.get_last_local_change().unwrap().clone();
        let raw = measure(puts.raw_bytes()).unwrap();
        assert_eq!(raw.ops, puts.len() as u64);
        assert_eq!(measure(puts.bytes().as_ref()).unwrap(), raw);
        for change in [&mut insert, &mut delete] {
            let raw = measure(change.raw_bytes()).unwrap();
            assert_eq!(raw.ops, change.len() as u64);
            let compressed = measure(change.bytes().as_ref()).unwrap();
            assert_eq!(compressed, raw, "the compressed form measures the same");
        }
        assert_eq!(measure(delete.raw_bytes()).unwrap().preds, 3000);
        let parsed = parse_change(Bytes::copy_from_slice(insert.bytes().as_ref())).unwrap();
        assert_eq!(parsed.hash.0, insert.hash().0);
    }

    /// One change that puts a string of `len` bytes: a few kilobytes compressed.
    fn one_long_string(len: usize) -> Bytes {
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, "text", "a".repeat(len)).unwrap();
        Bytes::copy_from_slice(
            doc.get_last_local_change()
                .unwrap()
                .clone()
                .bytes()
                .as_ref(),
        )
    }

    #[test]
    fn a_compression_bomb_is_refused_before_it_inflates() {
        // 2 MB of text compresses to a few kilobytes.
        let bytes = one_long_string(2_000_000);
        assert!(
            bytes.len() < 64 << 10,
            "compressed to {} bytes",
            bytes.len()
        );
        assert_eq!(measure(&bytes), Err(ChangeError::Inflated));
        assert_eq!(
            parse_change(bytes.clone()).unwrap_err(),
            ChangeError::Inflated
        );
        assert_eq!(ChangeError::Inflated.code(), ErrorCode::TooLarge);
        // Just under the limit is accepted.
        assert!(parse_change(one_long_string(MAX_CHANGE_INFLATED - 4096)).is_ok());
    }

    #[test]
    fn an_operation_bomb_is_refused_before_automerge_parses_it() {
        for ops in [MAX_CHANGE_OPS + 1, 1 << 40] {
            let bytes = operation_bomb(ops);
            assert!(bytes.len() < 64, "{} bytes", bytes.len());
            assert_eq!(measure(&bytes).unwrap().ops, ops);
            assert_eq!(
                parse_change(bytes).unwrap_err(),
                ChangeError::TooManyOps(ops)
            );
        }
        // At the limit, the count passes and the full parse finds the bad checksum.
        assert!(matches!(
            parse_change(operation_bomb(1000)),
            Err(ChangeError::Parse(_) | ChangeError::Checksum(_))
        ));
    }

    #[test]
    fn a_frame_shares_one_budget_and_its_changes_own_their_bytes() {
        // Changes of 300 KB inflated each: the frame takes as many as fit its budget.
        let one = one_long_string(300_000);
        let fit = MAX_FRAME_INFLATED / measure(&one).unwrap().inflated;
        let mut frame = vec![one; fit + 2];
        frame.push(one_change());
        let results = parse_frame(&frame);
        assert!(results[..fit].iter().all(Result::is_ok));
        // The next one is inflated as far as the budget goes and refused; the budget is
        // then spent, and what follows is refused unread, however small.
        for refused in &results[fit..] {
            assert_eq!(refused.as_ref().unwrap_err(), &ChangeError::FrameBudget);
        }

        // What a parse keeps is a copy, never a slice of the frame it came in.
        let change = one_change();
        let mut padded = vec![0u8; 1 << 20];
        padded[..change.len()].copy_from_slice(&change);
        let padded = Bytes::from(padded);
        let parsed = FrameBudget::default()
            .parse(&padded.slice(..change.len()))
            .unwrap();
        let kept = parsed.bytes.as_ptr() as usize;
        let frame_start = padded.as_ptr() as usize;
        assert!(kept < frame_start || kept >= frame_start + padded.len());
    }

    #[test]
    fn a_frame_of_bombs_costs_no_more_than_its_budget() {
        // As many bombs as fit a frame: only the first few are inflated (each to the
        // per-change limit, charged to the frame), the rest are refused unread.
        let bomb = one_long_string(2_000_000);
        let frame = vec![bomb; 300];
        let results = parse_frame(&frame);
        let inflated = results
            .iter()
            .filter(|r| matches!(r, Err(ChangeError::Inflated)))
            .count();
        assert_eq!(inflated, MAX_FRAME_INFLATED / MAX_CHANGE_INFLATED);
        assert!(
            results[inflated..]
                .iter()
                .all(|r| matches!(r, Err(ChangeError::FrameBudget)))
        );
        // Garbage is charged for the bytes read too.
        let garbage = Bytes::from(vec![0x85; 500_000]);
        let results = parse_frame(&vec![garbage; 20]);
        assert!(matches!(results[0], Err(ChangeError::Parse(_))));
        assert!(matches!(results[19], Err(ChangeError::FrameBudget)));
    }

    #[test]
    fn truncated_and_lying_headers_are_refused() {
        let change = one_change();
        for cut in [8, 9, 10, change.len() / 2, change.len() - 1] {
            assert!(matches!(
                measure(&change[..cut]),
                Err(ChangeError::Parse(_))
            ));
        }
        // A chunk type other than a change.
        let mut document = change.to_vec();
        document[8] = 0;
        assert!(matches!(measure(&document), Err(ChangeError::Parse(_))));
    }

    #[test]
    fn refuses_garbage_and_oversize() {
        assert!(matches!(
            parse_change(Bytes::from_static(b"garbage!")),
            Err(ChangeError::Parse(_))
        ));
        assert!(matches!(
            parse_change(Bytes::from(vec![0u8; MAX_CHANGE_LEN + 1])),
            Err(ChangeError::TooLarge(_))
        ));
    }
}
