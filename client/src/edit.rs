//! Edits and reads addressed by a path from the document's root, with plain JSON values:
//! what apps in other languages (and the CLI) use instead of Automerge's object ids.
//!
//! A path is a list of [`Segment`]s: map keys and list indexes, from the root map. Writes
//! create the maps a path names that do not exist yet; they never replace a value of
//! another kind on the way (that is an [`EditError::Path`]). Text indexes count Unicode
//! code points.

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjId, ObjType, ReadDoc, ScalarValue, Value};

/// One step of a path: a key of a map or an index into a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A key of a map.
    Key(String),
    /// An index into a list (or a text, for the last step of a read).
    Index(u64),
}

impl From<&str> for Segment {
    fn from(key: &str) -> Self {
        Segment::Key(key.to_owned())
    }
}

impl From<u64> for Segment {
    fn from(index: u64) -> Self {
        Segment::Index(index)
    }
}

/// Why an edit addressed by path was refused. Nothing was changed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EditError {
    /// The path does not lead where the edit needs it to.
    #[error("path {path}: {reason}")]
    Path {
        /// The path as written (`/a/0/b`).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The value cannot be stored (a number out of range, JSON that does not parse).
    #[error("value: {0}")]
    Value(String),
    /// Automerge refused the operation.
    #[error("automerge: {0}")]
    Automerge(String),
}

/// The deepest nesting a JSON value may have (each level is an Automerge object).
pub const MAX_VALUE_DEPTH: usize = 64;

/// `/a/0/b` for messages.
fn display(path: &[Segment]) -> String {
    if path.is_empty() {
        return "/".into();
    }
    path.iter()
        .map(|s| match s {
            Segment::Key(key) => format!("/{key}"),
            Segment::Index(index) => format!("/{index}"),
        })
        .collect()
}

fn path_error(path: &[Segment], reason: impl Into<String>) -> EditError {
    EditError::Path {
        path: display(path),
        reason: reason.into(),
    }
}

fn automerge_error(error: automerge::AutomergeError) -> EditError {
    EditError::Automerge(error.to_string())
}

fn index(path: &[Segment], index: u64) -> Result<usize, EditError> {
    usize::try_from(index).map_err(|_| path_error(path, "index out of range"))
}

/// Walks `path` from the root to an object. With `create`, missing map entries become
/// maps; otherwise a missing step is an error.
fn walk(doc: &mut AutoCommit, path: &[Segment], create: bool) -> Result<ObjId, EditError> {
    let mut obj = automerge::ROOT;
    for (depth, segment) in path.iter().enumerate() {
        let here = &path[..=depth];
        let kind = doc.object_type(&obj).map_err(automerge_error)?;
        let found = match (segment, kind) {
            (Segment::Key(key), ObjType::Map | ObjType::Table) => {
                doc.get(&obj, key.as_str()).map_err(automerge_error)?
            }
            (Segment::Index(i), ObjType::List) => {
                let i = index(here, *i)?;
                if i >= doc.length(&obj) {
                    return Err(path_error(here, "index past the end of the list"));
                }
                doc.get(&obj, i).map_err(automerge_error)?
            }
            (Segment::Key(_), _) => return Err(path_error(here, "a key into something not a map")),
            (Segment::Index(_), _) => {
                return Err(path_error(here, "an index into something not a list"));
            }
        };
        obj = match (found, segment) {
            (Some((Value::Object(_), id)), _) => id,
            (Some((Value::Scalar(_), _)), _) => {
                return Err(path_error(
                    here,
                    "a value, not a map or a list, is in the way",
                ));
            }
            (None, Segment::Key(key)) if create => doc
                .put_object(&obj, key.as_str(), ObjType::Map)
                .map_err(automerge_error)?,
            (None, _) => return Err(path_error(here, "nothing there")),
        };
    }
    Ok(obj)
}

/// Where a write lands: the parent object and the last step.
enum Slot {
    Key(String),
    /// Overwrites the element at this index.
    Element(usize),
    /// Appends to the list (the index was its length).
    Append(usize),
}

fn slot(doc: &mut AutoCommit, path: &[Segment]) -> Result<(ObjId, Slot), EditError> {
    let Some((last, parents)) = path.split_last() else {
        return Err(path_error(path, "the root cannot be replaced; name a key"));
    };
    let parent = walk(doc, parents, true)?;
    let kind = doc.object_type(&parent).map_err(automerge_error)?;
    let slot = match (last, kind) {
        (Segment::Key(key), ObjType::Map | ObjType::Table) => Slot::Key(key.clone()),
        (Segment::Index(i), ObjType::List) => {
            let i = index(path, *i)?;
            let len = doc.length(&parent);
            match i.cmp(&len) {
                std::cmp::Ordering::Less => Slot::Element(i),
                std::cmp::Ordering::Equal => Slot::Append(i),
                std::cmp::Ordering::Greater => {
                    return Err(path_error(path, "index past the end of the list"));
                }
            }
        }
        (Segment::Key(_), _) => return Err(path_error(path, "a key into something not a map")),
        (Segment::Index(_), _) => {
            return Err(path_error(path, "an index into something not a list"));
        }
    };
    Ok((parent, slot))
}

fn scalar(value: &serde_json::Value) -> Result<Option<ScalarValue>, EditError> {
    Ok(Some(match value {
        serde_json::Value::Null => ScalarValue::Null,
        serde_json::Value::Bool(b) => ScalarValue::Boolean(*b),
        serde_json::Value::String(s) => ScalarValue::Str(s.as_str().into()),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else if let Some(f) = n.as_f64() {
                ScalarValue::F64(f)
            } else {
                return Err(EditError::Value(format!("number {n} out of range")));
            }
        }
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => return Ok(None),
    }))
}

fn kind_of(value: &serde_json::Value) -> ObjType {
    match value {
        serde_json::Value::Array(_) => ObjType::List,
        _ => ObjType::Map,
    }
}

fn check_depth(value: &serde_json::Value, depth: usize) -> Result<(), EditError> {
    if depth > MAX_VALUE_DEPTH {
        return Err(EditError::Value(format!(
            "nested deeper than {MAX_VALUE_DEPTH} levels"
        )));
    }
    match value {
        serde_json::Value::Array(items) => items.iter().try_for_each(|v| check_depth(v, depth + 1)),
        serde_json::Value::Object(map) => map.values().try_for_each(|v| check_depth(v, depth + 1)),
        _ => Ok(()),
    }
}

/// Fills the new object `obj` with the contents of `value` (an array or an object).
fn fill(doc: &mut AutoCommit, obj: &ObjId, value: &serde_json::Value) -> Result<(), EditError> {
    match value {
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                match scalar(item)? {
                    Some(s) => doc.insert(obj, i, s).map_err(automerge_error)?,
                    None => {
                        let child = doc
                            .insert_object(obj, i, kind_of(item))
                            .map_err(automerge_error)?;
                        fill(doc, &child, item)?;
                    }
                }
            }
        }
        serde_json::Value::Object(map) => {
            for (key, item) in map {
                match scalar(item)? {
                    Some(s) => doc.put(obj, key.as_str(), s).map_err(automerge_error)?,
                    None => {
                        let child = doc
                            .put_object(obj, key.as_str(), kind_of(item))
                            .map_err(automerge_error)?;
                        fill(doc, &child, item)?;
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Sets the value at `path` (strings become plain strings, arrays lists, objects maps).
/// An index equal to a list's length appends.
pub fn put(
    doc: &mut AutoCommit,
    path: &[Segment],
    value: &serde_json::Value,
) -> Result<(), EditError> {
    check_depth(value, 0)?;
    let (parent, slot) = slot(doc, path)?;
    match (scalar(value)?, slot) {
        (Some(s), Slot::Key(key)) => doc.put(&parent, key, s),
        (Some(s), Slot::Element(i)) => doc.put(&parent, i, s),
        (Some(s), Slot::Append(i)) => doc.insert(&parent, i, s),
        (None, slot) => {
            let kind = kind_of(value);
            let child = match slot {
                Slot::Key(key) => doc.put_object(&parent, key, kind),
                Slot::Element(i) => doc.put_object(&parent, i, kind),
                Slot::Append(i) => doc.insert_object(&parent, i, kind),
            }
            .map_err(automerge_error)?;
            return fill(doc, &child, value);
        }
    }
    .map_err(automerge_error)
}

/// Sets a counter at `path`, starting at `value`.
pub fn put_counter(doc: &mut AutoCommit, path: &[Segment], value: i64) -> Result<(), EditError> {
    let (parent, slot) = slot(doc, path)?;
    let counter = ScalarValue::counter(value);
    match slot {
        Slot::Key(key) => doc.put(&parent, key, counter),
        Slot::Element(i) => doc.put(&parent, i, counter),
        Slot::Append(i) => doc.insert(&parent, i, counter),
    }
    .map_err(automerge_error)
}

/// Sets a collaborative text at `path` holding `text`.
pub fn put_text(doc: &mut AutoCommit, path: &[Segment], text: &str) -> Result<(), EditError> {
    let (parent, slot) = slot(doc, path)?;
    let obj = match slot {
        Slot::Key(key) => doc.put_object(&parent, key, ObjType::Text),
        Slot::Element(i) => doc.put_object(&parent, i, ObjType::Text),
        Slot::Append(i) => doc.insert_object(&parent, i, ObjType::Text),
    }
    .map_err(automerge_error)?;
    doc.splice_text(&obj, 0, 0, text).map_err(automerge_error)
}

/// Deletes `delete` code points at `index` of the text at `path` and inserts `text` there.
pub fn splice_text(
    doc: &mut AutoCommit,
    path: &[Segment],
    index: u64,
    delete: u64,
    text: &str,
) -> Result<(), EditError> {
    let obj = walk(doc, path, false)?;
    if doc.object_type(&obj).map_err(automerge_error)? != ObjType::Text {
        return Err(path_error(path, "not a text"));
    }
    let len = doc.length(&obj);
    let at = usize::try_from(index)
        .ok()
        .filter(|i| *i <= len)
        .ok_or_else(|| path_error(path, format!("index {index} past the text's end ({len})")))?;
    let delete = usize::try_from(delete)
        .ok()
        .filter(|d| at + d <= len)
        .ok_or_else(|| path_error(path, format!("deleting {delete} past the text's end")))?;
    let delete = isize::try_from(delete).map_err(|_| path_error(path, "delete out of range"))?;
    doc.splice_text(&obj, at, delete, text)
        .map_err(automerge_error)
}

/// Adds `by` to the counter at `path`.
pub fn increment(doc: &mut AutoCommit, path: &[Segment], by: i64) -> Result<(), EditError> {
    let (parent, slot) = slot(doc, path)?;
    let current = match &slot {
        Slot::Key(key) => doc.get(&parent, key.as_str()),
        Slot::Element(i) => doc.get(&parent, *i),
        Slot::Append(_) => return Err(path_error(path, "nothing there")),
    }
    .map_err(automerge_error)?;
    if !matches!(current, Some((Value::Scalar(ref s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_)))
    {
        return Err(path_error(path, "not a counter"));
    }
    match slot {
        Slot::Key(key) => doc.increment(&parent, key, by),
        Slot::Element(i) => doc.increment(&parent, i, by),
        Slot::Append(_) => return Err(path_error(path, "nothing there")),
    }
    .map_err(automerge_error)
}

/// Deletes the value at `path` (a map entry or a list element).
pub fn delete(doc: &mut AutoCommit, path: &[Segment]) -> Result<(), EditError> {
    let (parent, slot) = slot(doc, path)?;
    match slot {
        Slot::Key(key) => {
            if doc
                .get(&parent, key.as_str())
                .map_err(automerge_error)?
                .is_none()
            {
                return Err(path_error(path, "nothing there"));
            }
            doc.delete(&parent, key)
        }
        Slot::Element(i) => doc.delete(&parent, i),
        Slot::Append(_) => return Err(path_error(path, "nothing there")),
    }
    .map_err(automerge_error)
}

/// The document as JSON: maps as objects, lists as arrays, texts as strings, counters
/// as numbers, bytes as arrays of numbers.
pub fn to_json(doc: &AutoCommit) -> serde_json::Value {
    serde_json::to_value(automerge::AutoSerde::from(doc)).unwrap_or(serde_json::Value::Null)
}

/// The document as JSON as it was at `heads` (all of them in the document).
pub fn to_json_at(
    doc: &mut AutoCommit,
    heads: &[automerge::ChangeHash],
) -> Result<serde_json::Value, EditError> {
    known_heads(doc, heads)?;
    let past = doc.fork_at(heads).map_err(automerge_error)?;
    Ok(to_json(&past))
}

/// Heads as hex strings (64 digits each, surrounding spaces allowed) parsed.
pub fn parse_heads(heads: &[String]) -> Result<Vec<automerge::ChangeHash>, EditError> {
    heads
        .iter()
        .map(|h| {
            h.trim().parse().map_err(|_| {
                EditError::Value(format!("{h:?} is not a change hash (64 hex digits)"))
            })
        })
        .collect()
}

/// Refuses heads the document does not hold.
fn known_heads(doc: &mut AutoCommit, heads: &[automerge::ChangeHash]) -> Result<(), EditError> {
    match heads.iter().find(|h| doc.get_change_by_hash(h).is_none()) {
        Some(unknown) => Err(EditError::Value(format!(
            "head {unknown} is not in this document"
        ))),
        None => Ok(()),
    }
}

/// One change of a document's history.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HistoryEntry {
    /// The change's hash (hex).
    pub hash: String,
    /// Its actor (hex): one per writing device or session; the relay binds each to a user.
    pub actor: String,
    /// Its sequence number under that actor, from 1.
    pub seq: u64,
    /// Its own timestamp, seconds since the Unix epoch, from its author's clock
    /// (0 when the author set none).
    pub time: i64,
    /// Its commit message, if any.
    pub message: Option<String>,
    /// The changes it depends on (hex).
    pub deps: Vec<String>,
    /// The document's heads just after this change, in the order of this history: what
    /// to pass to `to_json_at` or `restore` to see or bring back that state.
    pub heads: Vec<String>,
}

/// Every change of the document in causal order (a change after its dependencies).
pub fn history(doc: &mut AutoCommit) -> Vec<HistoryEntry> {
    let mut heads: Vec<automerge::ChangeHash> = Vec::new();
    doc.get_changes(&[])
        .iter()
        .map(|change| {
            let hash = change.hash();
            heads.retain(|h| !change.deps().contains(h));
            heads.push(hash);
            heads.sort();
            HistoryEntry {
                hash: hash.to_string(),
                actor: change.actor_id().to_hex_string(),
                seq: change.seq(),
                time: change.timestamp(),
                message: change.message().map(str::to_owned),
                deps: change.deps().iter().map(ToString::to_string).collect(),
                heads: heads.iter().map(ToString::to_string).collect(),
            }
        })
        .collect()
}

/// Makes the document's content equal to what it was at `heads`, with new operations on
/// top of the current state (one forward edit that collaborators and offline replicas
/// merge like any other; nothing is rewritten). Texts are restored by a diff, so concurrent
/// edits elsewhere in a text survive the merge.
pub fn restore(doc: &mut AutoCommit, heads: &[automerge::ChangeHash]) -> Result<(), EditError> {
    if heads.is_empty() {
        return Err(EditError::Value(
            "restore needs the heads of a past state".into(),
        ));
    }
    known_heads(doc, heads)?;
    let past = doc
        .hydrate(automerge::ROOT, Some(heads))
        .map_err(automerge_error)?;
    doc.update_object(automerge::ROOT, &past)
        .map_err(|e| EditError::Automerge(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path(items: &[serde_json::Value]) -> Vec<Segment> {
        items
            .iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Segment::Key(s.clone()),
                serde_json::Value::Number(n) => Segment::Index(n.as_u64().unwrap()),
                _ => panic!("bad path"),
            })
            .collect()
    }

    #[test]
    fn put_creates_missing_maps_and_nests_values() {
        let mut doc = AutoCommit::new();
        put(
            &mut doc,
            &path(&[json!("a"), json!("b")]),
            &json!({"n": 1, "f": 1.5, "t": true, "z": null, "s": "x", "l": [1, [2], {"k": "v"}]}),
        )
        .unwrap();
        assert_eq!(
            to_json(&doc),
            json!({"a": {"b": {"n": 1, "f": 1.5, "t": true, "z": null, "s": "x", "l": [1, [2], {"k": "v"}]}}})
        );
        // Overwrite an element, append one, refuse a gap.
        put(
            &mut doc,
            &path(&[json!("a"), json!("b"), json!("l"), json!(0)]),
            &json!("first"),
        )
        .unwrap();
        put(
            &mut doc,
            &path(&[json!("a"), json!("b"), json!("l"), json!(3)]),
            &json!(4),
        )
        .unwrap();
        let gap = put(
            &mut doc,
            &path(&[json!("a"), json!("b"), json!("l"), json!(9)]),
            &json!(4),
        );
        assert!(matches!(gap, Err(EditError::Path { .. })), "{gap:?}");
        assert_eq!(
            to_json(&doc)["a"]["b"]["l"],
            json!(["first", [2], {"k": "v"}, 4])
        );
    }

    #[test]
    fn a_scalar_in_the_way_is_an_error_not_overwritten() {
        let mut doc = AutoCommit::new();
        put(&mut doc, &[Segment::from("a")], &json!(1)).unwrap();
        let err = put(
            &mut doc,
            &[Segment::from("a"), Segment::from("b")],
            &json!(2),
        )
        .unwrap_err();
        assert_eq!(
            err,
            EditError::Path {
                path: "/a".into(),
                reason: "a value, not a map or a list, is in the way".into()
            }
        );
        assert_eq!(to_json(&doc), json!({"a": 1}));
        assert!(matches!(
            put(&mut doc, &[], &json!(1)),
            Err(EditError::Path { .. })
        ));
        assert!(matches!(
            put(&mut doc, &[Segment::Index(0)], &json!(1)),
            Err(EditError::Path { .. })
        ));
    }

    #[test]
    fn text_splices_count_code_points() {
        let mut doc = AutoCommit::new();
        let p = [Segment::from("t")];
        put_text(&mut doc, &p, "héllo 🌍").unwrap();
        splice_text(&mut doc, &p, 7, 0, "!").unwrap();
        splice_text(&mut doc, &p, 0, 1, "H").unwrap();
        assert_eq!(to_json(&doc), json!({"t": "Héllo 🌍!"}));
        assert!(splice_text(&mut doc, &p, 8, 0, "x").is_ok());
        assert!(matches!(
            splice_text(&mut doc, &p, 11, 0, "x"),
            Err(EditError::Path { .. })
        ));
        assert!(matches!(
            splice_text(&mut doc, &p, 5, 9, ""),
            Err(EditError::Path { .. })
        ));
        put(&mut doc, &[Segment::from("s")], &json!("plain")).unwrap();
        assert!(matches!(
            splice_text(&mut doc, &[Segment::from("s")], 0, 0, "x"),
            Err(EditError::Path { .. })
        ));
    }

    #[test]
    fn counters_delete_and_depth() {
        let mut doc = AutoCommit::new();
        put_counter(&mut doc, &[Segment::from("c")], 5).unwrap();
        increment(&mut doc, &[Segment::from("c")], -2).unwrap();
        put(&mut doc, &[Segment::from("n")], &json!(1)).unwrap();
        assert!(matches!(
            increment(&mut doc, &[Segment::from("n")], 1),
            Err(EditError::Path { .. })
        ));
        assert_eq!(to_json(&doc), json!({"c": 3, "n": 1}));
        delete(&mut doc, &[Segment::from("n")]).unwrap();
        assert!(matches!(
            delete(&mut doc, &[Segment::from("n")]),
            Err(EditError::Path { .. })
        ));
        assert_eq!(to_json(&doc), json!({"c": 3}));
        let mut deep = json!(1);
        for _ in 0..=MAX_VALUE_DEPTH {
            deep = json!([deep]);
        }
        assert!(matches!(
            put(&mut doc, &[Segment::from("d")], &deep),
            Err(EditError::Value(_))
        ));
        assert_eq!(to_json(&doc), json!({"c": 3}));
    }

    #[test]
    fn history_lists_every_change_with_the_heads_after_it_and_restore_brings_a_state_back() {
        let mut doc = AutoCommit::new();
        put(&mut doc, &[Segment::from("title")], &json!("first")).unwrap();
        put_text(&mut doc, &[Segment::from("body")], "hello world").unwrap();
        doc.commit();
        let mut other = doc.fork();
        put(&mut other, &[Segment::from("title")], &json!("second")).unwrap();
        splice_text(&mut other, &[Segment::from("body")], 0, 5, "bye").unwrap();
        delete(&mut other, &[Segment::from("body")]).ok();
        put(&mut other, &[Segment::from("extra")], &json!({"a": [1]})).unwrap();
        other.commit();
        doc.merge(&mut other).unwrap();
        let entries = history(&mut doc);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].seq, 1);
        assert!(entries[0].deps.is_empty());
        assert_eq!(entries[1].deps, vec![entries[0].hash.clone()]);
        assert_eq!(entries[1].heads, vec![entries[1].hash.clone()]);
        let first: Vec<automerge::ChangeHash> = entries[0]
            .heads
            .iter()
            .map(|h| h.parse().unwrap())
            .collect();
        let before = to_json(&doc);
        assert_eq!(before, json!({"title": "second", "extra": {"a": [1]}}));
        restore(&mut doc, &first).unwrap();
        doc.commit();
        assert_eq!(
            to_json(&doc),
            json!({"title": "first", "body": "hello world"})
        );
        // A forward change: the history grew and still holds the restored-over state.
        assert_eq!(history(&mut doc).len(), 3);
        let latest: Vec<automerge::ChangeHash> = entries[1]
            .heads
            .iter()
            .map(|h| h.parse().unwrap())
            .collect();
        assert_eq!(to_json_at(&mut doc, &latest).unwrap(), before);
        assert!(matches!(restore(&mut doc, &[]), Err(EditError::Value(_))));
        let unknown = automerge::ChangeHash([7; 32]);
        assert!(matches!(
            restore(&mut doc, &[unknown]),
            Err(EditError::Value(_))
        ));
    }
}
