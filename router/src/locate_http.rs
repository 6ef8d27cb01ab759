//! `GET /locate?tenant=T` over HTTP, for browser apps: where the tenant lives and its home
//! cell's WebSocket URL, with CORS for the allowed origins.
//!
//! The answer is the QUIC `locate`'s (the same decision, which may place the tenant):
//! 200 with `{tenant, cell, region, jurisdiction, epoch, gateway}`; 400 for a missing or
//! invalid tenant id; 404 for an unknown tenant; 503 (with `Retry-After`) while no cell of
//! its jurisdiction can serve it or the router is still probing. A request with an
//! `Origin` outside the allowed list is refused with 403 and no CORS headers. Served with
//! the admin endpoint's defences (`meridian_process::web`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use meridian_protocol::{ErrorCode, RelayToClient, TenantId};

use crate::Router;

/// The HTTP locate's settings.
#[derive(Debug, Clone)]
pub struct LocateHttpConfig {
    /// Where it listens (plain HTTP; TLS is the load balancer's).
    pub listen: SocketAddr,
    /// Each cell's WebSocket URL for browser apps, by cell id (its gateway behind TLS).
    pub gateways: HashMap<String, String>,
    /// Origins allowed to call it from a browser; `*` allows any.
    pub origins: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Params {
    tenant: Option<String>,
}

#[derive(serde::Serialize)]
struct Home {
    tenant: String,
    cell: String,
    region: String,
    jurisdiction: String,
    epoch: u64,
    gateway: Option<String>,
}

#[derive(serde::Serialize)]
struct Failure {
    error: &'static str,
    message: String,
}

pub(crate) fn app(router: Arc<Router>) -> axum::Router {
    axum::Router::new()
        .route("/locate", axum::routing::get(locate))
        .with_state(router)
}

async fn locate(
    State(router): State<Arc<Router>>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Response {
    let Some(config) = router.config.locate_http.as_ref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let origin = headers.get(header::ORIGIN).cloned();
    if let Some(origin) = &origin {
        let allowed = config
            .origins
            .iter()
            .any(|o| o == "*" || origin.to_str().is_ok_and(|value| value == o));
        if !allowed {
            crate::metrics::http_locate("forbidden_origin");
            return failure(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this origin may not locate tenants".into(),
                None,
            );
        }
    }
    let response = match params.tenant.as_deref().map(TenantId::new) {
        None => failure(
            StatusCode::BAD_REQUEST,
            "malformed",
            "name the tenant: /locate?tenant=ID".into(),
            None,
        ),
        Some(Err(error)) => failure(
            StatusCode::BAD_REQUEST,
            "malformed",
            error.to_string(),
            None,
        ),
        Some(Ok(tenant)) => match router.locate(&tenant).await {
            RelayToClient::Home {
                tenant,
                cell,
                region,
                jurisdiction,
                epoch,
                ..
            } => {
                let gateway = config.gateways.get(&cell).cloned();
                let home = Home {
                    tenant: tenant.to_string(),
                    cell,
                    region,
                    jurisdiction,
                    epoch,
                    gateway,
                };
                (StatusCode::OK, axum::Json(home)).into_response()
            }
            RelayToClient::Error {
                code,
                message,
                retry_after_ms,
                ..
            } => {
                let status = match code {
                    ErrorCode::UnknownTenant => StatusCode::NOT_FOUND,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                let retry = (status == StatusCode::SERVICE_UNAVAILABLE)
                    .then(|| retry_after_ms.div_ceil(1000).max(1));
                failure(status, code.name().unwrap_or("error"), message, retry)
            }
            _ => failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "unexpected answer".into(),
                None,
            ),
        },
    };
    let mut response = response;
    if let Some(origin) = origin {
        response
            .headers_mut()
            .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        response
            .headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

fn failure(
    status: StatusCode,
    error: &'static str,
    message: String,
    retry_after_secs: Option<u32>,
) -> Response {
    let mut response = (status, axum::Json(Failure { error, message })).into_response();
    if let Some(secs) = retry_after_secs
        && let Ok(value) = HeaderValue::from_str(&secs.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}
