//! One instance of the cross-process stampede test (`tests/tests/load_processes.rs`): a
//! `MultiLevelCache::over_redis` (L1 + Redis L2 + backplane + distributed lock) under a
//! `CacheLoader`, a `#[cache_loader]` function or `CacheStrategies::read_through`, through
//! `Cache::new(multi.as_backend(), codec)`.
//!
//! Environment: `NCM_REDIS_URL` (one node) or `NCM_REDIS_NODES` (cluster seed URLs,
//! comma-separated), `NCM_REDIS_PREFIX`, `NCM_LOAD_MODE` (`loader`, `macro`, `strategies`;
//! `option`: a `#[cache_loader]` returning `Option` whose source has nothing; `around`: a
//! `CacheLoader` loader with `WriteAround`, which stores nothing),
//! `NCM_LOAD_MS` (how long the loader takes), `NCM_LOAD_CALLS` (concurrent calls per round),
//! `NCM_LOCK_TTL_MS` (the lock's TTL; waiters wait ten times as long).
//!
//! Input lines: `go <key>` runs a round of concurrent calls of `key`. Output lines: `ready` once
//! subscribed; `ran <key>` each time the loader runs, then `began <key> <unix ms>`; `got
//! <value>` per call (`got none` for
//! `None`); `done` after a round; `error <e>` for a failed call.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../shared/worker_redis.rs"]
mod worker_redis;

use std::io::{BufRead, Write};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ncm_cache::core::{Cache, CacheStrategy};
use ncm_cache::loader::{CacheLoader, cache_loader};
use ncm_cache::{CacheStrategies, MultiLevelCache, RedisCache, RedisConfig, Serializer};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

fn millis(name: &str) -> Duration {
    Duration::from_millis(env(name).parse().expect(name))
}

fn say(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn redis_config() -> RedisConfig {
    let mut c = worker_redis::from_env();
    c.health_check_interval = Some(Duration::from_millis(200));
    c
}

/// The source: slow, and says each time it runs.
async fn source(key: String) -> Result<String, std::io::Error> {
    say(&format!("ran {key}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    say(&format!("began {key} {now}"));
    tokio::time::sleep(millis("NCM_LOAD_MS")).await;
    Ok(format!("value of {key}"))
}

static LOADER: OnceLock<CacheLoader> = OnceLock::new();

#[cache_loader(loader = LOADER.get().unwrap(), ttl = 60)]
async fn from_macro(key: String) -> Result<String, std::io::Error> {
    source(key).await
}

#[cache_loader(loader = LOADER.get().unwrap(), ttl = 60)]
async fn nothing(key: String) -> Option<String> {
    let _ = source(key).await;
    None
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let redis = RedisCache::connect(redis_config()).await.unwrap();
    let lock_ttl = millis("NCM_LOCK_TTL_MS");
    let multi = MultiLevelCache::over_redis(&redis)
        .name("stampede")
        .distributed_lock(Arc::clone(redis.redis_backend()), lock_ttl, lock_ttl * 10)
        .build()
        .unwrap();
    let cache = Cache::new(multi.as_backend(), Serializer::default());
    let loader = CacheLoader::new(cache.clone());
    for (name, strategy) in [
        ("item", CacheStrategy::CacheAside),
        ("around", CacheStrategy::WriteAround),
    ] {
        loader
            .register_loader(name, source, Duration::from_secs(60), strategy)
            .unwrap();
    }
    LOADER.set(loader.clone()).unwrap();
    let strategies = CacheStrategies::new(cache);
    for _ in 0..500 {
        if multi.l1_active() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    say("ready");
    let calls: usize = env("NCM_LOAD_CALLS").parse().unwrap();
    let mode = env("NCM_LOAD_MODE");
    let mut lines = std::io::stdin().lock().lines();
    while let Some(Ok(line)) = lines.next() {
        let Some(key) = line.strip_prefix("go ") else {
            continue;
        };
        let round = (0..calls).map(|_| {
            let (key, loader, strategies) = (key.to_owned(), loader.clone(), strategies.clone());
            let mode = mode.clone();
            tokio::spawn(async move {
                match mode.as_str() {
                    "loader" => loader.load::<String, String>("item", key).await,
                    "around" => loader.load::<String, String>("around", key).await,
                    "macro" => from_macro(key)
                        .await
                        .map_err(ncm_cache::core::CacheError::loader),
                    "option" => Ok(nothing(key).await.unwrap_or_else(|| "none".into())),
                    _ => {
                        let k = key.clone();
                        strategies
                            .read_through(&key, move || source(k), Duration::from_secs(60))
                            .await
                    }
                }
            })
        });
        for call in futures_join(round).await {
            match call.unwrap() {
                Ok(v) => say(&format!("got {v}")),
                Err(e) => say(&format!("error {e}")),
            }
        }
        say("done");
    }
}

async fn futures_join<T>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::new();
    for t in tasks.collect::<Vec<_>>() {
        out.push(t.await);
    }
    out
}
