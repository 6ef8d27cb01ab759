//! The runtime every client's background work runs on, and how calls from foreign
//! threads wait for it.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use crate::MeridianError;

/// Worker threads of the shared runtime (an app has one client or a few; QUIC and
/// Automerge work is small per event).
const WORKERS: usize = 2;

static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();

/// The process-wide runtime, started on first use.
pub(crate) fn runtime() -> Result<&'static tokio::runtime::Runtime, MeridianError> {
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(WORKERS)
                .thread_name("meridian")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|message| MeridianError::Config {
            detail: format!("cannot start the client runtime: {message}"),
        })
}

/// A timeout in seconds as a [`Duration`] (finite, not negative).
pub(crate) fn timeout(seconds: f64) -> Result<Duration, MeridianError> {
    Duration::try_from_secs_f64(seconds).map_err(|_| MeridianError::InvalidValue {
        detail: format!("timeout {seconds} s is not a finite, non-negative number"),
    })
}

/// Runs `future` on the runtime and blocks the calling (foreign) thread until it ends,
/// at most `limit` (`None`: no limit). Refuses to block a runtime thread.
pub(crate) fn block_on<T>(
    limit: Option<f64>,
    future: impl Future<Output = Result<T, MeridianError>> + Send + 'static,
) -> Result<T, MeridianError>
where
    T: Send + 'static,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(MeridianError::WouldBlock);
    }
    let runtime = runtime()?;
    match limit {
        None => runtime.block_on(future),
        Some(seconds) => {
            let limit = timeout(seconds)?;
            runtime.block_on(async move {
                tokio::time::timeout(limit, future)
                    .await
                    .unwrap_or(Err(MeridianError::Timeout { seconds }))
            })
        }
    }
}

/// Runs `future` on the runtime for an async foreign call. Dropping the returned future
/// (the caller's task was cancelled) aborts the work.
pub(crate) async fn spawn<T>(
    future: impl Future<Output = Result<T, MeridianError>> + Send + 'static,
) -> Result<T, MeridianError>
where
    T: Send + 'static,
{
    struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
    impl<T> Drop for AbortOnDrop<T> {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut task = AbortOnDrop(runtime()?.spawn(future));
    match (&mut task.0).await {
        Ok(result) => result,
        // Only a panic ends the task otherwise (aborts happen after the caller is gone).
        Err(_) => Err(MeridianError::Closed),
    }
}
