//! `meridian token keygen` and `meridian token mint`.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::parse_duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use meridian_protocol::token::{self, Capability, DocScope, Rights, TenantSigningKey};
use meridian_protocol::{TenantId, UserId};

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a tenant signing key (Ed25519, PASERK k4.secret) and print its public key.
    Keygen {
        /// Write the secret key here (mode 0600) and the public key to FILE.pub;
        /// without it, print both.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print one JSON object (`public`, and `secret` unless written to `--out`, then
        /// `secret_file` and `public_file`) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Mint a capability token.
    Mint {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        user: String,
        /// Document id prefix the token covers ("" for all documents).
        #[arg(long, default_value = "")]
        docs: String,
        /// Exact document ids instead of a prefix (repeatable).
        #[arg(long = "doc")]
        exact: Vec<String>,
        /// Comma-separated: read, write, presence.
        #[arg(long, default_value = "read,write,presence")]
        rights: String,
        /// Lifetime, like 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The tenant's secret key file (from `token keygen --out`).
        #[arg(long)]
        key: PathBuf,
        /// The jurisdiction the token is valid in.
        #[arg(long, default_value = "dev")]
        audience: String,
        /// Print one JSON object (`token`, `id`, `tenant`, `user`, `audience`,
        /// `issued_at`, `expires_at`) on standard output instead of the bare token.
        #[arg(long)]
        json: bool,
    },
    /// Revoke one token (by its id) or every token of a user issued until now. The
    /// revocation is written to the durable tier the relay config names, which every
    /// relay of the jurisdiction reads (each closes the affected sessions with
    /// `token_revoked` within about a second); it is pruned once the tenant's maximum
    /// token lifetime has passed.
    Revoke {
        /// A relay config of the jurisdiction (its `[durable]` section and `[[tenants]]`).
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        /// The token's id (its `jti`).
        #[arg(long, required_unless_present = "user", conflicts_with = "user")]
        token_id: Option<String>,
        /// Every token of this user issued until now.
        #[arg(long)]
        user: Option<String>,
    },
}

pub async fn run(command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Revoke {
            config,
            tenant,
            token_id,
            user,
        } => revoke(&config, &tenant, token_id, user).await,
        TokenCommand::Keygen { out, json } => {
            let key = new_signing_key()?;
            let secret = key.to_paserk()?;
            let public = key.public_key()?.to_paserk()?;
            match out {
                Some(path) => {
                    write_secret(&path, &secret)?;
                    let public_path = path.with_extension("pub");
                    std::fs::write(&public_path, format!("{public}\n"))
                        .with_context(|| format!("cannot write {}", public_path.display()))?;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "public": public,
                                "secret_file": path,
                                "public_file": public_path,
                            })
                        );
                    } else {
                        println!("{public}");
                    }
                }
                None if json => {
                    println!(
                        "{}",
                        serde_json::json!({ "public": public, "secret": secret })
                    );
                }
                None => {
                    println!("secret: {secret}");
                    println!("public: {public}");
                }
            }
            Ok(())
        }
        TokenCommand::Mint {
            tenant,
            user,
            docs,
            exact,
            rights,
            ttl,
            key,
            audience,
            json,
        } => {
            let text = std::fs::read_to_string(&key)
                .with_context(|| format!("cannot read key {}", key.display()))?;
            let key = TenantSigningKey::from_paserk(&text)
                .with_context(|| format!("{} is not a tenant secret key", key.display()))?;
            let scope = if exact.is_empty() {
                DocScope::Prefix(docs)
            } else {
                DocScope::Exact(exact)
            };
            let capability = Capability {
                tenant: TenantId::new(tenant)?,
                user: UserId::new(user)?,
                docs: scope,
                rights: Rights::parse(&rights)?,
                id: new_token_id(),
                issued_at: unix_now()?,
                expires_at: unix_now()? + parse_duration(&ttl)?.as_secs() as i64,
                audience,
            };
            let minted = token::mint(&capability, &key)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "token": minted,
                        "id": capability.id,
                        "tenant": capability.tenant.as_str(),
                        "user": capability.user.as_str(),
                        "audience": capability.audience,
                        "issued_at": capability.issued_at,
                        "expires_at": capability.expires_at,
                    })
                );
            } else {
                println!("{minted}");
                // The id is what `token revoke --token-id` names.
                eprintln!("token id: {}", capability.id);
            }
            Ok(())
        }
    }
}

/// A new signing key from OS randomness.
async fn revoke(
    path: &std::path::Path,
    tenant: &str,
    token_id: Option<String>,
    user: Option<String>,
) -> Result<()> {
    use meridian_relay::revocation::{Revocation, Revoked};
    let file = crate::config::RelayFile::read(path)?;
    let base = path.parent().map(PathBuf::from).unwrap_or_default();
    let config = file.into_config(&base)?;
    let tenant = TenantId::new(tenant)?;
    let keys = config
        .tenants
        .iter()
        .find(|t| t.tenant == tenant)
        .with_context(|| format!("tenant {tenant} is not in {}", path.display()))?;
    let revoked = match (token_id, user) {
        (Some(id), None) => Revoked::Token(id),
        (None, Some(user)) => Revoked::User(UserId::new(user)?.to_string()),
        _ => bail!("name either --token-id or --user"),
    };
    let revocation = Revocation::new(&tenant, revoked, unix_now()?, keys.max_lifetime_secs());
    let store = meridian_relay::node::open_store(&config).await?;
    store.revoke(&revocation).await?;
    println!(
        "revoked {} in tenant {tenant} (kept until {})",
        match &revocation.revoked {
            Revoked::Token(id) => format!("token {id}"),
            Revoked::User(user) => format!("every token of user {user} issued until now"),
        },
        revocation.expires_at
    );
    Ok(())
}

/// A fresh token id (`jti`): 128 random bits in hex.
pub fn new_token_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

pub fn new_signing_key() -> Result<TenantSigningKey> {
    Ok(TenantSigningKey::from_seed(rand::random())?)
}

/// Writes a secret with owner-only permissions.
pub fn write_secret(path: &std::path::Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(format!("{secret}\n").as_bytes())?;
    Ok(())
}

pub fn unix_now() -> Result<i64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("h").is_err());
    }
}
