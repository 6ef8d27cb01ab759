//! Capability tokens: PASETO v4.public (Ed25519) through the `pasetors` crate.
//!
//! A tenant backend holds a [`TenantSigningKey`] and mints short-lived tokens for its users
//! with [`mint`]. Relays hold each tenant's [`TenantPublicKey`]s and check a token with
//! [`verify`], passing the current time in: this module never reads the clock.
//!
//! The payload is JSON: `tenant`, `sub` (user), `docs` (`{"exact": [..]}` or
//! `{"prefix": ".."}`), `rights` (`read`, `write`, `presence`), `jti` (the token's id, for
//! revocation), `iat` and `exp` (RFC 3339) and `aud` (the jurisdiction). The footer names
//! the tenant (`{"tenant": ".."}`) so that the relay knows which keys to try; the signed
//! payload must name the same tenant.
//!
//! A relay refuses a token whose lifetime (`exp − iat`) is longer than its tenant's
//! maximum, or that was issued more than [`CLOCK_SKEW_SECS`] in the future.

use pasetors::Public;
use pasetors::keys::{AsymmetricPublicKey, AsymmetricSecretKey};
use pasetors::paserk::FormatAsPaserk;
use pasetors::token::UntrustedToken;
use pasetors::version4::{PublicToken, V4};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::ids::{DocId, TenantId, UserId};

/// How far a token's `iat` may lie in the relay's future (clocks differ); `exp` is
/// checked exactly.
pub const CLOCK_SKEW_SECS: i64 = 60;
/// The longest token id (`jti`), in bytes.
pub const MAX_TOKEN_ID_LEN: usize = 128;
/// The maximum token lifetime a relay accepts when its tenant sets none: one day.
pub const DEFAULT_MAX_LIFETIME_SECS: i64 = 24 * 3600;

/// Why a token was refused or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a PASETO v4.public token, or its footer or payload is not valid JSON of the
    /// expected shape. Caused by the token's holder.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The footer names a tenant this relay has no keys for.
    #[error("unknown tenant {0}")]
    UnknownTenant(String),
    /// No key of the tenant verifies the signature.
    #[error("token signature is not valid for the tenant's keys")]
    BadSignature,
    /// The footer and the signed payload name different tenants.
    #[error("token footer and payload disagree on the tenant")]
    TenantMismatch,
    /// `exp` is at or before `now`.
    #[error("token expired")]
    Expired,
    /// `exp − iat` is longer than the tenant allows (or `exp` is before `iat`).
    #[error("token lifetime of {lifetime} s exceeds the tenant's maximum of {max} s")]
    LifetimeTooLong {
        /// `exp − iat`, in seconds.
        lifetime: i64,
        /// The tenant's maximum.
        max: i64,
    },
    /// `iat` lies further in the future than the clock-skew allowance.
    #[error("token issued in the future")]
    NotYetValid,
    /// The token is for another jurisdiction.
    #[error("token audience {found} does not match {expected}")]
    WrongAudience {
        /// The token's `aud`.
        found: String,
        /// This relay's jurisdiction.
        expected: String,
    },
    /// A key could not be parsed (not a `k4.secret.` / `k4.public.` PASERK).
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
}

/// What a token lets its holder do on the documents it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rights {
    /// Subscribe and receive changes.
    pub read: bool,
    /// Send changes.
    pub write: bool,
    /// Send and receive presence.
    pub presence: bool,
}

impl Rights {
    /// Every right.
    pub const ALL: Rights = Rights {
        read: true,
        write: true,
        presence: true,
    };

    /// Parses `read,write,presence` (any subset, comma-separated).
    pub fn parse(list: &str) -> Result<Rights, TokenError> {
        let mut rights = Rights::default();
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "read" => rights.read = true,
                "write" => rights.write = true,
                "presence" => rights.presence = true,
                _ => return Err(TokenError::Malformed("unknown right")),
            }
        }
        Ok(rights)
    }

    fn to_words(self) -> Vec<String> {
        let mut words = Vec::new();
        for (on, word) in [
            (self.read, "read"),
            (self.write, "write"),
            (self.presence, "presence"),
        ] {
            if on {
                words.push(word.to_owned());
            }
        }
        words
    }
}

/// Which documents a token covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocScope {
    /// Exactly these document ids.
    Exact(Vec<String>),
    /// Every document whose id starts with this prefix (empty: every document).
    Prefix(String),
}

impl DocScope {
    /// Whether the scope covers `doc`.
    pub fn covers(&self, doc: &DocId) -> bool {
        match self {
            DocScope::Exact(ids) => ids.iter().any(|id| id == doc.as_str()),
            DocScope::Prefix(prefix) => doc.as_str().starts_with(prefix.as_str()),
        }
    }
}

/// The verified content of a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// The tenant whose documents this covers.
    pub tenant: TenantId,
    /// The user it was minted for.
    pub user: UserId,
    /// The documents it covers.
    pub docs: DocScope,
    /// What it allows.
    pub rights: Rights,
    /// The token's id (`jti`), unique per tenant: what revocation names.
    pub id: String,
    /// When it was issued, in seconds since the Unix epoch.
    pub issued_at: i64,
    /// Expiry, in seconds since the Unix epoch.
    pub expires_at: i64,
    /// The jurisdiction it is valid in.
    pub audience: String,
}

/// What a relay trusts for one tenant: its public keys (several during a rotation) and
/// the longest token lifetime it accepts.
#[derive(Debug, Clone, Copy)]
pub struct TenantTrust<'k> {
    /// The tenant's current public keys.
    pub keys: &'k [TenantPublicKey],
    /// The longest `exp − iat` accepted, in seconds.
    pub max_lifetime_secs: i64,
}

impl Capability {
    /// Whether the capability allows `right` on `doc`.
    pub fn allows(&self, doc: &DocId, right: fn(&Rights) -> bool) -> bool {
        right(&self.rights) && self.docs.covers(doc)
    }
}

#[derive(Serialize, Deserialize)]
struct Payload {
    tenant: String,
    sub: String,
    docs: DocScope,
    rights: Vec<String>,
    jti: String,
    iat: String,
    exp: String,
    aud: String,
}

#[derive(Serialize, Deserialize)]
struct Footer {
    tenant: String,
}

/// A tenant's Ed25519 signing key. Kept by the tenant backend, never by relays.
pub struct TenantSigningKey(AsymmetricSecretKey<V4>);

impl std::fmt::Debug for TenantSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TenantSigningKey(..)")
    }
}

impl TenantSigningKey {
    /// Derives a key pair from 32 bytes of seed; the caller supplies the randomness.
    pub fn from_seed(seed: [u8; 32]) -> Result<Self, TokenError> {
        let pair = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new(seed));
        AsymmetricSecretKey::<V4>::from(pair.sk.as_ref())
            .map(TenantSigningKey)
            .map_err(|_| TokenError::InvalidKey("bad seed"))
    }

    /// Parses a `k4.secret.` PASERK string.
    pub fn from_paserk(text: &str) -> Result<Self, TokenError> {
        AsymmetricSecretKey::<V4>::try_from(text.trim())
            .map(TenantSigningKey)
            .map_err(|_| TokenError::InvalidKey("expected a k4.secret. PASERK"))
    }

    /// The key as a `k4.secret.` PASERK string.
    pub fn to_paserk(&self) -> Result<String, TokenError> {
        let mut out = String::new();
        self.0
            .fmt(&mut out)
            .map_err(|_| TokenError::InvalidKey("cannot format"))?;
        Ok(out)
    }

    /// The matching public key, for relays.
    pub fn public_key(&self) -> Result<TenantPublicKey, TokenError> {
        AsymmetricPublicKey::<V4>::try_from(&self.0)
            .map(TenantPublicKey)
            .map_err(|_| TokenError::InvalidKey("cannot derive public key"))
    }
}

/// A tenant's Ed25519 public key, configured on relays.
#[derive(Clone)]
pub struct TenantPublicKey(AsymmetricPublicKey<V4>);

impl std::fmt::Debug for TenantPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TenantPublicKey(..)")
    }
}

impl TenantPublicKey {
    /// Parses a `k4.public.` PASERK string.
    pub fn from_paserk(text: &str) -> Result<Self, TokenError> {
        AsymmetricPublicKey::<V4>::try_from(text.trim())
            .map(TenantPublicKey)
            .map_err(|_| TokenError::InvalidKey("expected a k4.public. PASERK"))
    }

    /// The key as a `k4.public.` PASERK string.
    pub fn to_paserk(&self) -> Result<String, TokenError> {
        let mut out = String::new();
        self.0
            .fmt(&mut out)
            .map_err(|_| TokenError::InvalidKey("cannot format"))?;
        Ok(out)
    }
}

/// Signs a capability into a PASETO v4.public token.
pub fn mint(capability: &Capability, key: &TenantSigningKey) -> Result<String, TokenError> {
    let time = |unix: i64, what: &'static str| {
        OffsetDateTime::from_unix_timestamp(unix)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .ok_or(TokenError::Malformed(what))
    };
    if capability.id.is_empty() || capability.id.len() > MAX_TOKEN_ID_LEN {
        return Err(TokenError::Malformed("token id empty or too long"));
    }
    let payload = Payload {
        tenant: capability.tenant.to_string(),
        sub: capability.user.to_string(),
        docs: capability.docs.clone(),
        rights: capability.rights.to_words(),
        jti: capability.id.clone(),
        iat: time(capability.issued_at, "issued-at out of range")?,
        exp: time(capability.expires_at, "expiry out of range")?,
        aud: capability.audience.clone(),
    };
    let footer = Footer {
        tenant: capability.tenant.to_string(),
    };
    let payload = serde_json::to_vec(&payload).map_err(|_| TokenError::Malformed("payload"))?;
    let footer = serde_json::to_vec(&footer).map_err(|_| TokenError::Malformed("footer"))?;
    PublicToken::sign(&key.0, &payload, Some(&footer), None)
        .map_err(|_| TokenError::InvalidKey("signing failed"))
}

/// Verifies a token: signature under one of the tenant's keys, tenant agreement, expiry
/// against `now_unix` (seconds), lifetime against the tenant's maximum, issue time
/// against `now_unix` plus [`CLOCK_SKEW_SECS`], and audience against `audience`.
///
/// `trust_for` returns what is trusted for a tenant (none: unknown tenant).
pub fn verify<'k>(
    token: &str,
    trust_for: impl Fn(&TenantId) -> Option<TenantTrust<'k>>,
    now_unix: i64,
    audience: &str,
) -> Result<Capability, TokenError> {
    let untrusted = UntrustedToken::<Public, V4>::try_from(token)
        .map_err(|_| TokenError::Malformed("not a v4.public token"))?;
    let footer: Footer = serde_json::from_slice(untrusted.untrusted_footer())
        .map_err(|_| TokenError::Malformed("footer"))?;
    let tenant =
        TenantId::new(footer.tenant.as_str()).map_err(|_| TokenError::Malformed("tenant id"))?;
    let trust = trust_for(&tenant).ok_or_else(|| TokenError::UnknownTenant(tenant.to_string()))?;
    let trusted = trust
        .keys
        .iter()
        .find_map(|key| PublicToken::verify(&key.0, &untrusted, None, None).ok())
        .ok_or(TokenError::BadSignature)?;
    let payload: Payload =
        serde_json::from_str(trusted.payload()).map_err(|_| TokenError::Malformed("payload"))?;
    if payload.tenant != footer.tenant {
        return Err(TokenError::TenantMismatch);
    }
    let expires_at = OffsetDateTime::parse(&payload.exp, &Rfc3339)
        .map_err(|_| TokenError::Malformed("exp"))?
        .unix_timestamp();
    let issued_at = OffsetDateTime::parse(&payload.iat, &Rfc3339)
        .map_err(|_| TokenError::Malformed("iat"))?
        .unix_timestamp();
    if payload.jti.is_empty() || payload.jti.len() > MAX_TOKEN_ID_LEN {
        return Err(TokenError::Malformed("jti"));
    }
    if expires_at <= now_unix {
        return Err(TokenError::Expired);
    }
    if issued_at > now_unix.saturating_add(CLOCK_SKEW_SECS) {
        return Err(TokenError::NotYetValid);
    }
    let lifetime = expires_at.saturating_sub(issued_at);
    if lifetime > trust.max_lifetime_secs || lifetime <= 0 {
        return Err(TokenError::LifetimeTooLong {
            lifetime,
            max: trust.max_lifetime_secs,
        });
    }
    if payload.aud != audience {
        return Err(TokenError::WrongAudience {
            found: payload.aud,
            expected: audience.to_owned(),
        });
    }
    Ok(Capability {
        tenant,
        user: UserId::new(payload.sub).map_err(|_| TokenError::Malformed("sub"))?,
        docs: payload.docs,
        rights: Rights::parse(&payload.rights.join(","))?,
        id: payload.jti,
        issued_at,
        expires_at,
        audience: payload.aud,
    })
}

/// When a token *claims* it was issued and expires (seconds since the Unix epoch), read
/// without checking its signature: a client uses them to refresh its token before it
/// expires. Never authorize anything with this.
pub fn unverified_times(token: &str) -> Result<(i64, i64), TokenError> {
    let untrusted = UntrustedToken::<Public, V4>::try_from(token)
        .map_err(|_| TokenError::Malformed("not a v4.public token"))?;
    let payload: Payload = serde_json::from_slice(untrusted.untrusted_payload())
        .map_err(|_| TokenError::Malformed("payload"))?;
    let time = |text: &str, what: &'static str| {
        OffsetDateTime::parse(text, &Rfc3339)
            .map(OffsetDateTime::unix_timestamp)
            .map_err(|_| TokenError::Malformed(what))
    };
    Ok((time(&payload.iat, "iat")?, time(&payload.exp, "exp")?))
}

/// The tenant and the audience (jurisdiction) a token *claims*, read without checking
/// its signature: a client uses them to find its tenant's home cell before any relay has
/// verified the token. Never authorize anything with this.
pub fn unverified_claims(token: &str) -> Result<(TenantId, String), TokenError> {
    let untrusted = UntrustedToken::<Public, V4>::try_from(token)
        .map_err(|_| TokenError::Malformed("not a v4.public token"))?;
    let payload: Payload = serde_json::from_slice(untrusted.untrusted_payload())
        .map_err(|_| TokenError::Malformed("payload"))?;
    let tenant =
        TenantId::new(payload.tenant.as_str()).map_err(|_| TokenError::Malformed("tenant id"))?;
    Ok((tenant, payload.aud))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capability(tenant: &str) -> Capability {
        Capability {
            tenant: TenantId::new(tenant).unwrap(),
            user: UserId::new("alice").unwrap(),
            docs: DocScope::Prefix("notes/".into()),
            rights: Rights {
                read: true,
                write: false,
                presence: true,
            },
            id: "token-1".into(),
            issued_at: 999_000,
            expires_at: 1_000_000,
            audience: "eu".into(),
        }
    }

    #[test]
    fn mint_and_verify() {
        let key = TenantSigningKey::from_seed([3; 32]).unwrap();
        let public = vec![key.public_key().unwrap()];
        let token = mint(&capability("acme"), &key).unwrap();
        let acme = TenantId::new("acme").unwrap();
        let keys = |t: &TenantId| {
            (t == &acme).then_some(TenantTrust {
                keys: public.as_slice(),
                max_lifetime_secs: 3600,
            })
        };
        let cap = verify(&token, keys, 999_999, "eu").unwrap();
        assert_eq!(
            unverified_claims(&token).unwrap(),
            (acme.clone(), "eu".into())
        );
        assert!(unverified_claims("v4.public.garbage").is_err());
        assert_eq!(unverified_times(&token).unwrap(), (999_000, 1_000_000));
        assert_eq!(cap, capability("acme"));
        assert!(cap.allows(&DocId::new("notes/a").unwrap(), |r| r.read));
        assert!(!cap.allows(&DocId::new("notes/a").unwrap(), |r| r.write));
        assert!(!cap.allows(&DocId::new("other").unwrap(), |r| r.read));

        assert_eq!(
            verify(&token, keys, 1_000_000, "eu"),
            Err(TokenError::Expired)
        );
        assert!(matches!(
            verify(&token, keys, 999_999, "us"),
            Err(TokenError::WrongAudience { .. })
        ));
        assert_eq!(
            verify("v4.public.xyz", keys, 999_999, "eu").unwrap_err(),
            TokenError::Malformed("not a v4.public token")
        );

        let other = mint(&capability("globex"), &key).unwrap();
        assert_eq!(
            verify(&other, keys, 999_999, "eu"),
            Err(TokenError::UnknownTenant("globex".into()))
        );

        let wrong_key = TenantSigningKey::from_seed([4; 32]).unwrap();
        let forged = mint(&capability("acme"), &wrong_key).unwrap();
        assert_eq!(
            verify(&forged, keys, 999_999, "eu"),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn lifetime_issue_time_and_id_are_checked() {
        let key = TenantSigningKey::from_seed([5; 32]).unwrap();
        let public = vec![key.public_key().unwrap()];
        let acme = TenantId::new("acme").unwrap();
        let keys = |t: &TenantId| {
            (t == &acme).then_some(TenantTrust {
                keys: public.as_slice(),
                max_lifetime_secs: 3600,
            })
        };
        // A token good until 2200 from a tenant that allows an hour.
        let mut long = capability("acme");
        long.expires_at = 7_258_118_400;
        let token = mint(&long, &key).unwrap();
        assert!(matches!(
            verify(&token, keys, 999_999, "eu"),
            Err(TokenError::LifetimeTooLong { max: 3600, .. })
        ));
        // Issued a little in the future (clock skew) is fine; further is not.
        let mut future = capability("acme");
        future.issued_at = 999_999 + CLOCK_SKEW_SECS;
        future.expires_at = future.issued_at + 60;
        let token = mint(&future, &key).unwrap();
        assert!(verify(&token, keys, 999_999, "eu").is_ok());
        future.issued_at += 1;
        future.expires_at += 1;
        let token = mint(&future, &key).unwrap();
        assert_eq!(
            verify(&token, keys, 999_999, "eu"),
            Err(TokenError::NotYetValid)
        );
        // Every token has an id.
        let mut anonymous = capability("acme");
        anonymous.id = String::new();
        assert!(mint(&anonymous, &key).is_err());
        assert_eq!(
            verify(
                &mint(&capability("acme"), &key).unwrap(),
                keys,
                999_999,
                "eu"
            )
            .unwrap()
            .id,
            "token-1"
        );
    }

    #[test]
    fn keys_round_trip_as_paserk() {
        let key = TenantSigningKey::from_seed([9; 32]).unwrap();
        let text = key.to_paserk().unwrap();
        assert!(text.starts_with("k4.secret."));
        let again = TenantSigningKey::from_paserk(&text).unwrap();
        let public = again.public_key().unwrap().to_paserk().unwrap();
        assert!(public.starts_with("k4.public."));
        assert_eq!(
            TenantPublicKey::from_paserk(&public)
                .unwrap()
                .to_paserk()
                .unwrap(),
            public
        );
        assert!(TenantPublicKey::from_paserk("k4.public.nope").is_err());
    }
}
