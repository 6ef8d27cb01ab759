//! The logging hook: the client's `tracing` events, handed to the app's logger.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};

/// How severe a log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, uniffi::Enum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn of(level: &tracing::Level) -> LogLevel {
        match *level {
            tracing::Level::ERROR => LogLevel::Error,
            tracing::Level::WARN => LogLevel::Warn,
            tracing::Level::INFO => LogLevel::Info,
            tracing::Level::DEBUG => LogLevel::Debug,
            _ => LogLevel::Trace,
        }
    }
}

/// Where the client's log lines go; implemented by the app. Called on the client's
/// threads: keep it quick.
#[uniffi::export(with_foreign)]
pub trait Logger: Send + Sync {
    /// One line: its level, its source (a Rust module path) and its text with fields.
    fn log(&self, level: LogLevel, target: String, detail: String);
}

struct Hook {
    logger: RwLock<Option<Arc<dyn Logger>>>,
    level: AtomicU8,
}

static HOOK: OnceLock<Arc<Hook>> = OnceLock::new();

/// Sends the client's log lines at `level` and above to `logger` (replacing an earlier
/// one). The first call installs the hook as the process's `tracing` subscriber; if the
/// process already has another one, an error says so.
#[uniffi::export]
pub fn set_logger(logger: Arc<dyn Logger>, level: LogLevel) -> Result<(), crate::MeridianError> {
    let mut installed = Ok(());
    let hook = HOOK.get_or_init(|| {
        let hook = Arc::new(Hook {
            logger: RwLock::new(None),
            level: AtomicU8::new(level as u8),
        });
        let subscriber = tracing_subscriber::registry().with(Forward(hook.clone()));
        installed = tracing::subscriber::set_global_default(subscriber).map_err(|e| {
            crate::MeridianError::Config {
                detail: format!("a logger is already installed: {e}"),
            }
        });
        hook
    });
    installed?;
    hook.level.store(level as u8, Ordering::Relaxed);
    if let Ok(mut slot) = hook.logger.write() {
        *slot = Some(logger);
    }
    Ok(())
}

/// Stops sending log lines to the app's logger (before the app's runtime shuts down).
#[uniffi::export]
pub fn clear_logger() {
    if let Some(hook) = HOOK.get()
        && let Ok(mut slot) = hook.logger.write()
    {
        *slot = None;
    }
}

struct Forward(Arc<Hook>);

#[derive(Default)]
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for Forward {
    // The level can change after a callsite was first seen: ask every time.
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        (LogLevel::of(metadata.level()) as u8) <= self.0.level.load(Ordering::Relaxed)
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let logger = match self.0.logger.read() {
            Ok(slot) => slot.clone(),
            Err(_) => None,
        };
        if let Some(logger) = logger {
            let mut line = Line::default();
            event.record(&mut line);
            let metadata = event.metadata();
            logger.log(
                LogLevel::of(metadata.level()),
                metadata.target().to_owned(),
                line.0,
            );
        }
    }
}
