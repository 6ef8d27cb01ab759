//! `meridian token keygen` and `meridian token mint`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    },
}

pub fn run(command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Keygen { out } => {
            let key = new_signing_key()?;
            let secret = key.to_paserk()?;
            let public = key.public_key()?.to_paserk()?;
            match out {
                Some(path) => {
                    write_secret(&path, &secret)?;
                    let public_path = path.with_extension("pub");
                    std::fs::write(&public_path, format!("{public}\n"))
                        .with_context(|| format!("cannot write {}", public_path.display()))?;
                    println!("{public}");
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
            println!("{}", token::mint(&capability, &key)?);
            Ok(())
        }
    }
}

/// A new signing key from OS randomness.
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

/// Parses `90s`, `30m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = number
        .parse()
        .with_context(|| format!("bad duration {text:?}"))?;
    let seconds = match unit {
        "" | "s" => value,
        "m" => value * 60,
        "h" => value * 3600,
        "d" => value * 86_400,
        _ => bail!("bad duration unit in {text:?} (use s, m, h or d)"),
    };
    if seconds == 0 {
        bail!("duration must be positive");
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

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
