//! Token revocation: by token id (`jti`) or by user (every token of the user issued at or
//! before the revocation). Revocations live in the jurisdiction's durable tier, which
//! every relay of the jurisdiction reads; each node polls it, and sessions whose tokens a
//! revocation covers are closed with `token_revoked`. A revocation is kept until every
//! token it could cover has expired (its tenant's maximum token lifetime after it was
//! made), then pruned.

use std::collections::{HashMap, HashSet};

use meridian_protocol::token::{CLOCK_SKEW_SECS, Capability};
use meridian_protocol::{TenantId, UserId};
use serde::{Deserialize, Serialize};

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Revoked {
    /// One token, by its id (`jti`).
    Token(String),
    /// Every token of a user issued at or before the revocation.
    User(String),
}

/// A revocation as stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Revocation {
    /// The tenant whose token or user is revoked.
    pub tenant: String,
    /// What is revoked.
    pub revoked: Revoked,
    /// When, in seconds since the Unix epoch.
    pub revoked_at: i64,
    /// When it may be forgotten: no token it covers can still be valid then.
    pub expires_at: i64,
}

impl Revocation {
    /// A revocation made at `now_unix` for a tenant whose tokens live at most
    /// `max_lifetime_secs`.
    pub fn new(tenant: &TenantId, revoked: Revoked, now_unix: i64, max_lifetime_secs: i64) -> Self {
        Revocation {
            tenant: tenant.to_string(),
            revoked,
            revoked_at: now_unix,
            expires_at: now_unix
                .saturating_add(max_lifetime_secs)
                .saturating_add(CLOCK_SKEW_SECS),
        }
    }

    /// The key it is stored under (one item per revoked token or user: revoking a user
    /// again moves its time forward).
    pub fn key(&self) -> String {
        match &self.revoked {
            Revoked::Token(id) => format!("{}#t#{id}", self.tenant),
            Revoked::User(user) => format!("{}#u#{user}", self.tenant),
        }
    }
}

/// The revocations in force, indexed for the check on every session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationSet {
    tokens: HashSet<(TenantId, String)>,
    users: HashMap<(TenantId, UserId), i64>,
}

impl RevocationSet {
    /// The set of the revocations not yet expired at `now_unix`.
    pub fn new(revocations: &[Revocation], now_unix: i64) -> Self {
        let mut set = RevocationSet::default();
        for revocation in revocations.iter().filter(|r| r.expires_at > now_unix) {
            let Ok(tenant) = TenantId::new(revocation.tenant.as_str()) else {
                continue;
            };
            match &revocation.revoked {
                Revoked::Token(id) => {
                    set.tokens.insert((tenant, id.clone()));
                }
                Revoked::User(user) => {
                    let Ok(user) = UserId::new(user.as_str()) else {
                        continue;
                    };
                    let at = set.users.entry((tenant, user)).or_insert(i64::MIN);
                    *at = (*at).max(revocation.revoked_at);
                }
            }
        }
        set
    }

    /// Whether the capability's token is revoked.
    pub fn covers(&self, capability: &Capability) -> bool {
        if self
            .tokens
            .contains(&(capability.tenant.clone(), capability.id.clone()))
        {
            return true;
        }
        self.users
            .get(&(capability.tenant.clone(), capability.user.clone()))
            .is_some_and(|revoked_at| capability.issued_at <= *revoked_at)
    }

    /// How many revocations are in force.
    pub fn len(&self) -> usize {
        self.tokens.len() + self.users.len()
    }

    /// True when nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_protocol::token::{DocScope, Rights};

    fn capability(user: &str, id: &str, issued_at: i64) -> Capability {
        Capability {
            tenant: TenantId::new("acme").unwrap(),
            user: UserId::new(user).unwrap(),
            docs: DocScope::Prefix(String::new()),
            rights: Rights::ALL,
            id: id.into(),
            issued_at,
            expires_at: issued_at + 600,
            audience: "eu".into(),
        }
    }

    #[test]
    fn tokens_by_id_and_users_by_issue_time() {
        let acme = TenantId::new("acme").unwrap();
        let revocations = vec![
            Revocation::new(&acme, Revoked::Token("t-1".into()), 1_000, 3600),
            Revocation::new(&acme, Revoked::User("bob".into()), 2_000, 3600),
            Revocation::new(
                &TenantId::new("other").unwrap(),
                Revoked::User("carol".into()),
                2_000,
                3600,
            ),
        ];
        let set = RevocationSet::new(&revocations, 2_500);
        assert_eq!(set.len(), 3);
        assert!(set.covers(&capability("alice", "t-1", 900)));
        assert!(!set.covers(&capability("alice", "t-2", 900)));
        // Bob's tokens from before the revocation, not after (he may log in again).
        assert!(set.covers(&capability("bob", "b-1", 2_000)));
        assert!(!set.covers(&capability("bob", "b-2", 2_001)));
        // Another tenant's user of the same name is someone else.
        assert!(!set.covers(&capability("carol", "c-1", 1_000)));
        // Once every token it could cover has expired, it is gone.
        let later = RevocationSet::new(&revocations, 2_000 + 3600 + CLOCK_SKEW_SECS);
        assert!(later.is_empty());
    }
}
