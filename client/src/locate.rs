//! Finding a tenant's home cell through a router: one `locate` on a fresh stream.

use meridian_protocol::{ClientToRelay, ErrorCode, FrameDecoder, RelayToClient, TenantId};

use crate::{ClientConfig, ClientError, node_list};

/// A tenant's home cell, as a router answered `locate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    /// The cell.
    pub cell: String,
    /// Its region.
    pub region: String,
    /// The tenant's jurisdiction.
    pub jurisdiction: String,
    /// The cell's nodes (`host:port`).
    pub nodes: Vec<String>,
    /// The placement epoch.
    pub epoch: u64,
}

/// The largest answer read from a router.
const ANSWER_MAX: usize = 64 << 10;

/// Asks the router at `router` (`host:port`) where `tenant` lives.
///
/// Errors: [`ClientError::Unavailable`] when no cell of the tenant's jurisdiction can
/// serve it now; [`ClientError::Relay`] with `UnknownTenant` for a tenant the control
/// plane does not know; [`ClientError::Unreachable`] when the router cannot be reached.
pub async fn locate(
    endpoint: &quinn::Endpoint,
    config: &ClientConfig,
    router: &str,
    tenant: &TenantId,
) -> Result<Home, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable {
        endpoint: router.to_owned(),
        reason,
    };
    let addr = tokio::net::lookup_host(router)
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".into()))?;
    let attempt = async {
        let connection = endpoint
            .connect(addr, &config.server_name)
            .map_err(|e| unreachable(e.to_string()))?
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let request = ClientToRelay::Locate {
            tenant: tenant.clone(),
        };
        send.write_all(&request.to_bytes())
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = send.finish();
        let mut decoder = FrameDecoder::new();
        let mut read = 0usize;
        let answer = loop {
            let frame = decoder.next_frame().map_err(|e| ClientError::Relay {
                code: ErrorCode::Malformed,
                message: e.to_string(),
            })?;
            if let Some(frame) = frame {
                break RelayToClient::decode(&frame).map_err(|e| ClientError::Relay {
                    code: ErrorCode::Malformed,
                    message: e.to_string(),
                })?;
            }
            match recv.read_chunk(ANSWER_MAX, true).await {
                Ok(Some(chunk)) if read + chunk.bytes.len() <= ANSWER_MAX => {
                    read += chunk.bytes.len();
                    decoder.push(&chunk.bytes);
                }
                Ok(Some(_)) => return Err(unreachable("answer too large".into())),
                Ok(None) => return Err(unreachable("the router closed the stream".into())),
                Err(e) => return Err(unreachable(e.to_string())),
            }
        };
        connection.close(0u32.into(), b"located");
        match answer {
            RelayToClient::Home {
                tenant: answered,
                cell,
                region,
                jurisdiction,
                nodes,
                epoch,
            } if answered == *tenant => Ok(Home {
                cell,
                region,
                jurisdiction,
                nodes: node_list(&nodes),
                epoch,
            }),
            RelayToClient::Error {
                code: ErrorCode::Unavailable,
                message,
                ..
            } => Err(ClientError::Unavailable(message)),
            RelayToClient::Error { code, message, .. } => Err(ClientError::Relay { code, message }),
            other => Err(unreachable(format!("unexpected answer {other:?}"))),
        }
    };
    tokio::time::timeout(config.connect_timeout, attempt)
        .await
        .map_err(|_| unreachable("timed out".into()))?
}
