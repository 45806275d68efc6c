//! The owner side of a queue: starts the tasks; flush and shutdown.

use std::sync::Arc;

use ncm_cache_core::{CacheError, Result};
use tokio::task::JoinHandle;

use super::QueueValue;
use super::queue::{Shared, Step, lock, maintain, worker};
use crate::stats::Counter;

/// The owner side: the worker and maintenance tasks, stopped on shutdown or when the last
/// handle is dropped (after a final flush).
pub(crate) struct Handle<V> {
    pub(crate) shared: Arc<Shared<V>>,
    worker: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    maintenance: Option<JoinHandle<()>>,
}

impl<V: QueueValue> Handle<V> {
    pub(crate) async fn start(shared: Shared<V>) -> Result<Self> {
        let shared = Arc::new(shared);
        if shared.journal.is_some() {
            shared.recover().await?;
        }
        let maintenance = shared
            .journal
            .clone()
            .map(|j| tokio::spawn(maintain(Arc::downgrade(&shared), j)));
        let worker = tokio::spawn(worker(Arc::clone(&shared)));
        Ok(Self {
            shared,
            worker: tokio::sync::Mutex::new(Some(worker)),
            maintenance,
        })
    }

    pub(crate) async fn flush(&self) -> Result<()> {
        let s = &self.shared;
        let dead_before = s.stats.get(Counter::DeadLettered);
        let (target, exited) = {
            let mut st = lock(&s.state);
            st.flush_target = st.flush_target.max(st.seq);
            (st.seq, st.exited)
        };
        if exited {
            self.drain_inline().await;
        } else {
            let mut rx = s.flushed.subscribe();
            s.wake.notify_one();
            // The worker publishes u64::MAX when it exits, so this cannot hang on a dead task.
            let _ = rx.wait_for(|done| *done >= target).await;
            if lock(&s.state).exited {
                self.drain_inline().await;
            }
        }
        s.flush_error(dead_before)
    }

    /// Persists everything pending from the caller's task (the worker has stopped).
    async fn drain_inline(&self) {
        let _one = self.shared.inline.lock().await;
        lock(&self.shared.state).closing = true;
        while matches!(self.shared.step(false).await, Step::Persisted) {}
        self.shared.ack(Vec::new()).await;
    }

    pub(crate) async fn shutdown(&self) -> Result<()> {
        let s = &self.shared;
        let dead_before = s.stats.get(Counter::DeadLettered);
        lock(&s.state).closing = true;
        s.wake.notify_one();
        s.space.notify_waiters();
        if let Some(task) = self.worker.lock().await.take()
            && let Err(e) = task.await
        {
            tracing::error!(queue = %s.name, error = %e, "write-behind worker failed");
        }
        if let Some(m) = &self.maintenance {
            m.abort();
        }
        // Anything requeued after the worker stopped (e.g. a replay) is drained here.
        self.drain_inline().await;
        s.flush_error(dead_before)?;
        let st = lock(&s.state);
        match st.dead.len() {
            0 => Ok(()),
            n => Err(CacheError::store(format!(
                "write-behind queue {:?} stopped with {n} dead letters",
                s.name
            ))),
        }
    }
}

impl<V> Drop for Handle<V> {
    fn drop(&mut self) {
        // The worker keeps running until everything pending is persisted, then exits.
        let mut st = lock(&self.shared.state);
        st.closing = true;
        drop(st);
        self.shared.wake.notify_one();
        self.shared.space.notify_waiters();
    }
}

impl<V> Drop for Shared<V> {
    fn drop(&mut self) {
        let st = lock(&self.state);
        let lost = st.pending.len() + st.in_flight;
        if lost > 0 {
            if self.journal.is_some() {
                tracing::warn!(queue = %self.name, pending = lost, "write-behind queue dropped with pending writes; they stay journaled in Redis and will be recovered");
            } else {
                tracing::error!(queue = %self.name, pending = lost, "write-behind queue dropped with pending writes that were never persisted (the runtime stopped before the queue was shut down)");
            }
        }
    }
}
