//! `meridian`: the one binary. Local dev deployment, relay node, tokens, documents.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod archive;
mod cell;
mod config;
mod dev;
mod doc;
mod feed;
mod placement;
mod purge;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// jemalloc instead of the system allocator on Linux: glibc's per-thread arenas keep what
/// the snapshot task and the loads free (a relay holding a 100k-change document kept
/// about half again its live memory), where jemalloc returns it to the system after a
/// second (`.cargo/config.toml` sets its options at build time).
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "meridian",
    version,
    about = "Meridian: a cell-based edge relay for Automerge documents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written on standard error (the filter is `MERIDIAN_LOG`).
    #[arg(
        long,
        global = true,
        env = "MERIDIAN_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: meridian_process::logging::LogFormat,
    /// Threads of the async runtime that runs every task of the process (default: the
    /// machine's cores).
    #[arg(long, global = true, env = "MERIDIAN_WORKER_THREADS")]
    worker_threads: Option<std::num::NonZeroUsize>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a complete local deployment with embedded storage.
    Dev(dev::DevArgs),
    /// Run a relay node from a TOML config file (see relay/config.example.toml).
    Relay(ServiceArgs),
    /// Run a router from a TOML config file (see relay/router.example.toml): answers
    /// `locate`, probes cells, commits failovers and drains.
    Router(ServiceArgs),
    /// Create tenants and locate them.
    #[command(subcommand)]
    Tenant(placement::TenantCommand),
    /// Inspect, list, drain and undrain cells.
    #[command(subcommand)]
    Cell(cell::CellCommand),
    /// Make tenant keys and capability tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Read and write documents through a relay.
    #[command(subcommand)]
    Doc(doc::DocCommand),
    /// Prepare the durable tier.
    #[command(subcommand)]
    Durable(DurableCommand),
    /// Write a tenant's documents (or some) from the durable tier to a portable archive:
    /// each document's Automerge save, its heads and the user of each actor.
    Export(archive::ExportArgs),
    /// The change feed: every durable change delivered to its tenant's webhook, signed,
    /// at least once, in causal order per document (see relay/feed.example.toml); and its
    /// `replay` and `dead-letters`.
    Feed(feed::FeedArgs),
    /// Write an archive's documents into a tenant of the same jurisdiction's durable tier
    /// (authors kept; changes already there are written again harmlessly).
    Import(archive::ImportArgs),
    /// The jurisdiction's audit log: purges and their sweeps, who ran them and when.
    Audit(purge::AuditArgs),
}

/// How `meridian relay` and `meridian router` are run.
#[derive(clap::Args)]
struct ServiceArgs {
    /// The config file.
    #[arg(long)]
    config: PathBuf,
    /// Shut down gracefully when standard input closes (how `meridian dev` stops its
    /// children, including when it dies itself).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
    /// Check the config file (every key and value; a relay's tenant keys and cell key
    /// file, a router's directory and timings) and exit.
    #[arg(long)]
    check: bool,
}

#[derive(Subcommand)]
enum DurableCommand {
    /// Create a jurisdiction's DynamoDB table (pay per request, streams, TTL) and S3 bucket
    /// (versioned) when missing, and print their names. For emulators; production tables
    /// and buckets come from Terraform.
    Init {
        #[arg(long)]
        jurisdiction: String,
        /// The DynamoDB/S3 endpoint (for example http://127.0.0.1:5000).
        #[arg(long)]
        endpoint: String,
        #[arg(long, default_value = "us-east-1")]
        region: String,
        /// Table name (default meridian-changes-<jurisdiction>).
        #[arg(long)]
        table: Option<String>,
        /// Bucket name (default meridian-snapshots-<jurisdiction>-<region>).
        #[arg(long)]
        bucket: Option<String>,
    },
}

/// The command line, where every flag can also come from the environment: `--flag-name`
/// of `meridian sub command` is `MERIDIAN_SUB_COMMAND_FLAG_NAME` (for containers and
/// service managers that configure by environment). A flag given on the command line
/// wins.
fn command() -> clap::Command {
    fn upper(name: &str) -> String {
        name.to_uppercase().replace('-', "_")
    }
    fn with_env(command: clap::Command, prefix: &str) -> clap::Command {
        let command = command.mut_args(|arg| {
            let flag = arg.get_long().is_some()
                && arg.get_env().is_none()
                && !matches!(
                    arg.get_action(),
                    clap::ArgAction::Help
                        | clap::ArgAction::HelpShort
                        | clap::ArgAction::HelpLong
                        | clap::ArgAction::Version
                );
            if flag {
                let name = format!("{prefix}_{}", upper(arg.get_id().as_str()));
                arg.env(name)
            } else {
                arg
            }
        });
        let subcommands: Vec<String> = command
            .get_subcommands()
            .map(|sub| sub.get_name().to_owned())
            .collect();
        subcommands.into_iter().fold(command, |command, name| {
            let prefix = format!("{prefix}_{}", upper(&name));
            command.mut_subcommand(&name, |sub| with_env(sub, &prefix))
        })
    }
    with_env(Cli::command(), "MERIDIAN")
}

fn main() -> ExitCode {
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    meridian_process::logging::init(cli.log_format);
    meridian_relay::tls::install_crypto_provider();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.worker_threads {
        builder.worker_threads(threads.get());
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Dev(args) => dev::run(args).await,
            Command::Relay(args) if args.check => check_relay(args.config),
            Command::Relay(args) => run_relay(args.config, args.exit_with_parent).await,
            Command::Router(args) if args.check => check_router(args.config),
            Command::Router(args) => run_router(args.config, args.exit_with_parent).await,
            Command::Tenant(command) => placement::run_tenant(command).await,
            Command::Cell(command) => cell::run(command).await,
            Command::Token(command) => token::run(command).await,
            Command::Doc(command) => doc::run(command).await,
            Command::Export(args) => archive::export(args).await,
            Command::Import(args) => archive::import(args).await,
            Command::Feed(args) => feed::run(args).await,
            Command::Audit(args) => purge::audit(args).await,
            Command::Durable(DurableCommand::Init {
                jurisdiction,
                endpoint,
                region,
                table,
                bucket,
            }) => durable_init(&jurisdiction, &endpoint, &region, table, bucket).await,
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

fn check_relay(path: PathBuf) -> anyhow::Result<()> {
    let file = config::RelayFile::read(&path)?;
    let base = path.parent().map(PathBuf::from).unwrap_or_default();
    let config = file.into_config(&base)?;
    println!(
        "{}: ok (node {}, cell {}, jurisdiction {}, {} tenant(s){})",
        path.display(),
        config.node,
        config.cell,
        config.jurisdiction,
        config.tenants.len(),
        if config.gossip.is_some() {
            ", gossip on"
        } else {
            ""
        }
    );
    Ok(())
}

async fn run_relay(path: PathBuf, exit_with_parent: bool) -> anyhow::Result<()> {
    let mut shutdown = Shutdown::listen()?;
    let file = config::RelayFile::read(&path)?;
    let base = path.parent().map(PathBuf::from).unwrap_or_default();
    let gateway_config = file.gateway.as_ref().map(|g| g.to_config()).transpose()?;
    let api_config = file.api.as_ref().map(config::ApiSection::to_config);
    let relay_config = file.into_config(&base)?;
    let relay = meridian_relay::start(relay_config).await?;
    eprintln!("relay listening on {}", relay.local_addr());
    let gateway = match gateway_config {
        Some(config) => {
            meridian_gateway::metrics::describe();
            let gateway = meridian_gateway::start(config, relay.session_port()).await?;
            eprintln!("gateway listening on ws://{}", gateway.local_addr());
            Some(gateway)
        }
        None => None,
    };
    let api = match api_config {
        Some(config) => {
            meridian_api::metrics::describe();
            let api = meridian_api::start(config, relay.session_port()).await?;
            eprintln!("HTTP API listening on http://{}", api.local_addr());
            Some(api)
        }
        None => None,
    };
    if let Some(metrics) = relay.metrics_addr() {
        eprintln!("metrics on http://{metrics}/metrics");
    }
    // SIGHUP re-reads the config file's tenants: a key rotation without a restart.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            () = stopped(&mut shutdown, exit_with_parent) => break,
            _ = hangup.recv() => match config::RelayFile::read(&path)
                .and_then(|file| file.into_config(&base))
            {
                Ok(config) => {
                    let ignored = relay.rotate_tenant_keys(&config.tenants);
                    eprintln!("tenant keys reloaded from {}", path.display());
                    for tenant in ignored {
                        eprintln!("tenant {tenant} is new: it is served only after a restart");
                    }
                }
                Err(error) => eprintln!("tenant keys not reloaded: {error:#}"),
            },
        }
    }
    if let Some(gateway) = gateway {
        gateway.shutdown().await;
    }
    if let Some(api) = api {
        api.shutdown().await;
    }
    eprintln!("shutting down: flushing to the durable tier");
    relay.shutdown(std::time::Duration::from_secs(30)).await?;
    Ok(())
}

fn check_router(path: PathBuf) -> anyhow::Result<()> {
    let file = config::RouterFile::read(&path)?;
    let base = path.parent().map(PathBuf::from).unwrap_or_default();
    let config = file.into_config(&base)?;
    println!(
        "{}: ok ({} cell(s) in {} jurisdiction(s), probes every {} ms)",
        path.display(),
        config.directory.cells().count(),
        config.directory.jurisdictions().names().count(),
        config.probe_interval.as_millis()
    );
    Ok(())
}

async fn run_router(path: PathBuf, exit_with_parent: bool) -> anyhow::Result<()> {
    let mut shutdown = Shutdown::listen()?;
    let file = config::RouterFile::read(&path)?;
    let base = path.parent().map(PathBuf::from).unwrap_or_default();
    let router = meridian_router::start(file.into_config(&base)?).await?;
    eprintln!("router listening on {}", router.local_addr());
    if let Some(metrics) = router.metrics_addr() {
        eprintln!("metrics on http://{metrics}/metrics");
    }
    stopped(&mut shutdown, exit_with_parent).await;
    router.shutdown().await;
    Ok(())
}

/// Waits for SIGINT or SIGTERM, or (with `exit_with_parent`) for standard input to close.
async fn stopped(shutdown: &mut Shutdown, exit_with_parent: bool) {
    if exit_with_parent {
        tokio::select! {
            _ = shutdown.wait() => {}
            _ = stdin_closed() => {}
        }
    } else {
        shutdown.wait().await;
    }
}

/// Resolves when standard input reaches its end (or fails).
async fn stdin_closed() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(read) = stdin.read(&mut buf).await {
        if read == 0 {
            break;
        }
    }
}

async fn durable_init(
    jurisdiction: &str,
    endpoint: &str,
    region: &str,
    table: Option<String>,
    bucket: Option<String>,
) -> anyhow::Result<()> {
    let mut aws = meridian_relay::store::AwsConfig::new(jurisdiction, region);
    aws.endpoint = Some(endpoint.to_owned());
    if let Some(table) = table {
        aws.table = table;
    }
    if let Some(bucket) = bucket {
        aws.bucket = bucket;
    }
    let store = meridian_relay::store::AwsStore::connect(aws.clone()).await;
    let (table_created, bucket_created) = store.ensure_resources().await?;
    let state = |created: bool| if created { "created" } else { "exists" };
    println!("table  {} ({})", aws.table, state(table_created));
    println!("bucket {} ({})", aws.bucket, state(bucket_created));
    Ok(())
}

/// SIGINT and SIGTERM, listened for from the moment this is created (create it before
/// announcing readiness, so that a signal sent right after the announcement is not lost to
/// the default action).
pub struct Shutdown {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Shutdown {
    pub fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Shutdown {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for either signal.
    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag of every subcommand, with its environment variable.
    fn flags(command: &clap::Command, path: &str, out: &mut Vec<(String, Option<String>)>) {
        for arg in command.get_arguments() {
            if arg.get_long().is_some()
                && !matches!(
                    arg.get_action(),
                    clap::ArgAction::Help | clap::ArgAction::Version
                )
            {
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                out.push((format!("{path} --{}", arg.get_id()), env));
            }
        }
        for sub in command.get_subcommands() {
            flags(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_flag_can_come_from_the_environment() {
        let command = command();
        command.clone().debug_assert();
        let mut all = Vec::new();
        flags(&command, "meridian", &mut all);
        assert!(all.len() > 30, "{all:?}");
        let missing: Vec<_> = all.iter().filter(|(_, env)| env.is_none()).collect();
        assert!(missing.is_empty(), "flags without a variable: {missing:?}");
        let env = |flag: &str| {
            all.iter()
                .find(|(name, _)| name == flag)
                .and_then(|(_, env)| env.clone())
        };
        assert_eq!(
            env("meridian token mint --tenant").as_deref(),
            Some("MERIDIAN_TOKEN_MINT_TENANT")
        );
        assert_eq!(
            env("meridian dev --data_dir").as_deref(),
            Some("MERIDIAN_DEV_DATA_DIR")
        );
        assert_eq!(
            env("meridian relay --config").as_deref(),
            Some("MERIDIAN_RELAY_CONFIG")
        );
    }
}
