//! Memory: every hot document is accounted in bytes, and documents nobody uses are evicted
//! in least-recently-used order when the node or a tenant holds more than its budget.
//!
//! A document's bytes are an estimate of what it holds: its changes' bytes, a fixed cost
//! per change for the graph's indexes ([`CHANGE_OVERHEAD_BYTES`]), its orphans, presence
//! and snapshot, and a fixed cost per document ([`DOC_OVERHEAD_BYTES`]). It is taken again
//! after each operation that grows or shrinks the document.
//!
//! Only an *idle* document can be evicted: no subscribers, nothing unflushed, no orphans,
//! loaded, not handing off. It reloads on demand. The budgets:
//! - `hot_bytes_per_tenant_max`: a tenant over it has its own idle documents evicted,
//!   least recently used first; while it stays over, its new loads are refused
//!   (`overloaded`, retryable). One tenant cannot take the others' memory.
//! - `hot_bytes_max`: while the node is over it, idle documents are evicted from the
//!   tenant that holds the most bytes first, least recently used first within it.
//! - `hot_bytes_hard_max`: while the node is over it (every document in use), new loads are
//!   refused for everyone.
//!
//! Recency is one LRU list per tenant; an eviction pass looks at most at
//! [`EVICT_SCAN_MAX`] documents of a tenant, so its work is bounded even when every
//! document is in use.

use std::collections::HashMap;

use bytes::Bytes;
use meridian_protocol::{DocId, TenantId};

use super::{DocKey, DocState, Engine, adjust};

/// What a hot document costs beyond its changes, as counted against the budgets (its
/// entry, maps and buckets).
pub const DOC_OVERHEAD_BYTES: usize = 1024;
/// What one change costs in the graph beyond its bytes (its entry, hash index, actor
/// chain slot and allocation).
pub const CHANGE_OVERHEAD_BYTES: usize = 192;
/// Documents of one tenant looked at, at most, by one eviction pass.
pub const EVICT_SCAN_MAX: usize = 256;

/// Each tenant's hot documents, least recently used last.
#[derive(Default)]
pub(super) struct Recency {
    by_tenant: HashMap<TenantId, lru::LruCache<DocId, ()>>,
}

impl Recency {
    /// Marks a document used now.
    pub(super) fn touch(&mut self, key: &DocKey) {
        self.by_tenant
            .entry(key.tenant.clone())
            .or_insert_with(lru::LruCache::unbounded)
            .put(key.doc.clone(), ());
    }

    /// Forgets a document that left memory.
    pub(super) fn remove(&mut self, key: &DocKey) {
        if let Some(list) = self.by_tenant.get_mut(&key.tenant) {
            list.pop(&key.doc);
            if list.is_empty() {
                self.by_tenant.remove(&key.tenant);
            }
        }
    }

    /// A tenant's documents, most recently used first.
    pub(super) fn docs_of(&self, tenant: &TenantId) -> impl Iterator<Item = &DocId> {
        self.by_tenant
            .get(tenant)
            .into_iter()
            .flat_map(|list| list.iter().map(|(doc, ())| doc))
    }

    /// A tenant's documents, least recently used first, at most [`EVICT_SCAN_MAX`].
    fn oldest(&self, tenant: &TenantId) -> Vec<DocId> {
        self.by_tenant.get(tenant).map_or_else(Vec::new, |list| {
            list.iter()
                .rev()
                .take(EVICT_SCAN_MAX)
                .map(|(doc, ())| doc.clone())
                .collect()
        })
    }
}

impl Engine {
    /// Bytes the hot documents hold, as accounted (see the module docs).
    pub fn hot_bytes(&self) -> usize {
        self.hot_bytes
    }

    /// Takes a document's bytes again after it grew or shrank.
    pub(super) fn reaccount(&mut self, key: &DocKey) {
        let Some(doc) = self.docs.get_mut(key) else {
            return;
        };
        let presence: usize = doc.presence.values().map(Bytes::len).sum();
        let bytes = DOC_OVERHEAD_BYTES
            + doc.graph.bytes()
            + doc.graph.len() * CHANGE_OVERHEAD_BYTES
            + doc.orphan_bytes
            + presence
            + doc.snapshot.as_ref().map_or(0, |s| s.bytes.len());
        let delta = bytes as isize - doc.accounted as isize;
        doc.accounted = bytes;
        self.hot_bytes = self.hot_bytes.saturating_add_signed(delta);
        adjust(
            &mut self.usage.hot_bytes_by_tenant,
            key.tenant.clone(),
            delta,
        );
    }

    /// Removes a document from memory (whatever its state), with its accounting.
    pub(super) fn remove_doc(&mut self, key: &DocKey) -> Option<super::Doc> {
        let doc = self.docs.remove(key)?;
        self.recency.remove(key);
        self.hot_bytes = self.hot_bytes.saturating_sub(doc.accounted);
        adjust(
            &mut self.usage.hot_bytes_by_tenant,
            key.tenant.clone(),
            -(doc.accounted as isize),
        );
        adjust(&mut self.usage.docs_by_tenant, key.tenant.clone(), -1);
        let presence: usize = doc.presence.values().map(Bytes::len).sum();
        adjust(
            &mut self.usage.presence_bytes_by_tenant,
            key.tenant.clone(),
            -(presence as isize),
        );
        Some(doc)
    }

    fn tenant_bytes(&self, tenant: &TenantId) -> usize {
        self.usage
            .hot_bytes_by_tenant
            .get(tenant)
            .copied()
            .unwrap_or(0)
    }

    /// Whether a document may leave memory now (it reloads on demand).
    fn idle(&self, key: &DocKey) -> bool {
        self.docs.get(key).is_some_and(|d| {
            d.subscribers.is_empty()
                && d.awaiting_history.is_empty()
                && d.unflushed == 0
                && d.orphans.is_empty()
                && d.handoff.is_none()
                && !d.compacting
                && matches!(d.state, DocState::Ready)
        })
    }

    /// Evicts a tenant's idle documents, least recently used first, until `enough` says
    /// so or none is left among the oldest [`EVICT_SCAN_MAX`]. A document found in use is
    /// marked used now, so that documents held open for long (read-only subscribers) do
    /// not fill the window that later passes look at. Returns how many went.
    fn evict_tenant(&mut self, tenant: &TenantId, enough: impl Fn(&Engine) -> bool) -> usize {
        let mut evicted = 0;
        for doc in self.recency.oldest(tenant) {
            if enough(self) {
                break;
            }
            let key = DocKey {
                tenant: tenant.clone(),
                doc,
            };
            if !self.idle(&key) {
                self.recency.touch(&key);
            } else if self.remove_doc(&key).is_some() {
                self.stats.evictions += 1;
                evicted += 1;
            }
        }
        evicted
    }

    /// Brings the node and every tenant under their budgets as far as idle documents
    /// allow.
    pub(super) fn make_room(&mut self) {
        let share = self.config.hot_bytes_per_tenant_max;
        let mut over: Vec<TenantId> = self
            .usage
            .hot_bytes_by_tenant
            .iter()
            .filter(|(_, bytes)| **bytes > share)
            .map(|(tenant, _)| tenant.clone())
            .collect();
        over.sort();
        for tenant in over {
            let t = tenant.clone();
            self.evict_tenant(&tenant, |e| e.tenant_bytes(&t) <= share);
        }
        let budget = self.config.hot_bytes_max;
        if self.hot_bytes <= budget {
            return;
        }
        // The tenants holding the most bytes give first (ties by tenant id, so that the
        // order repeats); one pass over them, each at most one scan window.
        let mut tenants: Vec<(usize, TenantId)> = self
            .usage
            .hot_bytes_by_tenant
            .iter()
            .map(|(tenant, bytes)| (*bytes, tenant.clone()))
            .collect();
        tenants.sort_by(|a, b| b.cmp(a));
        for (_, tenant) in tenants {
            if self.hot_bytes <= budget {
                break;
            }
            self.evict_tenant(&tenant, |e| e.hot_bytes <= budget);
        }
    }

    /// Whether a document of `tenant` may be loaded now; makes room first. `Err` says why
    /// not (answered as `overloaded`).
    pub(super) fn admit_load(&mut self, tenant: &TenantId) -> Result<(), &'static str> {
        let share = self.config.hot_bytes_per_tenant_max;
        if self.tenant_bytes(tenant) >= share {
            let t = tenant.clone();
            self.evict_tenant(tenant, |e| e.tenant_bytes(&t) < share);
        }
        if self.hot_docs_of(tenant) >= self.config.hot_docs_per_tenant_max {
            let (t, max) = (tenant.clone(), self.config.hot_docs_per_tenant_max);
            self.evict_tenant(tenant, |e| e.hot_docs_of(&t) < max);
        }
        if self.hot_bytes >= self.config.hot_bytes_hard_max {
            self.make_room();
        }
        if self.tenant_bytes(tenant) >= share {
            self.stats.memory_refusals += 1;
            return Err("this tenant's documents fill its share of this node's memory; retry");
        }
        if self.hot_docs_of(tenant) >= self.config.hot_docs_per_tenant_max {
            self.stats.memory_refusals += 1;
            return Err("too many documents in memory for this tenant on this node; retry");
        }
        if self.hot_bytes >= self.config.hot_bytes_hard_max {
            self.stats.memory_refusals += 1;
            return Err("documents in use fill this node's memory; retry");
        }
        Ok(())
    }

    fn hot_docs_of(&self, tenant: &TenantId) -> usize {
        self.usage.docs_by_tenant.get(tenant).copied().unwrap_or(0)
    }
}
