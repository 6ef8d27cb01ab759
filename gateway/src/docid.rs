//! automerge-repo document ids and Meridian document ids.
//!
//! An automerge-repo document id is the bs58check encoding of 16 random bytes (a UUID),
//! and its URL is `automerge:<id>`. Its Meridian document id is the same text under the
//! fixed prefix [`PREFIX`]: `automerge:4NMNnkMhL8jXrdJ9jamS58PAVdXu` is the Meridian
//! document `am/4NMNnkMhL8jXrdJ9jamS58PAVdXu`, and back. A token covers every
//! automerge-repo document with the prefix scope `am/`, or some of them exactly.

use meridian_protocol::DocId;

/// The prefix of every Meridian document id that maps an automerge-repo document.
pub const PREFIX: &str = "am/";
/// The scheme of an automerge-repo URL.
pub const URL_SCHEME: &str = "automerge:";

/// Why a text is not an automerge-repo document id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocIdError {
    /// Not bs58check, or not 16 bytes once decoded.
    #[error("{0:?} is not an automerge-repo document id (bs58check of 16 bytes)")]
    Invalid(String),
}

fn invalid(text: &str) -> DocIdError {
    let mut shown = text.to_string();
    shown.truncate(64);
    DocIdError::Invalid(shown)
}

/// The Meridian document id of an automerge-repo document id (checked).
pub fn to_doc_id(document_id: &str) -> Result<DocId, DocIdError> {
    // 16 bytes and a 4-byte checksum take at most 28 base58 digits.
    if document_id.len() > 32 {
        return Err(invalid(document_id));
    }
    let bytes = bs58::decode(document_id)
        .with_check(None)
        .into_vec()
        .map_err(|_| invalid(document_id))?;
    if bytes.len() != 16 {
        return Err(invalid(document_id));
    }
    DocId::new(format!("{PREFIX}{document_id}")).map_err(|_| invalid(document_id))
}

/// The automerge-repo document id of a Meridian document id, if it maps one.
pub fn from_doc_id(doc: &DocId) -> Option<&str> {
    let id = doc.as_str().strip_prefix(PREFIX)?;
    to_doc_id(id).ok().map(|_| id)
}

/// The Meridian document id named by `text`: an `automerge:` URL, an automerge-repo
/// document id, or already a Meridian document id under [`PREFIX`].
pub fn parse(text: &str) -> Result<DocId, DocIdError> {
    let id = text
        .strip_prefix(URL_SCHEME)
        .or_else(|| text.strip_prefix(PREFIX))
        .unwrap_or(text);
    to_doc_id(id)
}

/// The `automerge:` URL of an automerge-repo document id made of `bytes`.
pub fn url_of(bytes: [u8; 16]) -> String {
    format!(
        "{URL_SCHEME}{}",
        bs58::encode(bytes).with_check().into_string()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_map_both_ways_and_bad_ones_are_refused() {
        let url = url_of([7; 16]);
        let id = url.strip_prefix(URL_SCHEME).unwrap();
        let doc = parse(&url).unwrap();
        assert_eq!(doc.as_str(), format!("am/{id}"));
        assert_eq!(from_doc_id(&doc), Some(id));
        assert_eq!(parse(id).unwrap(), doc);
        assert_eq!(parse(doc.as_str()).unwrap(), doc);
        // A changed digit fails the checksum; other lengths and alphabets fail too.
        let mut broken = id.to_string();
        let last = broken.pop().unwrap();
        broken.push(if last == '2' { '3' } else { '2' });
        assert!(to_doc_id(&broken).is_err());
        assert!(to_doc_id(&bs58::encode([1u8; 8]).with_check().into_string()).is_err());
        assert!(to_doc_id("0OIl").is_err());
        assert!(to_doc_id(&"1".repeat(1000)).is_err());
        assert_eq!(from_doc_id(&DocId::new("notes/1").unwrap()), None);
    }
}
