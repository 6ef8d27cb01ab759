//! [`Client`]: a connection to the tenant's cell shared by every open document.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::MeridianError;
use crate::document::{Document, Subscription};
use crate::runtime::{block_on, spawn};

/// How to reach and authenticate with the relays, when not from a config file.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Settings {
    /// A relay's `host:port` (any node of the tenant's cell). With a `router`, only where
    /// to try when the router cannot be reached (may be empty).
    pub endpoint: String,
    /// The cell's other nodes (`host:port`).
    #[uniffi(default = [])]
    pub nodes: Vec<String>,
    /// A router's `host:port`: the client locates its tenant's home cell through it.
    #[uniffi(default = None)]
    pub router: Option<String>,
    /// The name the relays' certificates are checked against.
    #[uniffi(default = "localhost")]
    pub server_name: String,
    /// PEM of the CA that signs relay certificates; `None`: the operating system's trust
    /// store.
    #[uniffi(default = None)]
    pub ca_pem: Option<String>,
    /// A capability token.
    pub token: String,
    /// A directory where edits not yet Durable survive app restarts.
    #[uniffi(default = None)]
    pub store_dir: Option<String>,
    /// Name and version sent to the relay, for its logs.
    #[uniffi(default = None)]
    pub client_name: Option<String>,
}

/// Where fresh tokens come from; implemented by the app (usually by asking its backend).
/// Called on a background thread before the current token expires and when a relay
/// refuses it.
#[uniffi::export(with_foreign)]
pub trait TokenProvider: Send + Sync {
    /// A fresh token, or `None` if none could be had now (asked again later).
    fn fresh_token(&self) -> Option<String>;
}

/// The connection as the app sees it.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum ConnectionState {
    /// Connecting, or waiting to reconnect.
    Connecting,
    /// Connected and authenticated.
    Connected { session: u64, nodes: Vec<String> },
    /// No cell of the tenant's jurisdiction can serve it now; the client keeps trying.
    Unavailable { reason: String },
    /// Offline on purpose until `resume`.
    Paused,
    /// Stopped for good: the token was refused or the client was closed.
    Failed { reason: String },
}

impl From<meridian_client::ConnectionState> for ConnectionState {
    fn from(state: meridian_client::ConnectionState) -> Self {
        use meridian_client::ConnectionState as S;
        match state {
            S::Connecting => ConnectionState::Connecting,
            S::Connected { session, nodes } => ConnectionState::Connected { session, nodes },
            S::Unavailable(reason) => ConnectionState::Unavailable { reason },
            S::Paused => ConnectionState::Paused,
            S::Failed(reason) => ConnectionState::Failed { reason },
        }
    }
}

/// Hears the connection's state changes; implemented by the app.
#[uniffi::export(with_foreign)]
pub trait ConnectionListener: Send + Sync {
    /// The state changed (called on a thread of the listener's own, in order).
    fn on_state(&self, state: ConnectionState);
}

/// Adapts the app's provider to the SDK's.
struct Provider(Arc<dyn TokenProvider>);

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenProvider")
    }
}

impl meridian_client::TokenProvider for Provider {
    fn fresh_token(&self) -> Result<String, String> {
        self.0
            .fresh_token()
            .ok_or_else(|| "the app's token provider had none".into())
    }
}

/// How long `from_config` and `connect` may take to reach a first relay.
const CONNECT_LIMIT: f64 = 60.0;

/// A client of one tenant's cell. Every method fails with `Closed` after [`Client::shutdown`].
#[derive(uniffi::Object)]
pub struct Client {
    inner: meridian_client::Client,
    pub(crate) closed: Arc<AtomicBool>,
    docs: Mutex<HashMap<String, Arc<Document>>>,
    subscriptions: Mutex<Vec<Arc<Subscription>>>,
}

impl Client {
    fn connect_with(config: meridian_client::ClientConfig) -> Result<Arc<Client>, MeridianError> {
        let inner = block_on(Some(CONNECT_LIMIT), async move {
            Ok(meridian_client::Client::connect(config).await?)
        })?;
        Ok(Arc::new(Client {
            inner,
            closed: Arc::new(AtomicBool::new(false)),
            docs: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(Vec::new()),
        }))
    }

    fn check_open(&self) -> Result<(), MeridianError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(MeridianError::Closed);
        }
        Ok(())
    }

    /// Hands a command to the client's background task (quick: a bounded queue).
    fn command<F, Fut>(&self, command: F) -> Result<(), MeridianError>
    where
        F: FnOnce(meridian_client::Client) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.check_open()?;
        let sent = command(self.inner.clone());
        block_on(Some(CONNECT_LIMIT), async move {
            sent.await;
            Ok(())
        })
    }

    fn keep(&self, subscription: &Arc<Subscription>) {
        if let Ok(mut list) = self.subscriptions.lock() {
            list.retain(|s| !s.is_cancelled());
            list.push(subscription.clone());
        }
    }
}

#[uniffi::export]
impl Client {
    /// Connects with a `client.toml` (the file `meridian dev` writes; relative paths in it
    /// are relative to the file).
    #[uniffi::constructor]
    pub fn from_config(path: String) -> Result<Arc<Client>, MeridianError> {
        let config = meridian_client::ClientConfig::from_file(std::path::Path::new(&path))?;
        Client::connect_with(config)
    }

    /// Connects with a `client.toml` and a token provider that keeps the token fresh.
    #[uniffi::constructor]
    pub fn from_config_with_provider(
        path: String,
        provider: Arc<dyn TokenProvider>,
    ) -> Result<Arc<Client>, MeridianError> {
        let mut config = meridian_client::ClientConfig::from_file(std::path::Path::new(&path))?;
        config.token_provider = Some(Arc::new(Provider(provider)));
        Client::connect_with(config)
    }

    /// Connects with explicit settings and, optionally, a token provider.
    #[uniffi::constructor]
    pub fn connect(
        settings: Settings,
        provider: Option<Arc<dyn TokenProvider>>,
    ) -> Result<Arc<Client>, MeridianError> {
        let ca = settings.ca_pem.map(String::into_bytes).unwrap_or_default();
        let mut config = meridian_client::ClientConfig::new(settings.endpoint, ca, settings.token);
        config.nodes = settings.nodes;
        config.router = settings.router;
        config.server_name = settings.server_name;
        config.store_dir = settings.store_dir.map(Into::into);
        if let Some(name) = settings.client_name {
            config.client_name = name;
        }
        config.token_provider =
            provider.map(|p| Arc::new(Provider(p)) as Arc<dyn meridian_client::TokenProvider>);
        Client::connect_with(config)
    }

    /// Opens a document (loading what the local store holds) and subscribes to it;
    /// returns at once. The same id gives the same document.
    pub fn open(&self, doc_id: String) -> Result<Arc<Document>, MeridianError> {
        self.check_open()?;
        if let Some(doc) = self.docs.lock().ok().and_then(|d| d.get(&doc_id).cloned()) {
            return Ok(doc);
        }
        let client = self.inner.clone();
        let id = doc_id.clone();
        let handle = block_on(
            Some(CONNECT_LIMIT),
            async move { Ok(client.open(&id).await?) },
        )?;
        let doc = Arc::new(Document::new(handle, self.closed.clone()));
        if let Ok(mut docs) = self.docs.lock() {
            docs.insert(doc_id, doc.clone());
        }
        Ok(doc)
    }

    /// The connection's state now.
    pub fn state(&self) -> ConnectionState {
        self.inner.state().into()
    }

    /// Waits until connected (or failed for good), at most `timeout_s` seconds.
    pub fn wait_connected(&self, timeout_s: f64) -> Result<(), MeridianError> {
        self.check_open()?;
        let client = self.inner.clone();
        block_on(Some(timeout_s), async move {
            Ok(client.wait_connected().await?)
        })
    }

    /// Like `wait_connected`, cancellable, without a timeout of its own.
    pub async fn wait_connected_async(&self) -> Result<(), MeridianError> {
        self.check_open()?;
        let client = self.inner.clone();
        spawn(async move { Ok(client.wait_connected().await?) }).await
    }

    /// Replaces the token: live connections move to it at once.
    pub fn set_token(&self, token: String) -> Result<(), MeridianError> {
        self.command(|client| async move { client.set_token(token).await })
    }

    /// Goes offline until `resume` (the app moved to the background). Edits wait.
    pub fn pause(&self) -> Result<(), MeridianError> {
        self.command(|client| async move { client.pause().await })
    }

    /// Reconnects after `pause`.
    pub fn resume(&self) -> Result<(), MeridianError> {
        self.command(|client| async move { client.resume().await })
    }

    /// The device's network changed: connections move to a fresh socket.
    pub fn network_changed(&self) -> Result<(), MeridianError> {
        self.command(|client| async move { client.network_changed().await })
    }

    /// Calls `listener` with every change of the connection's state (first with the
    /// state now), on a thread of its own, until the subscription is cancelled or the
    /// client closed.
    pub fn on_state(
        &self,
        listener: Arc<dyn ConnectionListener>,
    ) -> Result<Arc<Subscription>, MeridianError> {
        self.check_open()?;
        let mut states = self.inner.state_changes();
        let subscription = Subscription::start("meridian-state", move |mut cancelled| {
            let runtime = crate::runtime::runtime()?;
            loop {
                let state = states.borrow_and_update().clone();
                if cancelled.is_set() {
                    return Ok(());
                }
                let failed = matches!(state, meridian_client::ConnectionState::Failed(_));
                listener.on_state(state.into());
                if failed {
                    return Ok(());
                }
                let ended = runtime.block_on(async {
                    tokio::select! {
                        changed = states.changed() => changed.is_err(),
                        () = cancelled.cancelled() => true,
                    }
                });
                if ended {
                    return Ok(());
                }
            }
        })?;
        self.keep(&subscription);
        Ok(subscription)
    }

    /// UDP bytes received over every connection this client made.
    pub fn bytes_received(&self) -> u64 {
        self.inner.bytes_received()
    }

    /// Closes the connections and ends every listener. Edits not yet Durable stay in the
    /// store (when one is configured) and are sent by the next client. Closing twice is
    /// harmless. (Named `shutdown`, not `close`: Kotlin's `AutoCloseable.close` frees the
    /// object itself.)
    pub fn shutdown(&self) -> Result<(), MeridianError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let subscriptions = self
            .subscriptions
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        for subscription in subscriptions {
            subscription.stop();
        }
        let docs: Vec<Arc<Document>> = self
            .docs
            .lock()
            .map(|d| d.values().cloned().collect())
            .unwrap_or_default();
        for doc in docs {
            doc.stop_listeners();
        }
        let client = self.inner.clone();
        block_on(Some(CONNECT_LIMIT), async move {
            client.close().await;
            Ok(())
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel)
            && let Ok(list) = self.subscriptions.lock()
        {
            for subscription in list.iter() {
                subscription.cancel();
            }
        }
    }
}
