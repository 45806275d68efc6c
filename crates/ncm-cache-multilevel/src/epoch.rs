//! O(1) `clear()` on a shared Redis ([`epoch_clear`](crate::MultiLevelBuilder::epoch_clear)):
//! L2 keys live in the cache's current *epoch* (`@{token}:{key}`); `clear()` writes a new random
//! token to one key (`__ncm:epoch:{name}`) instead of scanning the keyspace, and the old
//! epoch's keys are left to their L2 TTL. Every instance keeps the token it last read and
//! forgets it when told of a clear (a backplane CLEAR, the epoch key's client-tracking push),
//! whenever L1 is made stale-only (a link down or back, a lost backplane message), and re-reads
//! it at least every [`RECHECK`] while a link is down or absent, every [`RECHECK_LINKED`]
//! otherwise. Every write reads the epoch key after it lands and is made again under a new
//! token if a clear not heard of yet moved it. See docs/ARCHITECTURE.md, "O(1) clear".

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ncm_cache_core::{
    Bytes, CacheBackend, CacheError, CacheStats, HealthReport, KeyTtl, RESERVED_KEY_PREFIX, Result,
    SharedBackend, async_trait,
};

/// How old a token may be when no coherence link is up (no one would tell of a clear).
pub(crate) const RECHECK: Duration = Duration::from_secs(1);

/// How old a token may be with every link up: a clear is announced, but a lost epoch key
/// (evicted, or a restart without persistence) is not, and instances must not stay split
/// between two epochs.
pub(crate) const RECHECK_LINKED: Duration = Duration::from_secs(30);

/// The longest token accepted from the epoch key.
const MAX_TOKEN: usize = 16;

/// L2 seen through the cache's current epoch.
pub(crate) struct EpochBackend {
    core: Arc<Core>,
    /// The epoch key (in `inner`'s namespace), as client tracking reports it.
    key: String,
    /// One read of the epoch key at a time.
    fetch: tokio::sync::Mutex<()>,
    /// Whether every coherence link is up (a clear elsewhere would be heard).
    linked: AtomicBool,
}

/// What a write whose caller gave up before its epoch check still needs (see [`Unsettled`]).
struct Core {
    inner: SharedBackend,
    /// The epoch key's name among the reserved keys (`get_reserved`): without `__ncm:`.
    reserved: String,
    /// The token kept and when it was read, with the number of `forget`s so far: a read of
    /// the epoch key is kept only if no forget happened since it began (checked and stored
    /// under the same lock as `forget` bumps it).
    state: std::sync::RwLock<State>,
    /// Told of the keys removed in a new epoch after a write's caller gave up (see
    /// [`Core::late_fence`]): the caller's announcement went out before, so the cache evicts
    /// and announces them again.
    late: std::sync::OnceLock<LateHook>,
    /// Told when this instance created the epoch key (see [`EpochBackend::on_created`]).
    created: std::sync::OnceLock<CreatedHook>,
}

/// See [`EpochBackend::on_created`].
pub(crate) type CreatedHook = Box<dyn Fn() + Send + Sync>;

/// See [`EpochBackend::on_late_removal`].
pub(crate) type LateHook = Box<dyn Fn(&Removal) + Send + Sync>;

/// An L2 write, in user keys: what the epoch check makes again under a new token.
pub(crate) enum Write {
    Set(Vec<(String, Bytes)>, Option<Duration>),
    Remove(Removal),
}

/// A delete or pattern delete, in user keys: also what removes an abandoned write's keys.
pub(crate) enum Removal {
    Keys(Vec<String>),
    Pattern(String),
}

impl Removal {
    /// Removes in epoch `token`: the number of keys removed.
    async fn run(&self, inner: &dyn CacheBackend, token: &str) -> Result<u64> {
        let full = |k: &str| format!("@{token}:{k}");
        match self {
            Self::Keys(keys) => {
                if let [k] = keys.as_slice() {
                    return Ok(u64::from(inner.delete(&full(k)).await?));
                }
                let keys: Vec<String> = keys.iter().map(|k| full(k)).collect();
                let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                inner.delete_many(&refs).await
            }
            Self::Pattern(pattern) => inner.clear_pattern(&full(pattern)).await,
        }
    }
}

impl Write {
    /// What removes the write's keys: a set becomes a delete of its keys.
    fn into_removal(self) -> Removal {
        match self {
            Self::Set(entries, _) => Removal::Keys(entries.into_iter().map(|(k, _)| k).collect()),
            Self::Remove(removal) => removal,
        }
    }

    /// Makes the write in epoch `token`: the number of keys removed (0 for a set).
    async fn run(&self, inner: &dyn CacheBackend, token: &str) -> Result<u64> {
        let full = |k: &str| format!("@{token}:{k}");
        match self {
            Self::Set(entries, ttl) => {
                if let [(k, v)] = entries.as_slice() {
                    inner.set(&full(k), v.clone(), *ttl).await?;
                } else {
                    let keys: Vec<String> = entries.iter().map(|(k, _)| full(k)).collect();
                    let entries: Vec<(&str, Bytes)> = keys
                        .iter()
                        .zip(entries)
                        .map(|(k, (_, v))| (k.as_str(), v.clone()))
                        .collect();
                    inner.set_many(&entries, *ttl).await?;
                }
                Ok(0)
            }
            Self::Remove(removal) => removal.run(inner, token).await,
        }
    }
}

impl Core {
    fn forget(&self) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.forgets += 1;
        state.token = None;
    }

    /// The token in the epoch key now (not the one kept). An absent key (never cleared yet,
    /// or lost: evicted, a restart without persistence) is created with a new random token
    /// (`SET NX`: instances that find it absent together agree on the one written first).
    /// Before, an absent key meant the token `0` for every cache name, so caches of different
    /// names on one prefix shared their L2 keys until one was cleared, and a lost key brought
    /// back the entries written before the first clear (found by review).
    async fn read_epoch(&self) -> Result<Arc<str>> {
        // Bounded: the key would have to vanish again between each write and read.
        for _ in 0..3 {
            if let Some(bytes) = self.inner.get_reserved(&self.reserved).await? {
                return Ok(Arc::from(parse_token(&bytes)?));
            }
            let token = new_token();
            let value = Bytes::from(token.clone().into_bytes());
            if self
                .inner
                .set_reserved_if_absent(&self.reserved, value, None)
                .await?
            {
                if let Some(told) = self.created.get() {
                    told();
                }
                return Ok(Arc::from(token));
            }
        }
        Err(CacheError::backend(
            "the cache's epoch key (__ncm:epoch:<name>) disappeared each time it was written: \
             check the server's eviction policy (the key has no TTL) and what deletes it",
            None,
        ))
    }

    /// The epoch check of a write whose caller gave up before it ended (see [`Unsettled`]).
    /// If the epoch moved since `token`, or the caller gave up during the redo, the write's
    /// keys are removed in the current epoch, not written again: this runs after the caller
    /// gave up, and a write or clear that came since must not be undone by a value from
    /// before it. A removal only costs a miss. Then the keys are evicted and announced again
    /// (also when the removal failed: it may have landed).
    async fn late_fence(&self, token: &str, write: Write, redoing: bool) {
        let now = match self.read_epoch().await {
            Ok(now) => now,
            Err(e) => {
                // Not known whether a clear moved it: the next call reads the epoch key again.
                tracing::warn!(error = %e, "epoch check of an abandoned write failed: it may \
                    have stayed in the previous epoch (read by nobody) until its TTL");
                self.forget();
                return;
            }
        };
        if *now == *token && !redoing {
            return;
        }
        if *now != *token {
            self.forget();
        }
        let removal = write.into_removal();
        let _ = removal.run(&*self.inner, &now).await;
        if let Some(told) = self.late.get() {
            told(&removal);
        }
    }
}

/// A write made under `token` whose epoch check has not ended. Dropped armed (the caller gave
/// up: a timeout, a dropped future), it spawns [`Core::late_fence`]: otherwise a write that
/// landed in the old epoch would stay there, where nobody reads, while an older value written
/// in the new epoch is served.
struct Unsettled {
    core: Arc<Core>,
    token: Arc<str>,
    write: Write,
    armed: bool,
    /// The epoch moved and the write is being made again under `token` (the new one).
    redoing: bool,
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "a write abandoned outside a tokio runtime: its epoch is not \
                checked, it may stay in the previous epoch (read by nobody) until its TTL"
            );
            self.core.forget();
            return;
        };
        let core = Arc::clone(&self.core);
        let token = Arc::clone(&self.token);
        let write = std::mem::replace(&mut self.write, Write::Remove(Removal::Keys(Vec::new())));
        let redoing = self.redoing;
        runtime.spawn(async move { core.late_fence(&token, write, redoing).await });
    }
}

impl std::fmt::Debug for EpochBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochBackend")
            .field("inner", &self.core.inner)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl EpochBackend {
    pub(crate) fn new(inner: SharedBackend, name: &str, linked: bool) -> Self {
        Self {
            core: Arc::new(Core {
                inner,
                reserved: format!("epoch:{name}"),
                state: std::sync::RwLock::new(State::default()),
                late: std::sync::OnceLock::new(),
                created: std::sync::OnceLock::new(),
            }),
            key: format!("{RESERVED_KEY_PREFIX}epoch:{name}"),
            fetch: tokio::sync::Mutex::new(()),
            linked: AtomicBool::new(linked),
        }
    }

    /// A clear may have happened elsewhere: read the epoch key again before the next L2 call.
    pub(crate) fn forget(&self) {
        self.core.forget();
    }

    /// `told` learns of the keys removed in a new epoch after a write's caller gave up before
    /// its epoch check (see [`Core::late_fence`]): the cache evicts and announces them again.
    /// Set once.
    pub(crate) fn on_late_removal(&self, told: LateHook) {
        let _ = self.core.late.set(told);
    }

    /// `told` runs when this instance creates the epoch key (it was absent: never cleared, or
    /// lost): a new epoch began, as with a clear, and instances still on the previous token
    /// (a lost key is announced by nobody) must hear of it.
    pub(crate) fn on_created(&self, told: CreatedHook) {
        let _ = self.core.created.set(told);
    }

    fn forgets(&self) -> u64 {
        self.core
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .forgets
    }

    /// Keeps `token` unless a forget happened since `before`.
    fn keep(&self, token: Arc<str>, before: u64) {
        let mut state = self.core.state.write().unwrap_or_else(|e| e.into_inner());
        if state.forgets == before {
            // The first token read is no change (the instance's first load must not look
            // overtaken by it).
            if state.last.as_deref() != Some(&*token) {
                state.changes += u64::from(state.last.is_some());
                state.last = Some(Arc::clone(&token));
            }
            state.token = Some((token, Instant::now()));
        }
    }

    /// How many times the kept token changed: taken when a load begins (before its loader
    /// reads the source) and given to its store ([`place`](Self::place)).
    pub(crate) fn changes(&self) -> u64 {
        self.core
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .changes
    }

    /// Whether the token in use now differs from the one a load began under (`since`, from
    /// [`changes`](Self::changes)).
    fn moved_since(&self, since: Option<u64>) -> bool {
        since.is_some_and(|c| self.changes() != c)
    }

    /// Links up (clears are heard: the token is re-read every [`RECHECK_LINKED`]) or not
    /// (every [`RECHECK`]). The caller forgets the token when a link goes down or comes back.
    pub(crate) fn set_linked(&self, linked: bool) {
        self.linked.store(linked, Ordering::SeqCst);
    }

    /// The cache key of an L2 key that client tracking reported: `None` for the epoch key
    /// itself (a clear), the key without its epoch otherwise.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn user_key<'k>(&self, l2_key: &'k str) -> Option<&'k str> {
        if l2_key == self.key {
            return None;
        }
        Some(
            l2_key
                .strip_prefix('@')
                .and_then(|rest| rest.split_once(':'))
                .filter(|(token, _)| token.len() <= MAX_TOKEN)
                .map_or(l2_key, |(_, key)| key),
        )
    }

    fn cached(&self) -> Option<Arc<str>> {
        let state = self.core.state.read().unwrap_or_else(|e| e.into_inner());
        let (token, read_at) = state.token.as_ref()?;
        let max_age = if self.linked.load(Ordering::SeqCst) {
            RECHECK_LINKED
        } else {
            RECHECK
        };
        if read_at.elapsed() >= max_age {
            return None;
        }
        Some(Arc::clone(token))
    }

    /// The current token: the one kept, or read from the epoch key.
    async fn token(&self) -> Result<Arc<str>> {
        if let Some(token) = self.cached() {
            return Ok(token);
        }
        let _one = self.fetch.lock().await;
        if let Some(token) = self.cached() {
            return Ok(token);
        }
        let before = self.forgets();
        let token = self.read_epoch().await?;
        // A forget during the read (a clear announced meanwhile): use it for this call, keep
        // nothing.
        self.keep(Arc::clone(&token), before);
        Ok(token)
    }

    async fn read_epoch(&self) -> Result<Arc<str>> {
        self.core.read_epoch().await
    }

    /// Runs a write (set, delete) under the kept token, then reads the epoch key. If a clear
    /// elsewhere moved it before this instance heard of it (the CLEAR message still on its way,
    /// no link, a token younger than its re-check interval), the write landed in the old epoch,
    /// where nobody reads: lost, while older writes that instances which had heard of the clear
    /// made in the new epoch stay, for their whole L2 TTL. So the token is forgotten and the
    /// write made again under the new one, once: a clear after that read happened during this
    /// call, and such a clear may take the write with it. A caller that gives up before this
    /// ends leaves the check to a spawned task, which removes the keys instead
    /// ([`Unsettled`]). The result is the redo's when there is one: what the old epoch held is
    /// read by nobody (for a delete, counting it would hide that the current epoch had
    /// nothing, which decides whether a tombstone is written).
    async fn fenced(&self, write: Write) -> Result<u64> {
        let token = self.token().await?;
        let mut owed = Unsettled {
            core: Arc::clone(&self.core),
            token: Arc::clone(&token),
            write,
            armed: true,
            redoing: false,
        };
        let inner = &*self.core.inner;
        let first = match owed.write.run(inner, &token).await {
            Ok(first) => first,
            Err(e) => {
                // Not written (or not known): the caller settles it as a failed write.
                owed.armed = false;
                return Err(e);
            }
        };
        // An error here leaves the check to the spawned task (the write landed).
        let now = self.read_epoch().await?;
        if now == token {
            owed.armed = false;
            return Ok(first);
        }
        self.forget();
        owed.token = Arc::clone(&now);
        owed.redoing = true;
        let again = owed.write.run(inner, &now).await;
        owed.armed = false;
        again
    }

    /// A load's store: written under the kept token — only if absent there
    /// ([`Store::IfAbsent`], a load after a miss) or replacing ([`Store::Replace`], an eager
    /// refresh or any load not after a miss) — then the epoch checked as for any write. If a
    /// clear this instance had not heard of moved it, the value is not made again under the
    /// new token, as a caller's `set` is (the load may have read its source before that
    /// clear): [`Placed::Moved`], and the token forgotten. Before, such a refresh was written
    /// into the new epoch, where every instance read a value loaded before the clear (found by
    /// review). The load's read may also have looked in the old epoch after the clear (a false
    /// absence): the caller reads the new epoch (a multi-level `get_or_load` answers with what
    /// it holds). What landed in the old epoch is read by nobody. A clear this instance learned
    /// of earlier in the load is the caller's to catch (a multi-level cache's versions: a
    /// clear heard bumps them all).
    ///
    /// `since`: the token's change count when the load began ([`changes`](Self::changes)).
    /// A token that moved since (read again after its re-check interval, say: a load longer
    /// than that) may come from a clear after the load's source read: not written
    /// ([`Placed::Moved`]). Before, such a store went into the new epoch (found by review).
    pub(crate) async fn place(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
        how: Store,
        since: Option<u64>,
    ) -> Result<Placed> {
        ncm_cache_core::validate_key(key, usize::MAX)?;
        let token = self.token().await?;
        if self.moved_since(since) {
            return Ok(Placed::Moved);
        }
        let full = format!("@{token}:{key}");
        let inner = &self.core.inner;
        match how {
            Store::IfAbsent => {
                if !inner.set_if_absent(&full, value, ttl).await? {
                    return Ok(Placed::Refused);
                }
            }
            Store::Replace => inner.set(&full, value, ttl).await?,
        }
        self.placed_under(&token).await
    }

    /// After a load's store under `token`: [`Placed::Stored`] if the epoch is still `token`,
    /// else [`Placed::Moved`] (and the token forgotten).
    async fn placed_under(&self, token: &str) -> Result<Placed> {
        if *self.read_epoch().await? == *token {
            return Ok(Placed::Stored);
        }
        self.forget();
        Ok(Placed::Moved)
    }

    /// Starts a new epoch: everything written before is no longer read. One write.
    async fn bump(&self) -> Result<()> {
        let token = new_token();
        self.forget();
        // Read before the write: a clear announced by another instance during it wins.
        let before = self.forgets();
        // Cancelled during the write (which may have landed): a token read meanwhile may be
        // the old one, so forget it; the next call reads the epoch key again.
        let unsettled = crate::cache::OnCancel::new(|| self.forget());
        self.core
            .inner
            .set_reserved(
                &self.core.reserved,
                Bytes::from(token.clone().into_bytes()),
                None,
            )
            .await?;
        let _one = self.fetch.lock().await;
        unsettled.disarm();
        self.keep(Arc::from(token), before);
        Ok(())
    }

    async fn full(&self, key: &str) -> Result<String> {
        ncm_cache_core::validate_key(key, usize::MAX)?;
        Ok(format!("@{}:{key}", self.token().await?))
    }

    /// The keys of a batch under the current epoch (each checked as `full` does).
    async fn full_many<'k>(&self, keys: impl Iterator<Item = &'k str>) -> Result<Vec<String>> {
        let token = self.token().await?;
        keys.map(|k| {
            ncm_cache_core::validate_key(k, usize::MAX)?;
            Ok(format!("@{token}:{k}"))
        })
        .collect()
    }
}

/// How a load's value is stored ([`EpochBackend::place`], `Inner::place`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    /// Only if the key is absent (`SET NX`): a load after a miss.
    IfAbsent,
    /// Replacing what is there: an eager refresh, a load after an unreadable or failed read.
    Replace,
}

/// What a load's store did ([`EpochBackend::place`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placed {
    /// Written (only if absent: the key was absent).
    Stored,
    /// Only if absent: not written, the key was there (written since the load's read).
    Refused,
    /// Not kept: written in an epoch a clear had already left, or not written because the
    /// epoch moved since the load began; the new one may hold the key, which the load's read
    /// (in the old epoch) may have missed.
    Moved,
}

#[derive(Default)]
struct State {
    token: Option<(Arc<str>, Instant)>,
    forgets: u64,
    /// The last token kept (not cleared by a forget) and how many times it changed: a load
    /// notes the count when it begins, and its store is not made once it moved (see
    /// [`EpochBackend::place`]).
    last: Option<Arc<str>>,
    changes: u64,
}

/// A new random epoch token.
fn new_token() -> String {
    format!("{:x}", fastrand::u64(..))
}

fn parse_token(bytes: &[u8]) -> Result<&str> {
    std::str::from_utf8(bytes)
        .ok()
        .filter(|t| {
            !t.is_empty() && t.len() <= MAX_TOKEN && t.bytes().all(|b| b.is_ascii_alphanumeric())
        })
        .ok_or_else(|| {
            CacheError::backend(
                "the cache's epoch key (__ncm:epoch:<name>) holds something that is not an epoch \
                 token; delete the key (which clears the cache) or fix what writes it",
                None,
            )
        })
}

#[async_trait]
impl CacheBackend for EpochBackend {
    fn name(&self) -> &str {
        self.core.inner.name()
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.core.inner.get(&self.full(key).await?).await
    }
    async fn get_reserved(&self, name: &str) -> Result<Option<Bytes>> {
        self.core.inner.get_reserved(name).await
    }
    async fn set_reserved(&self, name: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.core.inner.set_reserved(name, value, ttl).await
    }
    async fn set_reserved_if_absent(
        &self,
        name: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        self.core
            .inner
            .set_reserved_if_absent(name, value, ttl)
            .await
    }
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        ncm_cache_core::validate_key(key, usize::MAX)?;
        self.fenced(Write::Set(vec![(key.to_owned(), value)], ttl))
            .await
            .map(drop)
    }
    /// A load's store (see `CacheBackend::set_loaded`): [`EpochBackend::place`], only if absent.
    async fn set_if_absent(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<bool> {
        Ok(matches!(
            self.place(key, value, ttl, Store::IfAbsent, None).await?,
            Placed::Stored
        ))
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        ncm_cache_core::validate_key(key, usize::MAX)?;
        Ok(self
            .fenced(Write::Remove(Removal::Keys(vec![key.to_owned()])))
            .await?
            > 0)
    }
    async fn exists(&self, key: &str) -> Result<bool> {
        self.core.inner.exists(&self.full(key).await?).await
    }
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Bytes>>> {
        let full = self.full_many(keys.iter().copied()).await?;
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        self.core.inner.get_many(&refs).await
    }
    async fn set_many(&self, entries: &[(&str, Bytes)], ttl: Option<Duration>) -> Result<()> {
        for (k, _) in entries {
            ncm_cache_core::validate_key(k, usize::MAX)?;
        }
        let entries = entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        self.fenced(Write::Set(entries, ttl)).await.map(drop)
    }
    async fn delete_many(&self, keys: &[&str]) -> Result<u64> {
        for k in keys {
            ncm_cache_core::validate_key(k, usize::MAX)?;
        }
        let keys = keys.iter().map(|k| (*k).to_owned()).collect();
        self.fenced(Write::Remove(Removal::Keys(keys))).await
    }
    /// Nothing: L2 is what instances share.
    async fn evict_local(&self, _keys: &[&str]) -> Result<u64> {
        Ok(0)
    }
    /// Nothing: L2 is what instances share.
    async fn evict_local_matching(&self, _pattern: &str) -> Result<u64> {
        Ok(0)
    }
    async fn get_ttl(&self, key: &str) -> Result<KeyTtl> {
        self.core.inner.get_ttl(&self.full(key).await?).await
    }
    async fn extend_ttl(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.core
            .inner
            .extend_ttl(&self.full(key).await?, ttl)
            .await
    }
    async fn get_and_touch(&self, key: &str, ttl: Duration) -> Result<Option<Bytes>> {
        self.core
            .inner
            .get_and_touch(&self.full(key).await?, ttl)
            .await
    }
    /// `*` starts a new epoch (one write, whatever the keyspace holds); another pattern
    /// deletes its matches in the current epoch (a SCAN, as without epochs).
    async fn clear_pattern(&self, pattern: &str) -> Result<u64> {
        if pattern == "*" {
            self.bump().await?;
            return Ok(0);
        }
        ncm_cache_core::validate_key(pattern, usize::MAX)?;
        self.fenced(Write::Remove(Removal::Pattern(pattern.to_owned())))
            .await
    }
    async fn health_report(&self) -> HealthReport {
        self.core.inner.health_report().await
    }
    fn get_stats(&self) -> CacheStats {
        self.core.inner.get_stats()
    }
    fn record_decode_error(&self, key: &str) {
        self.core.inner.record_decode_error(key);
    }
    async fn close(&self) -> Result<()> {
        self.core.inner.close().await
    }
    fn key_prefix(&self) -> Option<&str> {
        self.core.inner.key_prefix()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The L2 name of `key` in cache `name`'s current epoch, as the epoch key holds it.
    async fn in_epoch(mem: &SharedBackend, name: &str, key: &str) -> String {
        let token = mem.get_reserved(&format!("epoch:{name}")).await.unwrap();
        let token = String::from_utf8(token.expect("the epoch key exists").to_vec()).unwrap();
        format!("@{token}:{key}")
    }

    /// Caches of different names on one L2 keep apart before either was ever cleared: the
    /// epoch key is created with a random token, not read as a shared `0` (found by review:
    /// "users" read and overwrote "orders"' entries of the same key).
    #[tokio::test]
    async fn caches_of_different_names_never_share_entries() {
        use crate::{EntryOptions, MultiLevelCache};
        let mem: SharedBackend = Arc::new(ncm_cache_memory::MemoryBackend::new());
        let build = |name: &str| {
            MultiLevelCache::builder(Arc::clone(&mem))
                .name(name)
                .epoch_clear(true)
                .build()
                .unwrap()
        };
        let (users, orders) = (build("users"), build("orders"));
        users.set("42", 1u64).await.unwrap();
        assert_eq!(orders.get::<u64>("42").await.unwrap(), None);
        orders.set("42", 2u64).await.unwrap();
        let l2 = EntryOptions::new().skip_l1();
        let read = users.get_with::<u64>("42", &l2).await.unwrap();
        assert_eq!(read.map(|(v, _)| *v), Some(1));
        // Another instance of "users" finds the epoch its first instance created.
        let again = build("users");
        let read = again.get::<u64>("42").await.unwrap();
        assert_eq!(read, Some(1));
    }

    /// A lost epoch key (evicted) does not bring back the entries of the epoch before it.
    #[tokio::test]
    async fn a_lost_epoch_key_starts_a_new_epoch() {
        let mem: SharedBackend = Arc::new(ncm_cache_memory::MemoryBackend::new());
        let e = EpochBackend::new(Arc::clone(&mem), "c", true);
        e.set("k", Bytes::from_static(b"v"), None).await.unwrap();
        let first = in_epoch(&mem, "c", "k").await;
        assert!(mem.get(&first).await.unwrap().is_some());
        // The key is lost; the next instance to look creates a new epoch.
        mem.set_reserved(
            "epoch:c",
            Bytes::from_static(b"x"),
            Some(Duration::from_millis(1)),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let other = EpochBackend::new(Arc::clone(&mem), "c", true);
        assert_eq!(other.get("k").await.unwrap(), None);
        assert_ne!(in_epoch(&mem, "c", "k").await, first);
    }

    #[test]
    fn tracked_keys_lose_their_epoch_and_the_epoch_key_means_a_clear() {
        let e = EpochBackend::new(
            Arc::new(ncm_cache_memory::MemoryBackend::new()),
            "users",
            true,
        );
        assert_eq!(e.user_key("@0:user:1"), Some("user:1"));
        assert_eq!(e.user_key("@b5e1f0a2c3d4e5f6:user:1"), Some("user:1"));
        assert_eq!(e.user_key("@9f3a:a:b"), Some("a:b"));
        assert_eq!(e.user_key("plain"), Some("plain"));
        assert_eq!(e.user_key("__ncm:epoch:users"), None);
        assert!(parse_token(b"9f3a").is_ok());
        assert!(parse_token(b"").is_err());
        assert!(parse_token(b"a:b").is_err());
        assert!(parse_token(&[0xff]).is_err());
    }

    /// A clear whose announcement was lost (a backplane gap, a link down and back) is caught
    /// up when L1 is made stale-only: the token is read again.
    #[tokio::test]
    async fn making_l1_stale_forgets_the_epoch() {
        use crate::{EntryOptions, MultiLevelCache};
        let mem = Arc::new(ncm_cache_memory::MemoryBackend::new());
        let build = || {
            MultiLevelCache::builder(Arc::clone(&mem))
                .epoch_clear(true)
                .build()
                .unwrap()
        };
        let (this, other) = (build(), build());
        this.set("k", 1u32).await.unwrap();
        other.clear().await.unwrap();
        let l2 = EntryOptions::new().skip_l1();
        // Unannounced: this instance still reads its epoch (within its re-check interval).
        let read = this.get_with::<u32>("k", &l2).await.unwrap();
        assert_eq!(read.map(|(v, _)| *v), Some(1));
        this.inner.mark_l1_stale();
        assert!(this.get_with::<u32>("k", &l2).await.unwrap().is_none());
    }

    #[test]
    fn a_read_overtaken_by_a_forget_is_not_kept() {
        let e = EpochBackend::new(Arc::new(ncm_cache_memory::MemoryBackend::new()), "c", true);
        let before = e.forgets();
        e.forget();
        e.keep(Arc::from("old"), before);
        assert!(e.cached().is_none());
        e.keep(Arc::from("new"), e.forgets());
        assert_eq!(e.cached().as_deref(), Some("new"));
    }

    /// A load stored while a clear this instance has not heard of moved the epoch: not made
    /// again in the new epoch (the load may have read its source before the clear): `Moved`.
    #[tokio::test]
    async fn a_load_stored_across_an_unheard_clear_is_not_kept() {
        let mem: SharedBackend = Arc::new(ncm_cache_memory::MemoryBackend::new());
        let e = EpochBackend::new(Arc::clone(&mem), "c", true);
        let other = EpochBackend::new(Arc::clone(&mem), "c", true);
        let v = |b: &'static [u8]| Bytes::from_static(b);
        assert!(e.set_if_absent("k", v(b"v"), None).await.unwrap());
        let first_j = in_epoch(&mem, "c", "j").await;
        // Not written over an existing value.
        let refused = e
            .place("k", v(b"w"), None, Store::IfAbsent, None)
            .await
            .unwrap();
        assert_eq!(refused, Placed::Refused);
        other.clear_pattern("*").await.unwrap();
        // `e` still holds the old token: the write lands in the old epoch, then the check.
        assert!(!e.set_if_absent("j", v(b"v"), None).await.unwrap());
        assert!(mem.get(&first_j).await.unwrap().is_some());
        assert_eq!(other.get("j").await.unwrap(), None);
        // Again (`e` reads the token, then another clear), with the key in the new epoch:
        // not written over it.
        assert!(e.get("m").await.unwrap().is_none());
        other.clear_pattern("*").await.unwrap();
        other.set("m", v(b"new"), None).await.unwrap();
        let moved = e
            .place("m", v(b"old"), None, Store::IfAbsent, None)
            .await
            .unwrap();
        assert_eq!(moved, Placed::Moved);
        assert_eq!(other.get("m").await.unwrap().as_deref(), Some(&b"new"[..]));
    }

    #[tokio::test]
    async fn a_clear_is_one_write_and_hides_the_old_epoch() {
        let mem: SharedBackend = Arc::new(ncm_cache_memory::MemoryBackend::new());
        let e = EpochBackend::new(Arc::clone(&mem), "c", true);
        e.set("k", Bytes::from_static(b"v"), None).await.unwrap();
        let first = in_epoch(&mem, "c", "k").await;
        assert!(mem.get(&first).await.unwrap().is_some());
        e.clear_pattern("*").await.unwrap();
        assert_eq!(e.get("k").await.unwrap(), None);
        // The old epoch's key is left to its TTL.
        assert!(mem.get(&first).await.unwrap().is_some());
        // Another instance reads the new epoch from the key.
        let other = EpochBackend::new(Arc::clone(&mem), "c", true);
        other
            .set("k", Bytes::from_static(b"w"), None)
            .await
            .unwrap();
        assert_eq!(e.get("k").await.unwrap().as_deref(), Some(&b"w"[..]));
    }
}
