//! Cache warming: `warm_cache(configs, concurrency)` and background warming rounds.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use ncm_cache_core::{CacheError, Codec, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::loader::{CacheLoader, read, write};

/// One key to warm, as the original writes it: `{"name": ..., "args": [...], "kwargs": {...}}`.
/// Deserializable, so warming lists can live in configuration; an unknown field is an error.
///
/// How `args` and `kwargs` become the loader's argument (its type `A`):
/// - `args` is the list of positional arguments: one entry is that argument (`[123]` for a
///   `u64` loader; a list entry for a `Vec` loader), several are a tuple (`["rust", 10]` for
///   `(String, u32)`); a value that is not a list is the argument itself (`"args": 123`);
/// - `kwargs` are named arguments: the fields of a struct (or map) argument;
/// - both at once is an error (a Rust loader takes one value: positional or named).
///
/// ```
/// use ncm_cache_loader::WarmConfig;
/// let a = WarmConfig::new("user_data", 123);
/// let b: WarmConfig = serde_json::from_str(r#"{"name": "user_data", "args": 123}"#).unwrap();
/// assert_eq!(a, b);
/// let c = WarmConfig::with_args("search", &("rust", 10)).unwrap();
/// assert_eq!(c.args, serde_json::json!(["rust", 10]));
/// let d: WarmConfig = serde_json::from_str(
///     r#"{"name": "search", "args": [], "kwargs": {"query": "rust", "limit": 10}}"#,
/// ).unwrap();
/// assert_eq!(d.kwargs["limit"], 10);
/// assert!(serde_json::from_str::<WarmConfig>(r#"{"name": "x", "argz": [1]}"#).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmConfig {
    /// The registered loader's name.
    pub name: String,
    /// Positional arguments (see above; `null` or `[]` for a `()` loader).
    #[serde(default)]
    pub args: Value,
    /// Named arguments: the fields of a struct argument.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub kwargs: serde_json::Map<String, Value>,
}

impl WarmConfig {
    /// A config from a name and JSON arguments (anything convertible to a JSON value).
    pub fn new(name: impl Into<String>, args: impl Into<Value>) -> Self {
        Self {
            name: name.into(),
            args: args.into(),
            kwargs: serde_json::Map::new(),
        }
    }

    /// A config from a name and named arguments (a JSON object: the fields of the loader's
    /// struct argument).
    ///
    /// ```
    /// let c = ncm_cache_loader::WarmConfig::with_kwargs("search", serde_json::json!({"q": "rust"})).unwrap();
    /// assert_eq!(c.kwargs["q"], "rust");
    /// ```
    pub fn with_kwargs(name: impl Into<String>, kwargs: Value) -> Result<Self> {
        let Value::Object(kwargs) = kwargs else {
            return Err(CacheError::InvalidArgument(
                "named arguments must be a JSON object".into(),
            ));
        };
        Ok(Self {
            name: name.into(),
            args: Value::Null,
            kwargs,
        })
    }

    /// A config from a name and typed arguments.
    pub fn with_args<A: Serialize + ?Sized>(name: impl Into<String>, args: &A) -> Result<Self> {
        let args = serde_json::to_value(args).map_err(|e| {
            CacheError::InvalidArgument(format!("warming arguments cannot be serialized: {e}"))
        })?;
        Ok(Self::new(name, args))
    }
}

/// The result of warming one entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct WarmResult {
    /// The loader's name.
    pub name: String,
    /// The warmed key, when the arguments fitted the loader.
    pub key: Option<String>,
    /// `Ok` when the value was loaded and written, else why not.
    pub outcome: std::result::Result<(), String>,
    /// How long the entry took.
    pub elapsed: Duration,
}

impl WarmResult {
    /// `true` when the entry was warmed.
    pub fn is_ok(&self) -> bool {
        self.outcome.is_ok()
    }
}

/// Progress of a warming run, passed to the hook set with
/// [`CacheLoader::on_warm_progress`] after every entry.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct WarmProgress {
    /// The background round (1, 2, ...), or 0 for a direct `warm_cache` call.
    pub round: u64,
    /// Entries finished so far in this run.
    pub completed: usize,
    /// Entries that failed so far in this run.
    pub failed: usize,
    /// Entries in this run.
    pub total: usize,
    /// The entry that just finished.
    pub last: WarmResult,
}

type ProgressHook = Arc<dyn Fn(WarmProgress) + Send + Sync>;

struct Background {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

/// The loader's warming state: the background task, its round counter and the progress hook.
#[derive(Default)]
pub(crate) struct WarmingState {
    task: Mutex<Option<Background>>,
    rounds: Arc<AtomicU64>,
    hook: RwLock<Option<ProgressHook>>,
}

impl<C: Codec> CacheLoader<C> {
    /// Loads every entry now, at most `concurrency` at a time, overwriting cached values (the
    /// original's `warm_cache(configs, concurrency)`). Returns one result per entry, in the
    /// order given; failures are reported, not raised.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use ncm_cache_core::{Cache, CacheStrategy};
    /// # use ncm_cache_loader::{CacheLoader, WarmConfig};
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// # let cache = Cache::new(ncm_cache_memory::MemoryBackend::new(), ncm_cache_codec::Serializer::default());
    /// let loader = CacheLoader::new(cache);
    /// loader.register_loader(
    ///     "user_data",
    ///     |id: u64| async move { Ok::<_, std::io::Error>(format!("user {id}")) },
    ///     None,
    ///     CacheStrategy::CacheAside,
    /// )?;
    /// let configs = vec![WarmConfig::new("user_data", 123), WarmConfig::new("user_data", 456)];
    /// let results = loader.warm_cache(configs, 5).await;
    /// assert!(results.iter().all(|r| r.is_ok()));
    /// # Ok::<(), ncm_cache_core::CacheError>(())
    /// # }).unwrap();
    /// ```
    pub async fn warm_cache(
        &self,
        configs: impl IntoIterator<Item = WarmConfig>,
        concurrency: usize,
    ) -> Vec<WarmResult> {
        self.warm_round(configs.into_iter().collect(), concurrency, 0)
            .await
    }

    /// Sets the hook called after every warmed entry (direct and background runs).
    pub fn on_warm_progress(&self, hook: impl Fn(WarmProgress) + Send + Sync + 'static) {
        *write(&self.inner.warming.hook) = Some(Arc::new(hook));
    }

    /// Warms `configs` now and then every `interval` in a background task, until
    /// [`stop_background_warming`](Self::stop_background_warming) (the original's
    /// `start_background_warming`). A running background warming is stopped first.
    ///
    /// Fails when `interval` is zero or no tokio runtime is running. The task holds only a weak
    /// reference: dropping the last clone of the loader ends it too.
    pub async fn start_background_warming(
        &self,
        configs: Vec<WarmConfig>,
        interval: Duration,
        concurrency: usize,
    ) -> Result<()> {
        if interval.is_zero() {
            return Err(CacheError::InvalidArgument(
                "the background warming interval must be greater than zero".into(),
            ));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            CacheError::Config("background warming needs a running tokio runtime".into())
        })?;
        self.stop_background_warming().await;
        let (stop, mut stopped) = watch::channel(false);
        let weak = Arc::downgrade(&self.inner);
        let rounds = Arc::clone(&self.inner.warming.rounds);
        let logging = self.inner.enable_logging;
        let handle = runtime.spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = stopped.changed() => break,
                    _ = ticker.tick() => {}
                }
                let Some(inner) = weak.upgrade() else { break };
                let loader = CacheLoader { inner };
                let round = rounds.load(Ordering::Relaxed) + 1;
                tokio::select! {
                    biased;
                    _ = stopped.changed() => break,
                    _ = loader.warm_round(configs.clone(), concurrency, round) => {
                        rounds.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if logging {
                tracing::debug!("background warming stopped");
            }
        });
        *lock(&self.inner.warming.task) = Some(Background { stop, handle });
        Ok(())
    }

    /// Stops background warming and waits until its task has ended (an entry being loaded is
    /// abandoned). Returns `false` when none was running; calling it again is harmless.
    pub async fn stop_background_warming(&self) -> bool {
        let Some(background) = lock(&self.inner.warming.task).take() else {
            return false;
        };
        let _ = background.stop.send(true);
        if let Err(e) = background.handle.await
            && self.inner.enable_logging
        {
            tracing::warn!(error = %e, "background warming task ended abnormally");
        }
        true
    }

    /// `true` while background warming runs.
    pub fn is_background_warming(&self) -> bool {
        lock(&self.inner.warming.task)
            .as_ref()
            .is_some_and(|b| !b.handle.is_finished())
    }

    /// Background warming rounds completed so far.
    pub fn warming_rounds(&self) -> u64 {
        self.inner.warming.rounds.load(Ordering::Relaxed)
    }

    async fn warm_round(
        &self,
        configs: Vec<WarmConfig>,
        concurrency: usize,
        round: u64,
    ) -> Vec<WarmResult> {
        let total = configs.len();
        let hook = read(&self.inner.warming.hook).clone();
        let (completed, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let started = Instant::now();
        let mut results: Vec<(usize, WarmResult)> = futures_util::stream::iter(
            configs
                .into_iter()
                .enumerate()
                .map(|(i, config)| async move { (i, self.warm_one(config).await) }),
        )
        .buffer_unordered(concurrency.max(1))
        .inspect(|(_, result)| {
            let done = completed.fetch_add(1, Ordering::Relaxed) + 1;
            let bad = failed.fetch_add(usize::from(!result.is_ok()), Ordering::Relaxed)
                + usize::from(!result.is_ok());
            if let Some(hook) = &hook {
                hook(WarmProgress {
                    round,
                    completed: done,
                    failed: bad,
                    total,
                    last: result.clone(),
                });
            }
        })
        .collect()
        .await;
        results.sort_unstable_by_key(|(i, _)| *i);
        if self.inner.enable_logging {
            tracing::info!(
                round,
                total,
                failed = failed.load(Ordering::Relaxed),
                elapsed = ?started.elapsed(),
                "cache warming finished"
            );
        }
        results.into_iter().map(|(_, r)| r).collect()
    }

    async fn warm_one(&self, config: WarmConfig) -> WarmResult {
        let started = Instant::now();
        let (key, outcome) = match self.registered(&config.name) {
            // A panicking loader fails its entry: the round (and background warming, whose
            // task the panic would end for good) goes on.
            Ok(registered) => {
                let warm =
                    std::panic::AssertUnwindSafe(registered.warm(self, config.args, config.kwargs));
                futures_util::FutureExt::catch_unwind(warm)
                    .await
                    .unwrap_or_else(|panic| (None, Err(crate::panicked(&config.name, &*panic))))
            }
            Err(e) => (None, Err(e)),
        };
        WarmResult {
            name: config.name,
            key,
            outcome: outcome.map_err(|e| e.to_string()),
            elapsed: started.elapsed(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded value is replaced or taken whole: a panic cannot leave it inconsistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
