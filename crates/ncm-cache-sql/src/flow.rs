//! The query paths of [`SqlCache`]: strategies, cache lookups, single-flight loads, stores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ncm_cache_core::{CacheError, Codec, Operation, Result};

use crate::cache::{QueryCacheStrategy, SqlCache};
use crate::keys::Analysis;
use crate::rows::Rows;
use crate::stats::SqlStats;
use crate::value::SqlValue;

impl<C: Codec> SqlCache<C> {
    pub(crate) async fn run(
        &self,
        analysis: &Analysis,
        values: Vec<SqlValue>,
        strategy: QueryCacheStrategy,
        ttl: Duration,
    ) -> Result<Option<Arc<Rows>>> {
        if strategy == QueryCacheStrategy::CacheOnly && analysis.is_write() {
            return Ok(None);
        }
        let key = match self.inner().keys.entry(analysis, &values) {
            Some(key) if !analysis.is_write() => key,
            _ => {
                // Writes and statements naming too many tables: run, never cache.
                if strategy == QueryCacheStrategy::CacheOnly {
                    return Ok(None);
                }
                SqlStats::count(&self.inner().stats.uncached, 1);
                let rows = self.fetch(analysis, &values).await;
                if analysis.is_write() {
                    self.invalidate_writes(analysis).await?;
                }
                return rows.map(|r| Some(Arc::new(r)));
            }
        };
        match strategy {
            QueryCacheStrategy::CacheFirst => {
                if let Ok(Some(rows)) = self.lookup(&key, analysis).await {
                    return Ok(Some(Arc::new(rows)));
                }
                self.load(&key, analysis, values, ttl).await.map(Some)
            }
            QueryCacheStrategy::DbFirst => match self.load(&key, analysis, values, ttl).await {
                Ok(rows) => Ok(Some(rows)),
                Err(err) => match self.lookup(&key, analysis).await {
                    Ok(Some(stale)) => {
                        SqlStats::count(&self.inner().stats.stale_served, 1);
                        tracing::warn!(sql = %analysis.normalized, error = %err,
                            "database failed; serving the cached result");
                        Ok(Some(Arc::new(stale)))
                    }
                    _ => Err(err),
                },
            },
            QueryCacheStrategy::CacheOnly => Ok(self.lookup(&key, analysis).await?.map(Arc::new)),
        }
    }

    /// Reads and decodes a cached result. An undecodable entry is counted, removed, and a miss.
    async fn lookup(&self, key: &str, analysis: &Analysis) -> Result<Option<Rows>> {
        let backend = self.inner().cache.backend();
        let start = Instant::now();
        let bytes = match backend.get(key).await {
            Ok(bytes) => bytes,
            Err(err) => {
                self.inner().stats.cache_error(Operation::Get);
                tracing::warn!(key, error = %err, "cache read failed");
                return Err(err);
            }
        };
        let Some(bytes) = bytes else {
            self.inner().stats.miss(start.elapsed());
            self.log(analysis, "miss", start.elapsed(), None);
            return Ok(None);
        };
        match self.inner().cache.decode_for::<Rows>(key, &bytes) {
            Ok(rows) => {
                self.inner().stats.hit(start.elapsed());
                self.log(analysis, "hit", start.elapsed(), Some(rows.len()));
                Ok(Some(rows))
            }
            Err(err) => {
                self.inner().stats.codec_error();
                self.inner().stats.miss(start.elapsed());
                backend.record_decode_error(key);
                // Damaged or forged: removed; readable by another build: left (see
                // `CodecErrorKind::is_damaged`).
                let damaged = matches!(&err, CacheError::Codec(e) if e.kind().is_damaged());
                if damaged {
                    tracing::warn!(key, error = %err, "undecodable cached result removed");
                    if let Err(e) = backend.delete(key).await {
                        tracing::debug!(key, error = %e, "could not remove undecodable entry");
                    }
                } else {
                    tracing::debug!(key, error = %err, "unreadable cached result left in place");
                }
                Ok(None)
            }
        }
    }

    /// Runs the query once for every concurrent caller of `key` and stores the result.
    async fn load(
        &self,
        key: &str,
        analysis: &Analysis,
        values: Vec<SqlValue>,
        ttl: Duration,
    ) -> Result<Arc<Rows>> {
        // Callers join a running query only if no invalidation happened since it started, so a
        // query issued after a write never receives a result read before it.
        let started = self.inner().guard.epoch();
        self.inner()
            .flights
            .run(format!("{key}#{started}"), || async move {
                let rows = self.fetch(analysis, &values).await?;
                self.store(key, analysis, &rows, ttl, started).await;
                Ok(Arc::new(rows))
            })
            .await
    }

    async fn fetch(&self, analysis: &Analysis, values: &[SqlValue]) -> Result<Rows> {
        let start = Instant::now();
        let result = self
            .inner()
            .executor
            .fetch_all(&analysis.template.sql, values)
            .await;
        self.record_db(analysis, start.elapsed(), &result.as_ref().map(Rows::len));
        result
    }

    pub(crate) fn record_db(
        &self,
        analysis: &Analysis,
        elapsed: Duration,
        result: &Result<usize, &CacheError>,
    ) {
        let stats = &self.inner().stats;
        match result {
            Ok(rows) => {
                stats.database(&analysis.normalized, elapsed, *rows);
                self.log(analysis, "database", elapsed, Some(*rows));
            }
            Err(err) => {
                stats.database(&analysis.normalized, elapsed, 0);
                stats.db_error();
                tracing::debug!(sql = %analysis.normalized, error = %err, "database error");
            }
        }
    }

    /// Stores a fresh result unless it is too large or one of its tables was invalidated
    /// since the query started. Cache failures are logged and counted, never returned.
    async fn store(
        &self,
        key: &str,
        analysis: &Analysis,
        rows: &Rows,
        ttl: Duration,
        started: u64,
    ) {
        let inner = self.inner();
        let bytes = match inner.cache.encode_for(key, rows) {
            Ok(bytes) => bytes,
            Err(err) => {
                inner.stats.cache_error(Operation::Set);
                tracing::warn!(key, error = %err, "cannot encode a query result");
                return;
            }
        };
        if bytes.len() > inner.max_query_size {
            SqlStats::count(&inner.stats.oversized, 1);
            tracing::debug!(
                key,
                size = bytes.len(),
                max = inner.max_query_size,
                "result larger than max_query_size: served, not cached"
            );
            return;
        }
        let tags = analysis.tags.as_deref();
        if !inner.guard.may_store(started, tags) {
            SqlStats::count(&inner.stats.uncached, 1);
            return;
        }
        let backend = inner.cache.backend();
        if let Err(err) = backend.set(key, bytes, Some(ttl)).await {
            inner.stats.cache_error(Operation::Set);
            tracing::warn!(key, error = %err, "cache write failed");
            return;
        }
        // An invalidation that ran while we were writing may have missed our entry.
        if !inner.guard.may_store(started, tags) {
            SqlStats::count(&inner.stats.uncached, 1);
            if let Err(err) = backend.delete(key).await {
                tracing::warn!(key, error = %err, "could not withdraw a result invalidated while stored");
            }
        }
    }

    fn log(&self, analysis: &Analysis, outcome: &str, elapsed: Duration, rows: Option<usize>) {
        if self.inner().logging {
            tracing::info!(sql = %analysis.normalized, outcome, ?elapsed, rows, "sql cache");
        } else {
            tracing::debug!(sql = %analysis.normalized, outcome, ?elapsed, rows, "sql cache");
        }
    }
}
