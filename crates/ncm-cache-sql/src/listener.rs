//! PostgreSQL LISTEN/NOTIFY: triggers that announce writes, and a listener that invalidates
//! the cached queries of the tables written — by this process or anyone else.

use std::time::Duration;

use ncm_cache_core::{CacheError, Codec, Result};
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::mpsc::Sender;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::cache::SqlCache;
use crate::executor::database_error;

/// The channel the triggers notify and the listener listens on.
pub const NOTIFY_CHANNEL: &str = "ncm_cache_invalidate";

/// Name of the trigger function (created in each table's schema) and of the triggers.
const TRIGGER_NAME: &str = "ncm_cache_invalidate";

/// Notifications batched into one invalidation, at most.
const MAX_BATCH: usize = 1024;

/// How long the listener waits for more notifications of a burst before invalidating.
const BATCH_WAIT: Duration = Duration::from_millis(2);

/// Installs (or replaces) statement-level triggers that `pg_notify` [`NOTIFY_CHANNEL`] with
/// the table's quoted `schema.table` after every `INSERT`, `UPDATE`, `DELETE` and `TRUNCATE`.
///
/// `tables` are resolved like in SQL (`users`, `app.users`, `"Users"`); the trigger function
/// is created in each table's schema. Returns the resolved `schema.table` names. Needs the
/// privilege to create functions and triggers; installs are serialized with an advisory lock
/// so concurrent callers do not collide.
pub async fn install_triggers<S: AsRef<str>>(pool: &PgPool, tables: &[S]) -> Result<Vec<String>> {
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| database_error("cannot start a transaction", e))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('ncm_cache_triggers'))")
        .execute(&mut *tx)
        .await
        .map_err(|e| database_error("cannot take the trigger lock", e))?;
    let mut resolved = Vec::new();
    let mut schemas_done: Vec<String> = Vec::new();
    for table in tables {
        let row = sqlx::query(
            "SELECT n.nspname AS schema, c.relname AS name \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = $1::regclass",
        )
        .bind(table.as_ref())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| database_error(&format!("unknown table {:?}", table.as_ref()), e))?;
        let schema: String = row
            .try_get("schema")
            .map_err(|e| database_error("bad catalog row", e))?;
        let name: String = row
            .try_get("name")
            .map_err(|e| database_error("bad catalog row", e))?;
        let (qs, qt) = (quote_ident(&schema), quote_ident(&name));
        if !schemas_done.contains(&schema) {
            let function = format!(
                "CREATE OR REPLACE FUNCTION {qs}.{TRIGGER_NAME}() RETURNS trigger \
                 LANGUAGE plpgsql AS $ncm$ BEGIN \
                 PERFORM pg_notify('{NOTIFY_CHANNEL}', \
                 quote_ident(TG_TABLE_SCHEMA) || '.' || quote_ident(TG_TABLE_NAME)); \
                 RETURN NULL; END $ncm$"
            );
            sqlx::query(AssertSqlSafe(function))
                .execute(&mut *tx)
                .await
                .map_err(|e| database_error("cannot create the trigger function", e))?;
            schemas_done.push(schema.clone());
        }
        for ddl in [
            format!("DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {qs}.{qt}"),
            format!(
                "CREATE TRIGGER {TRIGGER_NAME} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE \
                 ON {qs}.{qt} FOR EACH STATEMENT EXECUTE FUNCTION {qs}.{TRIGGER_NAME}()"
            ),
        ] {
            sqlx::query(AssertSqlSafe(ddl))
                .execute(&mut *tx)
                .await
                .map_err(|e| database_error("cannot create the trigger", e))?;
        }
        resolved.push(format!("{schema}.{name}"));
    }
    tx.commit()
        .await
        .map_err(|e| database_error("cannot commit the triggers", e))?;
    Ok(resolved)
}

/// Removes the triggers [`install_triggers`] created on `tables` (the functions stay; they are
/// dropped with their schema).
pub async fn uninstall_triggers<S: AsRef<str>>(pool: &PgPool, tables: &[S]) -> Result<()> {
    for table in tables {
        let row = sqlx::query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS q \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = $1::regclass",
        )
        .bind(table.as_ref())
        .fetch_one(pool)
        .await
        .map_err(|e| database_error(&format!("unknown table {:?}", table.as_ref()), e))?;
        let qualified: String = row
            .try_get("q")
            .map_err(|e| database_error("bad catalog row", e))?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {qualified}"
        )))
        .execute(pool)
        .await
        .map_err(|e| database_error("cannot drop the trigger", e))?;
    }
    Ok(())
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A running invalidation listener. Stop it with [`stop`](Self::stop); dropping the handle
/// aborts the task, so it never outlives its owner.
#[derive(Debug)]
pub struct ListenerHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ListenerHandle {
    /// Stops listening and waits for the task to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// `true` while the listener task runs.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl<C: Codec> SqlCache<C> {
    /// Listens on [`NOTIFY_CHANNEL`] and invalidates a table's cached queries whenever its
    /// trigger (see [`install_triggers`]) reports a write — including writes by other
    /// programs. Returns once `LISTEN` is in effect.
    ///
    /// If the connection drops, the listener reconnects (with backoff) and, because
    /// notifications may have been missed meanwhile, invalidates every cached query of this
    /// database once it listens again.
    pub async fn listen_postgres(&self, pool: PgPool) -> Result<ListenerHandle> {
        let listener = connect(&pool).await?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let cache = self.clone();
        let task = tokio::spawn(async move { cache.listen_loop(pool, listener, stop_rx).await });
        Ok(ListenerHandle {
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Consumes what the receiving task forwards: batches the tables of a burst (what arrives
    /// within [`BATCH_WAIT`] of the first, up to [`MAX_BATCH`]), deduplicated, into one
    /// invalidation; resynchronizes after a lost connection.
    async fn listen_loop(
        self,
        pool: PgPool,
        listener: PgListener,
        mut stop: oneshot::Receiver<()>,
    ) {
        // Bounded: while invalidations fail (the cache is down) the receiver waits, and PostgreSQL
        // queues the notifications.
        let (tx, mut rx) = tokio::sync::mpsc::channel(65_536);
        // The receiving task is never cancelled mid-receive (a cancelled `try_recv` can lose
        // the connection's state); it ends when this loop ends (its sender fails) or is aborted.
        let _receiver = AbortOnDrop(tokio::spawn(receive(pool, listener, tx)));
        loop {
            let first = tokio::select! {
                _ = &mut stop => return,
                event = rx.recv() => event,
            };
            let mut tables = std::collections::BTreeSet::new();
            let mut resync = false;
            let Some(first) = first else {
                return; // the pool closed
            };
            let mut next = Some(first);
            tokio::time::sleep(BATCH_WAIT).await;
            while let Some(event) = next.take() {
                match event {
                    Event::Table(t) => {
                        tables.insert(t);
                    }
                    Event::Lost => resync = true,
                }
                if tables.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !tables.is_empty() && !self.invalidate_with_retry(&tables, &mut stop).await {
                return;
            }
            if resync && !self.resync(&mut stop).await {
                return;
            }
        }
    }

    /// Invalidates `tables`, retrying with backoff until it succeeds (the listener's job is
    /// to not lose a notification). `false` when asked to stop meanwhile.
    ///
    /// A table no key can be made of (any database user may `pg_notify` the channel: an
    /// oversized or hostile payload) names no cached result: it is dropped (logged, counted
    /// in `invalidation_failures`) instead of being retried forever in front of every later
    /// notification; the other tables of its batch are invalidated one by one.
    async fn invalidate_with_retry(
        &self,
        tables: &std::collections::BTreeSet<String>,
        stop: &mut oneshot::Receiver<()>,
    ) -> bool {
        let what = "invalidation from NOTIFY";
        match self
            .until_done(stop, what, || self.invalidate_tables(tables))
            .await
        {
            Ended::Done => true,
            Ended::Stopped => false,
            Ended::Refused(e) if tables.len() == 1 => {
                self.drop_unusable(tables, &e);
                true
            }
            Ended::Refused(_) => {
                for table in tables {
                    match self
                        .until_done(stop, what, || self.invalidate_tables([table]))
                        .await
                    {
                        Ended::Done => {}
                        Ended::Stopped => return false,
                        Ended::Refused(e) => self.drop_unusable([table], &e),
                    }
                }
                true
            }
        }
    }

    /// Counts and logs notifications dropped because no key can be made of them.
    fn drop_unusable<'a>(&self, tables: impl IntoIterator<Item = &'a String>, e: &CacheError) {
        for table in tables {
            crate::stats::SqlStats::count(&self.inner().stats.invalidation_failures, 1);
            let shown: String = table.chars().take(64).collect();
            tracing::warn!(
                error = %e,
                table = %shown,
                len = table.len(),
                "a notification names no usable table; dropped"
            );
        }
    }

    /// Clears every cached query after a reconnect (notifications may have been missed),
    /// retrying with backoff until it succeeds: a failure (the cache down too) left results
    /// cached before the outage served for their whole TTL. `false` when asked to stop.
    async fn resync(&self, stop: &mut oneshot::Receiver<()>) -> bool {
        let done = match self
            .until_done(stop, "clearing the cache after a reconnect", || {
                self.invalidate_all()
            })
            .await
        {
            Ended::Done => true,
            Ended::Stopped => false,
            // Not expected (the key is the library's own): logged, and the listener goes on.
            Ended::Refused(e) => {
                tracing::error!(error = %e, "clearing the cache after a reconnect was refused");
                return true;
            }
        };
        if done {
            tracing::info!("listener reconnected; cached queries cleared");
        }
        done
    }

    /// Runs `call` until it succeeds, with backoff (50 ms doubling to 5 s), counting each
    /// failure; an error of the input itself (`CacheError::is_invalid_input`: retrying the
    /// same call cannot succeed) ends it at once, uncounted.
    async fn until_done<T, F, Fut>(
        &self,
        stop: &mut oneshot::Receiver<()>,
        what: &str,
        mut call: F,
    ) -> Ended
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut delay = Duration::from_millis(50);
        loop {
            match call().await {
                Ok(_) => return Ended::Done,
                Err(e) if e.is_invalid_input() => return Ended::Refused(e),
                Err(e) => {
                    crate::stats::SqlStats::count(&self.inner().stats.invalidation_failures, 1);
                    tracing::warn!(error = %e, ?delay, "{what} failed; retrying");
                }
            }
            tokio::select! {
                _ = &mut *stop => return Ended::Stopped,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// How a retried call ended.
enum Ended {
    Done,
    /// Asked to stop meanwhile.
    Stopped,
    /// Refused for its input: retrying cannot help.
    Refused(CacheError),
}

/// What the receiving task forwards.
enum Event {
    /// A notification: the written table.
    Table(String),
    /// The connection was lost (and is back): notifications may have been missed.
    Lost,
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Receives notifications and forwards them; reconnects (with backoff) when the connection
/// fails. Ends when the consumer is gone or the pool is closed.
async fn receive(pool: PgPool, mut listener: PgListener, tx: Sender<Event>) {
    loop {
        let event = match listener.try_recv().await {
            Ok(Some(n)) => Event::Table(n.payload().to_owned()),
            // sqlx reconnected by itself.
            Ok(None) => Event::Lost,
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "invalidation listener lost its connection");
                let mut delay = Duration::from_millis(100);
                listener = loop {
                    tokio::time::sleep(delay).await;
                    if pool.is_closed() || tx.is_closed() {
                        return;
                    }
                    match connect(&pool).await {
                        Ok(l) => break l,
                        Err(e) => {
                            tracing::debug!(error = %e, "listener reconnect failed");
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                };
                Event::Lost
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener> {
    let mut listener = PgListener::connect_with(pool)
        .await
        .map_err(|e| database_error("cannot connect the listener", e))?;
    listener
        .listen(NOTIFY_CHANNEL)
        .await
        .map_err(|e| database_error("LISTEN failed", e))?;
    Ok(listener)
}
