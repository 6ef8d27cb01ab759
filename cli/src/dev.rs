//! `meridian dev`: a complete local deployment with embedded storage in one command.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use meridian_protocol::token::{self, Capability, DocScope, Rights, TenantSigningKey};
use meridian_protocol::{TenantId, UserId};

use crate::config::{
    ClientFile, DurableSection, NodeSection, RelayFile, TenantSection, TlsSection,
};

/// The tenant, jurisdiction and cell of the dev deployment.
const DEV_TENANT: &str = "dev";
const DEV_JURISDICTION: &str = "dev";
const DEV_CELL: &str = "dev";
/// The region named for the dev deployment's emulated DynamoDB and S3.
const DEV_REGION: &str = "us-east-1";
/// Lifetime of the token written to `client.toml`.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(clap::Args)]
pub struct DevArgs {
    /// Where keys, certificates, the cache and the durable store live.
    #[arg(long, default_value = "meridian-dev-data")]
    data_dir: PathBuf,
    /// UDP address to listen on (default: a free port on 127.0.0.1).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Use DynamoDB and S3 at this endpoint (an emulator such as moto_server) instead of
    /// the local directory store; the table and bucket are created when missing.
    #[arg(long)]
    durable_endpoint: Option<String>,
}

pub async fn run(args: DevArgs) -> Result<()> {
    let mut shutdown = crate::Shutdown::listen()?;
    let dir = absolute(&args.data_dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let pki = meridian_relay::tls::dev_pki(&dir.join("tls"))?;
    let key = tenant_key(&dir.join("tenant.key"))?;
    let public_key = key.public_key()?.to_paserk()?;

    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut file = RelayFile {
        node: NodeSection {
            id: "dev-1".into(),
            cell: DEV_CELL.into(),
            region: None,
            jurisdiction: DEV_JURISDICTION.into(),
            listen,
            advertise: None,
            data_dir: dir.join("node-1"),
        },
        tls: TlsSection {
            cert_file: pki.node_cert.clone(),
            key_file: pki.node_key.clone(),
        },
        durable: durable_section(&dir, args.durable_endpoint.as_deref()).await?,
        limits: None,
        metrics: Some(crate::config::MetricsSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }),
        tenants: vec![TenantSection {
            id: DEV_TENANT.into(),
            public_keys: vec![public_key],
            jurisdiction: None,
        }],
    };
    let relay = meridian_relay::start(file.clone().into_config(&dir)?).await?;
    let addr = relay.local_addr();
    file.node.listen = addr;
    if let (Some(metrics), Some(bound)) = (&mut file.metrics, relay.metrics_addr()) {
        metrics.listen = bound;
    }
    std::fs::write(dir.join("relay.toml"), toml::to_string_pretty(&file)?)?;

    let capability = Capability {
        tenant: TenantId::new(DEV_TENANT)?,
        user: UserId::new("dev-user")?,
        docs: DocScope::Prefix(String::new()),
        rights: Rights::ALL,
        expires_at: crate::token::unix_now()? + DEV_TOKEN_TTL.as_secs() as i64,
        audience: DEV_JURISDICTION.into(),
    };
    let client = ClientFile {
        endpoint: addr.to_string(),
        server_name: "localhost".into(),
        ca_cert: pki.ca_cert.clone(),
        tenant: DEV_TENANT.into(),
        token: token::mint(&capability, &key)?,
        store_dir: None,
    };
    let client_path = dir.join("client.toml");
    std::fs::write(&client_path, toml::to_string_pretty(&client)?)?;

    let config = client_path.display();
    println!("Meridian dev deployment is running.");
    println!(
        "  relay    {addr} (node dev-1, cell {DEV_CELL}, jurisdiction {DEV_JURISDICTION}, tenant {DEV_TENANT})"
    );
    if let Some(metrics) = relay.metrics_addr() {
        println!("  metrics  http://{metrics}/metrics  (health: /healthz, readiness: /readyz)");
    }
    println!("  data     {}", dir.display());
    match &file.durable.endpoint {
        Some(endpoint) => println!(
            "  durable  DynamoDB table {} and S3 bucket {} at {endpoint}",
            file.durable.table.as_deref().unwrap_or_default(),
            file.durable.bucket.as_deref().unwrap_or_default()
        ),
        None => println!(
            "  durable  local directory {}",
            dir.join("durable").display()
        ),
    }
    println!("  client   {config} (token valid 24 h; all rights on every document)");
    println!();
    println!(
        "Next, in another terminal (or prefix with `cargo run --release -p meridian-cli --`):"
    );
    println!("  meridian doc set --config {config} notes title \"hello\"");
    println!("  meridian doc get --config {config} notes");
    println!("  meridian doc watch --config {config} notes");
    println!();
    println!("Stop with Ctrl-C. Restarting with the same --data-dir keeps every document.");

    shutdown.wait().await;
    println!("shutting down: flushing to the durable store");
    relay.shutdown(Duration::from_secs(30)).await?;
    Ok(())
}

/// The dev deployment's durable tier: the local directory store, or DynamoDB + S3 at an
/// emulator endpoint (created when missing).
async fn durable_section(dir: &Path, endpoint: Option<&str>) -> Result<DurableSection> {
    let Some(endpoint) = endpoint else {
        return Ok(DurableSection {
            kind: "local".into(),
            path: Some(dir.join("durable")),
            table: None,
            bucket: None,
            region: None,
            endpoint: None,
        });
    };
    let mut aws = meridian_relay::store::AwsConfig::new(DEV_JURISDICTION, DEV_REGION);
    aws.endpoint = Some(endpoint.to_owned());
    let store = meridian_relay::store::AwsStore::connect(aws.clone()).await;
    store
        .ensure_resources()
        .await
        .with_context(|| format!("cannot prepare DynamoDB/S3 at {endpoint}"))?;
    Ok(DurableSection {
        kind: "dynamodb".into(),
        path: None,
        table: Some(aws.table),
        bucket: Some(aws.bucket),
        region: Some(aws.region),
        endpoint: Some(endpoint.to_owned()),
    })
}

/// Reads the dev tenant key, creating it on first start.
fn tenant_key(path: &Path) -> Result<TenantSigningKey> {
    if path.exists() {
        let text = std::fs::read_to_string(path)?;
        return TenantSigningKey::from_paserk(&text)
            .with_context(|| format!("{} is not a tenant key", path.display()));
    }
    let key = crate::token::new_signing_key()?;
    crate::token::write_secret(path, &key.to_paserk()?)?;
    Ok(key)
}

fn absolute(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(path))
    }
}
