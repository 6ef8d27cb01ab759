//! `meridian cell status`: the cell's members and their states, as one node sees them;
//! `meridian cell list|drain|undrain` live in `placement.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::config::ClientFile;

#[derive(clap::Subcommand)]
pub enum CellCommand {
    /// List the cells of the directory: region, jurisdiction, state (active or
    /// draining), health as a router sees it, and tenants placed.
    List(crate::placement::ListArgs),
    /// Drain a cell: routers move its tenants to other cells of their jurisdiction.
    Drain {
        cell: String,
        /// A config file with a [control] section (router.toml or client.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Take a cell out of drain.
    Undrain {
        cell: String,
        /// A config file with a [control] section (router.toml or client.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Print every member of the cell with its state (alive, suspect, down).
    Status {
        /// A client.toml that lists the cell's nodes with their admin addresses.
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: CellCommand) -> Result<()> {
    match command {
        CellCommand::Status { config, json } => status(config, json).await,
        CellCommand::List(args) => crate::placement::list(args).await,
        CellCommand::Drain { cell, config } => {
            crate::placement::set_draining(&config, &cell, true).await
        }
        CellCommand::Undrain { cell, config } => {
            crate::placement::set_draining(&config, &cell, false).await
        }
    }
}

async fn status(path: PathBuf, json: bool) -> Result<()> {
    let file = ClientFile::read(&path)?;
    let admins: Vec<(String, String)> = file
        .nodes
        .iter()
        .filter_map(|n| n.admin.clone().map(|a| (n.id.clone(), a)))
        .collect();
    if admins.is_empty() {
        bail!(
            "{} lists no node with an admin address ([[nodes]] admin = \"host:port\")",
            path.display()
        );
    }
    let mut unreachable = Vec::new();
    let mut view = None;
    for (id, admin) in &admins {
        let addr: SocketAddr = match tokio::net::lookup_host(admin)
            .await
            .ok()
            .and_then(|mut a| a.next())
        {
            Some(addr) => addr,
            None => {
                unreachable.push(id.clone());
                continue;
            }
        };
        match meridian_relay::http::get(addr, "/cell").await {
            Ok((200, body)) => {
                let value: serde_json::Value = serde_json::from_str(&body)
                    .with_context(|| format!("{id}: /cell did not answer JSON"))?;
                view = Some(value);
                break;
            }
            _ => unreachable.push(id.clone()),
        }
    }
    let Some(view) = view else {
        bail!(
            "no node of the cell answered at its admin address ({})",
            admins
                .iter()
                .map(|(_, a)| a.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    if json {
        let out = serde_json::json!({
            "seen_by": view["node"],
            "members": view["members"],
            "stats": view["stats"],
            "unreachable": unreachable,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "cell members as seen by {}",
        view["node"].as_str().unwrap_or("?")
    );
    println!(
        "{:<16} {:<8} {:<22} {:<22} {:>15}",
        "NODE", "STATE", "QUIC", "GOSSIP", "GENERATION"
    );
    for member in view["members"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let me = if member["me"].as_bool().unwrap_or(false) {
            " (this node)"
        } else {
            ""
        };
        println!(
            "{:<16} {:<8} {:<22} {:<22} {:>15}{me}",
            member["node"].as_str().unwrap_or("?"),
            member["state"].as_str().unwrap_or("?"),
            member["client"].as_str().unwrap_or("?"),
            member["gossip"].as_str().unwrap_or("?"),
            member["generation"].as_u64().unwrap_or(0),
        );
    }
    if !unreachable.is_empty() {
        println!("admin endpoint unreachable: {}", unreachable.join(", "));
    }
    Ok(())
}
