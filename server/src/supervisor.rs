//! Supervision of the node's background tasks (liveness, the leader balancer, bootstrap, the
//! directory, revocation watching, the batcher's shard queues).
//!
//! A task that panics, or a loop that ends while the node is still running, used to stop
//! silently: a node without its heartbeat task takes part in no election, one without its
//! balancer never hands leadership back. Every background task runs under [`supervise`]
//! instead: a *service* (a loop meant to run until shutdown) that ends or panics is restarted
//! after a pause, at most [`MAX_RESTARTS`] times in [`RESTART_WINDOW`]; a *job* (a task that
//! finishes, such as bootstrapping a shard) that panics or returns an error stops the node with
//! that error, as does a service that keeps failing. A stopped node exits non-zero, so that its
//! own supervisor (systemd, the chaos harness) restarts it cleanly.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::node::Node;

/// Restarts of one service allowed within [`RESTART_WINDOW`] before the node gives up.
pub const MAX_RESTARTS: usize = 3;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// Pause before a service is restarted.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// How a task is meant to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Runs until the node shuts down: ending earlier is a failure, and it is restarted.
    Service,
    /// Runs to completion: `Ok` ends it; an error or a panic stops the node.
    Job,
}

/// Why a supervised task stopped the node.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TaskFailure {
    #[error("background task {task} failed: {reason}")]
    Failed { task: &'static str, reason: String },
    #[error("background task {task} failed {restarts} times within {window:?}; last: {reason}")]
    KeepsFailing { task: &'static str, restarts: usize, window: Duration, reason: String },
}

/// Runs `make()`'s task on the node's background tracker under supervision (see the module
/// docs). `make` is called again for each restart.
pub fn supervise<F, Fut>(node: &Arc<Node>, task: &'static str, kind: Kind, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let node2 = node.clone();
    let span = tracing::info_span!("task", name = task);
    let shutdown = node.peers_shutdown.clone();
    node.background_tasks.spawn(run(shutdown, move |failure| node2.fail(failure), task, kind, make).instrument(span));
}

/// The supervision loop: `shutdown` says the node is stopping (a task may then end), `fail`
/// stops the node.
async fn run<F, Fut>(shutdown: CancellationToken, fail: impl Fn(TaskFailure), task: &'static str, kind: Kind, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let mut restarts: Vec<Instant> = Vec::new();
    loop {
        // Its own task, so that a panic is caught here rather than ending the supervisor.
        let outcome = tokio::spawn(make().in_current_span()).await;
        let stopping = shutdown.is_cancelled();
        let reason = match outcome {
            Ok(Ok(())) if stopping || kind == Kind::Job => return,
            Ok(Ok(())) => "it ended while the node is running".to_owned(),
            Ok(Err(e)) => e,
            Err(e) if e.is_panic() => format!("it panicked: {}", panic_message(e.into_panic())),
            Err(e) => format!("it was cancelled: {e}"),
        };
        if stopping {
            tracing::debug!(%reason, "background task ended during shutdown");
            return;
        }
        if kind == Kind::Job {
            fail(TaskFailure::Failed { task, reason });
            return;
        }
        let now = Instant::now();
        restarts.retain(|at| now.duration_since(*at) < RESTART_WINDOW);
        if restarts.len() >= MAX_RESTARTS {
            fail(TaskFailure::KeepsFailing { task, restarts: restarts.len(), window: RESTART_WINDOW, reason });
            return;
        }
        restarts.push(now);
        tracing::error!(%reason, restart = restarts.len(), "background task failed; restarting it");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RESTART_PAUSE) => {}
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "(no message)".to_owned(),
        },
    }
}

/// Runs a service that never fails on its own (its loop ends only at shutdown) under
/// supervision: the common case.
pub fn service<Fut>(node: &Arc<Node>, task: &'static str, body: fn(Arc<Node>) -> Fut)
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let node2 = node.clone();
    supervise(node, task, Kind::Service, move || {
        let fut = body(node2.clone());
        async move {
            fut.await;
            Ok(())
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Runs a supervised task to its end and returns how often it was started and the
    /// failure it stopped the node with, if any.
    async fn supervised(
        kind: Kind,
        body: impl Fn(usize) -> Result<(), String> + Send + Sync + 'static,
    ) -> (usize, Option<TaskFailure>) {
        let starts = Arc::new(AtomicUsize::new(0));
        let failure = Arc::new(Mutex::new(None));
        let shutdown = CancellationToken::new();
        let body = Arc::new(body);
        let (s, f) = (starts.clone(), failure.clone());
        let make = move || {
            let (n, body) = (s.fetch_add(1, Ordering::SeqCst) + 1, body.clone());
            async move { body(n) }
        };
        let done = run(shutdown.clone(), move |e| *f.lock().unwrap() = Some(e), "test", kind, make);
        tokio::time::timeout(Duration::from_secs(3600), done).await.expect("supervision ends");
        let failure = failure.lock().unwrap().take();
        (starts.load(Ordering::SeqCst), failure)
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_that_panics_once_is_restarted_and_one_that_keeps_panicking_stops_the_node() {
        // Panics on its first start, then ends as if shut down... which it was not: that
        // counts as a failure too, until the restarts run out.
        let (starts, failure) = supervised(Kind::Service, |n| if n == 1 { panic!("boom") } else { Ok(()) }).await;
        assert_eq!(starts, MAX_RESTARTS + 1);
        match failure {
            Some(TaskFailure::KeepsFailing { restarts, reason, .. }) => {
                assert_eq!(restarts, MAX_RESTARTS);
                assert!(reason.contains("ended while the node is running"), "{reason}");
            }
            other => panic!("expected the node to stop, got {other:?}"),
        }
        let (_, failure) = supervised(Kind::Service, |_| panic!("always")).await;
        assert!(
            matches!(failure, Some(TaskFailure::KeepsFailing { reason, .. }) if reason.contains("panicked: always"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_runs_once_and_its_error_stops_the_node() {
        assert_eq!(supervised(Kind::Job, |_| Ok(())).await.0, 1);
        let (starts, failure) = supervised(Kind::Job, |_| Err("disk on fire".into())).await;
        assert_eq!(starts, 1);
        assert!(matches!(failure, Some(TaskFailure::Failed { reason, .. }) if reason == "disk on fire"));
        let (_, failure) = supervised(Kind::Job, |_| panic!("oops")).await;
        assert!(matches!(failure, Some(TaskFailure::Failed { reason, .. }) if reason.contains("panicked: oops")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_that_ends_at_shutdown_is_not_restarted() {
        let shutdown = CancellationToken::new();
        let starts = Arc::new(AtomicUsize::new(0));
        let (s, sd) = (starts.clone(), shutdown.clone());
        let make = move || {
            s.fetch_add(1, Ordering::SeqCst);
            let sd = sd.clone();
            async move {
                sd.cancelled().await;
                Ok(())
            }
        };
        let task =
            tokio::spawn(run(shutdown.clone(), |e| panic!("no failure expected: {e}"), "t", Kind::Service, make));
        tokio::time::sleep(Duration::from_secs(5)).await;
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(starts.load(Ordering::SeqCst), 1);
    }
}
