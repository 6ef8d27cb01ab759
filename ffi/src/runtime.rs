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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_must_be_finite_and_not_negative() {
        assert!(timeout(0.0).is_ok());
        assert_eq!(timeout(1.5).unwrap(), Duration::from_millis(1500));
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                timeout(bad),
                Err(MeridianError::InvalidValue { .. })
            ));
        }
    }

    #[test]
    fn a_blocking_call_times_out_and_refuses_a_runtime_thread() {
        let never = block_on(
            Some(0.05),
            std::future::pending::<Result<(), MeridianError>>(),
        );
        assert_eq!(never, Err(MeridianError::Timeout { seconds: 0.05 }));
        let inside = runtime()
            .unwrap()
            .block_on(async { tokio::spawn(async { block_on(None, async { Ok(1) }) }).await })
            .unwrap();
        assert_eq!(inside, Err(MeridianError::WouldBlock));
    }

    #[test]
    fn dropping_an_async_call_aborts_its_work() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        struct Flag(std::sync::mpsc::Sender<()>);
        impl Drop for Flag {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let call = spawn(async move {
            let _flag = Flag(tx);
            std::future::pending::<Result<(), MeridianError>>().await
        });
        let outcome = runtime()
            .unwrap()
            .block_on(async { tokio::time::timeout(Duration::from_millis(50), call).await });
        assert!(outcome.is_err(), "the call never ends by itself");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the spawned work was dropped when the call was");
    }
}
