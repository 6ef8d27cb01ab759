//! `meridian`: the one binary. Local dev deployment, relay node, tokens, documents.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod config;
mod dev;
mod doc;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "Meridian: a cell-based edge relay for Automerge documents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a complete local deployment with embedded storage.
    Dev(dev::DevArgs),
    /// Run a relay node from a TOML config file.
    Relay {
        /// The config file (see relay/config.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Make tenant keys and capability tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Read and write documents through a relay.
    #[command(subcommand)]
    Doc(doc::DocCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MERIDIAN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    meridian_relay::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Dev(args) => dev::run(args).await,
            Command::Relay { config } => run_relay(config).await,
            Command::Token(command) => token::run(command),
            Command::Doc(command) => doc::run(command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_relay(path: PathBuf) -> anyhow::Result<()> {
    let file = config::RelayFile::read(&path)?;
    let base = path.parent().map(PathBuf::from).unwrap_or_default();
    let relay_config = file.into_config(&base)?;
    let relay = meridian_relay::start(relay_config).await?;
    eprintln!("relay listening on {}", relay.local_addr());
    wait_for_signal().await?;
    eprintln!("shutting down: flushing to the durable tier");
    relay.shutdown(std::time::Duration::from_secs(30)).await?;
    Ok(())
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}
