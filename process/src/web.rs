//! Public HTTP services on axum (the WebSocket gateway's upgrades, the router's HTTP
//! locate), served with the admin endpoint's defences: request headers must arrive
//! within `header_timeout` and a request be answered within `request_timeout` (an
//! upgraded connection then lives on outside these bounds: its service counts it), a
//! source address (an IPv6 /64) holds at most `per_address_max` connections still in
//! their HTTP phase and the listener `connections_max`; more are closed at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::http::{ACCEPT_RETRY, AddressSlot, PerAddress};

/// Bounds on a listener's connections in their HTTP phase.
#[derive(Debug, Clone, Copy)]
pub struct WebLimits {
    /// Connections in their HTTP phase at once.
    pub connections_max: usize,
    /// Of those, from one source address (an IPv6 /64).
    pub per_address_max: usize,
    /// How long a connection may take to send its request headers.
    pub header_timeout: Duration,
    /// How long a request may take to be answered (or upgraded).
    pub request_timeout: Duration,
}

impl Default for WebLimits {
    fn default() -> Self {
        WebLimits {
            connections_max: 4096,
            per_address_max: 64,
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// A connection's place among its source address's connections in their HTTP phase, as
/// an axum `Extension` on every request. A handler that finds the connection answers for
/// no address (another node of the cell forwarding its clients' requests, proven with
/// the cell's key) gives the place back: that address is every forwarded client's, and
/// its bound must not cap what the node forwards for all of them.
#[derive(Clone)]
pub struct AddressHold(Arc<std::sync::Mutex<Option<AddressSlot>>>);

impl AddressHold {
    /// Gives the connection's place back (once; later calls do nothing).
    pub fn release(&self) {
        if let Ok(mut slot) = self.0.lock() {
            slot.take();
        }
    }
}

/// Serves `app` on `listener` until the task is aborted; handlers can extract
/// `ConnectInfo<SocketAddr>` and `Extension<AddressHold>`. `refused` is called with
/// `address` or `limit` for every connection closed at once, `timeout` for every one
/// cut.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: WebLimits,
    refused: fn(&'static str),
) {
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let per_address = Arc::new(PerAddress::new(limits.per_address_max));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // Out of file descriptors, say: retrying at once would spin.
            tokio::time::sleep(ACCEPT_RETRY).await;
            continue;
        };
        // Small messages (sync acknowledgements, presence) go out at once: Nagle's
        // algorithm held them back behind delayed acknowledgements.
        let _ = stream.set_nodelay(true);
        let Some(slot) = per_address.take(peer.ip()) else {
            refused("address");
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused("limit");
            continue;
        };
        let hold = AddressHold(Arc::new(std::sync::Mutex::new(Some(slot))));
        let service = app
            .clone()
            .layer(axum::Extension(ConnectInfo::<SocketAddr>(peer)))
            .layer(axum::Extension(hold.clone()));
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(service);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                // Keep-alive stays on: with it off, hyper answers `Connection: close`,
                // which refuses a WebSocket upgrade. The request timeout bounds a
                // connection's HTTP phase whatever it sends.
                .keep_alive(true)
                .max_buf_size(crate::http::HEADERS_MAX)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if tokio::time::timeout(limits.request_timeout, connection)
                .await
                .is_err()
            {
                refused("timeout");
            }
            drop((permit, hold));
        });
    }
}
