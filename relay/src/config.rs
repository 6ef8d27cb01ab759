//! Plain configuration for a relay node. The binary owns the TOML file and converts it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meridian_protocol::token::TenantPublicKey;
use meridian_protocol::{NodeId, TenantId};

use crate::engine::EngineConfig;

/// Everything a relay node needs to start.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// This node's id within its cell.
    pub node: NodeId,
    /// The cell's id.
    pub cell: String,
    /// The jurisdiction: tokens must name it as their audience.
    pub jurisdiction: String,
    /// UDP address for QUIC.
    pub listen: SocketAddr,
    /// The address clients are told (`host:port`); defaults to the bound address.
    pub advertise: Option<String>,
    /// Where the sled cache lives (`<data_dir>/cache`).
    pub data_dir: PathBuf,
    /// TLS certificate chain (PEM).
    pub cert_file: PathBuf,
    /// TLS private key (PEM).
    pub key_file: PathBuf,
    /// The durable tier.
    pub durable: DurableConfig,
    /// Tenants served and their token keys.
    pub tenants: Vec<TenantKeys>,
    /// Transport and queue limits.
    pub limits: Limits,
    /// Engine limits and timings.
    pub engine: EngineConfig,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` over HTTP (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// Membership in a cell of several nodes (`None`: a relay on its own, owning every
    /// document).
    pub gossip: Option<GossipConfig>,
    /// Serve only the tenants the control plane places in this cell, redirecting the
    /// others (`None`: serve every configured tenant, as a deployment without a router).
    pub placement: Option<crate::placement::PlacementConfig>,
}

/// How a node finds and talks to the other nodes of its cell.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// UDP address for gossip.
    pub listen: SocketAddr,
    /// The gossip address other nodes are told (defaults to the bound address).
    pub advertise: Option<SocketAddr>,
    /// The cell's HMAC key (at least 16 bytes; every node of the cell has the same).
    pub key: Vec<u8>,
    /// Gossip addresses of other nodes to join through.
    pub seeds: Vec<SocketAddr>,
    /// Timings.
    pub membership: crate::cell::MembershipConfig,
}

/// Which durable tier to use.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum DurableConfig {
    /// Log files under a directory, committed by an fsynced feed log (the embedded default).
    Local {
        /// The directory.
        path: PathBuf,
    },
    /// DynamoDB + S3 for this node's jurisdiction.
    Aws(crate::store::AwsConfig),
}

/// A tenant and the public keys its tokens are verified with.
#[derive(Debug, Clone)]
pub struct TenantKeys {
    /// The tenant.
    pub tenant: TenantId,
    /// The tenant's jurisdiction (`None`: the node's). A tenant of another jurisdiction is
    /// refused: its data may not be written here.
    pub jurisdiction: Option<String>,
    /// Current keys (several during a rotation).
    pub public_keys: Vec<TenantPublicKey>,
    /// The longest token lifetime (`exp − iat`) accepted for this tenant; `None`: one
    /// day ([`meridian_protocol::token::DEFAULT_MAX_LIFETIME_SECS`]).
    pub max_token_lifetime: Option<Duration>,
}

impl TenantKeys {
    /// The longest token lifetime accepted, in seconds.
    pub fn max_lifetime_secs(&self) -> i64 {
        self.max_token_lifetime.map_or(
            meridian_protocol::token::DEFAULT_MAX_LIFETIME_SECS,
            |lifetime| i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
        )
    }
}

/// Transport limits (DESIGN.md "Limits").
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; more are refused.
    pub connections_max: usize,
    /// Bidirectional streams a connection may open after authentication (documents + 1),
    /// at most: the relay allows 16 at first and doubles the limit as they fill. A
    /// session's subscriptions are capped at one less (the control stream).
    pub streams_per_connection_max: u32,
    /// Connection receive window before authentication, in bytes.
    pub receive_window_unauthenticated: u32,
    /// Connection receive window after authentication, in bytes.
    pub receive_window: u32,
    /// Per-stream receive window, in bytes. A frame larger than it arrives in pieces (read
    /// as they come); what a stream left unread holds is at most this.
    pub stream_receive_window: u32,
    /// Bytes queued for one connection before it counts as a slow consumer.
    pub send_queue_bytes_max: usize,
    /// Messages queued per stream before the connection counts as a slow consumer.
    pub send_queue_messages_max: usize,
    /// How long a connection may take to send `hello`.
    pub hello_timeout: Duration,
    /// Idle timeout of the QUIC connection.
    pub idle_timeout: Duration,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Bound on queued engine inputs (sessions wait when it is full).
    pub engine_queue_max: usize,
    /// Documents loading from storage at once.
    pub loads_in_flight_max: usize,
    /// A stream that has started a frame and receives nothing more for this long is
    /// reset (a document stream) or closed (the control stream) with `timeout`.
    pub frame_stall_timeout: Duration,
    /// A started frame must be complete within this long, however it trickles in.
    pub frame_timeout: Duration,
    /// Bytes of unfinished frames one session may hold across its streams; a stream that
    /// would go over is reset with `overloaded`.
    pub unfinished_bytes_per_session_max: usize,
    /// Bytes of unfinished frames all sessions of the node may hold together.
    pub unfinished_bytes_per_node_max: usize,
    /// Rate limits and quotas per connection, user, tenant and source address.
    pub rates: crate::ratelimit::RateLimitConfig,
    /// How often the revocations are read from the durable tier.
    pub revocation_poll: Duration,
    /// The QUIC socket's kernel receive and send buffers, in bytes (asked for; the
    /// kernel caps them at `net.core.rmem_max` / `wmem_max`). Every connection's packets
    /// arrive through this one socket: a small buffer drops honest clients' packets
    /// while floods fill it, and each drop costs the honest client a loss recovery.
    pub udp_buffer_bytes: usize,
    /// How often the TLS certificate and key files are checked for a change (a changed
    /// pair is loaded and used for new connections, without a restart).
    pub tls_reload_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_max: 20_000,
            streams_per_connection_max: 256,
            receive_window_unauthenticated: 16 << 10,
            receive_window: 1 << 20,
            stream_receive_window: 256 << 10,
            send_queue_bytes_max: 8 << 20,
            send_queue_messages_max: 4096,
            hello_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(3),
            engine_queue_max: 8192,
            loads_in_flight_max: 16,
            frame_stall_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(60),
            unfinished_bytes_per_session_max: 4 << 20,
            unfinished_bytes_per_node_max: 256 << 20,
            rates: crate::ratelimit::RateLimitConfig::default(),
            revocation_poll: Duration::from_secs(1),
            udp_buffer_bytes: 8 << 20,
            tls_reload_interval: meridian_process::tls::RELOAD_INTERVAL,
        }
    }
}
