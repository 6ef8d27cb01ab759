//! The naive baseline relay as its own process (so that the load generator reads its
//! RSS and CPU from /proc as it does ours). See `meridian_benches::naive`.
//!
//! `naive-relay --dir DIR [--listen ADDR] [--preload NAME=FILE]`: creates a development
//! PKI in DIR (`ca.crt`), serves, and writes the bound address to `DIR/addr` once ready.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use meridian_benches::naive::{NaiveServer, bind};

#[derive(Parser, Debug)]
#[command(about = "The naive Automerge sync relay the load generator compares against")]
struct Args {
    /// Directory for the TLS files and the `addr` file.
    #[arg(long)]
    dir: PathBuf,
    /// QUIC address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Documents to load before serving, as NAME=FILE (a saved Automerge document).
    #[arg(long)]
    preload: Vec<String>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    meridian_relay::tls::install_crypto_provider();
    let args = Args::parse();
    let server = Arc::new(NaiveServer::default());
    for entry in &args.preload {
        let (name, file) = entry.split_once('=').context("--preload takes NAME=FILE")?;
        let bytes = std::fs::read(file).with_context(|| file.to_owned())?;
        let doc =
            automerge::AutoCommit::load(&bytes).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        server.preload(name, doc)?;
    }
    let pki = meridian_relay::tls::dev_pki(&args.dir)?;
    let (certs, key) = meridian_relay::tls::load_identity(&pki.node_cert, &pki.node_key)?;
    let endpoint = bind(args.listen, meridian_relay::tls::server_crypto(certs, key)?)?;
    let addr = endpoint.local_addr()?;
    let tmp = args.dir.join("addr.tmp");
    std::fs::write(&tmp, addr.to_string())?;
    std::fs::rename(&tmp, args.dir.join("addr"))?;
    tokio::select! {
        _ = server.serve(endpoint) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
