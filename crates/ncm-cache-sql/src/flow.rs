//! The query paths of [`SqlCache`]: strategies, cache lookups, single-flight loads, stores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ncm_cache_core::{
    Bytes, CacheError, Codec, LoadEnd, LoadPermit, LoadRead, LoadTurn, Operation, Result,
};
use serde::{Deserialize, Serialize};

use crate::cache::{QueryCacheStrategy, SqlCache};
use crate::keys::Analysis;
use crate::rows::Rows;
use crate::rules::Uncacheable;
use crate::stats::SqlStats;
use crate::value::SqlValue;

/// A cached result: the generation tokens of its tables when the query started (database-wide
/// token first, then one per table in `Analysis::tags` order) and the rows.
#[derive(Deserialize)]
struct Stored {
    g: Vec<String>,
    r: Rows,
}

/// A result decoded in this process, with the exact bytes it was decoded from and the tokens
/// they recorded: a later read of the same bytes shares the rows instead of decoding again.
pub(crate) struct Decoded {
    bytes: Bytes,
    tokens: Vec<String>,
    rows: Arc<Rows>,
}

/// Charges a remembered result its bytes plus an estimate of its decoded rows (decoded cells
/// take several times their encoded size: 8× is charged).
#[derive(Clone, Copy)]
pub(crate) struct DecodedWeighter;

impl quick_cache::Weighter<String, Arc<Decoded>> for DecodedWeighter {
    fn weight(&self, key: &String, value: &Arc<Decoded>) -> u64 {
        (key.len() + 9 * value.bytes.len() + 64) as u64
    }
}

/// The memory remembered results may use, at most.
pub(crate) const DECODED_BYTES: u64 = 64 << 20;

/// The memo of decoded results.
pub(crate) type DecodedMemo = quick_cache::sync::Cache<String, Arc<Decoded>, DecodedWeighter>;

/// [`Stored`] borrowed, for writing.
#[derive(Serialize)]
struct StoredRef<'a> {
    g: &'a [String],
    r: &'a Rows,
}

/// What a lookup found: the entry (if valid) and the current generation tokens (`None` when
/// the cache could not be read).
struct Found {
    rows: Option<Arc<Rows>>,
    tokens: Option<Vec<Option<Bytes>>>,
    /// Why the cache could not be read (then `tokens` is `None`).
    error: Option<CacheError>,
    /// The cache could not be read, but a fail-safe backend kept copies of the entry and its
    /// tokens (`CacheBackend::get_many_for_load`): the result they make, valid under those
    /// tokens, served only if the database fails too (or, `CacheOnly`, as the cache's answer).
    stale: Option<(Arc<Rows>, Bytes)>,
    /// The copied tokens (same case), naming the query's single-flight: concurrent callers
    /// during an L2 outage share one query instead of each asking the database.
    copied: Option<String>,
}

impl<C: Codec> SqlCache<C> {
    pub(crate) async fn run(
        &self,
        analysis: &Arc<Analysis>,
        values: Vec<SqlValue>,
        strategy: QueryCacheStrategy,
        ttl: Duration,
    ) -> Result<Option<Arc<Rows>>> {
        let key = match &analysis.uncacheable {
            None => self.inner().keys.entry(analysis, &values),
            Some(_) => None,
        };
        let Some(key) = key else {
            // Writes, statements that must not be cached, too many tables: run, never cache.
            if strategy == QueryCacheStrategy::CacheOnly {
                return Ok(None);
            }
            let reason = analysis
                .uncacheable
                .clone()
                .unwrap_or(Uncacheable::TooManyTables);
            self.inner().stats.uncached(reason.label());
            let rows = if analysis.is_write() {
                // Invalidated even when the statement failed (a partly applied script may have
                // written) or this call is dropped first.
                self.write_then_invalidate(analysis, move |cache, analysis| async move {
                    cache.fetch(&analysis, &values).await
                })
                .await
            } else {
                self.fetch(analysis, &values).await
            };
            return rows.map(|r| Some(Arc::new(r)));
        };
        match strategy {
            QueryCacheStrategy::CacheFirst | QueryCacheStrategy::DbFirst => {
                let cache_first = strategy == QueryCacheStrategy::CacheFirst;
                // `DbFirst` reads the cache only for its tokens and as a fallback: uncounted.
                let found = if cache_first {
                    self.lookup(&key, analysis).await
                } else {
                    self.lookup_quiet(&key, analysis).await
                };
                if cache_first && let Some(rows) = found.rows {
                    return Ok(Some(rows));
                }
                // Served when the database fails: `DbFirst`'s cached result, or a fail-safe
                // backend's copy (with its bytes, asked for again then).
                let fallback = match (found.rows, found.stale) {
                    (Some(rows), _) => Some((rows, None)),
                    (None, stale) => stale.map(|(rows, bytes)| (rows, Some(bytes))),
                };
                let copied = found.copied.as_deref();
                // `CacheFirst` waits for another process running the query under the same
                // tokens (a multi-level cache's stampede lock) and takes its result; `DbFirst`
                // asks the database itself. The wait never gives up to serve a copy (an expired
                // entry's): it then asks the database, which answers (review, helper-79 #3: it
                // served the expired rows after `lock_wait`). A copy from a read that failed
                // comes without tokens, and takes no turn (`load`).
                let turn = cache_first;
                let backend = self.inner().cache.backend();
                match self
                    .load(&key, analysis, values, ttl, (found.tokens, copied), turn)
                    .await
                {
                    Ok(rows) => Ok(Some(rows)),
                    Err(err) => match fallback {
                        Some((cached, None)) => Ok(Some(self.serve_stale(analysis, &err, cached))),
                        // A fail-safe copy: only while the backend may still serve that very
                        // copy (the query may have outlived its max stale age).
                        Some((cached, Some(bytes)))
                            if backend
                                .stale_to_serve(&key, Bytes::clone(&bytes))
                                .await
                                .is_some_and(|now| now == bytes) =>
                        {
                            Ok(Some(self.serve_stale(analysis, &err, cached)))
                        }
                        _ => Err(err),
                    },
                }
            }
            // Only the cache answers: its failure is the caller's error.
            QueryCacheStrategy::CacheOnly => {
                let found = self.lookup(&key, analysis).await;
                match (found.error, found.stale) {
                    (Some(_), Some((stale, _))) => Ok(Some(stale)),
                    (Some(err), None) => Err(err),
                    (None, _) => Ok(found.rows),
                }
            }
        }
    }

    /// The generation keys a result of `analysis` depends on: the database's, then one per
    /// table.
    fn generation_keys(&self, analysis: &Analysis) -> Vec<String> {
        let keys = &self.inner().keys;
        let mut out = vec![keys.generation_all()];
        if let Some(tags) = &analysis.tags {
            out.extend(tags.iter().map(|t| keys.generation(t)));
        }
        out
    }

    /// Reads the entry and the current generation tokens in one batch; the entry is a hit only
    /// when every token it recorded is still current. Counted as a hit or a miss.
    async fn lookup(&self, key: &str, analysis: &Analysis) -> Found {
        let start = Instant::now();
        let found = self.lookup_quiet(key, analysis).await;
        let elapsed = start.elapsed();
        match &found.rows {
            Some(rows) => {
                self.inner().stats.hit(elapsed);
                self.log(analysis, "hit", elapsed, Some(rows.len()));
            }
            None => {
                self.inner().stats.miss(elapsed);
                self.log(analysis, "miss", elapsed, None);
            }
        }
        found
    }

    /// [`lookup`](Self::lookup) without counting hits and misses (`DbFirst` reads the cache
    /// only for its tokens and as a fallback).
    async fn lookup_quiet(&self, key: &str, analysis: &Analysis) -> Found {
        let inner = self.inner();
        let backend = inner.cache.backend();
        let gens = self.generation_keys(analysis);
        let mut keys: Vec<&str> = Vec::with_capacity(1 + gens.len());
        keys.push(key);
        keys.extend(gens.iter().map(String::as_str));
        let result = backend.get_many_for_load(&keys).await.and_then(|got| {
            if got.len() == keys.len() {
                Ok(got)
            } else {
                Err(CacheError::backend(
                    "a batch read returned the wrong count",
                    None,
                ))
            }
        });
        let got = match result {
            Ok(got) => got,
            Err(err) => {
                inner.stats.cache_error(Operation::Get);
                tracing::warn!(key, error = %err, "cache read failed; the query goes to the database");
                return Found {
                    rows: None,
                    tokens: None,
                    error: Some(err),
                    stale: None,
                    copied: None,
                };
            }
        };
        // A fail-safe backend's copies (L2 failed): the read failed; what they make is kept
        // apart, served only if the database fails too.
        let failed = got.iter().find_map(|r| match r {
            LoadRead::Stale { error, .. } => Some(error.clone()),
            _ => None,
        });
        // The entry's copy a fail-safe backend kept after L2's copy expired: served only if
        // the database fails (and its tokens are still current; review, helper-74).
        let expired = match got.first() {
            Some(LoadRead::Expired { value }) => Some(Bytes::clone(value)),
            _ => None,
        };
        let mut got: Vec<Option<Bytes>> = got
            .into_iter()
            .map(|r| match r {
                LoadRead::Hit(bytes) | LoadRead::Stale { value: bytes, .. } => Some(bytes),
                _ => None,
            })
            .collect();
        let tokens = got.split_off(1);
        let entry = got.pop().flatten();
        if let Some(err) = failed {
            inner.stats.cache_error(Operation::Get);
            tracing::warn!(key, error = %err, "cache read failed; the query goes to the database");
            let stale = entry.and_then(|bytes| {
                let stored = inner.cache.decode_for::<Stored>(key, &bytes).ok()?;
                current(&stored.g, &tokens).then(|| (Arc::new(stored.r), bytes))
            });
            let copied = tokens
                .iter()
                .map(|t| {
                    t.as_deref()
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>()
                .join(",");
            return Found {
                rows: None,
                tokens: None,
                error: Some(err),
                stale,
                copied: Some(copied),
            };
        }
        if entry.is_none()
            && let Some(bytes) = expired
        {
            let stale = inner
                .cache
                .decode_for::<Stored>(key, &bytes)
                .ok()
                .filter(|stored| current(&stored.g, &tokens))
                .map(|stored| (Arc::new(stored.r), bytes));
            return Found {
                rows: None,
                tokens: Some(tokens),
                error: None,
                stale,
                copied: None,
            };
        }
        let rows = match entry {
            None => None,
            // The same bytes as a result decoded before: no decode (the rows are shared).
            Some(bytes) if let Some(d) = self.decoded(key, &bytes) => {
                current(&d.tokens, &tokens).then(|| Arc::clone(&d.rows))
            }
            Some(bytes) => match inner.cache.decode_for::<Stored>(key, &bytes) {
                Ok(stored) => {
                    let rows = Arc::new(stored.r);
                    let valid = current(&stored.g, &tokens);
                    self.remember(key, bytes, stored.g, Arc::clone(&rows));
                    // Read before a later invalidation: unreachable, overwritten by the next
                    // store.
                    valid.then_some(rows)
                }
                Err(err) => {
                    inner.stats.codec_error();
                    backend.record_decode_error(key);
                    let damaged = matches!(&err, CacheError::Codec(e) if e.kind().is_damaged());
                    if damaged {
                        tracing::warn!(key, error = %err, "undecodable cached result removed");
                        if let Err(e) = backend.delete(key).await {
                            tracing::debug!(key, error = %e, "could not remove undecodable entry");
                        }
                    } else {
                        tracing::debug!(key, error = %err, "unreadable cached result left in place");
                    }
                    None
                }
            },
        };
        Found {
            rows,
            tokens: Some(tokens),
            error: None,
            stale: None,
            copied: None,
        }
    }

    /// A cached result served because the database failed (`err`): counted and logged.
    fn serve_stale(&self, analysis: &Analysis, err: &CacheError, rows: Arc<Rows>) -> Arc<Rows> {
        SqlStats::count(&self.inner().stats.stale_served, 1);
        tracing::warn!(sql = %analysis.normalized, error = %err,
            "database failed; serving the cached result");
        rows
    }

    /// Runs the query once for every concurrent caller of `key` under the same generation
    /// tokens and stores the result with those tokens. `tokens`: the current tokens (`None`:
    /// unknown, the cache is unreachable: the result is served, not stored). `turn`: take the
    /// key's turn across processes first (`CacheBackend::begin_load`), taking a result another
    /// process stored under the same tokens meanwhile (with tokens only).
    async fn load(
        &self,
        key: &str,
        analysis: &Analysis,
        values: Vec<SqlValue>,
        ttl: Duration,
        (tokens, copied): (Option<Vec<Option<Bytes>>>, Option<&str>),
        turn: bool,
    ) -> Result<Arc<Rows>> {
        let tokens = match tokens {
            Some(tokens) => self.ensure_tokens(analysis, tokens).await,
            None => None,
        };
        // Callers join a running query only if they saw the same tokens, so a query issued
        // after an invalidation never receives a result read before it. Without tokens (the
        // cache is unreachable) nobody can tell: no sharing.
        let Some(tokens) = tokens else {
            self.inner().stats.uncached("cache unreachable".into());
            // Unless a fail-safe backend kept copies of the tokens: callers that saw the same
            // copies share one query (a write here during the outage fails and evicts its
            // copies, so no caller after it sees them); the result is not stored.
            if let Some(copied) = copied {
                let flight = format!("{key}#copied#{copied}");
                return self
                    .inner()
                    .flights
                    .run(flight, || async move {
                        self.fetch(analysis, &values).await.map(Arc::new)
                    })
                    .await;
            }
            return self.fetch(analysis, &values).await.map(Arc::new);
        };
        // Calls that take the key's turn across processes fly apart from those that do not
        // (`DbFirst`): a `DbFirst` call never joins one answered by another process's result.
        let mut flight = format!("{key}#{}", tokens.join(","));
        if turn {
            flight.push_str("#turn");
        }
        self.inner()
            .flights
            .run(flight, || async move {
                let permit = if turn {
                    match self.take_turn(key, &tokens).await {
                        Ok(rows) => return Ok(rows),
                        Err(permit) => permit,
                    }
                } else {
                    LoadPermit::free()
                };
                let rows = match self.fetch(analysis, &values).await {
                    Ok(rows) => Arc::new(rows),
                    Err(e) => {
                        permit.end(LoadEnd::Failed).await;
                        return Err(e);
                    }
                };
                let stored = self.store(key, &rows, ttl, &tokens).await;
                permit
                    .end(if stored {
                        LoadEnd::Stored
                    } else {
                        LoadEnd::NotStored
                    })
                    .await;
                Ok(rows)
            })
            .await
    }

    /// Waits for the key's turn across processes: `Ok(rows)`, another process's result stored
    /// under exactly `tokens` meanwhile; `Err(permit)`, run the query holding the permit (also
    /// when the wait gave up: the database is asked, never a copy served).
    async fn take_turn(
        &self,
        key: &str,
        tokens: &[String],
    ) -> std::result::Result<Arc<Rows>, LoadPermit> {
        // A result stored before the invalidation that made this lookup miss (other tokens)
        // is waited past.
        let accept = |bytes: &Bytes| self.result_under(key, bytes, tokens).is_some();
        let backend = self.inner().cache.backend();
        match backend.begin_load(key, false, Some(&accept)).await {
            Ok(LoadTurn::Found(bytes)) => self
                .result_under(key, &bytes, tokens)
                .ok_or_else(LoadPermit::free),
            Ok(LoadTurn::Load(permit)) => Err(permit),
            _ => Err(LoadPermit::free()),
        }
    }

    /// The result `bytes` hold for `key`, if it was read under exactly `tokens`.
    fn result_under(&self, key: &str, bytes: &Bytes, tokens: &[String]) -> Option<Arc<Rows>> {
        if let Some(d) = self.decoded(key, bytes) {
            return (d.tokens == tokens).then(|| Arc::clone(&d.rows));
        }
        let stored = self.inner().cache.decode_for::<Stored>(key, bytes).ok()?;
        let rows = Arc::new(stored.r);
        let under = stored.g == tokens;
        // The next lookup of these bytes does not decode them again.
        self.remember(key, bytes.clone(), stored.g, Arc::clone(&rows));
        under.then_some(rows)
    }

    /// The tokens to record, creating the missing ones (a table never invalidated, or whose
    /// generation key was evicted) before the query runs. `None` when they cannot be written.
    async fn ensure_tokens(
        &self,
        analysis: &Analysis,
        tokens: Vec<Option<Bytes>>,
    ) -> Option<Vec<String>> {
        let gens = self.generation_keys(analysis);
        let mut tokens = tokens;
        // Concurrent first misses of this process create tokens one at a time, and those that
        // waited use what the first created: they then share one query (single-flight by
        // tokens) instead of each invalidating the others' results.
        let _creating = if tokens.iter().any(Option::is_none) {
            let guard = self.inner().token_creation.lock().await;
            let missing: Vec<&str> = gens
                .iter()
                .zip(&tokens)
                .filter(|(_, t)| t.is_none())
                .map(|(g, _)| g.as_str())
                .collect();
            if let Ok(now) = self.inner().cache.backend().get_many(&missing).await {
                let mut now = now.into_iter();
                for t in tokens.iter_mut().filter(|t| t.is_none()) {
                    *t = now.next().flatten();
                }
            }
            Some(guard)
        } else {
            None
        };
        let mut out = Vec::with_capacity(tokens.len());
        let mut create: Vec<(&str, Bytes)> = Vec::new();
        for (gen_key, token) in gens.iter().zip(tokens) {
            match token.and_then(|t| String::from_utf8(t.to_vec()).ok()) {
                Some(t) => out.push(t),
                None => {
                    let t = new_token();
                    create.push((gen_key.as_str(), Bytes::from(t.clone())));
                    out.push(t);
                }
            }
        }
        if !create.is_empty() {
            // Writing a fresh token is itself an invalidation, so racing creators are safe:
            // whoever loses only makes the other's entries miss once.
            let ttl = Some(crate::keys::GENERATION_TTL);
            if let Err(err) = self.inner().cache.backend().set_many(&create, ttl).await {
                self.inner().stats.cache_error(Operation::Set);
                tracing::warn!(error = %err, "cannot create generation tokens; result not cached");
                return None;
            }
        }
        Some(out)
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

    /// Stores a fresh result with the tokens it was read under, unless it is too large. A
    /// token replaced meanwhile makes the entry a miss on every later lookup, so no check
    /// after the write is needed. Cache failures are logged and counted, never returned.
    /// Returns whether it was stored.
    async fn store(&self, key: &str, rows: &Arc<Rows>, ttl: Duration, tokens: &[String]) -> bool {
        let inner = self.inner();
        let stored = StoredRef { g: tokens, r: rows };
        let bytes = match inner.cache.encode_for(key, &stored) {
            Ok(bytes) => bytes,
            Err(err) => {
                inner.stats.cache_error(Operation::Set);
                tracing::warn!(key, error = %err, "cannot encode a query result");
                return false;
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
            return false;
        }
        match inner
            .cache
            .backend()
            .set(key, bytes.clone(), Some(ttl))
            .await
        {
            Ok(()) => {
                self.remember(key, bytes, tokens.to_vec(), Arc::clone(rows));
                true
            }
            Err(err) => {
                inner.stats.cache_error(Operation::Set);
                tracing::warn!(key, error = %err, "cache write failed");
                false
            }
        }
    }

    /// The result decoded from exactly `bytes` under `key` before, if remembered.
    fn decoded(&self, key: &str, bytes: &Bytes) -> Option<Arc<Decoded>> {
        let memo = self.inner().decoded.as_ref()?;
        memo.get(key).filter(|d| d.bytes == *bytes)
    }

    /// Remembers the result decoded from `bytes` (same bytes, same result: safe to share).
    fn remember(&self, key: &str, bytes: Bytes, tokens: Vec<String>, rows: Arc<Rows>) {
        if let Some(memo) = &self.inner().decoded {
            memo.insert(
                key.to_owned(),
                Arc::new(Decoded {
                    bytes,
                    tokens,
                    rows,
                }),
            );
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

/// `true` when every recorded token is the current one.
fn current(recorded: &[String], now: &[Option<Bytes>]) -> bool {
    recorded.len() == now.len()
        && recorded
            .iter()
            .zip(now)
            .all(|(r, n)| n.as_deref() == Some(r.as_bytes()))
}

/// A fresh generation token: 128 random bits (hex), unique across processes.
pub(crate) fn new_token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&fastrand::u64(..).to_le_bytes());
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Relaxed).to_le_bytes());
    format!("{:032x}", h.digest128() ^ u128::from(fastrand::u64(..)))
}
