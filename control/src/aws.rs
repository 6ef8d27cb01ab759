//! The production control store: one DynamoDB table (`meridian-control`).
//!
//! Items are keyed by `pk` alone: `tenant#<id>` holds a tenant (`jurisdiction`, `pin`,
//! `cell`, `epoch`, `updated`), `cell#<id>` a cell (`doc`: the JSON description, and
//! `draining`). A placement commit is a `PutItem` with the condition
//! `epoch = :expected`, so of two routers that read the same epoch exactly one commits;
//! the other gets `ConditionalCheckFailed`, reported as [`ControlError::Conflict`].

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use futures::future::BoxFuture;
use meridian_cell_router::{Cell, Placement, Tenant};
use meridian_protocol::{CellId, TenantId};

use super::{ControlError, ControlStore, TenantRecord};

/// Pages one scan may read: a bound on a runaway table.
const SCAN_PAGES_MAX: usize = 100_000;

/// The control plane in one DynamoDB table.
#[derive(Debug, Clone)]
pub struct DynamoControlStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

type Item = HashMap<String, AttributeValue>;

impl DynamoControlStore {
    /// Builds a client from the SDK's default credential chain; with an endpoint override
    /// and no credentials in the environment, emulator credentials are used.
    pub async fn connect(table: String, region: String, endpoint: Option<String>) -> Self {
        let shared =
            meridian_process::aws::sdk_config(&region, endpoint.is_some(), Duration::from_secs(3))
                .await;
        let mut config = aws_sdk_dynamodb::config::Builder::from(&shared);
        if let Some(endpoint) = &endpoint {
            config = config.endpoint_url(endpoint);
        }
        DynamoControlStore {
            client: aws_sdk_dynamodb::Client::from_conf(config.build()),
            table,
        }
    }

    /// Creates the table (pay per request) when missing; returns whether it was
    /// created. For emulators and `meridian control init`; production tables come from
    /// Terraform.
    pub async fn ensure_table(&self) -> Result<bool, ControlError> {
        match self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
        {
            Ok(_) => return Ok(false),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) => {}
            Err(error) => return Err(unavailable("DescribeTable", error)),
        }
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("pk")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(build_error)?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("pk")
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(build_error)?,
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match created {
            Ok(_) => Ok(true),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) =>
            {
                Ok(false)
            }
            Err(error) => Err(unavailable("CreateTable", error)),
        }
    }

    async fn scan(&self, prefix: &str) -> Result<Vec<Item>, ControlError> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        for _ in 0..SCAN_PAGES_MAX {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .filter_expression("begins_with(pk, :prefix)")
                .expression_attribute_values(":prefix", AttributeValue::S(prefix.to_owned()))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| unavailable("Scan", e))?;
            items.extend(page.items.unwrap_or_default());
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(items),
            }
        }
        Err(ControlError::Unavailable(format!(
            "scan of {} did not end within {SCAN_PAGES_MAX} pages",
            self.table
        )))
    }

    async fn put_tenant(
        &self,
        record: &TenantRecord,
        condition: &str,
        expected_epoch: Option<u64>,
    ) -> Result<
        (),
        aws_sdk_dynamodb::error::SdkError<aws_sdk_dynamodb::operation::put_item::PutItemError>,
    > {
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(tenant_item(record)))
            .condition_expression(condition);
        if let Some(expected) = expected_epoch {
            put = put.expression_attribute_values(":expected", number(expected));
        }
        put.send().await.map(|_| ())
    }
}

impl ControlStore for DynamoControlStore {
    fn webhook_hosts<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>, ControlError>> {
        Box::pin(async move {
            let item = self
                .client
                .get_item()
                .table_name(&self.table)
                .key("pk", AttributeValue::S(webhooks_key(tenant)))
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| unavailable("GetItem", e))?
                .item;
            item.map(|item| {
                serde_json::from_str(string(&item, "hosts")?)
                    .map_err(|e| ControlError::Corrupt(format!("webhooks item: {e}")))
            })
            .transpose()
        })
    }

    fn set_webhook_hosts<'a>(
        &'a self,
        tenant: &'a TenantId,
        hosts: &'a [String],
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            if self.tenant(tenant).await?.is_none() {
                return Err(ControlError::NotFound(format!("tenant {tenant}")));
            }
            let hosts = serde_json::to_string(hosts)
                .map_err(|e| ControlError::Corrupt(format!("webhooks item: {e}")))?;
            self.client
                .put_item()
                .table_name(&self.table)
                .item("pk", AttributeValue::S(webhooks_key(tenant)))
                .item("hosts", AttributeValue::S(hosts))
                .item("updated", number(crate::unix_ms()))
                .send()
                .await
                .map_err(|e| unavailable("PutItem", e))?;
            Ok(())
        })
    }

    fn tenant<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<TenantRecord>, ControlError>> {
        Box::pin(async move {
            let item = self
                .client
                .get_item()
                .table_name(&self.table)
                .key("pk", AttributeValue::S(tenant_key(tenant)))
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| unavailable("GetItem", e))?
                .item;
            item.map(|item| parse_tenant(&item)).transpose()
        })
    }

    fn tenants(&self) -> BoxFuture<'_, Result<Vec<TenantRecord>, ControlError>> {
        Box::pin(async move {
            Ok(self
                .scan("tenant#")
                .await?
                .iter()
                .filter_map(|item| skip_corrupt(parse_tenant(item)))
                .collect())
        })
    }

    fn create_tenant<'a>(
        &'a self,
        record: &'a TenantRecord,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            match self
                .put_tenant(record, "attribute_not_exists(pk)", None)
                .await
            {
                Ok(()) => Ok(()),
                Err(error)
                    if error
                        .as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
                {
                    Err(ControlError::Exists(record.tenant.id.clone()))
                }
                Err(error) => Err(unavailable("PutItem", error)),
            }
        })
    }

    fn commit<'a>(
        &'a self,
        record: &'a TenantRecord,
        expected_epoch: u64,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        debug_assert!(
            record.placement.epoch > expected_epoch,
            "a commit must raise the epoch"
        );
        Box::pin(async move {
            match self
                .put_tenant(record, "epoch = :expected", Some(expected_epoch))
                .await
            {
                Ok(()) => Ok(()),
                Err(error)
                    if error
                        .as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
                {
                    match self.tenant(&record.tenant.id).await? {
                        Some(current) => Err(ControlError::Conflict {
                            current: current.placement.epoch,
                        }),
                        None => Err(ControlError::NotFound(format!(
                            "tenant {}",
                            record.tenant.id
                        ))),
                    }
                }
                Err(error) => Err(unavailable("PutItem", error)),
            }
        })
    }

    fn cells(&self) -> BoxFuture<'_, Result<Vec<Cell>, ControlError>> {
        Box::pin(async move {
            Ok(self
                .scan("cell#")
                .await?
                .iter()
                .filter_map(|item| skip_corrupt(parse_cell(item)))
                .collect())
        })
    }

    fn publish_cell<'a>(&'a self, cell: &'a Cell) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let mut description = cell.clone();
            description.draining = false;
            let doc = serde_json::to_string(&description)
                .map_err(|e| ControlError::Corrupt(e.to_string()))?;
            // Only the description: an operator's drain flag survives a router restart.
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", AttributeValue::S(cell_key(&cell.id)))
                .update_expression("SET #doc = :doc")
                .expression_attribute_names("#doc", "doc")
                .expression_attribute_values(":doc", AttributeValue::S(doc))
                .send()
                .await
                .map_err(|e| unavailable("UpdateItem", e))?;
            Ok(())
        })
    }

    fn set_draining<'a>(
        &'a self,
        cell: &'a CellId,
        draining: bool,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let result = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("pk", AttributeValue::S(cell_key(cell)))
                .update_expression("SET draining = :draining")
                .condition_expression("attribute_exists(pk)")
                .expression_attribute_values(":draining", AttributeValue::Bool(draining))
                .send()
                .await;
            match result {
                Ok(_) => Ok(()),
                Err(error)
                    if error
                        .as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
                {
                    Err(ControlError::NotFound(format!("cell {cell}")))
                }
                Err(error) => Err(unavailable("UpdateItem", error)),
            }
        })
    }
}

/// A record that fails its checks is skipped and counted: one bad item must not stop
/// every other decision.
fn skip_corrupt<T>(parsed: Result<T, ControlError>) -> Option<T> {
    match parsed {
        Ok(record) => Some(record),
        Err(error) => {
            crate::record_corrupt();
            tracing::warn!(%error, "corrupt control record skipped");
            None
        }
    }
}

/// The key of a tenant's webhook allow-list, beside its record.
fn webhooks_key(tenant: &TenantId) -> String {
    format!("webhooks#{tenant}")
}

fn tenant_key(tenant: &TenantId) -> String {
    format!("tenant#{tenant}")
}

fn cell_key(cell: &CellId) -> String {
    format!("cell#{cell}")
}

fn number(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn tenant_item(record: &TenantRecord) -> Item {
    let mut item = Item::new();
    item.insert(
        "pk".into(),
        AttributeValue::S(tenant_key(&record.tenant.id)),
    );
    item.insert(
        "jurisdiction".into(),
        AttributeValue::S(record.tenant.jurisdiction.clone()),
    );
    if let Some(pin) = &record.tenant.pin {
        item.insert("pin".into(), AttributeValue::S(pin.to_string()));
    }
    if let Some(cell) = &record.placement.cell {
        item.insert("cell".into(), AttributeValue::S(cell.to_string()));
    }
    item.insert("epoch".into(), number(record.placement.epoch));
    item.insert("updated".into(), number(record.updated_ms));
    item
}

fn parse_tenant(item: &Item) -> Result<TenantRecord, ControlError> {
    let corrupt = |what: &str| ControlError::Corrupt(format!("tenant item: {what}"));
    let key = string(item, "pk")?;
    let id = key
        .strip_prefix("tenant#")
        .and_then(|id| TenantId::new(id).ok())
        .ok_or_else(|| corrupt("bad key"))?;
    let cell_id = |name: &str| -> Result<Option<CellId>, ControlError> {
        match item.get(name) {
            Some(AttributeValue::S(value)) => CellId::new(value.as_str())
                .map(Some)
                .map_err(|_| corrupt(name)),
            _ => Ok(None),
        }
    };
    Ok(TenantRecord {
        tenant: Tenant {
            id,
            jurisdiction: string(item, "jurisdiction")?.to_owned(),
            pin: cell_id("pin")?,
        },
        placement: Placement {
            cell: cell_id("cell")?,
            epoch: parse_number(item, "epoch")?,
        },
        updated_ms: parse_number(item, "updated").unwrap_or(0),
    })
}

fn parse_cell(item: &Item) -> Result<Cell, ControlError> {
    let mut cell: Cell = serde_json::from_str(string(item, "doc")?)
        .map_err(|e| ControlError::Corrupt(format!("cell item: {e}")))?;
    cell.draining = matches!(item.get("draining"), Some(AttributeValue::Bool(true)));
    Ok(cell)
}

fn string<'a>(item: &'a Item, name: &str) -> Result<&'a str, ControlError> {
    match item.get(name) {
        Some(AttributeValue::S(value)) => Ok(value),
        _ => Err(ControlError::Corrupt(format!("item without {name}"))),
    }
}

fn parse_number(item: &Item, name: &str) -> Result<u64, ControlError> {
    match item.get(name) {
        Some(AttributeValue::N(value)) => value
            .parse()
            .map_err(|_| ControlError::Corrupt(format!("{name} is not a number"))),
        _ => Err(ControlError::Corrupt(format!("item without {name}"))),
    }
}

fn unavailable<E: std::error::Error + 'static>(call: &str, error: E) -> ControlError {
    ControlError::Unavailable(format!(
        "{call}: {}",
        aws_sdk_dynamodb::error::DisplayErrorContext(&error)
    ))
}

fn build_error(error: aws_sdk_dynamodb::error::BuildError) -> ControlError {
    ControlError::Unavailable(format!("request: {error}"))
}
