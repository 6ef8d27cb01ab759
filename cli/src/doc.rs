//! `meridian doc set|splice|get|watch|history|restore`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use automerge::ReadDoc;
use automerge::transaction::Transactable;
use clap::Subcommand;
use meridian_client::edit::{self, Segment};
use meridian_client::{Client, DocEvent, DocHandle};

/// How long a one-shot command waits for the relay.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Subcommand)]
pub enum DocCommand {
    /// Set a string at KEY in the document's root map; returns once it is Durable.
    Set {
        #[arg(long)]
        config: PathBuf,
        doc: String,
        key: String,
        value: String,
    },
    /// Splice the collaborative text at KEY of the root map (created when missing):
    /// delete DELETE code points at INDEX and insert TEXT there; returns once Durable.
    Splice {
        #[arg(long)]
        config: PathBuf,
        doc: String,
        key: String,
        index: u64,
        delete: u64,
        text: String,
    },
    /// Print the document as JSON after catching up (DOC may be an automerge-repo URL,
    /// `automerge:<id>`, for the document `am/<id>`).
    Get {
        #[arg(long)]
        config: PathBuf,
        doc: String,
        /// Print the document as it was at these heads (hex, comma-separated), as
        /// `doc history` lists them.
        #[arg(long, value_delimiter = ',')]
        at: Vec<String>,
    },
    /// List the document's changes in causal order: time, hash, actor, sequence number
    /// and the heads just after each (what `get --at` and `restore --to` take).
    History {
        #[arg(long)]
        config: PathBuf,
        doc: String,
        /// One JSON array instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Make the document equal to its state at HEADS with one forward change (which
    /// collaborators and offline clients merge like any edit); returns once Durable and
    /// prints the new heads.
    Restore {
        #[arg(long)]
        config: PathBuf,
        doc: String,
        /// Heads of the state to bring back (hex, comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<String>,
    },
    /// Print one JSON line per remote update until interrupted.
    Watch {
        #[arg(long)]
        config: PathBuf,
        doc: String,
    },
    /// Operators: delete the document from every node's cache, every durable item and
    /// every snapshot (all object versions) of the jurisdiction, for good. A tombstone
    /// refuses it from then on (`gone`), a second sweep follows, and the audit log
    /// records who did it. Takes a *relay* config (its `[durable]` section).
    Purge(crate::purge::DocPurgeArgs),
}

pub async fn run(command: DocCommand) -> Result<()> {
    match command {
        DocCommand::Purge(args) => crate::purge::doc_purge(args).await,
        DocCommand::Set {
            config,
            doc,
            key,
            value,
        } => {
            let (client, handle) = open(&config, &doc).await?;
            handle.change(|d| d.put(automerge::ROOT, key.as_str(), value.as_str()))??;
            durable_then_close(client, &handle).await
        }
        DocCommand::Splice {
            config,
            doc,
            key,
            index,
            delete,
            text,
        } => {
            let (client, handle) = open(&config, &doc).await?;
            let path = [Segment::Key(key.clone())];
            handle.try_change(|d| {
                if matches!(d.get(automerge::ROOT, key.as_str()), Ok(None)) {
                    edit::put_text(d, &path, "")?;
                }
                edit::splice_text(d, &path, index, delete, &text)
            })??;
            durable_then_close(client, &handle).await
        }
        DocCommand::Get { config, doc, at } => {
            let (client, handle) = open(&config, &doc).await?;
            let value = if at.is_empty() {
                to_json(&handle)?
            } else {
                let heads = edit::parse_heads(&at)?;
                handle.try_change(|d| edit::to_json_at(d, &heads))??
            };
            println!("{}", serde_json::to_string_pretty(&value)?);
            client.close().await;
            Ok(())
        }
        DocCommand::History { config, doc, json } => {
            let (client, handle) = open(&config, &doc).await?;
            let history = handle.history();
            if json {
                println!("{}", serde_json::to_string_pretty(&history)?);
            } else {
                for entry in &history {
                    println!(
                        "{}  {}  actor {} seq {}  heads {}",
                        time_of(entry.time),
                        &entry.hash[..12],
                        &entry.actor[..entry.actor.len().min(12)],
                        entry.seq,
                        entry.heads.join(",")
                    );
                }
            }
            client.close().await;
            Ok(())
        }
        DocCommand::Restore { config, doc, to } => {
            let heads = edit::parse_heads(&to)?;
            let (client, handle) = open(&config, &doc).await?;
            handle.try_change(|d| edit::restore(d, &heads))??;
            durable_then_close(client, &handle).await
        }
        DocCommand::Watch { config, doc } => {
            let mut shutdown = crate::Shutdown::listen()?;
            let (client, handle) = open(&config, &doc).await?;
            let mut updates = handle.updates();
            print_line("synced", &handle)?;
            loop {
                tokio::select! {
                    event = updates.recv() => match event {
                        Ok(DocEvent::Remote { .. }) => print_line("update", &handle)?,
                        Ok(DocEvent::Error { code, message }) => eprintln!("relay error {code}: {message}"),
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => print_line("update", &handle)?,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    },
                    _ = shutdown.wait() => break,
                }
            }
            client.close().await;
            Ok(())
        }
    }
}

async fn open(config_path: &Path, doc: &str) -> Result<(Client, DocHandle)> {
    let client = Client::connect(crate::config::ClientFile::client_config(config_path)?).await?;
    // An automerge-repo URL (`automerge:<id>`) names the document `am/<id>`.
    let mapped;
    let doc = if doc.starts_with(meridian_gateway::docid::URL_SCHEME) {
        mapped = meridian_gateway::docid::parse(doc)?;
        mapped.as_str()
    } else {
        doc
    };
    let handle = client.open(doc).await?;
    within(handle.wait_synced(), "waiting for the catch-up").await?;
    Ok((client, handle))
}

/// Waits until the edits are Durable, prints the heads, and closes the client.
async fn durable_then_close(client: Client, handle: &DocHandle) -> Result<()> {
    within(
        handle.wait_durable(),
        "waiting for the change to become durable",
    )
    .await?;
    println!("{}", heads_hex(handle).join(" "));
    client.close().await;
    Ok(())
}

async fn within<T>(
    future: impl std::future::Future<Output = Result<T, meridian_client::ClientError>>,
    what: &str,
) -> Result<T> {
    Ok(tokio::time::timeout(COMMAND_TIMEOUT, future)
        .await
        .with_context(|| format!("timed out {what}"))??)
}

fn to_json(handle: &DocHandle) -> Result<serde_json::Value> {
    handle
        .read(|doc| serde_json::to_value(automerge::AutoSerde::from(doc)))
        .context("document is not JSON")
}

/// A change's own timestamp (seconds since the Unix epoch) as RFC 3339 (`-` when its
/// author set none).
fn time_of(seconds: i64) -> String {
    if seconds == 0 {
        return "-".into();
    }
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| seconds.to_string())
}

fn heads_hex(handle: &DocHandle) -> Vec<String> {
    handle.heads().iter().map(|h| h.to_hex()).collect()
}

fn print_line(event: &str, handle: &DocHandle) -> Result<()> {
    let line = serde_json::json!({
        "event": event,
        "doc": handle.id().as_str(),
        "heads": heads_hex(handle),
        "value": to_json(handle)?,
    });
    println!("{line}");
    Ok(())
}
