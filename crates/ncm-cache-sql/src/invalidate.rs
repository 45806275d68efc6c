//! Invalidation: by query, pattern, table, write — by replacing generation tokens, which costs
//! one write per table however many keys the store holds — and the retry of invalidations that
//! failed after a write committed.

use std::sync::Arc;
use std::time::Duration;

use ncm_cache_core::{Bytes, CacheError, Codec, Result};

use crate::cache::SqlCache;
use crate::flow::new_token;
use crate::keys::Analysis;
use crate::params::SqlParams;
use crate::stats::SqlStats;
use crate::tables::parse_table_name;

/// Background retries of invalidations that failed after a write: the first delay, doubling
/// up to the second, until they succeed.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Invalidations waiting for the background retrier.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    tables: std::collections::BTreeSet<String>,
    all: bool,
    /// A schema change to announce (the shared catalog token, see `deps.rs`).
    schema: bool,
    running: bool,
}

impl Pending {
    fn add(&mut self, target: Target, schema: bool) {
        match target {
            Target::All => self.all = true,
            Target::Tables(t) => self.tables.extend(t),
        }
        self.schema |= schema;
    }
}

/// What an invalidation replaces: the tokens of some tables, or the database's.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Tables(Vec<String>),
    All,
}

impl<C: Codec> SqlCache<C> {
    /// Removes the cached result of `sql` with `params`; `true` when there was one.
    pub async fn invalidate_query(&self, sql: &str, params: impl Into<SqlParams>) -> Result<bool> {
        let params = params.into();
        let analysis = self.analyze(sql, &params);
        let values = analysis.template.values(&params)?;
        let Some(key) = self.inner().keys.entry(&analysis, &values) else {
            return Ok(false);
        };
        let removed = self.inner().cache.backend().delete(&key).await?;
        self.count(u64::from(removed));
        Ok(removed)
    }

    /// Removes the cached results whose key, after `{namespace}:{database}:`, matches a Redis
    /// glob. That part reads `|table|table|:hash`, so `*users*` (the original's example)
    /// removes every query on a table whose name contains `users`. Returns how many.
    ///
    /// This one **scans the keys** of the store (SCAN on Redis): its cost grows with the
    /// keyspace. Use [`invalidate_table`](Self::invalidate_table) on hot paths.
    pub async fn invalidate_pattern(&self, pattern: &str) -> Result<u64> {
        let full = self.inner().keys.user_pattern(pattern);
        let n = self.inner().cache.backend().clear_pattern(&full).await?;
        self.count(n);
        Ok(n)
    }

    /// Invalidates every cached query that reads `table` (`users`, `public.users`,
    /// `"Users"`; compared by bare name, so a schema-qualified name also covers queries that
    /// name the table without its schema) or a table that depends on it (views, partitions,
    /// cascading foreign keys, declared dependencies). Returns how many tables were
    /// invalidated, `table` included.
    ///
    /// One write per table, whatever the size of the keyspace: each table's generation token
    /// is replaced, and results recorded under the old token are never served again (they
    /// expire with their TTL).
    pub async fn invalidate_table(&self, table: &str) -> Result<u64> {
        self.invalidate_tables([table]).await
    }

    /// [`invalidate_table`](Self::invalidate_table) for several tables, in one batch.
    pub async fn invalidate_tables<I, S>(&self, tables: I) -> Result<u64>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let dialect = self.inner().dialect;
        let tags: Vec<String> = tables
            .into_iter()
            .map(|t| parse_table_name(t.as_ref(), dialect).bare().to_owned())
            .collect();
        self.invalidate(Target::Tables(tags), false).await
    }

    /// Invalidates every cached result of this database (one write). Returns 1.
    pub async fn invalidate_all(&self) -> Result<u64> {
        self.invalidate(Target::All, false).await
    }

    /// Replaces the generation tokens of `target` (tables expanded by their dependencies) and,
    /// after a schema change (`schema`), the shared catalog token in the same write, so every
    /// instance reloads its dependency catalog before its next expansion.
    pub(crate) async fn invalidate(&self, target: Target, schema: bool) -> Result<u64> {
        let inner = self.inner();
        let mut keys = match &target {
            Target::All => vec![inner.keys.generation_all()],
            Target::Tables(tags) if tags.is_empty() => Vec::new(),
            // Dependencies unknown (the catalog could not be read): everything.
            Target::Tables(tags) => match self.dependents(tags).await {
                Some(tables) => tables.iter().map(|t| inner.keys.generation(t)).collect(),
                None => vec![inner.keys.generation_all()],
            },
        };
        let generations = keys.len() as u64;
        if schema {
            keys.push(inner.keys.catalog());
        }
        if keys.is_empty() {
            return Ok(0);
        }
        let entries: Vec<(&str, Bytes)> = keys
            .iter()
            .map(|k| (k.as_str(), Bytes::from(new_token())))
            .collect();
        inner
            .cache
            .backend()
            .set_many(&entries, Some(crate::keys::GENERATION_TTL))
            .await?;
        let n = generations;
        self.count(n);
        tracing::debug!(?target, generations = n, "invalidated");
        Ok(n)
    }

    /// [`write_target`](Self::write_target), or no table when a schema change wrote none
    /// (its catalog token is still replaced).
    fn write_target_or_schema(analysis: &Analysis) -> Option<Target> {
        Self::write_target(analysis).or_else(|| analysis.ddl.then(|| Target::Tables(Vec::new())))
    }

    /// What a statement that ran wrote: its tables, or everything when they are unknown.
    fn write_target(analysis: &Analysis) -> Option<Target> {
        if analysis.unknown_writes {
            return Some(Target::All);
        }
        if analysis.writes.is_empty() {
            return None;
        }
        Some(Target::Tables(
            analysis
                .writes
                .iter()
                .map(|t| t.bare().to_owned())
                .collect(),
        ))
    }

    /// Invalidates what a statement that ran wrote. Never fails: the statement's result is
    /// returned to the caller whatever happens here. A failure is counted and logged, and the
    /// tables join the pending set of the cache's one background retrier (with backoff, until
    /// it succeeds), so a write storm during an outage costs a set of table names, not a task
    /// per write.
    pub(crate) async fn invalidate_after_write(&self, analysis: &Analysis) {
        if analysis.ddl {
            self.inner().deps.mark_stale();
        }
        let Some(target) = Self::write_target_or_schema(analysis) else {
            return;
        };
        let Err(err) = self.invalidate(target.clone(), analysis.ddl).await else {
            return;
        };
        let stats = &self.inner().stats;
        SqlStats::count(&stats.invalidation_failures, 1);
        tracing::error!(error = %err, ?target,
            "invalidation after a committed write failed; retrying in the background \
             (cached results of these tables may be stale meanwhile)");
        self.retry_later(target, analysis.ddl);
    }

    /// Runs the write `make` returns (a statement that writes), then invalidates what it
    /// wrote — also when this future is dropped first (a request timeout, a client gone).
    /// Both run in a task of their own, which the caller only waits for: a statement already
    /// sent runs to its end on the server all the same (it may be waiting for a lock), and
    /// its invalidation comes after it ends — an invalidation before the commit alone would
    /// let a result read in between be stored under the new token and served after it. A
    /// caller dropped first also hands the tables to the background retrier at once (the
    /// write may already have committed, its reply late or lost), so they are invalidated
    /// then and once more when the statement ends.
    pub(crate) async fn write_then_invalidate<T, F, Fut>(
        &self,
        analysis: &Arc<Analysis>,
        make: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Self, Arc<Analysis>) -> Fut,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let mut unfinished = Unfinished {
            cache: self,
            analysis,
            armed: true,
        };
        let (cache, analysis) = (self.clone(), Arc::clone(analysis));
        let write = make(self.clone(), Arc::clone(&analysis));
        let task = async move {
            let out = write.await;
            // Also after a failure: a partly applied script may have written, and
            // invalidating is cheap and safe.
            cache.invalidate_after_write(&analysis).await;
            out
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let out = task.await;
            unfinished.armed = false;
            return out;
        };
        let ended = runtime
            .spawn(tracing::Instrument::in_current_span(task))
            .await;
        // Disarmed only when the task ended normally (its invalidation ran): a panic in it or
        // its cancellation (a runtime shutting down) leaves the tables to the retrier.
        match ended {
            Ok(out) => {
                unfinished.armed = false;
                out
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(CacheError::Closed).inspect_err(|_| {
                tracing::warn!(error = %e, "a write's task was cancelled (the runtime is shutting down)");
            }),
        }
    }

    /// Adds `target` (and a schema change to announce) to the background retrier's pending
    /// set, starting it if it is idle.
    fn retry_later(&self, target: Target, schema: bool) {
        let start = {
            let mut pending = self.pending();
            pending.add(target, schema);
            !std::mem::replace(&mut pending.running, true)
        };
        if !start {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.pending().running = false;
            return;
        };
        let cache = self.clone();
        runtime.spawn(async move { cache.retry_pending().await });
    }

    /// The background retrier: replays the pending invalidations until they succeed.
    async fn retry_pending(self) {
        let mut delay = FIRST_RETRY;
        loop {
            tokio::time::sleep(delay).await;
            let (target, schema) = {
                let mut pending = self.pending();
                let schema = std::mem::take(&mut pending.schema);
                let target = if pending.all {
                    pending.all = false;
                    pending.tables.clear();
                    Target::All
                } else if pending.tables.is_empty() && !schema {
                    pending.running = false;
                    return;
                } else {
                    Target::Tables(std::mem::take(&mut pending.tables).into_iter().collect())
                };
                (target, schema)
            };
            match self.invalidate(target.clone(), schema).await {
                Ok(_) => {
                    SqlStats::count(&self.inner().stats.invalidation_retries_succeeded, 1);
                    tracing::info!(?target, "invalidation retry succeeded");
                    delay = FIRST_RETRY;
                }
                Err(e) => {
                    tracing::warn!(error = %e, ?target, "invalidation retry failed");
                    let mut pending = self.pending();
                    pending.add(target, schema);
                    delay = (delay * 2).min(MAX_RETRY_DELAY);
                }
            }
        }
    }

    /// The retrier's pending set (a poisoned lock is recovered: losing invalidations is worse).
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.inner()
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, n: u64) {
        let stats = &self.inner().stats;
        SqlStats::count(&stats.invalidations, 1);
        SqlStats::count(&stats.invalidated_entries, n);
    }
}

/// A write whose caller was dropped before its task ended: its tables go to the background
/// retrier at once (see [`SqlCache::write_then_invalidate`]).
struct Unfinished<'a, C: Codec> {
    cache: &'a SqlCache<C>,
    analysis: &'a Analysis,
    armed: bool,
}

impl<C: Codec> Drop for Unfinished<'_, C> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if self.analysis.ddl {
            self.cache.inner().deps.mark_stale();
        }
        if let Some(target) = SqlCache::<C>::write_target_or_schema(self.analysis) {
            tracing::warn!(
                ?target,
                "a write's caller gave up before it ended; invalidating in the background now \
                 and again when the statement ends"
            );
            self.cache.retry_later(target, self.analysis.ddl);
        }
    }
}
