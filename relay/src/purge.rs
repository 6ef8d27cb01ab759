//! Purges: an operator's removal of a document, or of every document of a tenant, from
//! the whole jurisdiction, and the tombstones that keep it removed.
//!
//! A purge first stores a [`Tombstone`] in the durable tier, then deletes what the
//! durable tier holds of the document (change items, snapshots, and on AWS every version
//! of every S3 object), and records an [`AuditRecord`]. From the moment the tombstone is
//! stored:
//!
//! - every write to the durable tier leaves out the changes it covers (flushes, a flush
//!   queue replayed after a restart, an import), counted as refused;
//! - every relay node reads the tombstones (polled like revocations), drops the document
//!   from memory and from its sled cache, and answers `gone` to its subscribers and to
//!   every later subscribe or change, so an offline client that comes back with pending
//!   changes is refused rather than resurrecting it;
//! - the change feed drops what it holds of the document and delivers a purge event.
//!
//! A write that read the tombstones just before the purge stored one, or an item that
//! another region replicates after the delete, can still land: the **second sweep**
//! deletes again once `sweep_after_ms` has passed (the replication margin after the
//! purge). Every relay node that sees a tombstone due for its sweep runs it; the one that
//! marks the tombstone swept (`DurableStore::claim_sweep`) writes the audit record.
//!
//! A tenant's tombstone covers every document of the tenant, present and future: a
//! tenant purge retires the tenant id (a tenant that comes back needs a new one).
//! Tombstones are never forgotten.

use std::collections::HashSet;

use meridian_protocol::{DocId, TenantId};
use serde::{Deserialize, Serialize};

use crate::engine::{DocKey, Gone};

/// What a purge removes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Purged {
    /// One document of the tenant.
    Doc(String),
    /// Every document of the tenant.
    Tenant,
}

/// A purge as stored: what is gone, since when, who asked, and its second sweep.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tombstone {
    /// The tenant.
    pub tenant: String,
    /// What of it is gone.
    pub purged: Purged,
    /// When it was purged, milliseconds since the Unix epoch.
    pub purged_at_ms: u64,
    /// The operator identity that purged it.
    pub operator: String,
    /// When the second sweep is due (the purge plus the replication margin).
    pub sweep_after_ms: u64,
    /// Whether the second sweep ran.
    #[serde(default)]
    pub swept: bool,
}

impl Tombstone {
    /// A tombstone for a purge at `now_ms` whose second sweep is due `margin_ms` later.
    pub fn new(
        tenant: &TenantId,
        purged: Purged,
        operator: &str,
        now_ms: u64,
        margin_ms: u64,
    ) -> Self {
        Tombstone {
            tenant: tenant.to_string(),
            purged,
            purged_at_ms: now_ms,
            operator: operator.to_owned(),
            sweep_after_ms: now_ms.saturating_add(margin_ms),
            swept: false,
        }
    }

    /// The key it is stored under: one per document or tenant (purging again replaces
    /// it).
    pub fn key(&self) -> String {
        match &self.purged {
            Purged::Doc(doc) => format!("{}#d#{}", self.tenant, hex::encode(doc)),
            Purged::Tenant => format!("{}#t", self.tenant),
        }
    }

    /// Whether it covers `key`.
    pub fn covers(&self, key: &DocKey) -> bool {
        self.tenant == key.tenant.as_str()
            && match &self.purged {
                Purged::Doc(doc) => doc == key.doc.as_str(),
                Purged::Tenant => true,
            }
    }

    /// The tenant as an id (`None` for a stored tombstone with a bad one).
    pub fn tenant_id(&self) -> Option<TenantId> {
        TenantId::new(self.tenant.as_str()).ok()
    }

    /// The document as an id, for a document's tombstone.
    pub fn doc_id(&self) -> Option<DocId> {
        match &self.purged {
            Purged::Doc(doc) => DocId::new(doc.as_str()).ok(),
            Purged::Tenant => None,
        }
    }

    /// Whether its second sweep is due at `now_ms`.
    pub fn sweep_due(&self, now_ms: u64) -> bool {
        !self.swept && now_ms >= self.sweep_after_ms
    }
}

/// The documents and tenants the tombstones cover, for the engine's checks.
pub fn gone(tombstones: &[Tombstone]) -> Gone {
    let mut docs = HashSet::new();
    let mut tenants = HashSet::new();
    for tombstone in tombstones {
        let Some(tenant) = tombstone.tenant_id() else {
            continue;
        };
        match &tombstone.purged {
            Purged::Tenant => {
                tenants.insert(tenant);
            }
            Purged::Doc(_) => {
                if let Some(doc) = tombstone.doc_id() {
                    docs.insert(DocKey { tenant, doc });
                }
            }
        }
    }
    Gone::new(docs, tenants)
}

/// What one purge (or sweep) deleted from one store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReport {
    /// Documents it found anything of.
    pub documents: u64,
    /// Change items (or records) deleted.
    pub changes: u64,
    /// Snapshots deleted.
    pub snapshots: u64,
    /// Object versions deleted (S3), or feed log records blanked (local store).
    pub objects: u64,
    /// S3 objects this identity could not delete (a relay's sweep under Object Lock: the
    /// operator's purge command deletes them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub objects_left: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl PurgeReport {
    /// Adds another report's counts.
    pub fn add(&mut self, other: PurgeReport) {
        self.documents += other.documents;
        self.changes += other.changes;
        self.snapshots += other.snapshots;
        self.objects += other.objects;
        self.objects_left += other.objects_left;
    }
}

/// An operator action on stored data, kept in the durable tier: who did what, when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The operator identity.
    pub operator: String,
    /// What was done: `doc purge`, `tenant purge`, `sweep`.
    pub action: String,
    /// The tenant.
    pub tenant: String,
    /// The document, for a document's purge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<String>,
    /// What was deleted.
    pub report: PurgeReport,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, doc: &str) -> DocKey {
        DocKey {
            tenant: TenantId::new(tenant).unwrap(),
            doc: DocId::new(doc).unwrap(),
        }
    }

    #[test]
    fn a_document_tombstone_covers_that_document_and_a_tenant_tombstone_all_of_them() {
        let acme = TenantId::new("acme").unwrap();
        let doc = Tombstone::new(&acme, Purged::Doc("notes/1".into()), "ops", 1_000, 60_000);
        assert!(doc.covers(&key("acme", "notes/1")));
        assert!(!doc.covers(&key("acme", "notes/2")));
        assert!(!doc.covers(&key("other", "notes/1")));
        let tenant = Tombstone::new(&acme, Purged::Tenant, "ops", 1_000, 60_000);
        assert!(tenant.covers(&key("acme", "anything")));
        assert!(!tenant.covers(&key("acme2", "anything")));
        assert_ne!(doc.key(), tenant.key());

        let set = gone(std::slice::from_ref(&doc));
        assert!(set.covers(&key("acme", "notes/1")));
        assert!(!set.covers(&key("acme", "notes/2")));
        let set = gone(&[tenant]);
        assert!(set.covers(&key("acme", "notes/2")));

        assert!(!doc.sweep_due(60_999));
        assert!(doc.sweep_due(61_000));
        let swept = Tombstone { swept: true, ..doc };
        assert!(!swept.sweep_due(100_000));
    }
}
