//! Per-call entry options ([`EntryOptions`]) and the loader's context and answer
//! ([`LoadContext`], [`Loaded`]): adaptive caching and conditional refresh.

use std::sync::Arc;
use std::time::Duration;

use ncm_cache_core::{CacheError, Result};

use crate::builder::Options;

const SKIP_L1_READ: u8 = 1;
const SKIP_L1_WRITE: u8 = 2;
const SKIP_L2_READ: u8 = 4;
const SKIP_L2_WRITE: u8 = 8;
const SKIP_BACKPLANE: u8 = 16;
const NO_COMPRESSION: u8 = 32;
/// Internal (no setter): a write through a `MultiLevelBackend` view that another local write of
/// its stripe overlapped evicts instead of keeping its value for `CONTENDED_TTL`.
const EXACT_WRITES: u8 = 128;

/// An `EntryOptions` method that sets one flag.
macro_rules! flag_setter {
    ($(#[$doc:meta])* $name:ident, $flag:ident) => {
        $(#[$doc])*
        pub fn $name(mut self) -> Self {
            self.flags |= $flag;
            self
        }
    };
}

/// Options of one call — `get_or_load_with`, `get_with`, `set_with`, `delete_with` of a
/// [`MultiLevelCache`](crate::MultiLevelCache), or every call of a
/// [`MultiLevelBackend`](crate::MultiLevelBackend) view
/// ([`as_backend_with`](crate::MultiLevelCache::as_backend_with)) that `SqlCache`, strategies
/// and loaders run over. What is not set here comes from the builder.
///
/// FusionCache calls this `FusionCacheEntryOptions`, .NET HybridCache `HybridCacheEntryOptions`
/// (docs/configuration.md has the table of names).
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_memory::MemoryBackend;
/// use ncm_cache_multilevel::{EntryOptions, MultiLevelCache};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let cache = MultiLevelCache::builder(MemoryBackend::new()).build()?;
/// // A short-lived value that only this instance keeps (no L2, no L1 copy elsewhere).
/// let local = EntryOptions::new().ttl(Duration::from_secs(5)).skip_l2();
/// cache.set_with("draft:1", "text".to_string(), &local).await?;
/// let (value, _source) = cache.get_with::<String>("draft:1", &local).await?.unwrap();
/// assert_eq!(value.as_str(), "text");
/// assert!(cache.l2().get("draft:1").await?.is_none());
/// # Ok::<(), ncm_cache_core::CacheError>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[must_use]
pub struct EntryOptions {
    ttl: Option<Duration>,
    l1_ttl: Option<Duration>,
    fail_safe: Option<Option<Duration>>,
    soft_timeout: Option<Option<Duration>>,
    hard_timeout: Option<Option<Duration>>,
    eager_refresh: Option<Option<f64>>,
    sliding: Option<Duration>,
    flags: u8,
    size: Option<u32>,
}

impl EntryOptions {
    /// No overrides: everything as the builder says.
    pub fn new() -> Self {
        Self::default()
    }

    /// The entry's TTL in L2 (the builder's `l2_default_ttl` otherwise); L1 keeps it no longer.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long L1 keeps the entry fresh (the builder's `l1_default_ttl` otherwise; never
    /// longer than the L2 TTL).
    pub fn l1_ttl(mut self, ttl: Duration) -> Self {
        self.l1_ttl = Some(ttl);
        self
    }

    /// Fail-safe for this call: a value expired (or from before a fault) at most
    /// `max_stale_age` ago is served, marked stale, when L2 or the loader fails. A zero is
    /// refused (`InvalidArgument`); [`no_fail_safe`](Self::no_fail_safe) turns it off.
    pub fn fail_safe(mut self, max_stale_age: Duration) -> Self {
        self.fail_safe = Some(Some(max_stale_age));
        self
    }

    /// No fail-safe for this call, even when the builder turned it on.
    pub fn no_fail_safe(mut self) -> Self {
        self.fail_safe = Some(None);
        self
    }

    /// Loader timeouts for this call (`None`: none): after `soft` a caller holding a stale
    /// value serves it while the load goes on; `hard` ends the load. A zero is refused
    /// (`InvalidArgument`).
    pub fn timeouts(mut self, soft: Option<Duration>, hard: Option<Duration>) -> Self {
        self.soft_timeout = Some(soft);
        self.hard_timeout = Some(hard);
        self
    }

    /// Eager refresh for entries this call stores: a hit after `fraction` of the L1 TTL
    /// refreshes the entry in the background. As with the builder's, `fraction` is clamped
    /// to 0.1–0.99 (0.8 when not finite).
    pub fn eager_refresh(mut self, fraction: f64) -> Self {
        self.eager_refresh = Some(Some(eager_fraction(fraction)));
        self
    }

    /// No eager refresh for entries this call stores.
    pub fn no_eager_refresh(mut self) -> Self {
        self.eager_refresh = Some(None);
        self
    }

    /// Sliding (idle) expiration: every L2 read re-arms the entry's L2 lifetime to `idle` in
    /// the same round trip (`GETEX PX`), and L1 keeps a copy for at most half of `idle`, so an
    /// entry read at least every `idle / 2` stays; one nobody reads expires between `idle / 2`
    /// and `idle` after its last read. It replaces the entry's TTL when it is read (and is the
    /// TTL of entries this call stores unless [`ttl`](Self::ttl) is set).
    pub fn sliding(mut self, idle: Duration) -> Self {
        self.sliding = Some(idle);
        self
    }

    /// Neither reads nor writes L1 (the local copy is still evicted on writes).
    pub fn skip_l1(self) -> Self {
        self.skip_l1_read().skip_l1_write()
    }

    flag_setter!(
        /// Does not read L1: reads go to L2 (then the loader).
        skip_l1_read, SKIP_L1_READ
    );

    flag_setter!(
        /// Does not put the value into L1 (any local copy is evicted instead).
        skip_l1_write, SKIP_L1_WRITE
    );

    /// Neither reads nor writes L2: the entry lives in this instance's L1 only.
    pub fn skip_l2(self) -> Self {
        self.skip_l2_read().skip_l2_write()
    }

    flag_setter!(
        /// Does not read L2: an L1 miss goes to the loader (or is a miss).
        skip_l2_read, SKIP_L2_READ
    );

    flag_setter!(
        /// Does not write (or delete in) L2: writes and deletes stay in L1.
        skip_l2_write, SKIP_L2_WRITE
    );

    flag_setter!(
        /// Does not tell other instances (no backplane message): their L1 may keep an old copy
        /// until its TTL — for values only this instance reads, or bulk loads announced otherwise.
        /// (Client tracking still sees the L2 write: Redis reports it, not this cache.)
        skip_backplane, SKIP_BACKPLANE
    );

    flag_setter!(
        /// Stores the value uncompressed whatever the codec's threshold.
        no_compression, NO_COMPRESSION
    );

    /// The weight charged against L1's byte budget (instead of the encoded size).
    pub fn size(mut self, bytes: u32) -> Self {
        self.size = Some(bytes);
        self
    }

    /// These options over the builder's: the effective values of one call.
    pub(crate) fn resolve(&self, defaults: &Eff) -> Result<Eff> {
        let positive = |what: &str, d: Option<Duration>| match d {
            Some(d) if d.is_zero() => Err(CacheError::InvalidArgument(format!(
                "EntryOptions: {what} must be greater than zero"
            ))),
            _ => Ok(()),
        };
        positive("ttl", self.ttl)?;
        positive("l1_ttl", self.l1_ttl)?;
        positive("sliding", self.sliding)?;
        // A zero here would not mean "off" (a fail-safe that serves nothing, a load abandoned
        // or a stale value served before the load could begin): say so instead of obeying it.
        positive(
            "fail_safe's max stale age (no_fail_safe() turns fail-safe off)",
            self.fail_safe.flatten(),
        )?;
        positive(
            "the soft timeout (None in timeouts(..) means none)",
            self.soft_timeout.flatten(),
        )?;
        positive(
            "the hard timeout (None in timeouts(..) means none)",
            self.hard_timeout.flatten(),
        )?;
        let l2_ttl = self.ttl.or(self.sliding).or(defaults.l2_ttl);
        let mut l1_ttl = self.l1_ttl.unwrap_or(defaults.l1_ttl);
        // L1 copies of a sliding entry last half of `idle`: reads then go to L2, whose
        // `GETEX` re-arms the entry there before it can expire (an L1 hit re-arms nothing).
        if let Some(idle) = self.sliding {
            l1_ttl = l1_ttl.min(idle / 2);
        }
        let max_stale_age = self.fail_safe.unwrap_or(defaults.max_stale_age);
        Ok(Eff {
            l2_ttl,
            l1_ttl,
            negative_ttl: defaults.negative_ttl,
            max_stale_age,
            keep_stale: max_stale_age.map_or(defaults.keep_stale, |a| a.max(defaults.keep_stale)),
            soft_timeout: self.soft_timeout.unwrap_or(defaults.soft_timeout),
            hard_timeout: self.hard_timeout.unwrap_or(defaults.hard_timeout),
            eager_refresh: self.eager_refresh.unwrap_or(defaults.eager_refresh),
            sliding: self.sliding,
            flags: self.flags,
            size: self.size,
            explicit_ttl: self.ttl.or(self.sliding),
        })
    }
}

/// An eager-refresh fraction as the builder and the per-call options take it.
pub(crate) fn eager_fraction(fraction: f64) -> f64 {
    if fraction.is_finite() {
        fraction.clamp(0.1, 0.99)
    } else {
        0.8
    }
}

/// The effective options of one call (the builder's, with a call's [`EntryOptions`] over them).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Eff {
    pub(crate) l2_ttl: Option<Duration>,
    pub(crate) l1_ttl: Duration,
    pub(crate) negative_ttl: Option<Duration>,
    pub(crate) max_stale_age: Option<Duration>,
    /// How long L1 keeps an entry past its freshness (for any call's fail-safe): the largest
    /// max stale age, the builder's or this call's.
    pub(crate) keep_stale: Duration,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) hard_timeout: Option<Duration>,
    pub(crate) eager_refresh: Option<f64>,
    pub(crate) sliding: Option<Duration>,
    flags: u8,
    pub(crate) size: Option<u32>,
    explicit_ttl: Option<Duration>,
}

impl Eff {
    /// The builder's options.
    pub(crate) fn defaults(o: &Options) -> Self {
        Self {
            l2_ttl: o.l2_default_ttl,
            l1_ttl: o.l1_default_ttl,
            negative_ttl: o.negative_ttl,
            max_stale_age: o.max_stale_age,
            keep_stale: o.max_stale_age.unwrap_or(Duration::ZERO),
            soft_timeout: o.soft_timeout,
            hard_timeout: o.hard_timeout,
            eager_refresh: o.eager_refresh,
            sliding: None,
            flags: 0,
            size: None,
            explicit_ttl: None,
        }
    }

    /// The TTL the call's options set themselves (`ttl` or `sliding`), not the builder's.
    pub(crate) fn explicit_ttl(&self) -> Option<Duration> {
        self.explicit_ttl
    }
    #[inline]
    pub(crate) fn read_l1(&self) -> bool {
        self.flags & SKIP_L1_READ == 0
    }
    #[inline]
    pub(crate) fn write_l1(&self) -> bool {
        self.flags & SKIP_L1_WRITE == 0
    }
    #[inline]
    pub(crate) fn read_l2(&self) -> bool {
        self.flags & SKIP_L2_READ == 0
    }
    #[inline]
    pub(crate) fn write_l2(&self) -> bool {
        self.flags & SKIP_L2_WRITE == 0
    }
    #[inline]
    pub(crate) fn announce(&self) -> bool {
        self.flags & SKIP_BACKPLANE == 0
    }
    #[inline]
    pub(crate) fn compress(&self) -> bool {
        self.flags & NO_COMPRESSION == 0
    }
    /// Writes of a `MultiLevelBackend` view: one overlapped by another local write of its
    /// stripe is not kept in L1 (L2 decides), see [`exact_writes`](Self::exact_writes).
    pub(crate) fn with_exact_writes(mut self) -> Self {
        self.flags |= EXACT_WRITES;
        self
    }
    /// Whether an overlapped write evicts instead of keeping its value for `CONTENDED_TTL`.
    #[inline]
    pub(crate) fn exact_writes(&self) -> bool {
        self.flags & EXACT_WRITES != 0
    }
}

/// What a loader of [`get_or_load_with`](crate::MultiLevelCache::get_or_load_with) is told:
/// the key, and on a refresh the value it replaces and that value's validator (an ETag, a
/// last-modified date, a row version) for a conditional fetch.
///
/// ```
/// use ncm_cache_multilevel::{LoadContext, Loaded};
///
/// async fn fetch_page(ctx: LoadContext<String>) -> Result<Loaded<String>, std::io::Error> {
///     // A conditional request: the origin answers "304 Not Modified" when the ETag matches.
///     if ctx.validator() == Some("\"v7\"") {
///         return Ok(Loaded::not_modified());
///     }
///     Ok(Loaded::value(format!("page {}", ctx.key())).validator("\"v7\""))
/// }
/// ```
#[derive(Debug)]
pub struct LoadContext<T> {
    pub(crate) key: String,
    pub(crate) stale: Option<Arc<T>>,
    pub(crate) validator: Option<Arc<str>>,
}

impl<T> LoadContext<T> {
    /// The key being loaded.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The value this load refreshes (an eager refresh, or an expired value kept by fail-safe),
    /// if this instance holds one.
    pub fn stale_value(&self) -> Option<&Arc<T>> {
        self.stale.as_ref()
    }

    /// The validator the loader gave with [`stale_value`](Self::stale_value) (see
    /// [`Loaded::validator`]); `None` without one. Kept in this instance's L1 with the value:
    /// an instance that read the value from L2 has none, and loads in full.
    pub fn validator(&self) -> Option<&str> {
        self.validator.as_deref()
    }
}

/// What a loader of [`get_or_load_with`](crate::MultiLevelCache::get_or_load_with) answers:
/// a value, "not found", or "not modified" (keep the stale value) — and, adaptive caching, how
/// to cache it: its TTL, tags, or not at all.
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_multilevel::Loaded;
///
/// # struct Doc { draft: bool }
/// # let doc = Doc { draft: true };
/// // Drafts change often: cache them briefly.
/// let answer = if doc.draft {
///     Loaded::value("draft").ttl(Duration::from_secs(5))
/// } else {
///     Loaded::value("published").tags(["docs"])
/// };
/// # let _ = answer;
/// ```
#[derive(Debug)]
#[must_use]
pub struct Loaded<T> {
    pub(crate) answer: Answer<T>,
    pub(crate) validator: Option<Arc<str>>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) l1_ttl: Option<Duration>,
    pub(crate) cache: bool,
    pub(crate) tags: Vec<String>,
}

#[derive(Debug)]
pub(crate) enum Answer<T> {
    Value(T),
    NotFound,
    NotModified,
}

impl<T> Loaded<T> {
    fn new(answer: Answer<T>) -> Self {
        Self {
            answer,
            validator: None,
            ttl: None,
            l1_ttl: None,
            cache: true,
            tags: Vec::new(),
        }
    }

    /// The loaded value.
    pub fn value(value: T) -> Self {
        Self::new(Answer::Value(value))
    }

    /// Nothing there: cached as "not found" with the builder's `negative_ttl` (in L1), else
    /// not cached.
    pub fn not_found() -> Self {
        Self::new(Answer::NotFound)
    }

    /// The source says the [`stale_value`](LoadContext::stale_value) is still current: it is
    /// kept, and its TTL re-armed in L1 and L2 without writing the payload again (one
    /// `PEXPIRE`; a full write only if L2 lost the entry meanwhile). Answered without a stale
    /// value, the call fails with `InvalidArgument`.
    pub fn not_modified() -> Self {
        Self::new(Answer::NotModified)
    }

    /// The value's validator (ETag, last-modified, version), given back to the next refresh in
    /// [`LoadContext::validator`].
    pub fn validator(mut self, validator: impl Into<Arc<str>>) -> Self {
        self.validator = Some(validator.into());
        self
    }

    /// The TTL of this value in L2 (and the upper bound in L1), over the call's options.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long L1 keeps this value fresh, over the call's options.
    pub fn l1_ttl(mut self, ttl: Duration) -> Self {
        self.l1_ttl = Some(ttl);
        self
    }

    /// Serve the value to the callers of this load, but cache it nowhere (an error page, a
    /// partial result).
    pub fn do_not_cache(mut self) -> Self {
        self.cache = false;
        self
    }

    /// Tags for the entry, recorded in the cache's
    /// [`tag_index`](crate::MultiLevelBuilder::tag_index) before the value is written (a cache
    /// without one fails the call with `Config`), so that invalidating a tag removes it.
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }
}

impl<T> From<Option<T>> for Loaded<T> {
    fn from(value: Option<T>) -> Self {
        value.map_or_else(Self::not_found, Self::value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_options_override_the_builder_and_sliding_bounds_both_ttls() {
        let defaults = Eff::defaults(&Options::default());
        let eff = EntryOptions::new()
            .sliding(Duration::from_secs(2))
            .skip_l1_write()
            .resolve(&defaults)
            .unwrap();
        assert_eq!(eff.l2_ttl, Some(Duration::from_secs(2)));
        assert_eq!(eff.l1_ttl, Duration::from_secs(1));
        assert!(eff.read_l1() && !eff.write_l1() && eff.read_l2() && eff.write_l2());
        let eff = EntryOptions::new()
            .ttl(Duration::from_secs(9))
            .fail_safe(Duration::from_secs(60))
            .resolve(&defaults)
            .unwrap();
        assert_eq!(eff.l2_ttl, Some(Duration::from_secs(9)));
        assert_eq!(eff.max_stale_age, Some(Duration::from_secs(60)));
        assert_eq!(eff.keep_stale, Duration::from_secs(60));
        for zero in [
            EntryOptions::new().ttl(Duration::ZERO),
            EntryOptions::new().l1_ttl(Duration::ZERO),
            EntryOptions::new().sliding(Duration::ZERO),
            EntryOptions::new().fail_safe(Duration::ZERO),
            EntryOptions::new().timeouts(Some(Duration::ZERO), None),
            EntryOptions::new().timeouts(None, Some(Duration::ZERO)),
        ] {
            let err = zero.resolve(&defaults).unwrap_err();
            assert!(
                matches!(&err, CacheError::InvalidArgument(m) if m.contains("greater than zero")),
                "{zero:?}: {err:?}"
            );
        }
        // What turns them off is accepted.
        let eff = EntryOptions::new()
            .no_fail_safe()
            .timeouts(None, None)
            .resolve(&defaults)
            .unwrap();
        assert_eq!(
            (eff.max_stale_age, eff.soft_timeout, eff.hard_timeout),
            (None, None, None)
        );
        // Clamped as the builder's is.
        let eff = EntryOptions::new()
            .eager_refresh(1.5)
            .resolve(&defaults)
            .unwrap();
        assert_eq!(eff.eager_refresh, Some(0.99));
        let eff = EntryOptions::new()
            .eager_refresh(0.0)
            .resolve(&defaults)
            .unwrap();
        assert_eq!(eff.eager_refresh, Some(0.1));
    }

    /// The builder refuses the same zeros (found by review, helper-85: they were accepted and
    /// made a fail-safe that serves nothing or loads abandoned at once).
    #[test]
    fn the_builder_refuses_a_zero_that_would_not_mean_off() {
        use crate::MultiLevelCache;
        use ncm_cache_memory::MemoryBackend;
        let zero = Duration::ZERO;
        let builds = [
            MultiLevelCache::builder(MemoryBackend::new()).fail_safe(zero),
            MultiLevelCache::builder(MemoryBackend::new()).loader_timeouts(Some(zero), None),
            MultiLevelCache::builder(MemoryBackend::new()).loader_timeouts(None, Some(zero)),
            MultiLevelCache::builder(MemoryBackend::new()).negative_ttl(zero),
            MultiLevelCache::builder(MemoryBackend::new()).l2_default_ttl(zero),
        ];
        for b in builds {
            match b.build() {
                Err(CacheError::Config(m)) => assert!(m.contains("greater than zero"), "{m}"),
                Err(e) => panic!("not a Config error: {e:?}"),
                Ok(_) => panic!("a zero was accepted"),
            }
        }
        assert!(
            MultiLevelCache::builder(MemoryBackend::new())
                .l2_default_ttl(None)
                .loader_timeouts(None, None)
                .fail_safe(Duration::from_secs(1))
                .build()
                .is_ok()
        );
    }
}
