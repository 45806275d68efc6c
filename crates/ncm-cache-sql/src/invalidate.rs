//! Invalidation: by query, pattern, table, write; and the guard that keeps a result computed
//! before an invalidation from being stored after it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use ncm_cache_core::{Codec, Result};

use crate::cache::SqlCache;
use crate::keys::Analysis;
use crate::params::SqlParams;
use crate::stats::SqlStats;
use crate::tables::parse_table_name;

/// Tables remembered by the guard before it falls back to "everything changed".
const GUARD_TABLES: usize = 4096;

/// Orders invalidations against in-flight queries.
///
/// Every invalidation takes a new epoch and records it per table (or for everything). A query
/// notes the epoch when it starts; its result is stored only if none of its tables was
/// invalidated since — checked before and after the write to the cache, so an invalidation
/// racing the write either sees the entry (and deletes it) or makes the writer withdraw it.
/// (This protects one process; across instances sharing a cache the window is the TTL.)
#[derive(Debug, Default)]
pub(crate) struct Guard {
    epoch: AtomicU64,
    state: Mutex<GuardState>,
}

#[derive(Debug, Default)]
struct GuardState {
    tables: HashMap<String, u64>,
    /// Everything invalidated at this epoch (pattern, all, unknown tables, overflow).
    floor: u64,
    /// The latest invalidation of anything.
    last: u64,
}

impl Guard {
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(SeqCst)
    }

    /// Records an invalidation of `tables` (`None`: of everything).
    pub(crate) fn mark(&self, tables: Option<&[String]>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = self.epoch.fetch_add(1, SeqCst) + 1;
        st.last = epoch;
        match tables {
            Some(tables) => {
                for t in tables {
                    st.tables.insert(t.clone(), epoch);
                }
            }
            None => st.floor = epoch,
        }
        if st.tables.len() > GUARD_TABLES {
            st.tables.clear();
            st.floor = epoch;
        }
    }

    /// `true` when a query that started at `started` and reads `tags` (`None`: unknown) may
    /// store its result.
    pub(crate) fn may_store(&self, started: u64, tags: Option<&[String]>) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.floor > started {
            return false;
        }
        match tags {
            Some(tags) => tags
                .iter()
                .all(|t| st.tables.get(t).is_none_or(|&e| e <= started)),
            None => st.last <= started,
        }
    }
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
        self.inner().guard.mark(analysis.tags.as_deref());
        let removed = self.inner().cache.backend().delete(&key).await?;
        self.count(u64::from(removed));
        Ok(removed)
    }

    /// Removes the cached results whose key, after `{namespace}:{database}:`, matches a Redis
    /// glob. That part reads `|table|table|:hash`, so `*users*` (the original's example)
    /// removes every query on a table whose name contains `users`. Returns how many.
    pub async fn invalidate_pattern(&self, pattern: &str) -> Result<u64> {
        self.inner().guard.mark(None);
        let full = self.inner().keys.user_pattern(pattern);
        let n = self.inner().cache.backend().clear_pattern(&full).await?;
        self.count(n);
        Ok(n)
    }

    /// Removes every cached query that reads `table` (`users`, `public.users`, `"Users"`;
    /// a schema-qualified name also clears queries that name the table without its schema),
    /// and those whose tables could not be determined. Returns how many.
    pub async fn invalidate_table(&self, table: &str) -> Result<u64> {
        self.invalidate_tables([table]).await
    }

    /// [`invalidate_table`](Self::invalidate_table) for several tables.
    pub async fn invalidate_tables<I, S>(&self, tables: I) -> Result<u64>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let dialect = self.inner().dialect;
        let mut tags: Vec<String> = tables
            .into_iter()
            .map(|t| parse_table_name(t.as_ref(), dialect).bare().to_owned())
            .collect();
        tags.sort();
        tags.dedup();
        self.invalidate_tags(&tags).await
    }

    /// Removes every cached result of this database. Returns how many.
    pub async fn invalidate_all(&self) -> Result<u64> {
        self.inner().guard.mark(None);
        let pattern = self.inner().keys.all_pattern();
        let n = self.inner().cache.backend().clear_pattern(&pattern).await?;
        self.count(n);
        Ok(n)
    }

    pub(crate) async fn invalidate_tags(&self, tags: &[String]) -> Result<u64> {
        let inner = self.inner();
        inner.guard.mark(Some(tags));
        let backend = inner.cache.backend();
        let mut n = 0;
        for tag in tags {
            n += backend
                .clear_pattern(&inner.keys.table_pattern(tag))
                .await?;
        }
        n += backend.clear_pattern(&inner.keys.unknown_pattern()).await?;
        self.count(n);
        tracing::debug!(tables = ?tags, removed = n, "tables invalidated");
        Ok(n)
    }

    /// Invalidates what a statement that ran wrote.
    pub(crate) async fn invalidate_writes(&self, analysis: &Analysis) -> Result<u64> {
        if analysis.unknown_writes {
            return self.invalidate_all().await;
        }
        if analysis.writes.is_empty() {
            return Ok(0);
        }
        let mut tags: Vec<String> = analysis
            .writes
            .iter()
            .map(|t| t.bare().to_owned())
            .collect();
        tags.sort();
        tags.dedup();
        self.invalidate_tags(&tags).await
    }

    fn count(&self, removed: u64) {
        let stats = &self.inner().stats;
        SqlStats::count(&stats.invalidations, 1);
        SqlStats::count(&stats.invalidated_entries, removed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_blocks_results_older_than_an_invalidation() {
        let g = Guard::default();
        let users = vec!["users".to_string()];
        let orders = vec!["orders".to_string()];
        let started = g.epoch();
        assert!(g.may_store(started, Some(&users)));
        g.mark(Some(&users));
        assert!(!g.may_store(started, Some(&users)));
        assert!(g.may_store(started, Some(&orders)));
        assert!(
            !g.may_store(started, None),
            "unknown tables: any invalidation counts"
        );
        let later = g.epoch();
        assert!(g.may_store(later, Some(&users)));
        g.mark(None);
        assert!(!g.may_store(later, Some(&orders)));
    }

    #[test]
    fn guard_is_bounded() {
        let g = Guard::default();
        let started = g.epoch();
        for i in 0..(GUARD_TABLES + 10) {
            g.mark(Some(&[format!("t{i}")]));
        }
        assert!(g.state.lock().unwrap().tables.len() <= GUARD_TABLES);
        assert!(!g.may_store(started, Some(&["other".to_string()])));
    }
}
