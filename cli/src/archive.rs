//! `meridian export` and `meridian import`: a tenant's documents in a portable archive,
//! read from and written to the durable tier a relay config names.
//!
//! The archive is one CBOR map (`format` = `meridian-export/1`): the jurisdiction and
//! tenant it came from, when it was made, and per document its id, heads, change count,
//! the user each actor wrote as, and the document in Automerge's save format (which any
//! Automerge implementation loads).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use automerge::Automerge;
use bytes::Bytes;
use meridian_protocol::{ChangeHash, DocId, TenantId, UserId};
use meridian_relay::engine::{DocKey, StoredChange};
use serde::{Deserialize, Serialize};

/// The archive format this build writes and reads.
const FORMAT: &str = "meridian-export/1";
/// Changes per durable-tier write on import.
const IMPORT_BATCH: usize = 500;
/// The user that imported changes of an actor the archive names no user for write as.
const UNKNOWN_USER: &str = "imported";

#[derive(Debug, Serialize, Deserialize)]
struct Archive {
    format: String,
    jurisdiction: String,
    tenant: String,
    exported_at: String,
    /// For a point-in-time export: the time its documents are as of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at_time: Option<String>,
    documents: Vec<Document>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Document {
    doc: String,
    heads: Vec<String>,
    changes: u64,
    /// Actor (hex) → the user its changes were written by.
    users: Vec<(String, String)>,
    #[serde(with = "serde_bytes")]
    save: Vec<u8>,
}

/// `meridian export`.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// A relay config of the jurisdiction (its `[durable]` section and `[[tenants]]`).
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    tenant: String,
    /// Only these documents (repeatable); default: every document of the tenant.
    #[arg(long)]
    doc: Vec<String>,
    /// Where to write the archive.
    #[arg(long)]
    out: PathBuf,
    /// The documents as the durable tier held them at this time (RFC 3339, e.g.
    /// `2026-12-06T09:30:00Z`): changes written later are left out, and so are changes
    /// whose dependencies were (counted in the report); documents with nothing written
    /// by then are skipped.
    #[arg(long)]
    at_time: Option<String>,
}

/// `meridian import`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// A relay config of the jurisdiction to import into.
    #[arg(long)]
    config: PathBuf,
    /// The archive.
    file: PathBuf,
    /// The tenant to import into (default: the one the archive came from); it must be a
    /// tenant of this config, and so of the archive's jurisdiction.
    #[arg(long)]
    tenant: Option<String>,
}

pub(crate) fn relay_config(path: &Path) -> Result<meridian_relay::config::RelayConfig> {
    let file = crate::config::RelayFile::read(path)?;
    let base = path.parent().map(PathBuf::from).unwrap_or_default();
    file.into_config(&base)
}

pub async fn export(args: ExportArgs) -> Result<()> {
    let config = relay_config(&args.config)?;
    let tenant = TenantId::new(&args.tenant)?;
    if !config.tenants.iter().any(|t| t.tenant == tenant) {
        bail!("tenant {tenant} is not in {}", args.config.display());
    }
    let until_ms = args
        .at_time
        .as_deref()
        .map(|text| rfc3339_ms("--at-time", text))
        .transpose()?;
    let store = meridian_relay::node::open_store(&config).await?;
    let docs = if args.doc.is_empty() {
        store.documents(&tenant).await?
    } else {
        args.doc
            .iter()
            .map(|d| DocId::new(d).with_context(|| format!("document id {d:?}")))
            .collect::<Result<_>>()?
    };
    let mut documents = Vec::with_capacity(docs.len());
    let mut left_out = 0;
    for doc in docs {
        let key = DocKey {
            tenant: tenant.clone(),
            doc: doc.clone(),
        };
        let stored = match until_ms {
            Some(until) => store.load_written_until(&key, until).await?,
            None => store.load_all_changes(&key).await?,
        };
        if stored.is_empty() {
            if until_ms.is_some() {
                println!("skipped {doc}: nothing of it was written by then");
                continue;
            }
            bail!("document {doc} has no stored changes in tenant {tenant}");
        }
        let (document, missing) = archive_doc(&doc, &stored, until_ms.is_some())?;
        left_out += missing;
        documents.push(document);
    }
    if left_out > 0 {
        println!(
            "left out {left_out} change(s) written by then whose dependencies were written later"
        );
    }
    let archive = Archive {
        format: FORMAT.into(),
        jurisdiction: config.jurisdiction.clone(),
        tenant: tenant.to_string(),
        exported_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)?,
        at_time: args.at_time.clone(),
        documents,
    };
    let mut bytes = Vec::new();
    ciborium::into_writer(&archive, &mut bytes).context("encoding the archive")?;
    write_atomically(&args.out, &bytes)?;
    println!(
        "exported {} document(s) of tenant {tenant} to {} ({} bytes)",
        archive.documents.len(),
        args.out.display(),
        bytes.len()
    );
    Ok(())
}

/// One document's stored changes as an archive entry, and how many were left out for
/// want of their dependencies (refused unless `partial`: a point-in-time export).
fn archive_doc(doc: &DocId, stored: &[StoredChange], partial: bool) -> Result<(Document, usize)> {
    let mut users: HashMap<String, String> = HashMap::new();
    let mut changes = Vec::with_capacity(stored.len());
    for change in stored {
        let parsed = automerge::Change::try_from(&change.bytes[..])
            .with_context(|| format!("a stored change of {doc} does not parse"))?;
        users
            .entry(parsed.actor_id().to_hex_string())
            .or_insert_with(|| change.user.to_string());
        changes.push(parsed);
    }
    let count = changes
        .iter()
        .map(automerge::Change::hash)
        .collect::<std::collections::HashSet<_>>()
        .len();
    let mut loaded = Automerge::new();
    loaded
        .apply_changes(changes)
        .with_context(|| format!("the stored changes of {doc} do not apply"))?;
    // A change whose dependencies are not stored waits unapplied: refuse to write an
    // archive that would silently leave it out.
    let applied = loaded.get_changes(&[]).len();
    if applied != count && !partial {
        bail!(
            "document {doc}: {} of its {count} stored changes miss dependencies",
            count - applied
        );
    }
    let mut users: Vec<(String, String)> = users.into_iter().collect();
    users.sort();
    let document = Document {
        doc: doc.to_string(),
        heads: loaded.get_heads().iter().map(ToString::to_string).collect(),
        changes: applied as u64,
        users,
        save: loaded.save(),
    };
    Ok((document, count - applied))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))
}

pub async fn import(args: ImportArgs) -> Result<()> {
    let config = relay_config(&args.config)?;
    let file = std::fs::File::open(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let archive: Archive = ciborium::from_reader(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not a Meridian export", args.file.display()))?;
    if archive.format != FORMAT {
        bail!(
            "archive format {:?}; this build reads {FORMAT}",
            archive.format
        );
    }
    if archive.jurisdiction != config.jurisdiction {
        bail!(
            "the archive is from jurisdiction {}, {} serves {}: documents never leave their jurisdiction",
            archive.jurisdiction,
            args.config.display(),
            config.jurisdiction
        );
    }
    let tenant = TenantId::new(args.tenant.as_deref().unwrap_or(&archive.tenant))?;
    if !config.tenants.iter().any(|t| t.tenant == tenant) {
        bail!("tenant {tenant} is not in {}", args.config.display());
    }
    let store = meridian_relay::node::open_store(&config).await?;
    let unknown = UserId::new(UNKNOWN_USER)?;
    let tombstones = store.tombstones().await?;
    let mut total = 0;
    let mut imported = 0;
    for entry in &archive.documents {
        let doc = DocId::new(&entry.doc).with_context(|| format!("document id {:?}", entry.doc))?;
        let purged = DocKey {
            tenant: tenant.clone(),
            doc: doc.clone(),
        };
        if tombstones.iter().any(|t| t.covers(&purged)) {
            // The durable tier would leave every change out: say so, write nothing.
            println!("skipped {doc}: it was purged from tenant {tenant}");
            continue;
        }
        let loaded = Automerge::load(&entry.save)
            .with_context(|| format!("the saved document {doc} does not load"))?;
        let heads: Vec<String> = loaded.get_heads().iter().map(ToString::to_string).collect();
        if heads != entry.heads {
            bail!("document {doc}: the saved document's heads differ from the archive's");
        }
        let users: HashMap<&str, UserId> = entry
            .users
            .iter()
            .map(|(actor, user)| Ok((actor.as_str(), UserId::new(user)?)))
            .collect::<Result<_>>()?;
        let key = DocKey {
            tenant: tenant.clone(),
            doc: doc.clone(),
        };
        let stored: Vec<(DocKey, StoredChange)> = loaded
            .get_changes(&[])
            .iter()
            .map(|change| {
                let user = users
                    .get(change.actor_id().to_hex_string().as_str())
                    .cloned()
                    .unwrap_or_else(|| unknown.clone());
                (
                    key.clone(),
                    StoredChange {
                        hash: ChangeHash(change.hash().0),
                        bytes: Bytes::copy_from_slice(change.raw_bytes()),
                        user,
                    },
                )
            })
            .collect();
        for batch in stored.chunks(IMPORT_BATCH) {
            store.write_changes(batch).await?;
        }
        total += stored.len();
        imported += 1;
    }
    println!("imported {imported} document(s), {total} change(s), into tenant {tenant}");
    Ok(())
}

/// An RFC 3339 time given to `flag`, as milliseconds since the Unix epoch.
pub fn rfc3339_ms(flag: &str, text: &str) -> Result<u64> {
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("{flag} {text:?} is not an RFC 3339 time"))?;
    let ms = at.unix_timestamp_nanos() / 1_000_000;
    u64::try_from(ms).with_context(|| format!("{flag} {text:?} is before 1970"))
}
