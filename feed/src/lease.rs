//! The feed's lease on AWS: one process of a jurisdiction (in one of its regions) reads
//! the stream and delivers; the others wait and take over when its lease runs out.
//!
//! The lease is one item of the change table (`pk = "#feed"`, `sk = "lease#<feed id>"`)
//! holding the holder's name, its region and the time its lease ends. A process takes it
//! with a conditional put (no item, an ended lease, or its own), renews it every third of
//! its length, and deletes it when it stops. In a global table each region checks the
//! condition against its own replica, so two regions may both hold the lease for about
//! the replication delay after a takeover: their deliveries overlap, which at-least-once
//! delivery already allows (receivers deduplicate by change hash).

use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use tokio::sync::watch;

use crate::shared::FeedError;

/// The lease item's partition.
pub const LEASE_PK: &str = "#feed";

/// One process's claim on a feed's lease.
#[derive(Clone)]
pub struct Lease {
    client: aws_sdk_dynamodb::Client,
    table: String,
    sk: String,
    /// Who this process is (host, process id and a random part).
    pub holder: String,
    region: String,
    length: Duration,
}

impl Lease {
    /// The lease of feed `id` in `table`, held (when it is) for `length` at a time.
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        table: &str,
        id: &str,
        region: &str,
        length: Duration,
    ) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
        Lease {
            client,
            table: table.to_owned(),
            sk: format!("lease#{id}"),
            holder: format!(
                "{host}/{}/{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ),
            region: region.to_owned(),
            length,
        }
    }

    /// Takes or renews the lease; `false`: another holder's lease has not ended.
    pub async fn try_hold(&self) -> Result<bool, FeedError> {
        let now = crate::shared::unix_now_ms();
        let until = now.saturating_add(u64::try_from(self.length.as_millis()).unwrap_or(u64::MAX));
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(LEASE_PK.into()))
            .item("sk", AttributeValue::S(self.sk.clone()))
            .item("holder", AttributeValue::S(self.holder.clone()))
            .item("region", AttributeValue::S(self.region.clone()))
            .item("lease_until", AttributeValue::N(until.to_string()))
            .condition_expression("attribute_not_exists(pk) OR lease_until < :now OR holder = :me")
            .expression_attribute_values(":now", AttributeValue::N(now.to_string()))
            .expression_attribute_values(":me", AttributeValue::S(self.holder.clone()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(error) => Err(FeedError::Storage(format!("lease: {error:?}"))),
        }
    }

    /// Gives the lease up (only if this process holds it), so another takes over at once.
    pub async fn release(&self) -> Result<(), FeedError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(LEASE_PK.into()))
            .key("sk", AttributeValue::S(self.sk.clone()))
            .condition_expression("holder = :me")
            .expression_attribute_values(":me", AttributeValue::S(self.holder.clone()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(error) => Err(FeedError::Storage(format!("lease: {error:?}"))),
        }
    }

    /// Holds the lease while it can, until `stopped`: `held` says whether this process
    /// holds it now. A renewal that fails (the table unreachable) drops the claim at
    /// once: the holder stops delivering before its lease can end under it.
    pub async fn keep(self, held: watch::Sender<bool>, mut stopped: watch::Receiver<bool>) {
        let renew = self.length / 3;
        loop {
            let holding = match self.try_hold().await {
                Ok(holding) => holding,
                Err(error) => {
                    tracing::warn!(%error, "feed lease not renewed; delivering stops");
                    false
                }
            };
            if *held.borrow() != holding {
                tracing::info!(holder = %self.holder, holding, "feed lease");
                crate::metrics::leader(holding);
            }
            held.send_replace(holding);
            tokio::select! {
                () = tokio::time::sleep(renew) => {}
                _ = stopped.changed() => break,
            }
        }
        held.send_replace(false);
        if let Err(error) = self.release().await {
            tracing::warn!(%error, "feed lease not released; it ends on its own");
        }
    }
}
