//! Dependencies beyond the statement: a write to one table changes what queries of other
//! tables return (views over it, partitions of a partitioned table and their parent, tables
//! whose foreign keys cascade from it, tables its triggers write). Each write invalidates the
//! closure of its tables under these edges.
//!
//! Edges come from the database catalog ([`SqlExecutor::dependencies`]: loaded before the first
//! invalidation, reloaded after a DDL statement runs through this cache or any other instance
//! sharing its store — a DDL replaces the database's shared catalog token, which every
//! expansion reads first, one read per invalidation — and every [`CATALOG_MAX_AGE`]) and from
//! the builder ([`SqlCacheBuilder::dependency`]).
//!
//! [`SqlCacheBuilder::dependency`]: crate::SqlCacheBuilder::dependency

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ncm_cache_core::Bytes;

use crate::executor::SqlExecutor;

/// The catalog's edges are reloaded at least this often (a schema changed by another program).
pub(crate) const CATALOG_MAX_AGE: Duration = Duration::from_secs(300);

/// After a failed catalog load, the next expansion within this long does not ask again.
pub(crate) const CATALOG_RETRY: Duration = Duration::from_secs(1);

type Edges = HashMap<String, Vec<String>>;

#[derive(Debug, Default)]
pub(crate) struct Dependencies {
    /// Declared with the builder: written → also affected.
    declared: Edges,
    catalog: Mutex<Catalog>,
}

impl Catalog {
    fn mark_stale(&mut self) {
        self.loaded = None;
        self.known = false;
        self.retry_at = None;
        self.epoch += 1;
    }
}

#[derive(Debug, Default)]
struct Catalog {
    edges: Arc<Edges>,
    /// When the edges were loaded (`None`: never, or marked stale).
    loaded: Option<Instant>,
    /// The edges are known to match the schema as of some load: never loaded, or a schema
    /// change (DDL through the cache) since, makes them unknown.
    known: bool,
    /// A load failed: the next is not tried before this.
    retry_at: Option<Instant>,
    /// Bumped by every `mark_stale`: a load that started before one is not installed as fresh.
    epoch: u64,
    /// The shared catalog token read before the edges were loaded: another value means a
    /// schema change through another instance since.
    shared: Option<Bytes>,
}

impl Dependencies {
    pub(crate) fn new(declared: Vec<(String, String)>) -> Self {
        let mut edges = Edges::new();
        for (from, to) in declared {
            edges.entry(from).or_default().push(to);
        }
        Self {
            declared: edges,
            catalog: Mutex::default(),
        }
    }

    /// The schema may have changed: reload the catalog's edges before the next expansion.
    pub(crate) fn mark_stale(&self) {
        self.lock().mark_stale();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The catalog's edges, reloaded when stale; `None` when they are unknown (no load has
    /// succeeded since the last schema change, and this one failed too), so the caller must
    /// assume every table is affected. A failed load is tried again after [`CATALOG_RETRY`]
    /// (meanwhile the previous edges are used if they are known, else `None`).
    ///
    /// `shared`: the shared catalog token as read now (`None` when it could not be read); one
    /// other than at the last load marks the edges stale first.
    async fn catalog(
        &self,
        executor: &dyn SqlExecutor,
        shared: Option<Option<Bytes>>,
    ) -> Option<Arc<Edges>> {
        let (edges, fresh, known, epoch) = {
            let mut c = self.lock();
            if let Some(now) = &shared
                && c.loaded.is_some()
                && *now != c.shared
            {
                c.mark_stale();
            }
            let fresh = c.loaded.is_some_and(|at| at.elapsed() < CATALOG_MAX_AGE)
                || c.retry_at.is_some_and(|at| Instant::now() < at);
            (Arc::clone(&c.edges), fresh, c.known, c.epoch)
        };
        if fresh {
            return known.then_some(edges);
        }
        match executor.dependencies().await {
            Ok(list) => {
                let mut map = Edges::new();
                for (from, to) in list {
                    let (from, to) = (from.to_lowercase(), to.to_lowercase());
                    if from != to {
                        map.entry(from).or_default().push(to);
                    }
                }
                let map = Arc::new(map);
                let mut c = self.lock();
                // A schema change marked since this load began: use these edges now, but load
                // again next time.
                if c.epoch == epoch {
                    c.edges = Arc::clone(&map);
                    c.loaded = Some(Instant::now());
                    c.known = true;
                    c.retry_at = None;
                    if let Some(now) = shared {
                        c.shared = now;
                    }
                }
                Some(map)
            }
            Err(e) => {
                tracing::warn!(error = %e, known,
                    "cannot read table dependencies from the catalog; using the previous ones \
                     if they are known, else invalidating every cached query; retrying in 1 s");
                let mut c = self.lock();
                if c.epoch == epoch {
                    c.retry_at = Some(Instant::now() + CATALOG_RETRY);
                }
                known.then_some(edges)
            }
        }
    }

    /// `tables` and every table reachable from them, sorted; `None` when the catalog's
    /// edges are unknown (every table must be assumed affected). `shared`: see
    /// [`catalog`](Self::catalog).
    pub(crate) async fn expand(
        &self,
        executor: &dyn SqlExecutor,
        tables: &[String],
        shared: Option<Option<Bytes>>,
    ) -> Option<Vec<String>> {
        let catalog = self.catalog(executor, shared).await?;
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut todo: Vec<String> = tables.to_vec();
        while let Some(t) = todo.pop() {
            if !seen.insert(t.clone()) {
                continue;
            }
            for edges in [&self.declared, &*catalog] {
                if let Some(next) = edges.get(&t) {
                    todo.extend(next.iter().filter(|n| !seen.contains(*n)).cloned());
                }
            }
        }
        Some(seen.into_iter().collect())
    }
}

#[cfg(all(test, feature = "sqlite"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::executor::SqliteExecutor;
    use crate::{Rows, SqlDialect, SqlValue};
    use ncm_cache_core::Result;

    /// A database whose catalog is a table of edges: dropping it makes the catalog unreadable
    /// (as a revoked privilege or a lost connection does).
    #[derive(Debug)]
    struct EdgeTable(SqliteExecutor);

    #[async_trait::async_trait]
    impl SqlExecutor for EdgeTable {
        fn dialect(&self) -> SqlDialect {
            self.0.dialect()
        }
        fn identity(&self) -> &str {
            self.0.identity()
        }
        async fn fetch_all(&self, sql: &str, params: &[SqlValue]) -> Result<Rows> {
            self.0.fetch_all(sql, params).await
        }
        async fn execute(&self, sql: &str, params: &[SqlValue]) -> Result<u64> {
            self.0.execute(sql, params).await
        }
        async fn dependencies(&self) -> Result<Vec<(String, String)>> {
            let rows = self.0.fetch_all("SELECT w, a FROM edges", &[]).await?;
            Ok(rows
                .rows
                .into_iter()
                .filter_map(|r| match (r.first(), r.get(1)) {
                    (Some(SqlValue::Text(w)), Some(SqlValue::Text(a))) => {
                        Some((w.clone(), a.clone()))
                    }
                    _ => None,
                })
                .collect())
        }
    }

    async fn edges(db: &EdgeTable, list: Option<&[(&str, &str)]>) {
        db.execute("DROP TABLE IF EXISTS edges", &[]).await.unwrap();
        let Some(list) = list else { return };
        db.execute("CREATE TABLE edges (w TEXT, a TEXT)", &[])
            .await
            .unwrap();
        for (w, a) in list {
            db.execute(
                "INSERT INTO edges VALUES (?, ?)",
                &[SqlValue::Text((*w).into()), SqlValue::Text((*a).into())],
            )
            .await
            .unwrap();
        }
    }

    /// The two branches of an unreadable catalog: with edges known (loaded, aged out), they
    /// are used and the catalog is asked again only after `CATALOG_RETRY`; after a schema
    /// change, nothing is known and the caller must invalidate everything.
    #[tokio::test]
    async fn an_unreadable_catalog_keeps_known_edges_and_forgets_them_after_a_schema_change() {
        let db = EdgeTable(SqliteExecutor::memory().await.unwrap());
        let deps = Dependencies::new(Vec::new());
        let base = ["base".to_owned()];
        edges(&db, Some(&[("base", "over_base")])).await;
        let both = Some(vec!["base".to_owned(), "over_base".to_owned()]);
        assert_eq!(deps.expand(&db, &base, None).await, both);

        // Aged out, and the catalog cannot be read: the known edges are used.
        let age = |deps: &Dependencies| {
            deps.lock().loaded = Instant::now().checked_sub(CATALOG_MAX_AGE + CATALOG_RETRY);
        };
        age(&deps);
        edges(&db, None).await;
        assert_eq!(deps.expand(&db, &base, None).await, both);
        // Readable again but within the retry interval: not asked (the new edge is unseen).
        edges(&db, Some(&[("base", "other_view")])).await;
        assert_eq!(deps.expand(&db, &base, None).await, both);
        // After it: asked, and the new edges are used.
        deps.lock().retry_at = Instant::now().checked_sub(Duration::from_millis(1));
        let other = Some(vec!["base".to_owned(), "other_view".to_owned()]);
        assert_eq!(deps.expand(&db, &base, None).await, other);

        // A schema change, then an unreadable catalog: nothing is known.
        deps.mark_stale();
        edges(&db, None).await;
        assert_eq!(deps.expand(&db, &base, None).await, None);
        // Still nothing within the retry interval, even once readable.
        edges(&db, Some(&[("base", "over_base")])).await;
        assert_eq!(deps.expand(&db, &base, None).await, None);
        deps.lock().retry_at = Instant::now().checked_sub(Duration::from_millis(1));
        assert_eq!(deps.expand(&db, &base, None).await, both);
    }

    /// A schema change through another instance (another shared catalog token) reloads the
    /// edges; the same token, or one that could not be read, keeps them.
    #[tokio::test]
    async fn another_instances_schema_change_reloads_the_catalog() {
        let db = EdgeTable(SqliteExecutor::memory().await.unwrap());
        let deps = Dependencies::new(Vec::new());
        let base = ["base".to_owned()];
        let first = Some(vec!["base".to_owned(), "v1".to_owned()]);
        let second = Some(vec!["base".to_owned(), "v2".to_owned()]);
        edges(&db, Some(&[("base", "v1")])).await;
        assert_eq!(deps.expand(&db, &base, Some(None)).await, first);
        edges(&db, Some(&[("base", "v2")])).await;
        assert_eq!(deps.expand(&db, &base, Some(None)).await, first);
        assert_eq!(deps.expand(&db, &base, None).await, first);
        let changed = Some(Some(Bytes::from_static(b"t1")));
        assert_eq!(deps.expand(&db, &base, changed.clone()).await, second);
        edges(&db, Some(&[("base", "v3")])).await;
        assert_eq!(deps.expand(&db, &base, changed).await, second);
    }
}
